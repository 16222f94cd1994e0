package test

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/levee-gw/levee/config"
	"github.com/levee-gw/levee/dev"
	"github.com/levee-gw/levee/sim"
	"github.com/levee-gw/levee/test/harness"
)

// processConfig writes a levee.yaml for subprocesses sharing env's
// simulator, Postgres and NATS, and returns its path and environment.
func processConfig(t *testing.T, env *harness.Env, listen, extra string) (string, []string) {
	t.Helper()
	var b strings.Builder
	fmt.Fprintf(&b, "listen: %s\ndatabase_url: %s\nnats_url: %s\ndeployments:\n", listen, env.DatabaseURL, env.NATSURL)
	for _, d := range env.Config.Deployments {
		fmt.Fprintf(&b, "  - {name: %s, model: %s, endpoint: %q, credential_env: LEVEE_SIM_KEY, kind: %s, tpm: %d, rpm: %d, priority: %d, sync_reserve: %v}\n",
			d.Name, d.Model, d.Endpoint, d.Kind, d.TPM, d.RPM, d.Priority, d.SyncReserve)
	}
	b.WriteString("models:\n")
	for _, m := range env.Config.Models {
		fmt.Fprintf(&b, "  - {name: %s, deployments: [%s], max_tokens: %d}\n", m.Name, strings.Join(m.Deployments, ", "), m.MaxTokens)
	}
	b.WriteString(extra)
	path := filepath.Join(t.TempDir(), "levee.yaml")
	if err := os.WriteFile(path, []byte(b.String()), 0o600); err != nil {
		t.Fatal(err)
	}
	return path, []string{"LEVEE_SIM_KEY=" + env.Config.Deployments[0].Credential, "LEVEE_LOG_LEVEL=warn", "DATABASE_URL=", "NATS_URL="}
}

func freeAddr(t *testing.T) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// A worker killed with SIGKILL mid-batch, and a NATS restart while no worker
// runs: every accepted job still ends succeeded, exactly once.
func TestKilledWorkerAndNATSRestartLoseNothing(t *testing.T) {
	if testing.Short() {
		t.Skip("runs levee processes")
	}
	f := &dev.File{
		Deployments: []dev.FileDeployment{{Name: "d", Model: "gpt-4o", Kind: config.Standard, TPM: 1 << 30, RPM: 1 << 30,
			Sim: sim.Deployment{TTFT: 50 * time.Millisecond, PerToken: 5 * time.Millisecond, CompletionTokens: 10}}},
		Models: []config.Model{{Name: "gpt-4o", Deployments: []string{"d"}, MaxTokens: 4096}},
	}
	env := harness.StartWith(t, f, dev.StackOptions{NoWorkers: true})
	cfgPath, penv := processConfig(t, env, "127.0.0.1:0", "queue: {ack_wait: 2s}\nworker: {concurrency: 16}\n")

	const jobs = 300
	ids := make([]string, jobs)
	var wg sync.WaitGroup
	for w := 0; w < 8; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			for i := w; i < jobs; i += 8 {
				resp, j := submit(t, env, env.APIKey, jobBody(10, "low"))
				if resp.StatusCode != 202 {
					t.Errorf("submit: %d", resp.StatusCode)
				}
				ids[i] = j.ID
			}
		}(w)
	}
	wg.Wait()

	worker := harness.Spawn(t, penv, "worker", "--config", cfgPath, "--metrics", "")
	done := func() (n int) {
		_ = env.Store.Pool().QueryRow(context.Background(), `SELECT count(*) FROM jobs WHERE status = 'succeeded'`).Scan(&n)
		return n
	}
	harness.Eventually(t, 30*time.Second, "the worker to finish some jobs", func() bool { return done() >= 40 })
	worker.Kill() // kill -9, mid-batch: some jobs are running
	var running int
	_ = env.Store.Pool().QueryRow(context.Background(), `SELECT count(*) FROM jobs WHERE status = 'running'`).Scan(&running)
	before := done()
	t.Logf("killed the worker with %d jobs succeeded and %d running", before, running)
	if before == jobs {
		t.Fatal("every job finished before the kill: the test proves nothing")
	}

	env.RestartNATS()
	// The gateway reconnects; a job submitted now is accepted as usual.
	harness.Eventually(t, 10*time.Second, "the gateway to accept jobs after the NATS restart", func() bool {
		resp, j := submit(t, env, env.APIKey, jobBody(10, "low"))
		if resp.StatusCode == 202 {
			ids = append(ids, j.ID)
			return true
		}
		return false
	})
	harness.Spawn(t, penv, "worker", "--config", cfgPath, "--metrics", "")
	harness.Eventually(t, 60*time.Second, "every job to end", func() bool {
		var open int
		_ = env.Store.Pool().QueryRow(context.Background(), `SELECT count(*) FROM jobs WHERE status IN ('queued', 'running')`).Scan(&open)
		return open == 0
	})
	var succeeded, total int
	_ = env.Store.Pool().QueryRow(context.Background(), `SELECT count(*) FILTER (WHERE status = 'succeeded'), count(*) FROM jobs`).Scan(&succeeded, &total)
	if total != len(ids) || succeeded != len(ids) {
		t.Fatalf("%d of %d jobs succeeded (%d stored)", succeeded, len(ids), total)
	}
	// Exactly once: one usage row per job, no more.
	var rows, distinct int
	_ = env.Store.Pool().QueryRow(context.Background(), `SELECT count(*), count(DISTINCT request_id) FROM usage_events WHERE request_id LIKE 'job_%'`).Scan(&rows, &distinct)
	if rows != len(ids) || distinct != len(ids) {
		t.Fatalf("%d usage rows for %d jobs (%d distinct)", rows, len(ids), distinct)
	}
	t.Logf("simulator admitted %d calls for %d jobs (calls cut off by the kill were repeated)", env.Sim.Stats()["d"].Admitted, len(ids))
}

func TestLeveeWorkerProcessDrainsQueue(t *testing.T) {
	if testing.Short() {
		t.Skip("runs levee processes")
	}
	env := harness.StartWith(t, nil, dev.StackOptions{NoWorkers: true})
	cfgPath, penv := processConfig(t, env, "127.0.0.1:0", "")
	_, j := submit(t, env, env.APIKey, jobBody(5, "normal"))
	metrics := freeAddr(t)
	harness.Spawn(t, penv, "worker", "--config", cfgPath, "--metrics", metrics)
	if done := waitJob(t, env, env.APIKey, j.ID, 20*time.Second); done.Status != "succeeded" {
		t.Fatalf("%+v", done)
	}
	// The worker counts a job just after recording its end, so a poll may
	// see the job ended a moment before the counter appears.
	for _, want := range []string{"levee_jobs_finished_total", "levee_queue_depth", "levee_queue_oldest_age_seconds", "levee_worker_tokens_total"} {
		harness.Eventually(t, 5*time.Second, "worker metric "+want, func() bool {
			resp, err := http.Get("http://" + metrics + "/metrics")
			if err != nil {
				return false
			}
			defer resp.Body.Close()
			raw, err := io.ReadAll(resp.Body)
			return err == nil && strings.Contains(string(raw), want)
		})
	}
}

// Two gateways and two workers, as separate processes, share two
// deployments while synchronous calls and a job backlog compete for them.
// Their shared capacity view must keep the simulator from refusing calls.
func TestProcessesShareOneCapacityView(t *testing.T) {
	if testing.Short() {
		t.Skip("runs levee processes")
	}
	lat := sim.Deployment{TTFT: 20 * time.Millisecond, PerToken: time.Millisecond, CompletionTokens: 20}
	f := &dev.File{
		Deployments: []dev.FileDeployment{
			{Name: "ptu", Model: "gpt-4o", Kind: config.Provisioned, TPM: 30_000, RPM: 1 << 20, Sim: lat},
			{Name: "std", Model: "gpt-4o", Kind: config.Standard, TPM: 30_000, RPM: 1 << 20, Sim: lat},
		},
		Models: []config.Model{{Name: "gpt-4o", Deployments: []string{"ptu", "std"}, MaxTokens: 4096}},
	}
	env := harness.StartWith(t, f, dev.StackOptions{NoWorkers: true})
	var gateways []string
	for i := 0; i < 2; i++ {
		addr := freeAddr(t)
		cfgPath, penv := processConfig(t, env, addr, "worker: {enabled: false}\n")
		harness.Spawn(t, penv, "serve", "--config", cfgPath)
		gateways = append(gateways, "http://"+addr)
	}
	for i := 0; i < 2; i++ {
		cfgPath, penv := processConfig(t, env, "127.0.0.1:0", "worker: {concurrency: 32}\n")
		harness.Spawn(t, penv, "worker", "--config", cfgPath, "--metrics", "")
	}
	for _, g := range gateways {
		harness.Eventually(t, 30*time.Second, g+" to be ready", func() bool {
			resp, err := http.Get(g + "/readyz")
			if err != nil {
				return false
			}
			resp.Body.Close()
			return resp.StatusCode == 200
		})
	}
	// A backlog of jobs through both gateways...
	for i := 0; i < 300; i++ {
		if resp, _ := call(t, gateways[i%2], "/v1/jobs", env.APIKey, jobBody(100, "low")); resp.StatusCode != 202 {
			t.Fatalf("submit: %d", resp.StatusCode)
		}
	}
	// ...and synchronous calls through both, until together they have asked
	// for well over the deployments' 60,000 tokens a minute.
	statuses := map[int]int{}
	var mu sync.Mutex
	var wg sync.WaitGroup
	stop := time.Now().Add(6 * time.Second)
	for c := 0; c < 8; c++ {
		wg.Add(1)
		go func(c int) {
			defer wg.Done()
			for i := 0; time.Now().Before(stop); i++ {
				resp, _ := call(t, gateways[(c+i)%2], "/v1/chat/completions", env.APIKey, chat(100))
				mu.Lock()
				statuses[resp.StatusCode]++
				mu.Unlock()
			}
		}(c)
	}
	wg.Wait()
	time.Sleep(500 * time.Millisecond) // let in-flight jobs land
	var calls, refused int64
	for name, st := range env.Sim.Stats() {
		est := st.TokensAdmitted / max(st.Admitted, 1)
		t.Logf("%s: %d calls, %d admitted, %d refused; peak demand %d of %d TPM (+%.1f estimates)",
			name, st.Calls, st.Admitted, st.Refused, st.PeakDemand, st.TPM, float64(st.PeakDemand-st.TPM)/float64(est))
		calls += st.Calls
		refused += st.Refused
		if st.PeakTokens < st.TPM*8/10 {
			t.Errorf("%s was used to only %d of %d: the load did not reach the limit, so the test proves nothing", name, st.PeakTokens, st.TPM)
		}
	}
	var done int
	_ = env.Store.Pool().QueryRow(context.Background(), `SELECT count(*) FROM jobs WHERE status = 'succeeded'`).Scan(&done)
	t.Logf("sync statuses %v; %d jobs done; upstream 429s %d of %d calls", statuses, done, refused, calls)
	if calls == 0 || float64(refused)/float64(calls) >= 0.01 {
		t.Fatalf("upstream refused %d of %d calls (must stay under 1%%)", refused, calls)
	}
	if statuses[200] == 0 || done == 0 {
		t.Fatal("neither synchronous calls nor jobs got through")
	}
}

// JetStream restarted on an empty disk: the messages of accepted jobs are
// gone, yet every job still runs, because the stream's loss is noticed and
// the queued jobs are published again.
func TestJetStreamLosingItsStorageLosesNoJob(t *testing.T) {
	if testing.Short() {
		t.Skip("runs levee processes")
	}
	f := slowFile(0, 1<<30)
	f.Queue = config.Queue{AckWait: 2 * time.Second}
	env := harness.StartWith(t, f, dev.StackOptions{NoWorkers: true})
	var ids []string
	for i := 0; i < 20; i++ {
		_, j := submit(t, env, env.APIKey, jobBody(5, "low"))
		ids = append(ids, j.ID)
	}
	env.RestartNATSEmpty()
	cfgPath, penv := processConfig(t, env, "127.0.0.1:0", "queue: {ack_wait: 2s}\n")
	harness.Spawn(t, penv, "worker", "--config", cfgPath, "--metrics", "")
	for _, id := range ids {
		if j := waitJob(t, env, env.APIKey, id, 60*time.Second); j.Status != "succeeded" {
			t.Fatalf("%s: %+v", id, j)
		}
	}
}
