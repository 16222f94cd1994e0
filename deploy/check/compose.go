package main

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/compose-spec/compose-go/v2/loader"
	"github.com/compose-spec/compose-go/v2/types"
	"sigs.k8s.io/yaml"

	"github.com/levee-gw/levee/config"
)

const composeFile = "deploy/compose.yaml"

// compose loads compose.yaml as `docker compose` does (the Compose
// Specification's schema, interpolation, anchors, paths) and checks that it
// is the whole system: Postgres, three NATS servers with their own volumes,
// migrations that gate every Levee process, two gateways, two workers, the
// simulator, and a Prometheus that scrapes every Levee process.
func (c *checker) compose() []error {
	details := types.ConfigDetails{
		WorkingDir:  c.path("deploy"),
		ConfigFiles: []types.ConfigFile{{Filename: c.path(composeFile)}},
		Environment: types.Mapping{},
	}
	p, err := loader.LoadWithContext(context.Background(), details, func(o *loader.Options) { o.SetProjectName("levee", true) })
	if err != nil {
		return []error{problem{file: composeFile, msg: err.Error()}}
	}
	var errs []error
	add := func(field, format string, args ...any) {
		errs = append(errs, problem{file: composeFile, field: field, msg: fmt.Sprintf(format, args...)})
	}
	for _, name := range []string{"postgres", "migrate", "sim", "prometheus", "grafana"} {
		if _, ok := p.Services[name]; !ok {
			add("services", "no %s service", name)
		}
	}
	var nats []string
	for _, name := range slices.Sorted(mapKeys(p.Services)) {
		if strings.HasPrefix(p.Services[name].Image, "nats:") {
			nats = append(nats, name)
		}
	}
	// Levee's processes, by subcommand.
	roles := map[string][]string{}
	for _, name := range slices.Sorted(mapKeys(p.Services)) {
		s := p.Services[name]
		field := "services." + name
		for i, v := range s.Volumes {
			if v.Type == types.VolumeTypeBind {
				if _, err := os.Stat(v.Source); err != nil {
					add(fmt.Sprintf("%s.volumes[%d]", field, i), "bind source %s: %v", v.Source, err)
				}
			}
		}
		if strings.HasPrefix(s.Image, "nats:") {
			if !hasVolumeAt(s, "/data", types.VolumeTypeVolume) {
				add(field+".volumes", "a NATS server needs a volume of its own at /data (its JetStream store)")
			}
			continue
		}
		if s.Build == nil || len(s.Command) == 0 {
			continue
		}
		role := s.Command[0]
		roles[role] = append(roles[role], name)
		if role == "serve" || role == "worker" {
			dep, ok := s.DependsOn["migrate"]
			if !ok || dep.Condition != types.ServiceConditionCompletedSuccessfully {
				add(field+".depends_on.migrate", "must be condition service_completed_successfully: migrations run alone, before any Levee process")
			}
			errs = append(errs, c.composeLeveeConfig(field, s, len(nats))...)
		}
	}
	if len(nats) < 3 {
		add("services", "%d NATS servers (%v), want a cluster of 3", len(nats), nats)
	}
	for role, want := range map[string]int{"serve": 2, "worker": 2, "migrate": 1, "sim": 1} {
		if len(roles[role]) < want {
			add("services", "%d levee %s services (%v), want %d", len(roles[role]), role, roles[role], want)
		}
	}
	errs = append(errs, c.composeScrapes(p, roles)...)
	return errs
}

func mapKeys[V any](m map[string]V) func(func(string) bool) {
	return func(yield func(string) bool) {
		for k := range m {
			if !yield(k) {
				return
			}
		}
	}
}

func hasVolumeAt(s types.ServiceConfig, target, kind string) bool {
	for _, v := range s.Volumes {
		if v.Target == target && v.Type == kind {
			return true
		}
	}
	return false
}

// flagValue returns the value of --name in a command.
func flagValue(cmd []string, name string) string {
	for i, a := range cmd {
		if a == name && i+1 < len(cmd) {
			return cmd[i+1]
		}
		if v, ok := strings.CutPrefix(a, name+"="); ok {
			return v
		}
	}
	return ""
}

// composeLeveeConfig loads the config file a Levee service is given, as
// `levee serve` would with the service's environment, and checks that the
// jobs stream is replicated on every NATS server.
func (c *checker) composeLeveeConfig(field string, s types.ServiceConfig, natsServers int) []error {
	path := flagValue(s.Command, "--config")
	var source string
	for _, v := range s.Volumes {
		if v.Target == path || v.Target == filepath.Dir(path) {
			source = filepath.Join(v.Source, strings.TrimPrefix(path, v.Target))
		}
	}
	if source == "" {
		return []error{problem{file: composeFile, field: field + ".command", msg: fmt.Sprintf("--config %s is not mounted", path)}}
	}
	rel, _ := filepath.Rel(c.root, source)
	raw, err := os.ReadFile(source)
	if err != nil {
		return []error{problem{file: rel, msg: err.Error()}}
	}
	getenv := func(name string) string {
		if v := s.Environment[name]; v != nil {
			return *v
		}
		return ""
	}
	cfg, err := config.Parse(raw, getenv)
	if err != nil {
		return []error{problem{file: rel, msg: err.Error() + " (with " + field + "'s environment)"}}
	}
	if cfg.Queue.Replicas != natsServers {
		return []error{problem{file: rel, field: "queue.replicas", msg: fmt.Sprintf("%d, but compose runs %d NATS servers", cfg.Queue.Replicas, natsServers)}}
	}
	return nil
}

// composeScrapes checks that Prometheus (its config and rules mounted from
// deploy/prometheus) scrapes every gateway and worker on the port it
// serves /metrics on.
func (c *checker) composeScrapes(p *types.Project, roles map[string][]string) []error {
	const file = "deploy/prometheus/prometheus.yml"
	raw, err := os.ReadFile(c.path(file))
	if err != nil {
		return []error{problem{file: file, msg: err.Error()}}
	}
	var prom struct {
		RuleFiles     []string `json:"rule_files"`
		ScrapeConfigs []struct {
			StaticConfigs []struct {
				Targets []string `json:"targets"`
			} `json:"static_configs"`
		} `json:"scrape_configs"`
	}
	if err := yaml.Unmarshal(raw, &prom); err != nil {
		return []error{problem{file: file, msg: err.Error()}}
	}
	var errs []error
	if !slices.Contains(prom.RuleFiles, "alerts.yaml") {
		errs = append(errs, problem{file: file, field: "rule_files", msg: "does not load alerts.yaml"})
	}
	targets := map[string]bool{}
	for _, sc := range prom.ScrapeConfigs {
		for _, st := range sc.StaticConfigs {
			for _, t := range st.Targets {
				targets[t] = true
			}
		}
	}
	for _, role := range []string{"serve", "worker"} {
		for _, name := range roles[role] {
			s := p.Services[name]
			port := "8080"
			if role == "worker" {
				_, port, _ = net.SplitHostPort(flagValue(s.Command, "--metrics"))
			} else if cfgPort := c.listenPort(s); cfgPort != "" {
				port = cfgPort
			}
			if !targets[net.JoinHostPort(name, port)] {
				errs = append(errs, problem{file: file, field: "scrape_configs", msg: fmt.Sprintf("does not scrape %s (%s:%s)", name, name, port)})
			}
		}
	}
	return errs
}

// listenPort is the port a gateway's config listens on ("" if unknown).
func (c *checker) listenPort(s types.ServiceConfig) string {
	path := flagValue(s.Command, "--config")
	for _, v := range s.Volumes {
		if v.Target == path {
			raw, err := os.ReadFile(v.Source)
			if err != nil {
				return ""
			}
			var cfg struct {
				Listen string `json:"listen"`
			}
			if yaml.Unmarshal(raw, &cfg) != nil {
				return ""
			}
			_, port, _ := net.SplitHostPort(cfg.Listen)
			return port
		}
	}
	return ""
}
