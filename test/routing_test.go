package test

import (
	"bytes"
	"encoding/json"
	"net/http"
	"testing"
	"time"

	"github.com/levee-gw/levee/config"
	"github.com/levee-gw/levee/dev"
	"github.com/levee-gw/levee/sim"
	"github.com/levee-gw/levee/test/harness"
)

// pair is a provisioned and a standard deployment behind one alias, with no
// latency and request limits high enough that tokens are what binds.
func pair(ptuTPM, stdTPM int) *dev.File {
	return &dev.File{
		Deployments: []dev.FileDeployment{
			{Name: "ptu", Model: "gpt-4o", Kind: config.Provisioned, TPM: ptuTPM, RPM: 60_000, Timeout: 300 * time.Millisecond},
			{Name: "std", Model: "gpt-4o", Kind: config.Standard, TPM: stdTPM, RPM: 60_000, Timeout: 300 * time.Millisecond},
		},
		Models: []config.Model{{Name: "gpt-4o", Deployments: []string{"std", "ptu"}, MaxTokens: 1000}},
	}
}

func TestSpillsFromProvisionedToStandardWithinLimits(t *testing.T) {
	env := harness.Start(t, pair(6_000, 12_000))
	// Each call is estimated at its prompt plus 100 tokens; together the two
	// deployments hold about 159 of them per minute.
	const calls = 140
	counts := parallel(t, calls, 8, func(int) int {
		resp, _ := call(t, env.BaseURL, "/v1/chat/completions", env.APIKey, chat(100))
		return resp.StatusCode
	})
	if counts[200] != calls {
		t.Fatalf("statuses %v: every call should succeed while total headroom exists", counts)
	}
	st := env.Sim.Stats()
	ptu, std := st["ptu"], st["std"]
	t.Logf("ptu %+v", ptu)
	t.Logf("std %+v", std)
	if ptu.Refused != 0 || std.Refused != 0 {
		t.Fatalf("the simulator refused calls: ptu %d, std %d", ptu.Refused, std.Refused)
	}
	// Provisioned first: it is filled to within one call of its limit.
	est := ptu.TokensAdmitted / ptu.Admitted
	if ptu.PeakTokens < ptu.TPM-est {
		t.Fatalf("provisioned used only %d of %d before spilling", ptu.PeakTokens, ptu.TPM)
	}
	if std.Admitted != calls-ptu.Admitted {
		t.Fatalf("standard admitted %d, want %d", std.Admitted, calls-ptu.Admitted)
	}
	for name, s := range st {
		if s.PeakDemand > s.TPM+est {
			t.Fatalf("%s: Levee asked for %d tokens in a minute, limit %d plus one estimate %d", name, s.PeakDemand, s.TPM, est)
		}
	}
	// Past total headroom the client gets Levee's 429, and still no call is
	// sent to a full deployment.
	for i := 0; i < 30; i++ {
		call(t, env.BaseURL, "/v1/chat/completions", env.APIKey, chat(100))
	}
	resp, raw := call(t, env.BaseURL, "/v1/chat/completions", env.APIKey, chat(100))
	if resp.StatusCode != 429 || resp.Header.Get("Retry-After") == "" {
		t.Fatalf("want 429 with Retry-After once full, got %d %s", resp.StatusCode, raw)
	}
	for name, s := range env.Sim.Stats() {
		if s.Refused != 0 {
			t.Fatalf("%s refused %d calls: Levee sent calls to a full deployment", name, s.Refused)
		}
	}
}

func setFaults(t *testing.T, env *harness.Env, dep string, f sim.Faults) {
	t.Helper()
	raw, _ := json.Marshal(f)
	req, _ := http.NewRequest(http.MethodPut, env.SimURL+"/sim/deployments/"+dep+"/faults", bytes.NewReader(raw))
	resp, err := http.DefaultClient.Do(req)
	if err != nil || resp.StatusCode != http.StatusNoContent {
		t.Fatalf("set faults: %v %v", err, resp)
	}
	resp.Body.Close()
}

func TestFailingDeploymentIsRoutedAroundAndTakenBack(t *testing.T) {
	env := harness.Start(t, pair(1_000_000, 1_000_000))
	get := func() (int, string) {
		resp, _ := call(t, env.BaseURL, "/v1/chat/completions", env.APIKey, chat(10))
		return resp.StatusCode, resp.Header.Get("x-levee-deployment")
	}
	if _, dep := get(); dep != "ptu" {
		t.Fatalf("healthy calls should go to provisioned first, went to %s", dep)
	}
	setFaults(t, env, "ptu", sim.Faults{Outage: true})
	broken := time.Now()
	// Calls keep succeeding (failover), and within a second the circuit is
	// open: calls stop reaching the broken deployment at all.
	var openAt time.Time
	for time.Since(broken) < 3*time.Second {
		status, dep := get()
		if status != 200 || dep != "std" {
			t.Fatalf("during the outage: %d from %s", status, dep)
		}
		before := env.Sim.Stats()["ptu"].Calls
		time.Sleep(20 * time.Millisecond)
		if _, _ = get(); env.Sim.Stats()["ptu"].Calls == before {
			openAt = time.Now()
			break
		}
	}
	if openAt.IsZero() || openAt.Sub(broken) > time.Second {
		t.Fatalf("the failing deployment was not routed around within a second (%v)", openAt.Sub(broken))
	}
	if f := env.Sim.Stats()["ptu"].Faulted; f > 10 {
		t.Fatalf("%d calls reached the broken deployment", f)
	}
	setFaults(t, env, "ptu", sim.Faults{})
	healed := time.Now()
	harness.Eventually(t, 6*time.Second, "the healed deployment to be taken back", func() bool {
		_, dep := get()
		return dep == "ptu"
	})
	t.Logf("routed around after %v; taken back %v after healing", openAt.Sub(broken), time.Since(healed))
}

func TestErrorsAndTimeoutsFailOverInvisibly(t *testing.T) {
	t.Run("half the calls fail upstream", func(t *testing.T) {
		env := harness.Start(t, pair(1_000_000, 1_000_000))
		setFaults(t, env, "ptu", sim.Faults{ErrorRate: 0.5})
		counts := parallel(t, 60, 4, func(int) int {
			resp, _ := call(t, env.BaseURL, "/v1/chat/completions", env.APIKey, chat(10))
			return resp.StatusCode
		})
		if counts[200] != 60 {
			t.Fatalf("statuses %v", counts)
		}
		if env.Sim.Stats()["ptu"].Faulted == 0 {
			t.Fatal("no fault was injected; the test proves nothing")
		}
	})
	t.Run("a slow deployment times out", func(t *testing.T) {
		env := harness.Start(t, pair(1_000_000, 1_000_000))
		setFaults(t, env, "ptu", sim.Faults{Delay: 2 * time.Second})
		start := time.Now()
		resp, raw := call(t, env.BaseURL, "/v1/chat/completions", env.APIKey, chat(10))
		if resp.StatusCode != 200 || resp.Header.Get("x-levee-deployment") != "std" {
			t.Fatalf("%d from %s: %s", resp.StatusCode, resp.Header.Get("x-levee-deployment"), raw)
		}
		if took := time.Since(start); took > 1500*time.Millisecond {
			t.Fatalf("took %v: the 300 ms timeout did not fire", took)
		}
		harness.Eventually(t, 2*time.Second, "the slow call to be cancelled upstream", func() bool {
			return env.Sim.Stats()["ptu"].Cancelled == 1
		})
	})
	t.Run("every deployment down: 502 envelope", func(t *testing.T) {
		env := harness.Start(t, pair(1_000_000, 1_000_000))
		setFaults(t, env, "ptu", sim.Faults{Outage: true})
		setFaults(t, env, "std", sim.Faults{Outage: true})
		resp, raw := call(t, env.BaseURL, "/v1/chat/completions", env.APIKey, chat(10))
		if resp.StatusCode != http.StatusBadGateway {
			t.Fatalf("%d %s", resp.StatusCode, raw)
		}
		if e := mustEnvelope(t, raw); deref(e.Error.Code) != "upstream_unavailable" {
			t.Fatalf("code %s", deref(e.Error.Code))
		}
	})
}

func TestUpstream429IsHonouredAndFailsOver(t *testing.T) {
	env := harness.Start(t, pair(2_000, 1_000_000))
	// Someone else uses the provisioned deployment: fill it behind Levee's back.
	other, _ := json.Marshal(map[string]any{"max_tokens": 1900, "messages": []map[string]string{{"role": "user", "content": "hi"}}})
	req, _ := http.NewRequest(http.MethodPost, env.SimURL+"/openai/deployments/ptu/chat/completions?api-version=2024-10-21", bytes.NewReader(other))
	req.Header.Set("api-key", env.Config.Deployments[0].Credential)
	resp, err := http.DefaultClient.Do(req)
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("filling the deployment: %v %v", err, resp)
	}
	resp.Body.Close()
	for i := 0; i < 5; i++ {
		resp, raw := call(t, env.BaseURL, "/v1/chat/completions", env.APIKey, chat(100))
		if resp.StatusCode != 200 || resp.Header.Get("x-levee-deployment") != "std" {
			t.Fatalf("call %d: %d from %s: %s", i, resp.StatusCode, resp.Header.Get("x-levee-deployment"), raw)
		}
	}
	// One 429, then Levee kept off the deployment for its retry-after.
	if st := env.Sim.Stats()["ptu"]; st.Refused != 1 || st.Calls != 2 {
		t.Fatalf("provisioned: %+v; want exactly one refused call from Levee", st)
	}
}
