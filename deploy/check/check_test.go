package main

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// Each test breaks one thing the checker promises to catch and asserts the
// problem names the file and the field, so a checker that passes everything
// fails here.

// wantProblem fails unless some error contains every one of parts.
func wantProblem(t *testing.T, errs []error, parts ...string) {
	t.Helper()
	for _, e := range errs {
		ok := true
		for _, p := range parts {
			ok = ok && strings.Contains(e.Error(), p)
		}
		if ok {
			return
		}
	}
	t.Errorf("no problem names %q; got %v", parts, errs)
}

func TestUnknownAndMistypedFieldsAreNamed(t *testing.T) {
	c := &checker{}
	_, errs := c.decode(manifest{source: "templates/x.yaml", body: `
apiVersion: apps/v1
kind: Deployment
metadata: {name: x}
spec:
  selector: {matchLabels: {a: b}}
  template:
    metadata: {labels: {a: b}}
    spec:
      containers:
        - name: x
          image: levee
          imagePullPolicyy: Always
`})
	wantProblem(t, errs, "templates/x.yaml", `unknown field "spec.template.spec.containers[0].imagePullPolicyy"`)
	_, errs = c.decode(manifest{source: "templates/x.yaml", body: "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\nspec: {replicas: two}\n"})
	wantProblem(t, errs, "templates/x.yaml", "spec.replicas")
	_, errs = c.decode(manifest{source: "templates/y.yaml", body: "apiVersion: v1\nkind: Service\nmetadata: {name: y}\nspec: {type: ClusterIP, type: NodePort}\n"})
	wantProblem(t, errs, "templates/y.yaml", "type")
	_, errs = c.decode(manifest{source: "templates/z.yaml", body: "apiVersion: v1\nkind: Pod\nmetadata: {name: z}\n"})
	wantProblem(t, errs, "templates/z.yaml", "apiVersion", "no schema")
}

const scaledObjectYAML = `
apiVersion: keda.sh/v1alpha1
kind: ScaledObject
metadata: {name: w}
spec:
  scaleTargetRef: {name: w}
  minReplicaCount: 1
  maxReplicaCount: 10
  triggers:
    - type: prometheus
      metadata: {serverAddress: "http://p:9090", query: "sum(levee_queue_depth)", threshold: "100"}
`

func TestScaledObjectIsCheckedAgainstKEDAsCRD(t *testing.T) {
	c := &checker{}
	o, errs := c.decode(manifest{source: "so.yaml", body: scaledObjectYAML})
	if len(errs) != 0 {
		t.Fatalf("a valid ScaledObject: %v", errs)
	}
	if errs := c.scaledObjectProblems(o, o.value.(*scaledObject)); len(errs) != 0 && !promtoolMissing(errs) {
		t.Fatalf("a valid ScaledObject: %v", errs)
	}
	for _, tc := range []struct{ from, to, field, msg string }{
		{"scaleTargetRef:", "scaleTargetReff:", "spec.scaleTargetReff", "unknown field"},
		{"metadata: {serverAddress", "metdata: {serverAddress", "spec.triggers[0].metdata", "unknown field"},
		{"minReplicaCount: 1", "minReplicaCount: one", "spec.minReplicaCount", "must be an integer"},
		{"metadata: {name: w}", "metadata: {name: w, labelz: {}}", "metadata", `unknown field "labelz"`},
		{"  scaleTargetRef: {name: w}\n", "", "spec.scaleTargetRef", "required"},
	} {
		body := strings.Replace(scaledObjectYAML, tc.from, tc.to, 1)
		_, errs := c.decode(manifest{source: "so.yaml", body: body})
		wantProblem(t, errs, "so.yaml", tc.field, tc.msg)
	}
	// What the CRD's schema cannot say: its CEL rule, and what the scaler
	// needs in metadata.
	body := strings.Replace(scaledObjectYAML, "minReplicaCount: 1", "minReplicaCount: 20", 1)
	body = strings.Replace(body, "type: prometheus", "type: nats-jetstream", 1)
	o, _ = c.decode(manifest{source: "so.yaml", body: body})
	errs = c.scaledObjectProblems(o, o.value.(*scaledObject))
	wantProblem(t, errs, "so.yaml", "spec.minReplicaCount", "above maxReplicaCount")
	wantProblem(t, errs, "so.yaml", "spec.triggers[0].metadata.consumer", "required")
}

func promtoolMissing(errs []error) bool {
	return len(errs) == 1 && strings.Contains(errs[0].Error(), "promtool not found")
}

func TestChartPromisesAreChecked(t *testing.T) {
	c := &checker{}
	ms := []manifest{
		{source: "templates/d.yaml", body: `
apiVersion: apps/v1
kind: Deployment
metadata: {name: d}
spec:
  replicas: 2
  selector: {matchLabels: {app: d}}
  template:
    metadata: {labels: {app: d}}
    spec:
      containers:
        - name: d
          image: levee
          ports: [{name: http, containerPort: 8080}]
          livenessProbe: {httpGet: {path: /health, port: http}}
          readinessProbe: {httpGet: {path: /readyz, port: web}}
          securityContext: {allowPrivilegeEscalation: false}
`},
		{source: "templates/s.yaml", body: `
apiVersion: v1
kind: Service
metadata: {name: d}
spec:
  selector: {app: d}
  ports: [{name: http, port: 80, targetPort: api}]
`},
		{source: "templates/h.yaml", body: `
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata: {name: d}
spec:
  scaleTargetRef: {apiVersion: apps/v1, kind: Deployment, name: d}
  minReplicas: 2
  maxReplicas: 4
`},
	}
	errs := c.validateRender(ms, valueSet{name: "test"})
	for _, want := range [][]string{
		{"templates/d.yaml", "spec.template.spec.containers[0].securityContext.runAsNonRoot"},
		{"templates/d.yaml", "spec.template.spec.containers[0].securityContext.readOnlyRootFilesystem"},
		{"templates/d.yaml", "spec.template.spec.containers[0].resources.requests"},
		{"templates/d.yaml", "livenessProbe.httpGet.path", `"/health"`},
		{"templates/d.yaml", "readinessProbe.httpGet.port", `"web"`},
		{"templates/s.yaml", "spec.ports[0].targetPort", `"api"`},
		{"templates/h.yaml", "spec.scaleTargetRef.name", "sets spec.replicas"},
	} {
		wantProblem(t, errs, want...)
	}
}

func TestTheChartRendersWhatItShould(t *testing.T) {
	c := &checker{root: "../.."}
	for _, e := range c.chart() {
		t.Error(e)
	}
	// A render that lacks a kind it should have is a problem.
	errs := c.validateRender(nil, valueSet{name: "empty", want: map[string]int{"Deployment": 2}})
	wantProblem(t, errs, chartDir, "renders 0 Deployment, want 2")
}

func TestDockerfileProblems(t *testing.T) {
	good, err := os.ReadFile("../Dockerfile")
	if err != nil {
		t.Fatal(err)
	}
	if errs := dockerfileProblems("Dockerfile", good); len(errs) != 0 {
		t.Fatalf("deploy/Dockerfile: %v", errs)
	}
	for _, tc := range []struct{ from, to, field string }{
		{"USER 65532:65532", "USER root", "USER"},
		{"USER 65532:65532", "", "USER"},
		{`ENTRYPOINT ["/levee"]`, "ENTRYPOINT /levee", "ENTRYPOINT"},
		{"FROM gcr.io/distroless/static-debian12:nonroot", "FROM debian:12", "FROM"},
		{"CGO_ENABLED=0 ", "", "RUN"},
	} {
		bad := strings.Replace(string(good), tc.from, tc.to, 1)
		wantProblem(t, dockerfileProblems("Dockerfile", []byte(bad)), "Dockerfile", tc.field)
	}
	// One stage only.
	wantProblem(t, dockerfileProblems("Dockerfile", []byte("FROM scratch\nUSER 1\nENTRYPOINT [\"/levee\"]\n")), "Dockerfile", "FROM", "1 stages")
}

func TestDashboardProblems(t *testing.T) {
	if _, err := exec.LookPath("promtool"); err != nil {
		t.Skip("promtool is not installed (make deploy-check installs it)")
	}
	raw := []byte(`{"uid": "x", "title": "x",
	  "templating": {"list": [{"name": "datasource", "type": "datasource"}]},
	  "panels": [
	    {"id": 1, "type": "timeseries", "title": "no source", "gridPos": {"h": 8, "w": 8},
	     "targets": [{"refId": "A", "expr": "levee_queue_depth"}]},
	    {"id": 2, "type": "timeseries", "title": "bad query", "gridPos": {"h": 8, "w": 8},
	     "datasource": {"type": "prometheus", "uid": "${datasource}"},
	     "targets": [{"refId": "A", "expr": "sum by (priority (levee_queue_depth)"}]},
	    {"id": 2, "type": "timeseries", "title": "no query", "gridPos": {"h": 8, "w": 8},
	     "datasource": {"type": "prometheus", "uid": "${other}"}, "targets": []}]}`)
	errs := dashboardProblems("levee.json", raw)
	wantProblem(t, errs, "levee.json", `panels[0] ("no source").datasource`, "missing")
	wantProblem(t, errs, "levee.json", `panels[1] ("bad query").targets[0].expr`, "parse")
	wantProblem(t, errs, "levee.json", `panels[2] ("no query").targets`, "no query")
	wantProblem(t, errs, "levee.json", `panels[2] ("no query").datasource.uid`, "not a variable")
	wantProblem(t, errs, "levee.json", `panels[2] ("no query").id`, "also the id")
	// Grafana's variables become values Prometheus parses.
	if err := checkPromQL(withoutGrafanaVariables(`rate(levee_requests_total{model=~"$model"}[$__rate_interval])`)); err != nil {
		t.Fatal(err)
	}
}

// copyDeploy copies the files compose.yaml refers to into a new root.
func copyDeploy(t *testing.T) string {
	t.Helper()
	root := t.TempDir()
	err := filepath.Walk("..", func(path string, info os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel("..", path)
		if info.IsDir() {
			if rel == "check" || rel == "helm" {
				return filepath.SkipDir
			}
			return os.MkdirAll(filepath.Join(root, "deploy", rel), 0o755)
		}
		raw, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		return os.WriteFile(filepath.Join(root, "deploy", rel), raw, 0o644)
	})
	if err != nil {
		t.Fatal(err)
	}
	return root
}

func replaceIn(t *testing.T, file, from, to string) {
	t.Helper()
	raw, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(raw), from) {
		t.Fatalf("%s has no %q", file, from)
	}
	if err := os.WriteFile(file, []byte(strings.Replace(string(raw), from, to, 1)), 0o644); err != nil {
		t.Fatal(err)
	}
}

func TestComposeProblems(t *testing.T) {
	root := copyDeploy(t)
	c := &checker{root: root}
	if errs := c.compose(); len(errs) != 0 {
		t.Fatalf("deploy/compose.yaml: %v", errs)
	}
	replaceIn(t, filepath.Join(root, "deploy/compose/levee.yaml"), "replicas: 3", "replicas: 1")
	replaceIn(t, filepath.Join(root, "deploy/prometheus/prometheus.yml"), "levee-worker-2:9091", "levee-worker-2:9092")
	replaceIn(t, filepath.Join(root, "deploy/compose.yaml"), "      condition: service_completed_successfully", "      condition: service_started")
	errs := c.compose()
	wantProblem(t, errs, "deploy/compose/levee.yaml", "queue.replicas", "3 NATS servers")
	wantProblem(t, errs, "deploy/prometheus/prometheus.yml", "does not scrape levee-worker-2")
	wantProblem(t, errs, composeFile, "services.levee-serve-1.depends_on.migrate")
	// Not YAML the Compose Specification allows.
	replaceIn(t, filepath.Join(root, "deploy/compose.yaml"), "restart: unless-stopped", "restartt: unless-stopped")
	errs = c.compose()
	wantProblem(t, errs, composeFile, "restartt")
}

func TestProblemNamesFileAndField(t *testing.T) {
	var err error = problem{file: "a.yaml", field: "spec.x", msg: "bad"}
	if err.Error() != "a.yaml: spec.x: bad" || !errors.As(err, new(problem)) {
		t.Fatal(err)
	}
}
