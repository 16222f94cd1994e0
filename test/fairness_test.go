package test

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/levee-gw/levee/config"
	"github.com/levee-gw/levee/dev"
	"github.com/levee-gw/levee/sim"
	"github.com/levee-gw/levee/test/harness"
)

// throttled is one deployment whose speed, not its limits, bounds the drain:
// a backlog takes tens of seconds to clear.
func throttled() *dev.File {
	return &dev.File{
		Deployments: []dev.FileDeployment{{Name: "d", Model: "gpt-4o", Kind: config.Standard, TPM: 1 << 30, RPM: 1 << 30,
			Sim: sim.Deployment{TTFT: 40 * time.Millisecond, CompletionTokens: 5}}},
		Models: []config.Model{{Name: "gpt-4o", Deployments: []string{"d"}, MaxTokens: 4096}},
		Worker: config.Worker{Concurrency: 8},
	}
}

func submitMany(t *testing.T, env *harness.Env, key, prio string, n, maxTokens int) []string {
	t.Helper()
	ids := make([]string, n)
	var wg sync.WaitGroup
	for w := 0; w < 8; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			for i := w; i < n; i += 8 {
				resp, j := submit(t, env, key, jobBody(maxTokens, prio))
				if resp.StatusCode != 202 {
					t.Errorf("submit: %d", resp.StatusCode)
					return
				}
				ids[i] = j.ID
			}
		}(w)
	}
	wg.Wait()
	return ids
}

func openJobs(t *testing.T, env *harness.Env, tenant string) int {
	var n int
	_ = env.Store.Pool().QueryRow(context.Background(), `SELECT count(*) FROM jobs j JOIN tenants t ON t.id = j.tenant_id
		WHERE t.name = $1 AND j.status IN ('queued', 'running')`, tenant).Scan(&n)
	return n
}

// Tenant B's 10 jobs, submitted behind tenant A's 1,500, are served in turn
// with A's: they finish in about the time of 20 jobs, not 1,510.
func TestTenantsAreServedInTurn(t *testing.T) {
	env := harness.Start(t, throttled())
	a := env.NewKey("tenant-a")
	b := env.NewKey("tenant-b")
	submitMany(t, env, a, "low", 1500, 5)
	start := time.Now()
	idsB := submitMany(t, env, b, "low", 10, 5)
	for _, id := range idsB {
		waitJob(t, env, b, id, 30*time.Second)
	}
	took := time.Since(start)
	left := openJobs(t, env, "tenant-a")
	t.Logf("tenant B's 10 jobs took %v; tenant A still had %d of 1500 open", took, left)
	// 8 at a time at ~40 ms each is ~200 jobs/s; A's backlog takes ~7 s.
	if left < 1000 {
		t.Fatalf("tenant A had only %d jobs open when B finished: B waited behind A", left)
	}
}

// Normal-priority jobs submitted behind a low-priority backlog overtake it.
func TestHigherPriorityDrainsFirst(t *testing.T) {
	env := harness.Start(t, throttled())
	submitMany(t, env, env.APIKey, "low", 1500, 5)
	ids := submitMany(t, env, env.APIKey, "normal", 20, 5)
	for _, id := range ids {
		if j := waitJob(t, env, env.APIKey, id, 30*time.Second); j.Status != "succeeded" {
			t.Fatalf("%+v", j)
		}
	}
	var lowOpen int
	_ = env.Store.Pool().QueryRow(context.Background(), `SELECT count(*) FROM jobs WHERE priority = 'low' AND status IN ('queued', 'running')`).Scan(&lowOpen)
	t.Logf("normal jobs done with %d of 1500 low jobs still open", lowOpen)
	if lowOpen < 1000 {
		t.Fatalf("only %d low jobs open: normal ones waited behind them", lowOpen)
	}
}

// Workers leave each deployment's sync reserve free and pace themselves:
// with a backlog bigger than the deployment's minute, synchronous calls
// still find room, and the deployment never refuses a call.
func TestWorkersLeaveRoomForSyncCalls(t *testing.T) {
	f := &dev.File{
		Deployments: []dev.FileDeployment{{Name: "d", Model: "gpt-4o", Kind: config.Standard, TPM: 20_000, RPM: 1 << 20, SyncReserve: 0.25}},
		Models:      []config.Model{{Name: "gpt-4o", Deployments: []string{"d"}, MaxTokens: 4096}},
	}
	env := harness.Start(t, f)
	submitMany(t, env, env.APIKey, "low", 300, 100) // ~34,000 tokens: more than the minute holds
	d := env.Gateway.Broker.Deployments()[0]
	harness.Eventually(t, 20*time.Second, "workers to take some of the deployment", func() bool {
		tok, _ := d.Capacity.Headroom(time.Now())
		return tok < 18_500
	})
	// Paced at 75 % of 20,000 a minute (250 tokens/s) they cannot have taken
	// the minute in one pulse; and they never touch the 5,000-token reserve.
	for i := 0; i < 20; i++ {
		if resp, raw := call(t, env.BaseURL, "/v1/chat/completions", env.APIKey, chat(100)); resp.StatusCode != 200 {
			t.Fatalf("sync call %d: %d %s", i, resp.StatusCode, raw)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if tok, _ := d.Capacity.Headroom(time.Now()); tok < 0 {
		t.Fatalf("headroom %d", tok)
	}
	if st := env.Sim.Stats()["d"]; st.Refused != 0 {
		t.Fatalf("the deployment refused %d calls", st.Refused)
	}
}
