package main

import (
	"fmt"
	"maps"
	"slices"
	"sort"
	"strings"

	"helm.sh/helm/v3/pkg/chart"
	"helm.sh/helm/v3/pkg/chart/loader"
	"helm.sh/helm/v3/pkg/chartutil"
	"helm.sh/helm/v3/pkg/engine"
	"helm.sh/helm/v3/pkg/lint"
	"helm.sh/helm/v3/pkg/lint/support"
	"helm.sh/helm/v3/pkg/releaseutil"
)

const chartDir = "deploy/helm/levee"

// The cluster the chart is rendered for: the oldest its kubeVersion allows.
var kubeVersion = chartutil.KubeVersion{Version: "v1.30.0", Major: "1", Minor: "30"}

// valueSet is one way of installing the chart, and the objects it must
// produce (kind → count).
type valueSet struct {
	name   string
	values map[string]any
	want   map[string]int
}

// valueSets are the installs checked: the defaults, and every optional part
// on (KEDA with both triggers, the ServiceMonitor, the HPA, the PDB, an
// admin key).
func valueSets() []valueSet {
	base := map[string]int{"ConfigMap": 1, "ServiceAccount": 1, "Deployment": 2, "Service": 2, "PodDisruptionBudget": 1, "Job": 1}
	all := maps.Clone(base)
	all["HorizontalPodAutoscaler"], all["ScaledObject"], all["ServiceMonitor"] = 1, 1, 1
	return []valueSet{
		{name: "default values", values: map[string]any{}, want: base},
		{name: "every option on", want: all, values: map[string]any{
			"gateway": map[string]any{
				"autoscaling": map[string]any{"enabled": true},
				"pdb":         map[string]any{"enabled": true},
			},
			"worker": map[string]any{"keda": map[string]any{
				"enabled":       true,
				"prometheus":    map[string]any{"enabled": true, "authenticationRef": "prometheus-auth"},
				"natsJetStream": map[string]any{"enabled": true, "consumer": "levee_jobs_batch_gpt-4o_2f1c6d4e-8b1a-4c4e-9a53-0d2b8f7e6a10"},
			}},
			"serviceMonitor": map[string]any{"enabled": true, "labels": map[string]any{"release": "kube-prometheus-stack"}},
			"secrets":        map[string]any{"adminKey": map[string]any{"name": "levee-admin"}},
			"extraEnv":       []any{map[string]any{"name": "LEVEE_LOG_LEVEL", "value": "debug"}},
		}},
	}
}

// chart lints and renders the chart for each value set and validates what
// it renders.
func (c *checker) chart() []error {
	dir := c.path(chartDir)
	ch, err := loader.Load(dir)
	if err != nil {
		return []error{problem{file: chartDir, msg: err.Error()}}
	}
	var errs []error
	if kv := ch.Metadata.KubeVersion; kv != "" && !chartutil.IsCompatibleRange(kv, kubeVersion.String()) {
		errs = append(errs, problem{file: chartDir + "/Chart.yaml", field: "kubeVersion", msg: fmt.Sprintf("%q excludes %s, the version the chart is checked for", kv, kubeVersion.Version)})
	}
	for _, vs := range valueSets() {
		linter := lint.AllWithKubeVersion(dir, vs.values, "levee", &kubeVersion)
		for _, m := range linter.Messages {
			// Info messages (a missing icon) are advice, not faults.
			if m.Severity >= support.WarningSev {
				errs = append(errs, problem{file: chartDir + "/" + m.Path, msg: "helm lint (" + vs.name + "): " + m.Err.Error()})
			}
		}
		ms, err := render(ch, vs.values)
		if err != nil {
			errs = append(errs, problem{file: chartDir, msg: "rendering with " + vs.name + ": " + err.Error()})
			continue
		}
		errs = append(errs, c.validateRender(ms, vs)...)
	}
	return errs
}

// manifest is one rendered object and the template it came from.
type manifest struct {
	source, body string
}

// render renders the chart as `helm install --dry-run` would for a new
// release, in strict mode: a template that reads a value that does not exist
// is an error, not an empty string.
func render(ch *chart.Chart, values map[string]any) ([]manifest, error) {
	caps := chartutil.DefaultCapabilities.Copy()
	caps.KubeVersion = kubeVersion
	opts := chartutil.ReleaseOptions{Name: "levee", Namespace: "levee", Revision: 1, IsInstall: true}
	vals, err := chartutil.ToRenderValues(ch, values, opts, caps)
	if err != nil {
		return nil, err
	}
	out, err := engine.Engine{Strict: true}.Render(ch, vals)
	if err != nil {
		return nil, err
	}
	var ms []manifest
	for _, name := range slices.Sorted(maps.Keys(out)) {
		if strings.HasSuffix(name, "NOTES.txt") {
			continue
		}
		docs := releaseutil.SplitManifests(out[name])
		keys := slices.Collect(maps.Keys(docs))
		sort.Sort(releaseutil.BySplitManifestsOrder(keys))
		for _, k := range keys {
			if body := strings.TrimSpace(docs[k]); body != "" {
				ms = append(ms, manifest{source: chartDir + "/" + strings.TrimPrefix(name, ch.Name()+"/"), body: body})
			}
		}
	}
	return ms, nil
}
