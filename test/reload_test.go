package test

import (
	"bufio"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/levee-gw/levee/config"
	"github.com/levee-gw/levee/dev"
	"github.com/levee-gw/levee/sim"
	"github.com/levee-gw/levee/test/harness"
)

// metric reads one series' value from a /metrics page (-1: absent).
func metric(t *testing.T, base, name string, labels ...string) float64 {
	t.Helper()
	resp, err := http.Get(base + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
next:
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, name+"{") && !strings.HasPrefix(line, name+" ") {
			continue
		}
		for _, l := range labels {
			if !strings.Contains(line, l) {
				continue next
			}
		}
		v, err := strconv.ParseFloat(line[strings.LastIndexByte(line, ' ')+1:], 64)
		if err != nil {
			t.Fatalf("metric line %q: %v", line, err)
		}
		return v
	}
	return -1
}

// SIGHUP reloads deployments, models, policies and prices while calls are
// in flight: those calls finish, a removed deployment takes no new call, an
// added one serves, a deployment that stays keeps its capacity window, and
// an invalid file leaves the running configuration as it is.
func TestSIGHUPReloadsWithCallsInFlight(t *testing.T) {
	if testing.Short() {
		t.Skip("runs levee processes")
	}
	slow := sim.Deployment{TTFT: 600 * time.Millisecond, CompletionTokens: 10}
	f := &dev.File{
		Deployments: []dev.FileDeployment{
			{Name: "a", Model: "gpt-4o", Kind: config.Provisioned, TPM: 1_000_000, RPM: 100_000, Sim: slow},
			{Name: "b", Model: "gpt-4o", Kind: config.Standard, TPM: 1_000_000, RPM: 100_000, Sim: slow},
			{Name: "c", Model: "gpt-4o", Kind: config.Standard, TPM: 1_000_000, RPM: 100_000},
		},
		Models: []config.Model{{Name: "gpt-4o", Deployments: []string{"a", "b", "c"}, MaxTokens: 1000}},
	}
	env := harness.StartWith(t, f, dev.StackOptions{NoWorkers: true})
	addr := freeAddr(t)
	base := "http://" + addr
	dep := func(name string) string {
		for _, d := range env.Config.Deployments {
			if d.Name == name {
				return fmt.Sprintf("  - {name: %s, model: gpt-4o, endpoint: %q, credential_env: LEVEE_SIM_KEY, kind: %s, tpm: %d, rpm: %d}\n",
					d.Name, d.Endpoint, d.Kind, d.TPM, d.RPM)
			}
		}
		t.Fatalf("no deployment %s", name)
		return ""
	}
	path := filepath.Join(t.TempDir(), "levee.yaml")
	write := func(body string) {
		head := fmt.Sprintf("listen: %s\ndatabase_url: %s\nnats_url: %s\n", addr, env.DatabaseURL, env.NATSURL)
		if err := os.WriteFile(path, []byte(head+body), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	// Before: gpt-4o is a then b (a provisioned, so first); b also serves
	// alone as "only-b".
	write("deployments:\n" + dep("a") + dep("b") +
		"models:\n  - {name: gpt-4o, deployments: [a, b], max_tokens: 1000}\n  - {name: only-b, deployments: [b], max_tokens: 1000}\n")
	penv := []string{"LEVEE_SIM_KEY=" + env.Config.Deployments[0].Credential, "LEVEE_LOG_LEVEL=info", "DATABASE_URL=", "NATS_URL="}
	p := harness.Spawn(t, penv, "serve", "--config", path)
	harness.Eventually(t, 30*time.Second, "levee serve to answer", func() bool {
		resp, err := http.Get(base + "/healthz")
		if err == nil {
			resp.Body.Close()
		}
		return err == nil && resp.StatusCode == 200
	})

	// One call ended on b, so it has latency series for the reload to clear.
	first := chat(20)
	first["model"] = "only-b"
	if resp, raw := call(t, base, "/v1/chat/completions", env.APIKey, first); resp.StatusCode != 200 {
		t.Fatalf("a call on b: %d %s", resp.StatusCode, raw)
	}
	if v := metric(t, base, "levee_upstream_duration_seconds_count", `deployment="b"`); v != 1 {
		t.Fatalf("b's latency count is %v before the reload", v)
	}

	// Calls in flight on both deployments when the file changes.
	var wg sync.WaitGroup
	type result struct {
		status int
		dep    string
	}
	results := make(chan result, 16)
	for i := 0; i < 8; i++ {
		model := "gpt-4o"
		if i%2 == 1 {
			model = "only-b"
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			body := chat(20)
			body["model"] = model
			resp, _ := call(t, base, "/v1/chat/completions", env.APIKey, body)
			results <- result{resp.StatusCode, resp.Header.Get("x-levee-deployment")}
		}()
	}
	harness.Eventually(t, 5*time.Second, "the calls to reach the deployments", func() bool {
		s := env.Sim.Stats()
		return s["a"].Calls >= 4 && s["b"].Calls >= 5
	})
	usedBefore := metric(t, base, "levee_deployment_used_tokens", `deployment="a"`)
	if usedBefore <= 0 {
		t.Fatalf("deployment a's window holds %v tokens; the test needs some", usedBefore)
	}

	// After: b is gone, c is added, gpt-4o's max_tokens is 50.
	write("deployments:\n" + dep("a") + dep("c") +
		"models:\n  - {name: gpt-4o, deployments: [a], max_tokens: 50}\n  - {name: only-c, deployments: [c], max_tokens: 1000}\n")
	if err := p.Cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	harness.Eventually(t, 10*time.Second, "the reload", func() bool { return metric(t, base, "levee_config_reloads_total") == 1 })
	if used := metric(t, base, "levee_deployment_used_tokens", `deployment="a"`); used < usedBefore {
		t.Fatalf("deployment a's window went from %v to %v tokens: an unchanged deployment must keep it", usedBefore, used)
	}
	for _, name := range []string{"levee_deployment_used_tokens", "levee_upstream_duration_seconds_count"} {
		if v := metric(t, base, name, `deployment="b"`); v != -1 {
			t.Fatalf("a removed deployment is still reported in %s: %v", name, v)
		}
	}
	wg.Wait()
	close(results)
	var onB int
	for r := range results {
		if r.status != 200 {
			t.Fatalf("a call in flight during the reload ended %d", r.status)
		}
		if r.dep == "b" {
			onB++
		}
	}
	if onB < 4 {
		t.Fatalf("only %d calls in flight finished on the removed deployment", onB)
	}
	callsB := env.Sim.Stats()["b"].Calls

	// The new configuration serves: c answers its alias, b's is gone, the
	// new policy holds, and b takes nothing more.
	body := chat(20)
	body["model"] = "only-c"
	if resp, raw := call(t, base, "/v1/chat/completions", env.APIKey, body); resp.StatusCode != 200 || resp.Header.Get("x-levee-deployment") != "c" {
		t.Fatalf("only-c: %d via %q %s", resp.StatusCode, resp.Header.Get("x-levee-deployment"), raw)
	}
	body["model"] = "only-b"
	if resp, raw := call(t, base, "/v1/chat/completions", env.APIKey, body); resp.StatusCode != 404 {
		t.Fatalf("only-b after its removal: %d %s", resp.StatusCode, raw)
	}
	if resp, raw := call(t, base, "/v1/chat/completions", env.APIKey, chat(100)); resp.StatusCode != 400 {
		t.Fatalf("gpt-4o with max_tokens 100 over the new limit of 50: %d %s", resp.StatusCode, raw)
	}
	if resp, _ := call(t, base, "/v1/chat/completions", env.APIKey, chat(20)); resp.StatusCode != 200 || resp.Header.Get("x-levee-deployment") != "a" {
		t.Fatalf("gpt-4o after the reload: %d via %q", resp.StatusCode, resp.Header.Get("x-levee-deployment"))
	}
	if got := env.Sim.Stats()["b"].Calls; got != callsB {
		t.Fatalf("the removed deployment took %d new calls", got-callsB)
	}

	// An invalid file is refused, named, counted; the running
	// configuration stays.
	write("deployments:\n  - {name: a, model: gpt-4o, endpoint: \"http://127.0.0.1:1\", credential_env: LEVEE_SIM_KEY, tpm: -5}\n" +
		"models:\n  - {name: gpt-4o, deployments: [a]}\n")
	if err := p.Cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	harness.Eventually(t, 10*time.Second, "the refused reload to be counted", func() bool {
		return metric(t, base, "levee_config_reload_errors_total") == 1
	})
	if !strings.Contains(p.Output(), "field=deployments[0].tpm") {
		t.Fatalf("the log should name the field at fault:\n%s", p.Output())
	}
	body["model"] = "only-c"
	if resp, _ := call(t, base, "/v1/chat/completions", env.APIKey, body); resp.StatusCode != 200 {
		t.Fatalf("after a refused reload the running configuration should stay: %d", resp.StatusCode)
	}
	if v := metric(t, base, "levee_config_reloads_total"); v != 1 {
		t.Fatalf("levee_config_reloads_total = %v after a refused reload", v)
	}
}

// Workers take a reload too: a job for an alias added by the reload runs,
// on the deployment the new configuration names.
func TestWorkersServeAReloadedAlias(t *testing.T) {
	env := harness.Start(t, pair(1_000_000, 1_000_000))
	body := jobBody(10, "low")
	body["body"].(map[string]any)["model"] = "std-only"
	if resp, _ := submit(t, env, env.APIKey, body); resp.StatusCode != 404 && resp.StatusCode != 400 {
		t.Fatalf("a job for an alias not yet configured: %d", resp.StatusCode)
	}
	next := *env.Config
	next.Models = append(append([]config.Model(nil), env.Config.Models...), config.Model{Name: "std-only", Deployments: []string{"std"}, MaxTokens: 100})
	if err := next.Validate(); err != nil {
		t.Fatal(err)
	}
	if restart := env.Gateway.Reload(&next); len(restart) != 0 {
		t.Fatalf("a models-only change needs no restart, got %v", restart)
	}
	resp, j := submit(t, env, env.APIKey, body)
	if resp.StatusCode != 202 {
		t.Fatalf("submit after the reload: %d", resp.StatusCode)
	}
	done := waitJob(t, env, env.APIKey, j.ID, 20*time.Second)
	if done.Status != "succeeded" || done.Deployment == nil || *done.Deployment != "std" {
		t.Fatalf("the job ended %s on %v", done.Status, done.Deployment)
	}
}
