package main

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"

	"sigs.k8s.io/yaml"
)

// checkPromQL parses expr with promtool (make deploy-check installs it), as
// a recording rule: Prometheus' own parser, so an expression Grafana or
// KEDA would send and Prometheus refuse is found here.
func checkPromQL(expr string) error {
	promtool, err := exec.LookPath("promtool")
	if err != nil {
		return errors.New("promtool not found (make deploy-check installs it): cannot check PromQL")
	}
	dir, err := os.MkdirTemp("", "levee-check-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	rules := map[string]any{"groups": []any{map[string]any{"name": "check", "rules": []any{
		map[string]any{"record": "levee_check", "expr": expr}}}}}
	raw, err := yaml.Marshal(rules)
	if err != nil {
		return err
	}
	file := filepath.Join(dir, "rules.yaml")
	if err := os.WriteFile(file, raw, 0o600); err != nil {
		return err
	}
	out, err := exec.Command(promtool, "check", "rules", file).CombinedOutput()
	if err != nil {
		msg := strings.TrimSpace(strings.ReplaceAll(string(out), file, "expression"))
		return fmt.Errorf("PromQL %q: %s", expr, msg)
	}
	return nil
}

// grafanaVariable is a dashboard variable in an expression: $name or
// ${name}, Grafana's $__rate_interval included.
var grafanaVariable = regexp.MustCompile(`\$\{?[A-Za-z_][A-Za-z0-9_]*\}?`)

// withoutGrafanaVariables puts values where Grafana would put them: a range
// for $__rate_interval (and $__interval), a regular expression for the
// others (they stand in label matchers).
func withoutGrafanaVariables(expr string) string {
	return grafanaVariable.ReplaceAllStringFunc(expr, func(v string) string {
		switch strings.Trim(v, "${}") {
		case "__rate_interval", "__interval", "__range":
			return "1m"
		}
		return ".*"
	})
}
