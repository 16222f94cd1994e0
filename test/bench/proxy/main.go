// Command proxy is `make bench`: it measures what Levee adds to a call. It
// builds levee, runs the simulator (zero latency, no limits) and a gateway as
// separate processes, with a private Postgres for keys and usage, then drives
// an open-loop load at a fixed rate (2,000 req/s), alternating rounds sent
// directly to the simulator, through Levee and through a do-nothing TCP hop,
// and reports per-round p50/p99, their medians, Levee's memory, and each of
// the synchronous path's goals with PASS or MISS; it exits non-zero when it
// could not measure one. Last it ramps the rate to find the highest one each
// path sustains.
package main

import (
	"bytes"
	"cmp"
	"context"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/valyala/fasthttp"

	"github.com/levee-gw/levee/dev"
	"github.com/levee-gw/levee/store"
)

func main() {
	rate := flag.Int("rate", goalRate, "requests per second for the latency rounds")
	dur := flag.Duration("duration", 3*time.Second, "length of one round")
	rounds := flag.Int("rounds", 5, "rounds per path (interleaved)")
	ramp := flag.String("ramp", "1000,2000,3000,4000,5000", "rates to try for the sustained-rate search")
	gwEnv := flag.String("gateway-env", "", "extra environment for the gateway process, e.g. GOMAXPROCS=1")
	flag.StringVar(&loadgenFlag, "loadgen", "nethttp", "the load generator's HTTP client: nethttp or fasthttp")
	flag.StringVar(&bEnvFlag, "b-env", "", "also run a second gateway with this environment and interleave it (A/B in one run)")
	flag.StringVar(&bBinFlag, "b-bin", "", "also run a second gateway from this levee binary (e.g. built from an earlier commit) and interleave it")
	flag.StringVar(&hopFlag, "hop", "tcp", "also measure a do-nothing hop (tcp, fast, stdfast or std; see test/bench/hop; \"\" for none) in the same rounds")
	flag.BoolVar(&limitsFlag, "limits", false, "also measure calls of a tenant with limits and a budget (none binding) in the same rounds")
	flag.StringVar(&simAddrFlag, "sim-addr", "", "fixed simulator address (default: a free port)")
	flag.StringVar(&viaFlag, "via", "", "measure through this base URL instead of Levee (e.g. another proxy in front of -sim-addr)")
	flag.Parse()
	// What the run starts is stopped also when the bench is interrupted: a
	// gateway, a simulator or a Postgres left behind would load the machine
	// under every later measurement.
	cl := &cleanups{}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, os.Interrupt, syscall.SIGTERM)
	go func() {
		<-sig
		fmt.Fprintln(os.Stderr, "bench: interrupted; stopping what it started")
		cl.run()
		os.Exit(130)
	}()
	err := run(cl, *rate, *dur, *rounds, *ramp, *gwEnv)
	cl.run()
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

// cleanups are run once, the last added first.
type cleanups struct {
	mu   sync.Mutex
	fs   []func()
	done bool
}

func (c *cleanups) add(f func()) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.fs = append(c.fs, f)
}

func (c *cleanups) run() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.done {
		return
	}
	c.done = true
	for i := len(c.fs) - 1; i >= 0; i-- {
		c.fs[i]()
	}
}

var simAddrFlag, viaFlag, bEnvFlag, bBinFlag, hopFlag, loadgenFlag string
var limitsFlag bool

func run(cl *cleanups, rate int, dur time.Duration, rounds int, ramp, gwEnv string) error {
	ctx := context.Background()
	dir, err := os.MkdirTemp("", "levee-bench-")
	if err != nil {
		return err
	}
	cl.add(func() { os.RemoveAll(dir) })
	_ = os.Chmod(dir, 0o755)
	bin := filepath.Join(dir, "levee")
	if out, err := exec.Command("go", "build", "-o", bin, "./cmd/levee").CombinedOutput(); err != nil {
		return fmt.Errorf("build: %v: %s", err, out)
	}
	pg, err := dev.StartPostgres(ctx, filepath.Join(dir, "pg"), dev.PostgresOptions{Ephemeral: true})
	if err != nil {
		return err
	}
	cl.add(func() { pg.Stop() })

	simAddr, gwAddr := freeAddr(), freeAddr()
	if simAddrFlag != "" {
		simAddr = simAddrFlag
	}
	simKey := store.NewSecret()
	simCfg := fmt.Sprintf("api_key: %s\ndeployments:\n  - name: bench\n    model: gpt-4o\n    tpm: 0\n    completion_tokens: 16\n", simKey)
	gwCfg := fmt.Sprintf(`listen: %s
database_url: %s
deployments:
  - name: bench
    model: gpt-4o
    endpoint: http://%s
    credential_env: BENCH_SIM_KEY
    kind: provisioned
    tpm: 1000000000000
    rpm: 1000000000000
models:
  - name: gpt-4o
    deployments: [bench]
`, gwAddr, pg.URL, simAddr)
	if err := os.WriteFile(filepath.Join(dir, "sim.yaml"), []byte(simCfg), 0o600); err != nil {
		return err
	}
	simProc, err := start(bin, nil, "sim", "--listen", simAddr, "--config", filepath.Join(dir, "sim.yaml"))
	if err != nil {
		return err
	}
	cl.add(func() { stop(simProc) })
	// serve starts a gateway on addr with extra environment and waits until
	// it is ready; gateways start one after another, since each migrates.
	serve := func(bin, addr, name, extraEnv string) (*exec.Cmd, error) {
		path := filepath.Join(dir, name)
		if err := os.WriteFile(path, []byte(strings.Replace(gwCfg, "listen: "+gwAddr, "listen: "+addr, 1)), 0o600); err != nil {
			return nil, err
		}
		p, err := start(bin, append([]string{"BENCH_SIM_KEY=" + simKey, "LEVEE_LOG_LEVEL=warn"}, strings.Fields(extraEnv)...), "serve", "--config", path)
		if err != nil {
			return nil, err
		}
		if err := waitHTTP("http://" + addr + "/readyz"); err != nil {
			stop(p)
			return nil, err
		}
		return p, nil
	}
	gwProc, err := serve(bin, gwAddr, "levee.yaml", gwEnv)
	if err != nil {
		return err
	}
	cl.add(func() { stop(gwProc) })
	// B is a second gateway: the same binary with other environment, or
	// another binary.
	var bAddr, bName string
	var bPid int
	if bEnvFlag != "" || bBinFlag != "" {
		bAddr, bName = freeAddr(), strings.TrimSpace(bEnvFlag+" "+bBinFlag)
		bb := bin
		if bBinFlag != "" {
			bb = bBinFlag
		}
		bProc, err := serve(bb, bAddr, "levee-b.yaml", bEnvFlag)
		if err != nil {
			return err
		}
		cl.add(func() { stop(bProc) })
		bPid = bProc.Process.Pid
	}
	var hopAddr string
	if hopFlag != "" {
		hopBin := filepath.Join(dir, "hop")
		if out, err := exec.Command("go", "build", "-o", hopBin, "./test/bench/hop").CombinedOutput(); err != nil {
			return fmt.Errorf("build hop: %v: %s", err, out)
		}
		hopAddr = freeAddr()
		hopProc, err := start(hopBin, nil, hopFlag, hopAddr, simAddr)
		if err != nil {
			return err
		}
		cl.add(func() { stop(hopProc) })
		if err := waitTCP(hopAddr); err != nil {
			return err
		}
	}

	st, err := store.Open(ctx, pg.URL, 0)
	if err != nil {
		return err
	}
	cl.add(st.Close)
	if _, err := st.CreateTenant(ctx, &store.CreateTenantParams{Name: "bench"}); err != nil {
		return err
	}
	_, key, err := st.CreateKey(ctx, &store.CreateKeyParams{TenantName: "bench"})
	if err != nil {
		return err
	}
	// A second tenant whose every call goes through the limit and budget
	// checks, with limits far above the load so none binds.
	var limitedKey string
	if limitsFlag {
		t, err := st.CreateTenant(ctx, &store.CreateTenantParams{Name: "bench-limited"})
		if err != nil {
			return err
		}
		var k *store.Key
		if k, limitedKey, err = st.CreateKey(ctx, &store.CreateKeyParams{TenantName: "bench-limited"}); err != nil {
			return err
		}
		if err := st.SetLimits(ctx, &store.SetLimitsParams{TenantID: t.ID, TPM: 1 << 40, RPM: 1 << 40, Concurrency: 1 << 20}); err != nil {
			return err
		}
		if err := st.SetLimits(ctx, &store.SetLimitsParams{TenantID: t.ID, KeyID: k.ID, TPM: 1 << 40}); err != nil {
			return err
		}
		if err := st.SetBudget(ctx, &store.SetBudgetParams{TenantID: t.ID, Tokens: 1 << 50, Period: "month", Soft: 0.8, OnExhausted: "wait"}); err != nil {
			return err
		}
		time.Sleep(2 * time.Second) // the gateway reloads limits every second
	}

	body := []byte(`{"model":"gpt-4o","max_tokens":16,"messages":[{"role":"system","content":"You are terse."},{"role":"user","content":"Say something short about rivers."}]}`)
	direct := target{url: "http://" + simAddr + "/openai/deployments/bench/chat/completions?api-version=2024-10-21", header: "api-key", key: simKey, body: body}
	levee := target{url: "http://" + gwAddr + "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21", header: "api-key", key: key, body: body}
	if viaFlag != "" {
		levee = target{url: viaFlag + "/openai/deployments/bench/chat/completions?api-version=2024-10-21", header: "api-key", key: simKey, body: body}
		fmt.Printf("measuring through %s instead of Levee\n", viaFlag)
	}
	var client sender
	switch loadgenFlag {
	case "nethttp":
		client = netHTTPSender(&http.Client{Transport: &http.Transport{MaxIdleConns: 4096, MaxIdleConnsPerHost: 4096, IdleConnTimeout: time.Minute}, Timeout: 10 * time.Second})
	case "fasthttp":
		client = fastHTTPSender(&fasthttp.Client{MaxConnsPerHost: 4096, DisablePathNormalizing: true, NoDefaultUserAgentHeader: true})
	default:
		return fmt.Errorf("-loadgen: %q is neither nethttp nor fasthttp", loadgenFlag)
	}

	fmt.Printf("levee bench: %d rounds of %v at %d req/s per path, interleaved; %d cores; gateway env %q; load generator %s\n", rounds, dur, rate, numCPU(), gwEnv, loadgenFlag)
	// Warm both paths: connections, tokenizers, the key cache.
	bt := levee
	bt.url = strings.Replace(bt.url, gwAddr, bAddr, 1)
	ht := direct
	ht.url = strings.Replace(ht.url, simAddr, hopAddr, 1)
	load(client, direct, rate, time.Second)
	load(client, levee, rate, time.Second)
	if bAddr != "" {
		load(client, bt, rate, time.Second)
	}
	if hopAddr != "" {
		load(client, ht, rate, time.Second)
	}
	lt := levee
	lt.key = limitedKey
	if limitedKey != "" {
		load(client, lt, rate, time.Second)
	}
	// The paths take turns, one round each, in an order that rotates every
	// round: on 2 shared cores the machine drifts between windows, and a
	// fixed order would hand one path the same place in every drift.
	paths := []*path{{name: "direct", t: direct}, {name: "levee", t: levee, pid: gwProc.Process.Pid, metrics: "http://" + gwAddr + "/metrics"}}
	if viaFlag != "" {
		paths[1].pid = 0 // not a Levee process
	}
	if bAddr != "" {
		paths = append(paths, &path{name: "B", t: bt, pid: bPid, metrics: "http://" + bAddr + "/metrics"})
	}
	if hopAddr != "" {
		paths = append(paths, &path{name: "hop", t: ht})
	}
	var qAdd50, qAdd99 []time.Duration
	var failures []string
	for r := 0; r < rounds; r++ {
		for i := range paths {
			p := paths[(i+r)%len(paths)]
			var cpu0 time.Duration
			var rt0 goRuntime
			if p.pid != 0 {
				if cpu0, err = readCPU(p.pid); err != nil {
					return fmt.Errorf("%s's CPU time: %w", p.name, err)
				}
				if rt0, err = readGoRuntime(p.metrics); err != nil {
					return fmt.Errorf("%s's metrics: %w", p.name, err)
				}
			}
			res := load(client, p.t, rate, dur)
			p.rounds = append(p.rounds, res)
			if p.pid != 0 {
				cpu1, err := readCPU(p.pid)
				if err != nil {
					return fmt.Errorf("%s's CPU time: %w", p.name, err)
				}
				rt1, err := readGoRuntime(p.metrics)
				if err != nil {
					return fmt.Errorf("%s's metrics: %w", p.name, err)
				}
				p.cpu += cpu1 - cpu0
				p.calls += res.ok
				p.allocated += rt1.allocated - rt0.allocated
				p.gcs += rt1.gcs - rt0.gcs
			}
			if res.errors > 0 {
				failures = append(failures, fmt.Sprintf("round %d: %d of %s's calls failed", r+1, res.errors, p.name))
			}
			if p.pid != 0 {
				// Read right after the path's round, while its load is
				// still what the process holds.
				m, err := readMem(p.pid)
				if err != nil {
					return fmt.Errorf("%s's memory: %w", p.name, err)
				}
				p.rss = append(p.rss, m.rss)
			}
		}
		if limitedKey != "" {
			// The limited tenant's calls alternate with the other's in one
			// window: a difference of microseconds is not lost in the drift
			// between windows.
			pair := loadMany(client, []target{levee, lt}, rate, dur)
			u, lq := pair[0], pair[1]
			if lq.errors+u.errors > 0 {
				failures = append(failures, fmt.Sprintf("round %d: %d of the limited tenant's calls and %d of the others' alongside failed", r+1, lq.errors, u.errors))
			}
			fmt.Printf("  round %d  limited tenant p50 %-9v p99 %-9v errors %d | alongside, unlimited p50 %-9v p99 %-9v\n",
				r+1, lq.p(50), lq.p(99), lq.errors, u.p(50), u.p(99))
			qAdd50, qAdd99 = append(qAdd50, lq.p(50)-u.p(50)), append(qAdd99, lq.p(99)-u.p(99))
		}
		fmt.Printf("  round %d ", r+1)
		for _, p := range paths {
			res := p.rounds[r]
			fmt.Printf(" | %s p50 %-9v p99 %-9v", p.name, res.p(50).Round(time.Microsecond), res.p(99).Round(time.Microsecond))
		}
		fmt.Println()
	}
	// The peak is read before the ramp, which goes past the rate measured.
	for _, p := range paths {
		if p.pid == 0 {
			continue
		}
		m, err := readMem(p.pid)
		if err != nil {
			return fmt.Errorf("%s's memory: %w", p.name, err)
		}
		p.hwm = m.hwm
	}
	d := paths[0]
	fmt.Printf("\nat %d req/s (medians of %d rounds; added = the path's percentile minus direct's in the same round)\n", rate, rounds)
	for _, p := range paths {
		fmt.Printf("  %-7s p50 %-9v p99 %-9v", p.name, p.median(50).Round(time.Microsecond), p.median(99).Round(time.Microsecond))
		if p != d {
			fmt.Printf("  added p50 %-9v p99 %-9v (from the actual send: p50 %v, p99 %v)",
				p.added(d, 50, false).Round(time.Microsecond), p.added(d, 99, false).Round(time.Microsecond),
				p.added(d, 50, true).Round(time.Microsecond), p.added(d, 99, true).Round(time.Microsecond))
		}
		if p.pid != 0 {
			calls := float64(max(p.calls, 1))
			fmt.Printf("  RSS %d MB (peak %d MB)  per call: CPU %v, %.1f KB allocated; %.0f GC cycles in its %v of rounds",
				median(p.rss)>>20, p.hwm>>20, (p.cpu / time.Duration(calls)).Round(time.Microsecond), p.allocated/calls/1024,
				p.gcs, time.Duration(rounds)*dur)
		}
		fmt.Println()
	}
	if bAddr != "" {
		fmt.Printf("  (B is %s)\n", bName)
	}
	if limitedKey != "" {
		fmt.Printf("  added by the limit and budget checks (limited tenant minus the other, calls alternating in one window): p50 %v  p99 %v\n", median(qAdd50), median(qAdd99))
	}
	l := paths[1]
	if hopAddr != "" {
		h := paths[len(paths)-1]
		fmt.Printf("  levee beyond the %s hop: p50 %v  p99 %v\n", hopFlag, (l.added(d, 50, false) - h.added(d, 50, false)).Round(time.Microsecond),
			(l.added(d, 99, false) - h.added(d, 99, false)).Round(time.Microsecond))
	}
	goals(rate, d, l, paths, &failures)
	if len(failures) > 0 {
		for _, f := range failures {
			fmt.Fprintln(os.Stderr, "bench: cannot measure:", f)
		}
		return fmt.Errorf("%d measurements failed (see above); the figures are not to be trusted", len(failures))
	}

	fmt.Printf("\nsustained rate (%v per step; sustained = ≥99%% of the rate completed, no errors, p99 < 100ms)\n", dur)
	best := map[string]int{}
	for _, f := range strings.Split(ramp, ",") {
		rt, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil {
			return fmt.Errorf("ramp: %w", err)
		}
		for _, p := range []struct {
			name string
			t    target
		}{{"direct", direct}, {"levee", levee}} {
			res := load(client, p.t, rt, dur)
			achieved := float64(res.ok) / dur.Seconds()
			okay := res.errors == 0 && achieved >= 0.99*float64(rt) && res.p(99) < 100*time.Millisecond
			fmt.Printf("  %-6s %5d req/s: completed %7.0f/s  errors %-5d p50 %-9v p99 %-9v %s\n", p.name, rt, achieved, res.errors, res.p(50), res.p(99), verdict(okay))
			if okay && rt > best[p.name] {
				best[p.name] = rt
			}
		}
	}
	fmt.Printf("\nhighest sustained: direct %d req/s, levee %d req/s\n", best["direct"], best["levee"])
	return nil
}

func verdict(ok bool) string {
	if ok {
		return "sustained"
	}
	return "NOT sustained"
}

type target struct {
	url, header, key string
	body             []byte
}

type result struct {
	lat        []time.Duration // from each request's scheduled time
	svc        []time.Duration // from the moment it was handed to the client
	ok, errors int
}

func (r *result) p(q int) time.Duration { return pct(r.lat, q) }

// s is the percentile of the latency counted from the actual send.
func (r *result) s(q int) time.Duration { return pct(r.svc, q) }

func pct(ds []time.Duration, q int) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	return ds[min(len(ds)*q/100, len(ds)-1)]
}

// load sends rate requests per second for dur, open loop: each request is
// scheduled at its own time whether or not earlier ones have finished, and
// its latency counts from that scheduled time.
// sender sends one call and reports its status once the body is read.
type sender func(t target) (int, error)

func netHTTPSender(c *http.Client) sender {
	return func(t target) (int, error) {
		req, _ := http.NewRequest(http.MethodPost, t.url, bytes.NewReader(t.body))
		req.Header.Set(t.header, t.key)
		req.Header.Set("Content-Type", "application/json")
		resp, err := c.Do(req)
		if err != nil {
			return 0, err
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return resp.StatusCode, nil
	}
}

// fastHTTPSender writes and reads on the calling goroutine, so the load
// generator itself wakes fewer threads per call.
func fastHTTPSender(c *fasthttp.Client) sender {
	return func(t target) (int, error) {
		req, resp := fasthttp.AcquireRequest(), fasthttp.AcquireResponse()
		defer fasthttp.ReleaseRequest(req)
		defer fasthttp.ReleaseResponse(resp)
		req.SetRequestURI(t.url)
		req.Header.SetMethod(http.MethodPost)
		req.Header.Set(t.header, t.key)
		req.Header.SetContentType("application/json")
		req.SetBodyRaw(t.body)
		if err := c.DoTimeout(req, resp, 10*time.Second); err != nil {
			return 0, err
		}
		return resp.StatusCode(), nil
	}
}

func load(send sender, t target, rate int, dur time.Duration) *result {
	return loadMany(send, []target{t}, rate, dur)[0]
}

// loadMany sends at rate for dur, request i to ts[i%len(ts)]: targets
// compared in the same window see the same machine, which sequential
// windows on 2 shared cores do not.
func loadMany(send sender, ts []target, rate int, dur time.Duration) []*result {
	n := int(float64(rate) * dur.Seconds())
	lat := make([]time.Duration, n)
	svc := make([]time.Duration, n)
	errs := make([]atomic.Int64, len(ts))
	var wg sync.WaitGroup
	start := time.Now()
	interval := time.Second / time.Duration(rate)
	for i := 0; i < n; i++ {
		at := start.Add(time.Duration(i) * interval)
		if d := time.Until(at); d > 0 {
			time.Sleep(d)
		}
		wg.Add(1)
		go func(i int, at time.Time) {
			defer wg.Done()
			sent := time.Now()
			status, err := send(ts[i%len(ts)])
			if err != nil || status != http.StatusOK {
				errs[i%len(ts)].Add(1)
				lat[i] = -1
				return
			}
			lat[i], svc[i] = time.Since(at), time.Since(sent)
		}(i, at)
	}
	wg.Wait()
	out := make([]*result, len(ts))
	for k := range ts {
		out[k] = &result{errors: int(errs[k].Load())}
	}
	for i, l := range lat {
		if l >= 0 {
			r := out[i%len(ts)]
			r.ok++
			r.lat = append(r.lat, l)
			r.svc = append(r.svc, svc[i])
		}
	}
	for _, r := range out {
		slices.Sort(r.lat)
		slices.Sort(r.svc)
	}
	return out
}

func median[T cmp.Ordered](ds []T) T {
	s := slices.Clone(ds)
	slices.Sort(s)
	return s[len(s)/2]
}

func freeAddr() string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		panic(err)
	}
	defer l.Close()
	return l.Addr().String()
}

func start(bin string, env []string, args ...string) (*exec.Cmd, error) {
	cmd := exec.Command(bin, args...)
	cmd.Env = append(os.Environ(), env...)
	cmd.Stdout, cmd.Stderr = io.Discard, os.Stderr
	return cmd, cmd.Start()
}

func stop(cmd *exec.Cmd) {
	_ = cmd.Process.Signal(os.Interrupt)
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		_ = cmd.Process.Kill()
	}
}

func waitTCP(addr string) error {
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		if c, err := net.Dial("tcp", addr); err == nil {
			c.Close()
			return nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	return fmt.Errorf("%s did not listen", addr)
}

func waitHTTP(url string) error {
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		if resp, err := http.Get(url); err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return nil
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	return fmt.Errorf("%s not ready", url)
}

func numCPU() int {
	out, err := exec.Command("nproc").Output()
	if err != nil {
		return 0
	}
	n, _ := strconv.Atoi(strings.TrimSpace(string(out)))
	return n
}

// path is one way to the simulator measured in the latency rounds: its
// result in each round and, for a gateway process, its memory.
type path struct {
	name   string
	t      target
	pid    int // the gateway's process, 0 for none
	rounds []*result
	rss    []int64 // VmRSS after each of its rounds
	hwm    int64   // VmHWM after the last round
	// cpu is the process's CPU time (user and system, every thread) over
	// its rounds, for calls calls: unlike latency, it hardly moves with
	// what else the machine runs, so A/B runs compare by it too.
	cpu   time.Duration
	calls int
	// metrics is the gateway's /metrics: the Go runtime's bytes allocated
	// and GC cycles over its rounds.
	metrics        string
	allocated, gcs float64
}

type goRuntime struct{ allocated, gcs float64 }

// readGoRuntime reads the bytes a gateway has allocated and the GC cycles
// it has run, from its Prometheus metrics.
func readGoRuntime(url string) (goRuntime, error) {
	resp, err := http.Get(url)
	if err != nil {
		return goRuntime{}, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return goRuntime{}, err
	}
	var g goRuntime
	found := 0
	for _, line := range strings.Split(string(b), "\n") {
		name, v, ok := strings.Cut(line, " ")
		var dst *float64
		switch name {
		case "go_memstats_alloc_bytes_total":
			dst = &g.allocated
		case "go_gc_duration_seconds_count":
			dst = &g.gcs
		}
		if !ok || dst == nil {
			continue
		}
		if *dst, err = strconv.ParseFloat(strings.TrimSpace(v), 64); err != nil {
			return goRuntime{}, fmt.Errorf("%s: %w", name, err)
		}
		found++
	}
	if found != 2 {
		return goRuntime{}, fmt.Errorf("%s has no go_memstats_alloc_bytes_total or go_gc_duration_seconds_count", url)
	}
	return g, nil
}

// readCPU reads a process's user plus system time from /proc/PID/stat.
func readCPU(pid int) (time.Duration, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// The command name, field 2, is in parentheses and may hold spaces.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, fmt.Errorf("/proc/%d/stat: no command name", pid)
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 13 {
		return 0, fmt.Errorf("/proc/%d/stat: %d fields", pid, len(f))
	}
	// utime and stime are fields 14 and 15, in clock ticks (USER_HZ, 100
	// on Linux).
	var ticks int64
	for _, s := range f[11:13] {
		n, err := strconv.ParseInt(s, 10, 64)
		if err != nil {
			return 0, fmt.Errorf("/proc/%d/stat: %w", pid, err)
		}
		ticks += n
	}
	return time.Duration(ticks) * 10 * time.Millisecond, nil
}

// median is the median over rounds of the path's q-th percentile.
func (p *path) median(q int) time.Duration {
	ds := make([]time.Duration, len(p.rounds))
	for i, r := range p.rounds {
		ds[i] = r.p(q)
	}
	return median(ds)
}

// added is the median over rounds of what the path adds to d's q-th
// percentile in the same round; svc counts from each call's actual send
// instead of its schedule.
func (p *path) added(d *path, q int, svc bool) time.Duration {
	ds := make([]time.Duration, len(p.rounds))
	for i, r := range p.rounds {
		if svc {
			ds[i] = r.s(q) - d.rounds[i].s(q)
		} else {
			ds[i] = r.p(q) - d.rounds[i].p(q)
		}
	}
	return median(ds)
}

type mem struct{ rss, hwm int64 }

// readMem reads a process's resident set now (VmRSS) and at its peak
// (VmHWM) from /proc.
func readMem(pid int) (mem, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return mem{}, err
	}
	var m mem
	for _, line := range strings.Split(string(b), "\n") {
		k, v, ok := strings.Cut(line, ":")
		if !ok || (k != "VmRSS" && k != "VmHWM") {
			continue
		}
		f := strings.Fields(v)
		if len(f) != 2 || f[1] != "kB" {
			return mem{}, fmt.Errorf("/proc/%d/status: cannot read %q", pid, line)
		}
		n, err := strconv.ParseInt(f[0], 10, 64)
		if err != nil {
			return mem{}, fmt.Errorf("/proc/%d/status: %w", pid, err)
		}
		if k == "VmRSS" {
			m.rss = n << 10
		} else {
			m.hwm = n << 10
		}
	}
	if m.rss == 0 || m.hwm == 0 {
		return mem{}, fmt.Errorf("/proc/%d/status has no VmRSS or VmHWM", pid)
	}
	return m, nil
}

// The synchronous path's goals (issue 13), at goalRate.
const (
	goalRate     = 2000
	goalAddedP99 = 500 * time.Microsecond
	goalHopRatio = 1.3
	goalRSS      = 150 << 20
)

// goals prints each goal with what was measured and PASS or MISS. What it
// cannot measure is added to failures, so the run fails rather than pass
// without a figure.
func goals(rate int, d, l *path, paths []*path, failures *[]string) {
	fmt.Printf("\ngoals (issue 13) at %d req/s, medians of interleaved rounds:\n", goalRate)
	if rate != goalRate {
		fmt.Printf("  (this run is at %d req/s: the verdicts below are not the goals' own)\n", rate)
	}
	verdict := func(ok bool) string {
		if ok {
			return "PASS"
		}
		return "MISS"
	}
	a50, a99 := l.added(d, 50, false), l.added(d, 99, false)
	fmt.Printf("  added p99            %-10v goal ≤ %-8v %s\n", a99.Round(time.Microsecond), goalAddedP99, verdict(a99 <= goalAddedP99))
	var hop *path
	for _, p := range paths {
		if p.name == "hop" {
			hop = p
		}
	}
	switch {
	case hop == nil:
		*failures = append(*failures, "added p50 / tcp hop: no hop was measured (run with -hop tcp)")
	default:
		h50 := hop.added(d, 50, false)
		if h50 <= 0 {
			*failures = append(*failures, fmt.Sprintf("added p50 / %s hop: the hop's added p50 was %v, so the noise between rounds exceeded what a hop costs (rerun, with more -rounds)", hopFlag, h50))
			break
		}
		ratio := float64(a50) / float64(h50)
		note := ""
		if hopFlag != "tcp" {
			note = fmt.Sprintf(" (against the %s hop; the goal is against tcp)", hopFlag)
		}
		fmt.Printf("  added p50 / hop p50  %-10s goal ≤ %-8.2f %s  (%v / %v)%s\n", fmt.Sprintf("%.2f", ratio), goalHopRatio, verdict(ratio <= goalHopRatio),
			a50.Round(time.Microsecond), h50.Round(time.Microsecond), note)
	}
	if l.pid == 0 {
		// -via measures another proxy on purpose: there is no Levee to read.
		fmt.Println("  RSS                  not measured: -via measures another proxy, not a Levee process")
		return
	}
	steady := median(l.rss)
	fmt.Printf("  RSS steady (VmRSS)   %-10s goal ≤ %-8s %s\n", fmt.Sprintf("%d MB", steady>>20), fmt.Sprintf("%d MB", goalRSS>>20), verdict(steady <= goalRSS))
	fmt.Printf("  RSS peak (VmHWM)     %-10s goal ≤ %-8s %s\n", fmt.Sprintf("%d MB", l.hwm>>20), fmt.Sprintf("%d MB", goalRSS>>20), verdict(l.hwm <= goalRSS))
}
