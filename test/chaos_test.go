package test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/levee-gw/levee/config"
	"github.com/levee-gw/levee/dev"
	"github.com/levee-gw/levee/sim"
	"github.com/levee-gw/levee/test/harness"
)

// attempt is one submit as a client saw it.
type attempt struct {
	phase   string
	status  int // 0: no answer (connection refused or reset)
	latency time.Duration
}

// TestChaos submits jobs through two `levee serve` processes, drained by two
// `levee worker` processes, while NATS restarts, Postgres restarts, a worker
// and a gateway are killed with SIGKILL. Clients behave as the OpenAI SDKs
// do: a 503 or a dropped connection is retried (with the same
// Idempotency-Key, at the other gateway) after its Retry-After. It reports
// per phase what clients saw, and holds Levee to: no failed submit while NATS
// restarts, and none slower than a second; no 5xx other than 503 ever; every
// accepted job ends succeeded, exactly once (one result, one usage row).
//
// `make chaos` runs it with 10,000 jobs (LEVEE_CHAOS_JOBS); `make test` with
// 1,200.
func TestChaos(t *testing.T) {
	if testing.Short() {
		t.Skip("runs levee processes")
	}
	total := 1200
	if v, err := strconv.Atoi(os.Getenv("LEVEE_CHAOS_JOBS")); err == nil && v > 0 {
		total = v
	}
	rate := max(total/12, 100) // submits per second: the schedule spans about 12 s

	pg := harness.PrivatePostgres(t)
	f := &dev.File{
		Deployments: []dev.FileDeployment{{Name: "d", Model: "gpt-4o", Kind: config.Standard, TPM: 1 << 30, RPM: 1 << 30,
			Sim: sim.Deployment{TTFT: 20 * time.Millisecond, PerToken: time.Millisecond, CompletionTokens: 10}}},
		Models: []config.Model{{Name: "gpt-4o", Deployments: []string{"d"}, MaxTokens: 4096}},
	}
	env := harness.StartWith(t, f, dev.StackOptions{NoWorkers: true, DatabaseURL: pg.URL})
	extra := "queue: {ack_wait: 3s}\nworker: {concurrency: 64}\nshutdown_timeout: 5s\n"

	gateways := make([]string, 2)
	serve := make([]*harness.Process, 2)
	startGateway := func(i int) {
		addr := freeAddr(t)
		cfgPath, penv := processConfig(t, env, addr, extra)
		serve[i] = harness.Spawn(t, penv, "serve", "--config", cfgPath)
		gateways[i] = "http://" + addr
		harness.Eventually(t, 30*time.Second, "gateway "+addr+" to be ready", func() bool {
			resp, err := http.Get(gateways[i] + "/readyz")
			if err != nil {
				return false
			}
			resp.Body.Close()
			return resp.StatusCode == 200
		})
	}
	startWorker := func() *harness.Process {
		cfgPath, penv := processConfig(t, env, "127.0.0.1:0", extra)
		return harness.Spawn(t, penv, "worker", "--config", cfgPath, "--metrics", "")
	}
	for i := range gateways {
		startGateway(i)
	}
	workers := []*harness.Process{startWorker(), startWorker()}

	var (
		mu       sync.Mutex
		phase    = "steady"
		attempts []attempt
		accepted = map[string]string{} // idempotency key → job id
		gwMu     sync.RWMutex
	)
	setPhase := func(p string) {
		mu.Lock()
		phase = p
		mu.Unlock()
		t.Logf("%s: %s", time.Now().Format("15:04:05.000"), p)
	}
	client := &http.Client{Timeout: 30 * time.Second}
	submitOne := func(n int) {
		key := fmt.Sprintf("chaos-%d", n)
		for try := 0; ; try++ {
			gwMu.RLock()
			base := gateways[(n+try)%2]
			gwMu.RUnlock()
			start := time.Now()
			resp, j, err := submitVia(client, base, env.APIKey, key)
			a := attempt{latency: time.Since(start)}
			if err == nil {
				a.status = resp.StatusCode
			}
			mu.Lock()
			a.phase = phase
			attempts = append(attempts, a)
			if a.status == 202 {
				accepted[key] = j
			}
			mu.Unlock()
			if a.status == 202 {
				return
			}
			if a.status != 0 && a.status != 503 {
				t.Errorf("submit %s: %d", key, a.status)
				return
			}
			wait := 200 * time.Millisecond
			if err == nil {
				if s, perr := strconv.Atoi(resp.Header.Get("Retry-After")); perr == nil {
					wait = time.Duration(s) * time.Second
				}
			}
			time.Sleep(wait)
		}
	}

	// Submitters pace themselves to the rate; the schedule below breaks
	// things while they run.
	var next atomic.Int64
	var wg sync.WaitGroup
	begin := time.Now()
	for c := 0; c < 32; c++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				n := int(next.Add(1)) - 1
				if n >= total {
					return
				}
				if d := time.Until(begin.Add(time.Duration(n) * time.Second / time.Duration(rate))); d > 0 {
					time.Sleep(d)
				}
				submitOne(n)
			}
		}()
	}
	at := func(share float64) {
		for int(next.Load()) < int(share*float64(total)) {
			time.Sleep(10 * time.Millisecond)
		}
	}

	at(0.15)
	setPhase("nats-restart")
	env.StopNATS()
	time.Sleep(2 * time.Second)
	env.StartNATS()
	time.Sleep(3 * time.Second) // clients reconnect within their 250 ms backoff; then some margin
	setPhase("steady")

	at(0.40)
	setPhase("postgres-restart")
	pg.Stop()
	time.Sleep(time.Second)
	pg.Start()
	time.Sleep(2 * time.Second)
	setPhase("steady")

	at(0.60)
	setPhase("worker-kill")
	workers[0].Kill()
	workers[0] = startWorker()
	setPhase("steady")

	at(0.75)
	setPhase("gateway-kill")
	serve[0].Kill() // SIGKILL: calls in flight there are cut off
	gwMu.Lock()
	startGateway(0)
	gwMu.Unlock()
	setPhase("steady")

	wg.Wait()
	// Signalled workers finish what they hold before they go.
	_ = workers[1].Cmd.Process.Signal(syscall.SIGTERM)
	_ = workers[1].Cmd.Wait()
	workers[1] = startWorker()

	ctx := context.Background()
	harness.Eventually(t, 5*time.Minute, "every accepted job to end", func() bool {
		var open int
		if err := env.Store.Pool().QueryRow(ctx, `SELECT count(*) FROM jobs WHERE status IN ('queued', 'running')`).Scan(&open); err != nil {
			return false
		}
		return open == 0
	})

	// What clients saw, per phase.
	type tally struct {
		n, ok, s503, s5xx, dropped, other int
		lat                               []time.Duration
	}
	byPhase := map[string]*tally{}
	for _, a := range attempts {
		tl := byPhase[a.phase]
		if tl == nil {
			tl = &tally{}
			byPhase[a.phase] = tl
		}
		tl.n++
		tl.lat = append(tl.lat, a.latency)
		switch {
		case a.status == 202:
			tl.ok++
		case a.status == 503:
			tl.s503++
		case a.status >= 500:
			tl.s5xx++
		case a.status == 0:
			tl.dropped++
		default:
			tl.other++
		}
	}
	phases := make([]string, 0, len(byPhase))
	for p := range byPhase {
		phases = append(phases, p)
	}
	sort.Strings(phases)
	for _, p := range phases {
		tl := byPhase[p]
		sort.Slice(tl.lat, func(i, j int) bool { return tl.lat[i] < tl.lat[j] })
		t.Logf("%-17s %6d submits: %6d accepted, %4d 503, %d other 5xx, %d dropped, %d other; latency p50 %v p99 %v max %v",
			p, tl.n, tl.ok, tl.s503, tl.s5xx, tl.dropped, tl.other,
			tl.lat[len(tl.lat)/2].Round(time.Millisecond), tl.lat[len(tl.lat)*99/100].Round(time.Millisecond), tl.lat[len(tl.lat)-1].Round(time.Millisecond))
		if tl.s5xx > 0 || tl.other > 0 {
			t.Errorf("%s: %d 5xx other than 503, %d other failures", p, tl.s5xx, tl.other)
		}
	}
	if nr := byPhase["nats-restart"]; nr != nil {
		if failed := nr.n - nr.ok; failed > 0 {
			t.Errorf("a NATS restart cost %d failed submits (goal 0)", failed)
		}
		if slow := nr.lat[len(nr.lat)-1]; slow > time.Second {
			t.Errorf("a submit took %v during the NATS restart (goal under 1 s)", slow)
		}
	} else {
		t.Error("no submit happened during the NATS restart: the test proves nothing")
	}
	if byPhase["postgres-restart"] == nil {
		t.Error("no submit happened during the Postgres restart: the test proves nothing")
	}

	// Lost and doubled, from Postgres itself.
	var jobs, succeeded, usageRows, usageJobs, dupKeys int
	q := env.Store.Pool()
	if err := q.QueryRow(ctx, `SELECT count(*), count(*) FILTER (WHERE status = 'succeeded') FROM jobs`).Scan(&jobs, &succeeded); err != nil {
		t.Fatal(err)
	}
	if err := q.QueryRow(ctx, `SELECT count(*), count(DISTINCT request_id) FROM usage_events WHERE request_id LIKE 'job_%'`).Scan(&usageRows, &usageJobs); err != nil {
		t.Fatal(err)
	}
	if err := q.QueryRow(ctx, `SELECT count(*) FROM (SELECT idempotency_key FROM jobs GROUP BY 1 HAVING count(*) > 1) d`).Scan(&dupKeys); err != nil {
		t.Fatal(err)
	}
	lost := len(accepted) - succeeded
	doubled := usageRows - usageJobs + dupKeys
	t.Logf("jobs: %d intended, %d accepted, %d stored, %d succeeded; lost %d, doubled %d (usage rows %d for %d jobs); simulator admitted %d calls",
		total, len(accepted), jobs, succeeded, lost, doubled, usageRows, usageJobs, simTotal(env, func(s sim.Stats) int64 { return s.Admitted }))
	if len(accepted) != total || jobs != total || succeeded != total {
		t.Errorf("%d intended jobs, %d accepted, %d stored, %d succeeded", total, len(accepted), jobs, succeeded)
	}
	if doubled != 0 {
		t.Errorf("doubled: %d usage rows for %d jobs, %d idempotency keys stored twice", usageRows, usageJobs, dupKeys)
	}
	if usageRows != succeeded {
		t.Errorf("%d usage rows for %d succeeded jobs", usageRows, succeeded)
	}
}

// submitVia submits one small job to a gateway with an Idempotency-Key.
func submitVia(c *http.Client, base, key, idem string) (*http.Response, string, error) {
	body := `{"endpoint":"/v1/chat/completions","priority":"low","body":{"model":"gpt-4o","max_tokens":10,"messages":[{"role":"user","content":"chaos"}]}}`
	req, err := http.NewRequest(http.MethodPost, base+"/v1/jobs", strings.NewReader(body))
	if err != nil {
		return nil, "", err
	}
	req.Header.Set("Authorization", "Bearer "+key)
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Idempotency-Key", idem)
	resp, err := c.Do(req)
	if err != nil {
		return nil, "", err
	}
	defer resp.Body.Close()
	var j job
	if resp.StatusCode == 202 {
		if err := json.NewDecoder(resp.Body).Decode(&j); err != nil {
			return nil, "", errors.New("202 without a job")
		}
	} else {
		_, _ = io.Copy(io.Discard, resp.Body)
	}
	return resp, j.ID, nil
}
