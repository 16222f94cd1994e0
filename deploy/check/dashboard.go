package main

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"sigs.k8s.io/yaml"
)

type datasource struct {
	Type string `json:"type"`
	UID  string `json:"uid"`
}

type panel struct {
	ID         int         `json:"id"`
	Type       string      `json:"type"`
	Title      string      `json:"title"`
	Datasource *datasource `json:"datasource"`
	Targets    []struct {
		RefID string `json:"refId"`
		Expr  string `json:"expr"`
	} `json:"targets"`
	GridPos *struct {
		H, W int
	} `json:"gridPos"`
	// A collapsed row holds its panels.
	Panels []panel `json:"panels"`
}

type dashboard struct {
	UID        string  `json:"uid"`
	Title      string  `json:"title"`
	Panels     []panel `json:"panels"`
	Templating struct {
		List []struct {
			Name string `json:"name"`
			Type string `json:"type"`
		} `json:"list"`
	} `json:"templating"`
}

// dashboards checks every dashboard in deploy/grafana: it parses, each
// panel has a data source (one the dashboard defines, when it is a
// variable), a position and at least one query, and each query is PromQL
// that Prometheus parses. The compose provisioning files must parse too.
func (c *checker) dashboards() []error {
	files, err := filepath.Glob(c.path("deploy/grafana/*.json"))
	if err != nil || len(files) == 0 {
		return []error{problem{file: "deploy/grafana", msg: "no dashboard (*.json)"}}
	}
	var errs []error
	for _, f := range files {
		rel, _ := filepath.Rel(c.root, f)
		raw, err := os.ReadFile(f)
		if err != nil {
			errs = append(errs, problem{file: rel, msg: err.Error()})
			continue
		}
		errs = append(errs, dashboardProblems(rel, raw)...)
	}
	for _, f := range []string{"deploy/grafana/provisioning/datasources/prometheus.yaml", "deploy/grafana/provisioning/dashboards/levee.yaml"} {
		raw, err := os.ReadFile(c.path(f))
		if err == nil {
			var v map[string]any
			err = yaml.UnmarshalStrict(raw, &v)
		}
		if err != nil {
			errs = append(errs, problem{file: f, msg: err.Error()})
		}
	}
	return errs
}

func dashboardProblems(file string, raw []byte) []error {
	var d dashboard
	if err := json.Unmarshal(raw, &d); err != nil {
		return []error{problem{file: file, msg: "not valid JSON: " + err.Error()}}
	}
	var errs []error
	add := func(field, format string, args ...any) {
		errs = append(errs, problem{file: file, field: field, msg: fmt.Sprintf(format, args...)})
	}
	if d.UID == "" || d.Title == "" {
		add("uid", "a dashboard needs a uid and a title (provisioning and links use them)")
	}
	vars := map[string]bool{}
	for _, v := range d.Templating.List {
		vars[v.Name] = true
	}
	ids := map[int]string{}
	var walk func(prefix string, ps []panel)
	walk = func(prefix string, ps []panel) {
		for i, p := range ps {
			field := fmt.Sprintf("%s[%d] (%q)", prefix, i, p.Title)
			if other, dup := ids[p.ID]; dup {
				add(field+".id", "%d is also the id of %q", p.ID, other)
			}
			ids[p.ID] = p.Title
			if p.GridPos == nil || p.GridPos.W == 0 || p.GridPos.H == 0 {
				add(field+".gridPos", "missing or empty")
			}
			if p.Type == "row" {
				walk(field+".panels", p.Panels)
				continue
			}
			switch {
			case p.Datasource == nil || p.Datasource.UID == "":
				add(field+".datasource", "missing")
			case strings.HasPrefix(p.Datasource.UID, "$") && !vars[strings.Trim(p.Datasource.UID, "${}")]:
				add(field+".datasource.uid", "%s is not a variable of the dashboard", p.Datasource.UID)
			}
			if len(p.Targets) == 0 {
				add(field+".targets", "no query")
			}
			for j, t := range p.Targets {
				tf := fmt.Sprintf("%s.targets[%d]", field, j)
				if t.RefID == "" {
					add(tf+".refId", "missing")
				}
				if strings.TrimSpace(t.Expr) == "" {
					add(tf+".expr", "empty")
					continue
				}
				if err := checkPromQL(withoutGrafanaVariables(t.Expr)); err != nil {
					add(tf+".expr", "%v", err)
				}
			}
		}
	}
	walk("panels", d.Panels)
	if len(ids) == 0 {
		add("panels", "none")
	}
	return errs
}
