package test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/levee-gw/levee/store"
	"github.com/levee-gw/levee/test/harness"
)

// deployFiles are the files in deploy/ whose PromQL names Levee's metrics:
// the Grafana dashboards and the alert rules.
var deployFiles = []string{"../deploy/grafana/*.json", "../deploy/prometheus/alerts.yaml"}

var metricName = regexp.MustCompile(`\blevee_[a-z0-9_]+`)

// TestDeployMetrics guards the dashboard and the alerts against drift: it
// drives a real Levee until every metric family they use has a series (a
// call that fails over an upstream 429, a job run to completion with a
// webhook that fails, a tenant whose spent budget holds its job in the
// queue), then fails naming each metric they use that /metrics lacks.
func TestDeployMetrics(t *testing.T) {
	used := usedMetrics(t)
	env := harness.Start(t, pair(2_000, 1_000_000))

	// Someone else fills the provisioned deployment behind Levee's back
	// (first, while it is empty):
	// the next call gets its 429 and fails over to the standard one.
	other, _ := json.Marshal(map[string]any{"max_tokens": 1900, "messages": []map[string]string{{"role": "user", "content": "hi"}}})
	req, _ := http.NewRequest(http.MethodPost, env.SimURL+"/openai/deployments/ptu/chat/completions?api-version=2024-10-21", bytes.NewReader(other))
	req.Header.Set("api-key", env.Config.Deployments[0].Credential)
	resp, err := http.DefaultClient.Do(req)
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("filling the deployment: %v %v", err, resp)
	}
	resp.Body.Close()
	if resp, raw := call(t, env.BaseURL, "/v1/chat/completions", env.APIKey, chat(100)); resp.StatusCode != 200 {
		t.Fatalf("a call that fails over: %d %s", resp.StatusCode, raw)
	}
	if st := env.Sim.Stats()["ptu"]; st.Refused == 0 {
		t.Fatalf("the provisioned deployment refused nothing: %+v", st)
	}

	// A budget of 300 tokens, held (not failed) when spent: its tenant's
	// job then waits in the queue, so the queue's by-model and by-tenant
	// depths have a series.
	budgeted := env.NewKey("budgeted")
	if err := env.Store.SetBudget(context.Background(), &store.SetBudgetParams{TenantID: tenantOf(t, env, budgeted), Tokens: 300, Period: "month", Soft: 0.5, OnExhausted: "wait"}); err != nil {
		t.Fatal(err)
	}
	if err := env.Gateway.Quota.Refresh(context.Background()); err != nil {
		t.Fatal(err)
	}
	spent := false
	for i := 0; i < 40 && !spent; i++ {
		resp, raw := call(t, env.BaseURL, "/v1/chat/completions", budgeted, chat(5))
		spent = resp.StatusCode == 429 && bytes.Contains(raw, []byte("budget_exceeded"))
	}
	if !spent {
		t.Fatal("the budget was never spent")
	}
	if resp, held := submit(t, env, budgeted, jobBody(5, "low")); resp.StatusCode != 202 {
		t.Fatalf("submitting the held job: %d", resp.StatusCode)
	} else {
		harness.Eventually(t, 10*time.Second, "the budget to hold the job", func() bool {
			_, j := getJob(t, env, budgeted, held.ID)
			return j.Status == "queued"
		})
	}

	// A job to completion, whose webhook receiver fails.
	var hooks atomic.Int64
	receiver := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		hooks.Add(1)
		w.WriteHeader(http.StatusInternalServerError)
	}))
	defer receiver.Close()
	body := jobBody(10, "normal")
	body["webhook"] = map[string]any{"url": receiver.URL}
	resp, j := submit(t, env, env.APIKey, body)
	if resp.StatusCode != 202 {
		t.Fatalf("submit: %d", resp.StatusCode)
	}
	if done := waitJob(t, env, env.APIKey, j.ID, 20*time.Second); done.Status != "succeeded" {
		t.Fatalf("job: %+v", done)
	}
	harness.Eventually(t, 10*time.Second, "a webhook delivery attempt", func() bool { return hooks.Load() > 0 })

	// Collectors that read Postgres cache for a few seconds: scrape until
	// every used metric shows, then report what does not.
	var missing []string
	deadline := time.Now().Add(30 * time.Second)
	for {
		families := scrapeFamilies(t, env.BaseURL)
		missing = missing[:0]
		for _, name := range slices.Sorted(mapKeysOf(used)) {
			if _, ok := families[familyOf(name, families)]; !ok {
				missing = append(missing, name+" (in "+strings.Join(used[name], ", ")+")")
			}
		}
		if len(missing) == 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(500 * time.Millisecond)
	}
	if len(missing) > 0 {
		t.Fatalf("deploy/ uses metrics that Levee's /metrics does not have:\n  %s", strings.Join(missing, "\n  "))
	}
	t.Logf("all %d metrics deploy/ uses are on /metrics: %s", len(used), strings.Join(slices.Sorted(mapKeysOf(used)), " "))
}

// usedMetrics maps each levee_ metric name in deployFiles to the files that
// use it.
func usedMetrics(t *testing.T) map[string][]string {
	t.Helper()
	used := map[string][]string{}
	for _, pattern := range deployFiles {
		files, err := filepath.Glob(pattern)
		if err != nil || len(files) == 0 {
			t.Fatalf("no file matches %s", pattern)
		}
		for _, f := range files {
			raw, err := os.ReadFile(f)
			if err != nil {
				t.Fatal(err)
			}
			names := map[string]bool{}
			for _, n := range metricName.FindAllString(string(raw), -1) {
				names[n] = true
			}
			// An extraction that finds almost nothing would pass anything.
			if len(names) < 5 {
				t.Fatalf("%s names only %d levee_ metrics: is the extraction broken?", f, len(names))
			}
			for n := range names {
				used[n] = append(used[n], strings.TrimPrefix(f, "../"))
			}
		}
	}
	return used
}

// scrapeFamilies returns the metric families on /metrics with their types.
func scrapeFamilies(t *testing.T, base string) map[string]string {
	t.Helper()
	resp, err := http.Get(base + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	families := map[string]string{}
	sc := bufio.NewScanner(bytes.NewReader(raw))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		// The text format names each family with samples in a TYPE line.
		if f := strings.Fields(sc.Text()); len(f) == 4 && f[0] == "#" && f[1] == "TYPE" {
			families[f[2]] = f[3]
		}
	}
	return families
}

// familyOf is the family a series name belongs to: a histogram's _bucket,
// _sum and _count series belong to the histogram.
func familyOf(name string, families map[string]string) string {
	for _, suffix := range []string{"_bucket", "_sum", "_count"} {
		if base, ok := strings.CutSuffix(name, suffix); ok {
			if typ := families[base]; typ == "histogram" || typ == "summary" {
				return base
			}
		}
	}
	return name
}

func mapKeysOf[V any](m map[string]V) func(func(string) bool) {
	return func(yield func(string) bool) {
		for k := range m {
			if !yield(k) {
				return
			}
		}
	}
}
