package test

import (
	"context"
	"fmt"
	"net/http"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/levee-gw/levee/config"
	"github.com/levee-gw/levee/dev"
	"github.com/levee-gw/levee/gateway"
	"github.com/levee-gw/levee/sim"
	"github.com/levee-gw/levee/test/harness"
)

// TestClusterFailoverLosesNoJob runs two gateways, each with workers, on a
// three-node JetStream cluster with queue.replicas 3, and submits jobs
// through both, continuously, while (a) the node leading the jobs stream is
// stopped, and, once it is back, (b) the node leading it then is restarted.
// Clients retry as the SDKs do (a 503 or a dropped connection, with the same
// Idempotency-Key, at the other gateway). It holds Levee to: every submit
// answered 202 or a retryable 503 and in the end accepted; every accepted job
// succeeded; each ran once (one attempt, one upstream call, one usage row);
// and the two gateways' capacity views stay one across the cluster, before
// and after the failovers.
func TestClusterFailoverLosesNoJob(t *testing.T) {
	if testing.Short() {
		t.Skip("runs a NATS cluster")
	}
	const stream = "LEVEE_JOBS"
	start := time.Now()
	cl := harness.StartCluster(t, 3)
	t.Logf("cluster ready in %v", time.Since(start).Round(time.Millisecond))
	quick := sim.Deployment{TTFT: 5 * time.Millisecond, CompletionTokens: 5}
	f := &dev.File{
		Deployments: []dev.FileDeployment{
			{Name: "d", Model: "gpt-4o", Kind: config.Standard, TPM: 1 << 30, RPM: 1 << 30, Sim: quick},
			// Synchronous calls only, one deployment per check of the shared
			// capacity view, so each check starts from an empty minute.
			{Name: "share-1", Model: "gpt-4o", Kind: config.Standard, TPM: 1 << 20, RPM: 1 << 20, Sim: quick},
			{Name: "share-2", Model: "gpt-4o", Kind: config.Standard, TPM: 1 << 20, RPM: 1 << 20, Sim: quick},
		},
		Models: []config.Model{
			{Name: "gpt-4o", Deployments: []string{"d"}, MaxTokens: 4096},
			{Name: "share-1", Deployments: []string{"share-1"}},
			{Name: "share-2", Deployments: []string{"share-2"}},
		},
		// Messages a worker had fetched when its connection dropped are
		// redelivered after ack_wait: 3 s keeps the test short.
		Queue: config.Queue{Replicas: 3, AckWait: 3 * time.Second},
	}
	env := harness.StartWith(t, f, dev.StackOptions{NATSURL: cl.URL})
	other := gatewayOver(t, env, nil, true, nil)
	gws := []*gateway.Gateway{env.Gateway, other}
	bases := []string{env.BaseURL, "http://" + other.Addr}

	info, err := cl.StreamInfo(stream)
	if err != nil {
		t.Fatal(err)
	}
	if info.Config.Replicas != 3 || len(info.Cluster.Replicas) != 2 {
		t.Fatalf("the jobs stream has %d replicas (cluster %+v)", info.Config.Replicas, info.Cluster)
	}
	where := func() string {
		return fmt.Sprintf("gateways on %s and %s", gws[0].Queue.Conn().ConnectedServerName(), gws[1].Queue.Conn().ConnectedServerName())
	}

	var (
		mu       sync.Mutex
		phase    = "steady"
		attempts []attempt
		accepted = map[string]string{} // idempotency key → job id
	)
	setPhase := func(p string) {
		mu.Lock()
		phase = p
		mu.Unlock()
		t.Logf("%s: %s (%s)", time.Now().Format("15:04:05.000"), p, where())
	}
	client := &http.Client{Timeout: 30 * time.Second}
	submitOne := func(n int) {
		key := fmt.Sprintf("cluster-%d", n)
		for try := 0; ; try++ {
			start := time.Now()
			resp, id, err := submitVia(client, bases[(n+try)%2], env.APIKey, key)
			a := attempt{latency: time.Since(start)}
			if err == nil {
				a.status = resp.StatusCode
			}
			mu.Lock()
			a.phase = phase
			attempts = append(attempts, a)
			if a.status == 202 {
				accepted[key] = id
			}
			mu.Unlock()
			switch {
			case a.status == 202:
				return
			case a.status == 503 && resp.Header.Get("Retry-After") != "":
				s, _ := strconv.Atoi(resp.Header.Get("Retry-After"))
				time.Sleep(time.Duration(s) * time.Second)
			case a.status == 0:
				time.Sleep(200 * time.Millisecond)
			default:
				t.Errorf("submit %s: %d", key, a.status)
				return
			}
		}
	}

	// Eight clients submit 50 jobs a second between them until stopped.
	// More would only lengthen the test: on two shared cores under the
	// race detector, a pull from the replicated consumer is often answered
	// after the workers' 50 ms stall limit (in 52–120 ms), and each such
	// pull puts the tenant aside for 2 s, so the workers drain slower than
	// that.
	const rate = 50
	var (
		next    atomic.Int64
		stopped atomic.Bool
		wg      sync.WaitGroup
	)
	begin := time.Now()
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for !stopped.Load() {
				n := int(next.Add(1)) - 1
				if d := time.Until(begin.Add(time.Duration(n) * time.Second / rate)); d > 0 {
					time.Sleep(d)
				}
				submitOne(n)
			}
		}()
	}
	// submitted waits until k more submits have started from now, so every
	// phase has clients in it.
	submitted := func(k int) {
		target := next.Load() + int64(k)
		harness.Eventually(t, 30*time.Second, "submits to go on", func() bool { return next.Load() >= target })
	}

	submitted(50)
	tries := shareOneView(t, gws, bases, env.APIKey, "share-1")
	t.Logf("capacity view shared across nodes (%s) at try %d", where(), tries)

	// (a) The node leading the jobs stream goes.
	first := cl.StreamLeader(stream)
	if first < 0 {
		t.Fatal("the jobs stream has no leader")
	}
	setPhase("leader-" + cl.Name(first) + "-stopped")
	killed := time.Now()
	cl.Kill(first)
	second := cl.WaitStreamLeader(stream, first, 30*time.Second)
	t.Logf("new leader of %s: %s, %v after the old one stopped", stream, cl.Name(second), time.Since(killed).Round(time.Millisecond))
	setPhase("two-nodes")
	submitted(50)
	cl.Start(first)
	cl.WaitStreamCurrent(stream, 30*time.Second)
	setPhase("steady")
	submitted(25)

	// (b) A second node, the stream's leader now, restarts.
	leader := cl.StreamLeader(stream)
	if leader < 0 || leader == first {
		t.Fatalf("the jobs stream is led by node %d after the first failover (%d stopped)", leader, first)
	}
	setPhase("leader-" + cl.Name(leader) + "-restarting")
	killed = time.Now()
	cl.Kill(leader)
	third := cl.WaitStreamLeader(stream, leader, 30*time.Second)
	t.Logf("new leader of %s: %s, %v after the old one stopped", stream, cl.Name(third), time.Since(killed).Round(time.Millisecond))
	cl.Start(leader)
	cl.WaitStreamCurrent(stream, 30*time.Second)
	setPhase("steady-after")
	submitted(50)

	tries = shareOneView(t, gws, bases, env.APIKey, "share-2")
	t.Logf("capacity view shared across nodes after the failovers (%s) at try %d", where(), tries)
	stopped.Store(true)
	wg.Wait()
	drain := time.Now()
	ctx := context.Background()
	pool := env.Store.Pool()
	harness.Eventually(t, 90*time.Second, "every accepted job to end", func() bool {
		var open int
		if err := pool.QueryRow(ctx, `SELECT count(*) FROM jobs WHERE status IN ('queued', 'running')`).Scan(&open); err != nil {
			return false
		}
		return open == 0
	})
	t.Logf("every job ended %v after the last submit", time.Since(drain).Round(time.Millisecond))
	env.FlushUsage()
	flush, cancel := context.WithTimeout(ctx, 10*time.Second)
	if err := other.Ledger.Flush(flush); err != nil {
		t.Fatal(err)
	}
	cancel()

	reportAttempts(t, attempts)
	var jobs, succeeded, retried, usageRows, usageJobs, dupKeys int
	var longestWait float64
	if err := pool.QueryRow(ctx, `SELECT count(*), count(*) FILTER (WHERE status = 'succeeded'), count(*) FILTER (WHERE attempts <> 1),
		coalesce(extract(epoch FROM max(started_at - created_at)), 0) FROM jobs`).Scan(&jobs, &succeeded, &retried, &longestWait); err != nil {
		t.Fatal(err)
	}
	if err := pool.QueryRow(ctx, `SELECT count(*), count(DISTINCT request_id) FROM usage_events WHERE request_id LIKE 'job_%'`).Scan(&usageRows, &usageJobs); err != nil {
		t.Fatal(err)
	}
	if err := pool.QueryRow(ctx, `SELECT count(*) FROM (SELECT idempotency_key FROM jobs GROUP BY 1 HAVING count(*) > 1) d`).Scan(&dupKeys); err != nil {
		t.Fatal(err)
	}
	calls := env.Sim.Stats()["d"].Admitted
	intended := int(next.Load())
	t.Logf("jobs: %d submitted, %d accepted, %d stored, %d succeeded (the longest %.1f s after its submit), %d run more than once; %d usage rows for %d jobs; the deployment took %d calls",
		intended, len(accepted), jobs, succeeded, longestWait, retried, usageRows, usageJobs, calls)
	if len(accepted) != intended || jobs != intended {
		t.Errorf("%d submitted, %d accepted, %d stored", intended, len(accepted), jobs)
	}
	if lost := len(accepted) - succeeded; lost != 0 {
		t.Errorf("lost: %d accepted jobs did not succeed", lost)
	}
	if retried != 0 || calls != int64(succeeded) || usageRows != succeeded || usageJobs != succeeded || dupKeys != 0 {
		t.Errorf("doubled: %d jobs with more than one attempt, %d upstream calls and %d usage rows (%d distinct) for %d jobs, %d keys stored twice",
			retried, calls, usageRows, usageJobs, succeeded, dupKeys)
	}
}

// shareOneView proves that what one gateway charges a deployment reaches
// the other's view of it over NATS, with the two connected to different
// nodes of the cluster (so the charges cross a route). The second gateway
// makes no call of its own there, so its view of the deployment's minute
// must grow by exactly what the first charged. A charge published while the
// second's interest had not yet reached the first's node is lost (core NATS
// does not keep messages), so up to three bursts are tried; it returns the
// one that matched.
func shareOneView(t *testing.T, gws []*gateway.Gateway, bases []string, key, dep string) int {
	t.Helper()
	apart(t, gws[0].Queue.Conn(), gws[1].Queue.Conn())
	da, _ := gws[0].Broker.Deployment(dep)
	db, _ := gws[1].Broker.Deployment(dep)
	body := chat(20)
	body["model"] = dep
	for try := 1; try <= 3; try++ {
		_, charged0, _ := da.Capacity.Charged(time.Now())
		seen0, _, _ := db.Capacity.Charged(time.Now())
		for range 5 {
			if resp, raw := call(t, bases[0], "/v1/chat/completions", key, body); resp.StatusCode != 200 {
				t.Fatalf("a call to %s: %d %s", dep, resp.StatusCode, raw)
			}
		}
		// A call is committed (counted in charged) a moment after its
		// answer, so both sides are read again each time.
		var seen, charged int64
		deadline := time.Now().Add(3 * time.Second)
		for time.Now().Before(deadline) {
			seen, _, _ = db.Capacity.Charged(time.Now())
			_, charged, _ = da.Capacity.Charged(time.Now())
			if charged > charged0 && seen-seen0 == charged-charged0 {
				return try
			}
			time.Sleep(10 * time.Millisecond)
		}
		t.Logf("try %d: the other gateway saw %d of the %d tokens charged on %s", try, seen-seen0, charged-charged0, dep)
	}
	t.Errorf("the gateways' views of %s are not one: charges made through one never reached the other", dep)
	return 0
}

// apart moves b to another node than a's, so messages between them cross a
// route.
func apart(t *testing.T, a, b *nats.Conn) {
	t.Helper()
	harness.Eventually(t, 20*time.Second, "the gateways to be on different nodes", func() bool {
		if a.IsConnected() && b.IsConnected() && a.ConnectedServerName() != b.ConnectedServerName() {
			return true
		}
		if b.IsConnected() {
			_ = b.ForceReconnect()
		}
		return false
	})
}

// reportAttempts logs what clients saw per phase, and fails on any answer
// other than 202 and a 503 with Retry-After.
func reportAttempts(t *testing.T, attempts []attempt) {
	t.Helper()
	type tally struct {
		n, ok, s503, dropped, other int
		lat                         []time.Duration
	}
	byPhase := map[string]*tally{}
	var phases []string
	for _, a := range attempts {
		tl := byPhase[a.phase]
		if tl == nil {
			tl = &tally{}
			byPhase[a.phase] = tl
			phases = append(phases, a.phase)
		}
		tl.n++
		tl.lat = append(tl.lat, a.latency)
		switch a.status {
		case 202:
			tl.ok++
		case 503:
			tl.s503++
		case 0:
			tl.dropped++
		default:
			tl.other++
		}
	}
	for _, p := range phases {
		tl := byPhase[p]
		slices.Sort(tl.lat)
		t.Logf("%-28s %5d submits: %5d accepted, %3d 503, %d dropped, %d other; latency p50 %v p99 %v max %v",
			p, tl.n, tl.ok, tl.s503, tl.dropped, tl.other,
			tl.lat[len(tl.lat)/2].Round(time.Millisecond), tl.lat[len(tl.lat)*99/100].Round(time.Millisecond), tl.lat[len(tl.lat)-1].Round(time.Millisecond))
		if tl.other > 0 {
			t.Errorf("%s: %d answers other than 202 and 503", p, tl.other)
		}
	}
}
