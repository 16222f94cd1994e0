// Command check validates Levee's deploy/ folder without a cluster or a
// network: the Helm chart (linted, rendered with its defaults and with every
// optional part on, each object decoded strictly into its Kubernetes type or
// checked against KEDA's CRD schema), the compose file, the Levee configs
// they carry, the Grafana dashboard, the Dockerfile, and every PromQL
// expression they hold (through promtool). It builds the image only where a
// Docker engine answers.
//
//	cd deploy/check && go run . -root ../..
package main

import (
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// problem is one thing wrong, named by its file and, where there is one,
// its field.
type problem struct {
	file, field, msg string
}

func (p problem) Error() string {
	if p.field == "" {
		return p.file + ": " + p.msg
	}
	return p.file + ": " + p.field + ": " + p.msg
}

func main() {
	root := flag.String("root", "../..", "the repository root")
	build := flag.Bool("build", true, "build the image when a Docker engine answers")
	flag.Parse()
	abs, err := filepath.Abs(*root)
	if err != nil {
		fmt.Fprintln(os.Stderr, "check:", err)
		os.Exit(2)
	}
	c := &checker{root: abs}
	steps := []struct {
		name string
		run  func() []error
	}{
		{"helm chart deploy/helm/levee", c.chart},
		{"compose deploy/compose.yaml", c.compose},
		{"grafana deploy/grafana", c.dashboards},
		{"dockerfile deploy/Dockerfile", c.dockerfile},
	}
	failed := false
	for _, s := range steps {
		errs := s.run()
		if len(errs) == 0 {
			fmt.Printf("ok    %s\n", s.name)
			continue
		}
		failed = true
		fmt.Printf("FAIL  %s\n", s.name)
		for _, e := range errs {
			fmt.Printf("      %s\n", strings.ReplaceAll(e.Error(), "\n", "\n        "))
		}
	}
	if failed {
		os.Exit(1)
	}
	if *build {
		if err := c.dockerBuild(); err != nil {
			fmt.Printf("FAIL  docker build: %v\n", err)
			os.Exit(1)
		}
	}
}

// checker holds what the checks share.
type checker struct {
	root string
}

func (c *checker) path(rel string) string { return filepath.Join(c.root, filepath.FromSlash(rel)) }
