// Command cost is `make bench-cost`: how Levee's figures move as the work
// grows (issue 13). Three sweeps, each point on a fresh stack (private
// Postgres without fsync, NATS JetStream in a child process of its own so its
// memory is counted apart, a zero-latency simulator without limits; the
// gateway and, when a point needs them, its workers run in this process):
//
//   - tenants: a backlog of -tenant-jobs low-priority jobs spread over 1, 10,
//     100, 1,000 tenants, submitted over HTTP with the workers off, then
//     drained; a small tenant's 10 jobs are submitted as the workers start.
//   - depth: 0, 100,000, 1,000,000 queued jobs of one tenant, copied into
//     Postgres (COPY) and published to JetStream (asynchronous publishes,
//     the job id as message id, as the outbox does); then submit latency with
//     the backlog there, and the time a new job of another tenant (normal and
//     low priority) takes to start once the workers run.
//   - deployments: 2, 10, 50 standard deployments behind one model: added
//     latency of synchronous calls (through Levee vs straight to the
//     simulator, interleaved), capacity-sharing messages per second, jobs/s.
//
// Each sweep prints a table with ratios against its smallest point. Any
// figure that cannot be measured ends the run with a non-zero exit.
package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/levee-gw/levee/config"
	"github.com/levee-gw/levee/dev"
	"github.com/levee-gw/levee/gateway"
	"github.com/levee-gw/levee/queue"
	"github.com/levee-gw/levee/sim"
	"github.com/levee-gw/levee/store"
)

func main() {
	natsChild := flag.String("nats-child", "", "(internal) run only an embedded NATS server storing here")
	sweeps := flag.String("sweeps", "tenants,depth,deployments", "sweeps to run")
	tenants := flag.String("tenants", "1,10,100,1000", "tenants sweep: active tenants with queued jobs")
	tenantJobs := flag.Int("tenant-jobs", 20000, "tenants sweep: backlog, spread evenly over the tenants")
	depths := flag.String("depth", "0,100000,1000000", "depth sweep: queued jobs of one tenant")
	deployments := flag.String("deployments", "2,10,50", "deployments sweep: deployments behind one model")
	flag.IntVar(&reps, "reps", 1, "tenants sweep: runs of each point (the table shows medians)")
	flag.IntVar(&concurrency, "concurrency", 256, "worker.concurrency (256 is the default)")
	flag.StringVar(&profileDir, "profiles", "", "keep each tenants point's CPU profile of the drain in this directory")
	flag.Parse()
	if *natsChild != "" {
		if err := runNATSChild(*natsChild); err != nil {
			fmt.Fprintln(os.Stderr, "nats child:", err)
			os.Exit(1)
		}
		return
	}
	start := time.Now()
	fmt.Printf("levee bench-cost: %d cores (shared with anything else running), Go %s\n", runtime.NumCPU(), runtime.Version())
	ctx := context.Background()
	for _, s := range strings.Split(*sweeps, ",") {
		var err error
		switch s {
		case "tenants":
			err = sweepTenants(ctx, ints(*tenants), *tenantJobs)
		case "depth":
			err = sweepDepth(ctx, ints(*depths))
		case "deployments":
			err = sweepDeployments(ctx, ints(*deployments))
		default:
			err = fmt.Errorf("unknown sweep %q", s)
		}
		if err != nil {
			fmt.Fprintf(os.Stderr, "bench-cost: %s sweep: %v\n", s, err)
			os.Exit(1)
		}
	}
	fmt.Printf("\nbench-cost done in %v\n", time.Since(start).Round(time.Second))
}

// reps is how many times the tenants sweep runs each point.
var reps int

// concurrency is worker.concurrency in every point.
var concurrency int

// profileDir keeps the drain profiles when set (-profiles).
var profileDir string

func ints(s string) []int {
	var out []int
	for _, f := range strings.Split(s, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil {
			fmt.Fprintf(os.Stderr, "bench-cost: %q is not a number\n", f)
			os.Exit(2)
		}
		out = append(out, n)
	}
	return out
}

// runNATSChild serves NATS until its parent closes stdin (or dies).
func runNATSChild(dir string) error {
	n, err := dev.StartNATS(dir, 0)
	if err != nil {
		return err
	}
	fmt.Println(n.URL)
	_, _ = io.Copy(io.Discard, os.Stdin)
	n.Stop()
	return nil
}

// env is one point's stack.
type env struct {
	s       *dev.Stack
	dir     string
	nats    *exec.Cmd
	natsIn  io.WriteCloser
	workers *gateway.Gateway
	// metricsAddr serves the workers' /metrics; warm is what loading
	// their tokenizers took.
	metricsAddr string
	warm        time.Duration
	js          jetstream.JetStream
	client      *http.Client
	log         *slog.Logger
}

func start(ctx context.Context, f *dev.File) (*env, error) {
	dir, err := os.MkdirTemp("", "levee-bench-cost-")
	if err != nil {
		return nil, err
	}
	_ = os.Chmod(dir, 0o755)
	e := &env{dir: dir, log: slog.New(slog.NewTextHandler(io.Discard, nil)),
		client: &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 128}}}
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	e.nats = exec.Command(self, "-nats-child", filepath.Join(dir, "nats"))
	e.nats.Stderr = os.Stderr
	// The child goes with this process, however it ends.
	e.nats.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if e.natsIn, err = e.nats.StdinPipe(); err != nil {
		return nil, err
	}
	out, err := e.nats.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := e.nats.Start(); err != nil {
		return nil, fmt.Errorf("starting NATS: %w", err)
	}
	url, err := bufio.NewReader(out).ReadString('\n')
	if err != nil {
		e.stop()
		return nil, fmt.Errorf("NATS did not start: %w", err)
	}
	e.s, err = dev.StartStack(ctx, dev.StackOptions{Listen: "127.0.0.1:0", DataDir: dir, File: f, Ephemeral: true,
		NATSURL: strings.TrimSpace(url), NoWorkers: true, Log: e.log})
	if err != nil {
		e.stop()
		return nil, err
	}
	if e.js, err = jetstream.New(e.s.Gateway.Queue.Conn()); err != nil {
		e.stop()
		return nil, err
	}
	return e, nil
}

// startWorkers runs the queue workers in this process as `levee worker`
// would: a gateway with only that role, its own broker and connections.
func (e *env) startWorkers(ctx context.Context) error {
	cfg := *e.s.Config
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	e.metricsAddr = ln.Addr().String()
	ln.Close()
	g, err := gateway.Start(ctx, &cfg, e.s.Store, gateway.Roles{Workers: true, MetricsAddr: e.metricsAddr}, e.log)
	if err != nil {
		return fmt.Errorf("starting workers: %w", err)
	}
	e.workers = g
	// A process without the API does not load its tokenizers at start (the
	// API warms them); a long-running worker has them, so the bench loads
	// them before it measures, and says what that costs.
	t := time.Now()
	for _, d := range g.Broker.Deployments() {
		g.Broker.Tokenizers().Count(d.Encoding, "warm")
	}
	e.warm = time.Since(t)
	return nil
}

// metric reads one counter or gauge (summed over its series) from the
// workers' /metrics.
func (e *env) metric(name string) (float64, error) {
	resp, err := http.Get("http://" + e.metricsAddr + "/metrics")
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	if err != nil {
		return 0, err
	}
	var sum float64
	found := false
	for _, line := range strings.Split(string(raw), "\n") {
		if strings.HasPrefix(line, name+" ") || strings.HasPrefix(line, name+"{") {
			f := strings.Fields(line)
			v, err := strconv.ParseFloat(f[len(f)-1], 64)
			if err != nil {
				return 0, err
			}
			sum += v
			found = true
		}
	}
	if !found {
		return 0, fmt.Errorf("the workers' /metrics has no %s", name)
	}
	return sum, nil
}

func (e *env) stop() {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if e.workers != nil {
		_ = e.workers.Shutdown(ctx)
	}
	if e.s != nil {
		_ = e.s.Stop(ctx)
	}
	if e.nats != nil && e.nats.Process != nil {
		_ = e.natsIn.Close()
		done := make(chan struct{})
		go func() { _ = e.nats.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			_ = e.nats.Process.Kill()
			<-done
		}
	}
	os.RemoveAll(e.dir)
}

// stream is the jobs stream's state: messages, bytes, consumers.
func (e *env) stream(ctx context.Context) (*jetstream.StreamState, error) {
	s, err := e.js.Stream(ctx, "LEVEE_JOBS")
	if err != nil {
		return nil, fmt.Errorf("jobs stream: %w", err)
	}
	info, err := s.Info(ctx)
	if err != nil {
		return nil, fmt.Errorf("jobs stream: %w", err)
	}
	return &info.State, nil
}

type tenant struct {
	id  uuid.UUID
	key string
}

func (e *env) tenants(ctx context.Context, prefix string, n int) ([]tenant, error) {
	out := make([]tenant, n)
	for i := range out {
		t, err := e.s.Store.CreateTenant(ctx, &store.CreateTenantParams{Name: fmt.Sprintf("%s-%04d", prefix, i)})
		if err != nil {
			return nil, err
		}
		_, secret, err := e.s.Store.CreateKey(ctx, &store.CreateKeyParams{TenantID: t.ID, Name: "bench"})
		if err != nil {
			return nil, err
		}
		out[i] = tenant{t.ID, secret}
	}
	return out, nil
}

func jobBody(priority string) []byte {
	return []byte(`{"endpoint":"/v1/chat/completions","priority":"` + priority +
		`","body":{"model":"gpt-4o","max_tokens":8,"messages":[{"role":"user","content":"Summarize the river's course in one line."}]}}`)
}

// submit posts one job and returns how long the 202 took.
func (e *env) submit(key string, body []byte) (time.Duration, error) {
	req, _ := http.NewRequest(http.MethodPost, e.s.BaseURL+"/v1/jobs", bytes.NewReader(body))
	req.Header.Set("Authorization", "Bearer "+key)
	t := time.Now()
	resp, err := e.client.Do(req)
	if err != nil {
		return 0, err
	}
	raw, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	d := time.Since(t)
	if resp.StatusCode != http.StatusAccepted {
		return 0, fmt.Errorf("submit: %d %s", resp.StatusCode, raw)
	}
	return d, nil
}

// submitMany submits n jobs from clients concurrent clients; job k is
// tenant keyOf(k)'s. It returns every submit's latency and the wall time.
func (e *env) submitMany(n, clients int, keyOf func(int) string, body []byte) ([]time.Duration, time.Duration, error) {
	lat := make([]time.Duration, n)
	var next atomic.Int64
	var firstErr error
	var mu sync.Mutex
	t := time.Now()
	var wg sync.WaitGroup
	for c := 0; c < clients; c++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				k := int(next.Add(1)) - 1
				if k >= n {
					return
				}
				d, err := e.submit(keyOf(k), body)
				if err != nil {
					mu.Lock()
					firstErr = cmp(firstErr, err)
					mu.Unlock()
					return
				}
				lat[k] = d
			}
		}()
	}
	wg.Wait()
	return lat, time.Since(t), firstErr
}

func cmp(a, b error) error {
	if a != nil {
		return a
	}
	return b
}

// waitPublished waits until every queued job's message is in the stream.
func (e *env) waitPublished(ctx context.Context, want uint64) error {
	deadline := time.Now().Add(5 * time.Minute)
	for {
		st, err := e.stream(ctx)
		if err != nil {
			return err
		}
		if st.Msgs >= want {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("the stream holds %d messages, want %d", st.Msgs, want)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// rssKB reads a process's resident set now and at its peak.
func rssKB(pid int) (now, peak int64, err error) {
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, 0, fmt.Errorf("reading memory: %w", err)
	}
	for _, line := range strings.Split(string(raw), "\n") {
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		v, _ := strconv.ParseInt(f[1], 10, 64)
		switch f[0] {
		case "VmRSS:":
			now = v
		case "VmHWM:":
			peak = v
		}
	}
	if now == 0 {
		return 0, 0, fmt.Errorf("no VmRSS for process %d", pid)
	}
	return now, peak, nil
}

func mb(kb int64) float64 { return float64(kb) / 1024 }

// cpu is this process's user+system CPU time.
func cpu() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func pct(ds []time.Duration, p float64) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	return s[min(len(s)-1, int(math.Ceil(p/100*float64(len(s))))-1)]
}

func ms(d time.Duration) string { return fmt.Sprintf("%.2f ms", float64(d)/float64(time.Millisecond)) }

// table prints rows of figures per point with the ratio of each point to
// the first.
type table struct {
	title  string
	points []string
	rows   []row
}

type row struct {
	name   string
	vals   []float64
	format func(float64) string
	ratio  bool
}

func (t *table) add(name string, format func(float64) string, ratio bool) *row {
	t.rows = append(t.rows, row{name: name, format: format, ratio: ratio})
	return &t.rows[len(t.rows)-1]
}

func (t *table) print() {
	fmt.Printf("\n%s\n", t.title)
	fmt.Printf("  %-46s", "")
	for _, p := range t.points {
		fmt.Printf(" %16s", p)
	}
	fmt.Println()
	for _, r := range t.rows {
		fmt.Printf("  %-46s", r.name)
		for i, v := range r.vals {
			s := r.format(v)
			if r.ratio && i > 0 && r.vals[0] != 0 {
				s += fmt.Sprintf(" (%.2f×)", v/r.vals[0])
			}
			fmt.Printf(" %16s", s)
		}
		fmt.Println()
	}
}

func fmtMS(v float64) string  { return fmt.Sprintf("%.2f ms", v) }
func fmtMB(v float64) string  { return fmt.Sprintf("%.0f MB", v) }
func fmtN(v float64) string   { return fmt.Sprintf("%.0f", v) }
func fmtPct(v float64) string { return fmt.Sprintf("%.1f %%", v) }
func fmtS(v float64) string   { return fmt.Sprintf("%.2f s", v) }
func fmtUS(v float64) string  { return fmt.Sprintf("%.0f µs", v) }

func oneDeployment(concurrency int) *dev.File {
	return &dev.File{
		Deployments: []dev.FileDeployment{{Name: "d", Model: "gpt-4o", Kind: config.Provisioned, TPM: 1 << 40, RPM: 1 << 40,
			Sim: sim.Deployment{CompletionTokens: 8}}},
		Models: []config.Model{{Name: "gpt-4o", Deployments: []string{"d"}}},
		Worker: config.Worker{Concurrency: concurrency},
		// Nothing is swept away under the bench.
		Retention: config.Retention{Jobs: -1, Batches: -1, Uploads: -1, Webhooks: -1, FailedWebhooks: -1, UsageMonths: -1},
	}
}

// ---- tenants ----

type tenantPoint struct {
	submitRate, submitP50, submitP99     float64
	pendingUS                            float64 // one Pending() read of the stream's subjects
	streamMB, natsIdleMB, natsPeakMB     float64
	consumers                            float64
	drainRate                            float64
	smallWait, smallAfterPct             float64
	spreadMin, spreadMax, spreadCV       float64
	rssPeakMB, heapMB                    float64
	cpuPerJobUS, dispatchPct, pendingPct float64
	dispatchPerJobUS, pendingPerJobUS    float64
	saturated                            float64
}

func sweepTenants(ctx context.Context, counts []int, jobs int) error {
	fmt.Printf("\n== tenants: %d low-priority jobs spread over N tenants, submitted with the workers off, then drained (worker concurrency %d)\n", jobs, concurrency)
	// Each point runs reps times; the table shows medians. The runs of a
	// point are interleaved with the other points' (1, 10, …, 1, 10, …), so
	// a busy spell on the machine does not fall on one point alone.
	pts := make([][]tenantPoint, len(counts))
	for r := 0; r < reps; r++ {
		for i, n := range counts {
			p, err := tenantRun(ctx, n, jobs)
			if err != nil {
				return fmt.Errorf("%d tenants: %w", n, err)
			}
			pts[i] = append(pts[i], *p)
		}
	}
	t := &table{title: fmt.Sprintf("tenants sweep, median of %d runs (ratio to the first point)", reps)}
	for _, n := range counts {
		t.points = append(t.points, fmt.Sprintf("%d tenants", n))
	}
	rows := []figure[tenantPoint]{
		{"submit jobs/s (32 clients, workers off)", func(p tenantPoint) float64 { return p.submitRate }, fmtN, true},
		{"submit p50", func(p tenantPoint) float64 { return p.submitP50 }, fmtMS, true},
		{"submit p99", func(p tenantPoint) float64 { return p.submitP99 }, fmtMS, true},
		{"one Pending() read (stream subjects), median", func(p tenantPoint) float64 { return p.pendingUS }, fmtUS, true},
		{"JetStream consumers after the drain", func(p tenantPoint) float64 { return p.consumers }, fmtN, true},
		{"drain jobs/s (workers start → last job ends)", func(p tenantPoint) float64 { return p.drainRate }, fmtN, true},
		{"small tenant's 10 jobs: last ends after", func(p tenantPoint) float64 { return p.smallWait }, fmtS, true},
		{"  … behind this share of the backlog", func(p tenantPoint) float64 { return p.smallAfterPct }, fmtPct, false},
		{"per-tenant progress at 50 %: least done", func(p tenantPoint) float64 { return p.spreadMin }, fmtPct, false},
		{"  most done", func(p tenantPoint) float64 { return p.spreadMax }, fmtPct, false},
		{"  coefficient of variation", func(p tenantPoint) float64 { return p.spreadCV }, fmtPct, false},
		{"gateway+workers process RSS, peak", func(p tenantPoint) float64 { return p.rssPeakMB }, fmtMB, true},
		{"  Go heap in use after the drain", func(p tenantPoint) float64 { return p.heapMB }, fmtMB, true},
		{"NATS RSS with the backlog (workers off)", func(p tenantPoint) float64 { return p.natsIdleMB }, fmtMB, true},
		{"NATS RSS, peak", func(p tenantPoint) float64 { return p.natsPeakMB }, fmtMB, true},
		{"JetStream stream size with the backlog", func(p tenantPoint) float64 { return p.streamMB }, func(v float64) string { return fmt.Sprintf("%.1f MB", v) }, true},
		{"process CPU per job during the drain", func(p tenantPoint) float64 { return p.cpuPerJobUS }, fmtUS, true},
		{"  of which the dispatch loop (profile)", func(p tenantPoint) float64 { return p.dispatchPerJobUS }, fmtUS, true},
		{"  of which reading Pending (profile)", func(p tenantPoint) float64 { return p.pendingPerJobUS }, fmtUS, true},
		{"tenants put aside 2 s (a pull unanswered 50 ms)", func(p tenantPoint) float64 { return p.saturated }, fmtN, false},
	}
	for _, r := range rows {
		x := t.add(r.name, r.format, r.ratio)
		for _, runs := range pts {
			var vs []float64
			for _, p := range runs {
				vs = append(vs, r.f(p))
			}
			x.vals = append(x.vals, median(vs))
		}
	}
	t.print()
	return nil
}

func tenantRun(ctx context.Context, n, jobs int) (*tenantPoint, error) {
	e, err := start(ctx, oneDeployment(concurrency))
	if err != nil {
		return nil, err
	}
	defer e.stop()
	ts, err := e.tenants(ctx, "big", n)
	if err != nil {
		return nil, err
	}
	small, err := e.tenants(ctx, "small", 1)
	if err != nil {
		return nil, err
	}
	p := &tenantPoint{}
	low := jobBody("low")
	lat, wall, err := e.submitMany(jobs, 32, func(k int) string { return ts[k%n].key }, low)
	if err != nil {
		return nil, err
	}
	p.submitRate = float64(jobs) / wall.Seconds()
	p.submitP50, p.submitP99 = ms64(pct(lat, 50)), ms64(pct(lat, 99))
	if err := e.waitPublished(ctx, uint64(jobs)); err != nil {
		return nil, err
	}
	st, err := e.stream(ctx)
	if err != nil {
		return nil, err
	}
	p.streamMB = float64(st.Bytes) / (1 << 20)
	// What each dispatch pass reads first: the stream's message count per
	// subject, one subject per (priority, model, tenant).
	var reads []time.Duration
	for i := 0; i < 50; i++ {
		t := time.Now()
		subj, err := e.s.Gateway.Queue.Pending(ctx)
		if err != nil {
			return nil, err
		}
		reads = append(reads, time.Since(t))
		if len(subj) != n {
			return nil, fmt.Errorf("Pending read %d subjects, want %d", len(subj), n)
		}
	}
	p.pendingUS = float64(pct(reads, 50)) / float64(time.Microsecond)
	natsPID := e.nats.Process.Pid
	nr, _, err := rssKB(natsPID)
	if err != nil {
		return nil, err
	}
	p.natsIdleMB = mb(nr)

	prof, err := os.Create(filepath.Join(e.dir, "cpu.pprof"))
	if err != nil {
		return nil, err
	}
	if err := pprof.StartCPUProfile(prof); err != nil {
		return nil, err
	}
	profiling := true
	defer func() {
		if profiling {
			pprof.StopCPUProfile()
		}
	}()
	cpu0 := time.Now()
	c0 := cpu()
	if err := e.startWorkers(ctx); err != nil {
		return nil, err
	}
	smallAt := time.Now()
	for i := 0; i < 10; i++ {
		if _, err := e.submit(small[0].key, low); err != nil {
			return nil, err
		}
	}
	// Sample every tenant's progress until everything ended.
	total := jobs + 10
	pool := e.s.Store.Pool()
	var half map[uuid.UUID]int
	var natsPeak int64
	deadline := time.Now().Add(15 * time.Minute)
	lastDone, progressAt := -1, time.Now()
	for {
		rows, err := pool.Query(ctx, `SELECT tenant_id, count(*) FILTER (WHERE status = 'succeeded'), count(*) FILTER (WHERE status IN ('queued','running')) FROM jobs GROUP BY tenant_id`)
		if err != nil {
			return nil, err
		}
		done, open := map[uuid.UUID]int{}, 0
		sum := 0
		for rows.Next() {
			var id uuid.UUID
			var d, o int
			if err := rows.Scan(&id, &d, &o); err != nil {
				rows.Close()
				return nil, err
			}
			done[id] = d
			open += o
			if id != small[0].id {
				sum += d
			}
		}
		rows.Close()
		if err := rows.Err(); err != nil {
			return nil, err
		}
		if half == nil && sum*2 >= jobs {
			half = done
		}
		if r, _, err := rssKB(natsPID); err == nil {
			natsPeak = max(natsPeak, r)
		}
		if open == 0 && len(done) > 0 {
			var all int
			for _, d := range done {
				all += d
			}
			if all != total {
				return nil, fmt.Errorf("%d of %d jobs succeeded", all, total)
			}
			break
		}
		all := sum + done[small[0].id]
		if all != lastDone {
			lastDone, progressAt = all, time.Now()
		}
		if stalled := time.Since(progressAt); stalled > time.Minute || time.Now().After(deadline) {
			var stuck []string
			for _, t := range append(ts, small...) {
				if done[t.id] < jobs/n {
					stuck = append(stuck, t.id.String())
				}
			}
			st, _ := e.stream(ctx)
			return nil, fmt.Errorf("no job ended for %v with %d open; %d tenants not done (first: %v); stream: %+v", stalled.Round(time.Second), open, len(stuck), stuck[:min(3, len(stuck))], st)
		}
		time.Sleep(100 * time.Millisecond)
	}
	pprof.StopCPUProfile()
	profiling = false
	prof.Close()
	var last time.Time
	if err := pool.QueryRow(ctx, `SELECT max(finished_at) FROM jobs`).Scan(&last); err != nil {
		return nil, err
	}
	p.drainRate = float64(total) / last.Sub(cpu0).Seconds()
	used := cpu() - c0
	p.cpuPerJobUS = float64(used) / float64(time.Microsecond) / float64(total)
	var smallLast time.Time
	if err := pool.QueryRow(ctx, `SELECT max(finished_at) FROM jobs WHERE tenant_id = $1`, small[0].id).Scan(&smallLast); err != nil {
		return nil, err
	}
	p.smallWait = smallLast.Sub(smallAt).Seconds()
	var before int
	if err := pool.QueryRow(ctx, `SELECT count(*) FROM jobs WHERE tenant_id <> $1 AND finished_at <= $2`, small[0].id, smallLast).Scan(&before); err != nil {
		return nil, err
	}
	p.smallAfterPct = 100 * float64(before) / float64(jobs)
	if half == nil {
		return nil, errors.New("never saw half the backlog done")
	}
	var fr []float64
	for i, t := range ts {
		per := jobs/n + btoi(i < jobs%n)
		fr = append(fr, 100*float64(half[t.id])/float64(per))
	}
	p.spreadMin, p.spreadMax, p.spreadCV = stats(fr)
	st, err = e.stream(ctx)
	if err != nil {
		return nil, err
	}
	p.consumers = float64(st.Consumers)
	if p.saturated, err = e.metric("levee_worker_saturated_consumers_total"); err != nil {
		return nil, err
	}
	_, peak, err := rssKB(os.Getpid())
	if err != nil {
		return nil, err
	}
	p.rssPeakMB = mb(peak)
	p.natsPeakMB = mb(natsPeak)
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	p.heapMB = float64(m.HeapInuse) / (1 << 20)
	if profileDir != "" {
		if raw, err := os.ReadFile(prof.Name()); err == nil {
			_ = os.WriteFile(filepath.Join(profileDir, fmt.Sprintf("drain-%d-tenants.pprof", n)), raw, 0o644)
		}
	}
	share, err := profileShare(prof.Name(), `worker\.\(\*Worker\)\.dispatch$`, `queue\.\(\*Queue\)\.Pending$`)
	if err != nil {
		return nil, err
	}
	p.dispatchPct, p.pendingPct = 100*share[0]/share[2], 100*share[1]/share[2]
	p.dispatchPerJobUS = p.cpuPerJobUS * share[0] / share[2]
	p.pendingPerJobUS = p.cpuPerJobUS * share[1] / share[2]
	fmt.Printf("  %4d tenants: submitted %d in %v, drained at %.0f jobs/s; small tenant's last job after %.2f s; %d consumers; %.0f put aside; dispatch %.1f %% and Pending %.1f %% of the profile's CPU\n",
		n, jobs, wall.Round(time.Millisecond), p.drainRate, p.smallWait, st.Consumers, p.saturated, p.dispatchPct, p.pendingPct)
	return p, nil
}

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
}

func ms64(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// stats returns the least, the most and the coefficient of variation (in %).
func stats(xs []float64) (lo, hi, cv float64) {
	lo, hi = math.Inf(1), math.Inf(-1)
	var sum float64
	for _, x := range xs {
		lo, hi, sum = min(lo, x), max(hi, x), sum+x
	}
	mean := sum / float64(len(xs))
	var v float64
	for _, x := range xs {
		v += (x - mean) * (x - mean)
	}
	if mean > 0 {
		cv = 100 * math.Sqrt(v/float64(len(xs))) / mean
	}
	return lo, hi, cv
}

// profileShare reads a CPU profile with `go tool pprof` and returns, for
// each pattern, the cumulative seconds of the function it names, and last
// the profile's total seconds. A function absent from the profile counts
// zero (it ran too little to be sampled); a profile that cannot be read is
// an error.
func profileShare(path string, patterns ...string) ([]float64, error) {
	out, err := exec.Command("go", "tool", "pprof", "-top", "-cum", "-nodecount=100000", "-unit=s", path).CombinedOutput()
	if err != nil {
		return nil, fmt.Errorf("go tool pprof: %v: %s", err, out)
	}
	total := regexp.MustCompile(`Total samples = ([0-9.]+)s`).FindSubmatch(out)
	if total == nil {
		return nil, fmt.Errorf("go tool pprof printed no total: %s", out)
	}
	res := make([]float64, len(patterns)+1)
	res[len(patterns)], _ = strconv.ParseFloat(string(total[1]), 64)
	if res[len(patterns)] == 0 {
		return nil, errors.New("the CPU profile is empty")
	}
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		if len(f) < 6 {
			continue
		}
		name := strings.Join(f[5:], " ")
		for i, p := range patterns {
			if regexp.MustCompile(p).MatchString(name) {
				v, err := strconv.ParseFloat(strings.TrimSuffix(f[3], "s"), 64)
				if err == nil {
					res[i] = v
				}
			}
		}
	}
	return res, nil
}

// ---- depth ----

type depthPoint struct {
	fill                               time.Duration
	pgPerJob, streamPerJob             float64
	rssMB, heapMB, natsMB              float64
	tableMB, indexMB, streamMB         float64
	submitP50, submitP99               float64
	ttfNormal, ttfLow, ttfBig          float64
	ttfNormalMax, ttfLowMax            float64
	drainRate, rssDrainMB, natsDrainMB float64
}

func sweepDepth(ctx context.Context, depths []int) error {
	fmt.Printf("\n== depth: N queued low-priority jobs of one tenant (COPY into Postgres + asynchronous publishes to JetStream), then new jobs of other tenants\n")
	rows := []figure[depthPoint]{
		{"gateway process RSS with the backlog (idle)", func(p depthPoint) float64 { return p.rssMB }, fmtMB, true},
		{"  Go heap in use", func(p depthPoint) float64 { return p.heapMB }, fmtMB, true},
		{"NATS RSS with the backlog", func(p depthPoint) float64 { return p.natsMB }, fmtMB, true},
		{"JetStream stream size", func(p depthPoint) float64 { return p.streamMB }, fmtMB, false},
		{"Postgres jobs table (heap+TOAST)", func(p depthPoint) float64 { return p.tableMB }, fmtMB, false},
		{"Postgres jobs indexes", func(p depthPoint) float64 { return p.indexMB }, fmtMB, false},
		{"  Postgres bytes per queued job (table+indexes)", func(p depthPoint) float64 { return p.pgPerJob }, fmtN, false},
		{"  JetStream bytes per queued job", func(p depthPoint) float64 { return p.streamPerJob }, fmtN, false},
		{"submit p50 (serial, another tenant)", func(p depthPoint) float64 { return p.submitP50 }, fmtMS, true},
		{"submit p99", func(p depthPoint) float64 { return p.submitP99 }, fmtMS, true},
		{"new tenant's normal job: submit to start, median", func(p depthPoint) float64 { return p.ttfNormal }, fmtMS, true},
		{"  slowest of 5", func(p depthPoint) float64 { return p.ttfNormalMax }, fmtMS, true},
		{"new tenant's low job: submit to start, median", func(p depthPoint) float64 { return p.ttfLow }, fmtMS, true},
		{"  slowest of 5", func(p depthPoint) float64 { return p.ttfLowMax }, fmtMS, true},
		{"time to start: backlog's first job (workers up)", func(p depthPoint) float64 { return p.ttfBig }, fmtMS, true},
		{"jobs/s drained in the first 10 s", func(p depthPoint) float64 { return p.drainRate }, fmtN, true},
		{"gateway+workers RSS after 10 s of draining", func(p depthPoint) float64 { return p.rssDrainMB }, fmtMB, true},
		{"NATS RSS after 10 s of draining", func(p depthPoint) float64 { return p.natsDrainMB }, fmtMB, true},
	}
	return sweep(ctx, depths, "queued", "depth sweep (ratio to the first point)", depthRun, rows)
}

// v7 is a UUIDv7 at t (job ids sort by creation).
func v7(t time.Time) uuid.UUID {
	var u uuid.UUID
	_, _ = rand.Read(u[:])
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], uint64(t.UnixMilli()))
	copy(u[0:6], b[2:8])
	u[6] = (u[6] & 0x0f) | 0x70
	u[8] = (u[8] & 0x3f) | 0x80
	return u
}

// fillQueued copies n queued jobs of one tenant into Postgres, as accepted
// and published, and publishes their messages as the outbox would.
func (e *env) fillQueued(ctx context.Context, tenantID uuid.UUID, n int) error {
	pool := e.s.Store.Pool()
	body := []byte(`{"model":"gpt-4o","max_tokens":8,"messages":[{"role":"user","content":"Summarize the river's course in one line."}]}`)
	hash := make([]byte, 32)
	now := time.Now()
	const chunk = 100_000
	for done := 0; done < n; done += chunk {
		m := min(chunk, n-done)
		ids := make([]uuid.UUID, m)
		ats := make([]time.Time, m)
		for i := range ids {
			ats[i] = now.Add(-time.Hour + time.Duration(done+i)*time.Microsecond)
			ids[i] = v7(ats[i])
		}
		if _, err := pool.CopyFrom(ctx, pgx.Identifier{"jobs"}, []string{"id", "tenant_id", "endpoint", "model", "body", "body_hash", "priority", "status", "created_at", "published_at"},
			pgx.CopyFromSlice(m, func(i int) ([]any, error) {
				return []any{ids[i], tenantID, "/v1/chat/completions", "gpt-4o", body, hash, "low", "queued", ats[i], ats[i]}, nil
			})); err != nil {
			return fmt.Errorf("copying jobs: %w", err)
		}
		refs := make([]queue.JobRef, m)
		for i, id := range ids {
			refs[i] = queue.JobRef{ID: id, Priority: "low", Model: "gpt-4o", Tenant: tenantID}
		}
		acked, err := e.s.Gateway.Queue.PublishMany(ctx, refs)
		if err != nil {
			return fmt.Errorf("publishing: %w", err)
		}
		if len(acked) != m {
			return fmt.Errorf("published %d of %d", len(acked), m)
		}
	}
	return nil
}

func depthRun(ctx context.Context, n int) (*depthPoint, error) {
	e, err := start(ctx, oneDeployment(concurrency))
	if err != nil {
		return nil, err
	}
	defer e.stop()
	ts, err := e.tenants(ctx, "t", 2) // the backlog's and a prober's
	if err != nil {
		return nil, err
	}
	big, probe := ts[0], ts[1]
	p := &depthPoint{}
	t0 := time.Now()
	if err := e.fillQueued(ctx, big.id, n); err != nil {
		return nil, err
	}
	p.fill = time.Since(t0)
	pool := e.s.Store.Pool()
	// A long-lived backlog has its statistics; a fresh COPY does not yet.
	if _, err := pool.Exec(ctx, `VACUUM ANALYZE jobs`); err != nil {
		return nil, err
	}
	if err := e.waitPublished(ctx, uint64(n)); err != nil {
		return nil, err
	}
	st, err := e.stream(ctx)
	if err != nil {
		return nil, err
	}
	p.streamMB = float64(st.Bytes) / (1 << 20)
	var table, index int64
	if err := pool.QueryRow(ctx, `SELECT pg_table_size('jobs'), pg_indexes_size('jobs')`).Scan(&table, &index); err != nil {
		return nil, err
	}
	p.tableMB, p.indexMB = float64(table)/(1<<20), float64(index)/(1<<20)
	if n > 0 {
		p.pgPerJob = float64(table+index) / float64(n)
		p.streamPerJob = float64(st.Bytes) / float64(n)
	}

	// Submits beside the backlog, serially (their latency, not a rate).
	lowBody := jobBody("low")
	var lat []time.Duration
	for i := 0; i < 400; i++ {
		d, err := e.submit(probe.key, lowBody)
		if err != nil {
			return nil, err
		}
		lat = append(lat, d)
	}
	p.submitP50, p.submitP99 = ms64(pct(lat, 50)), ms64(pct(lat, 99))
	runtime.GC()
	r, _, err := rssKB(os.Getpid())
	if err != nil {
		return nil, err
	}
	p.rssMB = mb(r)
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	p.heapMB = float64(m.HeapInuse) / (1 << 20)
	nr, _, err := rssKB(e.nats.Process.Pid)
	if err != nil {
		return nil, err
	}
	p.natsMB = mb(nr)
	fmt.Printf("  %7d queued: filled in %v; stream %.0f MB; jobs table %.0f MB + indexes %.0f MB\n", n, p.fill.Round(time.Second), p.streamMB, p.tableMB, p.indexMB)

	startOf := func(tid uuid.UUID) (float64, bool, error) {
		var created, started *time.Time
		err := pool.QueryRow(ctx, `SELECT created_at, started_at FROM jobs WHERE tenant_id = $1 ORDER BY started_at NULLS LAST LIMIT 1`, tid).Scan(&created, &started)
		if err != nil {
			return 0, false, err
		}
		if started == nil {
			return 0, false, nil
		}
		return ms64(started.Sub(*created)), true, nil
	}
	// The workers start with the backlog (and the prober's 400) there.
	workersAt := time.Now()
	if err := e.startWorkers(ctx); err != nil {
		return nil, err
	}
	deadline := time.Now().Add(2 * time.Minute)
	if n > 0 {
		for {
			var first *time.Time
			if err := pool.QueryRow(ctx, `SELECT min(started_at) FROM jobs WHERE tenant_id = $1`, big.id).Scan(&first); err != nil {
				return nil, err
			}
			if first != nil {
				p.ttfBig = ms64(first.Sub(workersAt))
				break
			}
			if time.Now().After(deadline) {
				return nil, errors.New("no job of the backlog started within 2 minutes")
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	// Ten seconds of draining with the backlog: rate and memory.
	count := func() (int, error) {
		var c int
		err := pool.QueryRow(ctx, `SELECT count(*) FROM jobs WHERE status = 'succeeded'`).Scan(&c)
		return c, err
	}
	d0, err := count()
	if err != nil {
		return nil, err
	}
	w0 := time.Now()
	time.Sleep(10 * time.Second)
	d1, err := count()
	if err != nil {
		return nil, err
	}
	p.drainRate = float64(d1-d0) / time.Since(w0).Seconds()
	if p.drainRate == 0 && n > 0 {
		return nil, errors.New("no job of the backlog ended in 10 s")
	}
	if r, _, err = rssKB(os.Getpid()); err != nil {
		return nil, err
	}
	p.rssDrainMB = mb(r)
	if nr, _, err = rssKB(e.nats.Process.Pid); err != nil {
		return nil, err
	}
	p.natsDrainMB = mb(nr)

	// While the workers drain it, a new tenant's normal job and another's
	// low one arrive, five times: how long until each starts (from its
	// row's creation to its claim, both stamped by the same clock).
	var normals, lows []float64
	for round := 0; round < 5; round++ {
		ts, err := e.tenants(ctx, fmt.Sprintf("new%d", round), 2)
		if err != nil {
			return nil, err
		}
		if _, err := e.submit(ts[0].key, jobBody("normal")); err != nil {
			return nil, err
		}
		if _, err := e.submit(ts[1].key, lowBody); err != nil {
			return nil, err
		}
		var tn, tl float64
		var okN, okL bool
		for !okN || !okL {
			if tn, okN, err = startOf(ts[0].id); err != nil {
				return nil, err
			}
			if tl, okL, err = startOf(ts[1].id); err != nil {
				return nil, err
			}
			if time.Now().After(deadline.Add(time.Minute)) {
				return nil, fmt.Errorf("a new tenant's job had not started after minutes (normal %v, low %v)", okN, okL)
			}
			time.Sleep(5 * time.Millisecond)
		}
		normals, lows = append(normals, tn), append(lows, tl)
		time.Sleep(500 * time.Millisecond)
	}
	p.ttfNormal, p.ttfNormalMax = median(normals), slices.Max(normals)
	p.ttfLow, p.ttfLowMax = median(lows), slices.Max(lows)
	fmt.Printf("  %7d queued: submit p50 %.2f ms p99 %.2f ms; a new normal job started %.0f ms after its submit, a low one %.0f ms; drained %.0f jobs/s\n",
		n, p.submitP50, p.submitP99, p.ttfNormal, p.ttfLow, p.drainRate)
	return p, nil
}

// ---- deployments ----

type depPoint struct {
	directP50, directP99, leveeP50, leveeP99 float64
	addedP50, addedP99                       float64
	cpuPerCallUS                             float64
	shareMsgs, shareBytes                    float64
	jobsRate, jobsShareMsgs                  float64
	jobsSubmitRate                           float64
	rssMB                                    float64
}

func sweepDeployments(ctx context.Context, counts []int) error {
	fmt.Printf("\n== deployments: N standard deployments at one priority behind one model (each call a weighted draw over all of them)\n")
	rows := []figure[depPoint]{
		{"serial sync call straight to the simulator p50", func(p depPoint) float64 { return p.directP50 }, fmtMS, true},
		{"  through Levee p50", func(p depPoint) float64 { return p.leveeP50 }, fmtMS, true},
		{"  added by Levee p50 (median of rounds)", func(p depPoint) float64 { return p.addedP50 }, fmtMS, true},
		{"  added by Levee p99 (median of rounds)", func(p depPoint) float64 { return p.addedP99 }, fmtMS, true},
		{"process CPU per sync call at 500/s", func(p depPoint) float64 { return p.cpuPerCallUS }, fmtUS, true},
		{"capacity-sharing msgs/s at 500 sync calls/s", func(p depPoint) float64 { return p.shareMsgs }, fmtN, true},
		{"  bytes/s", func(p depPoint) float64 { return p.shareBytes }, fmtN, true},
		{"jobs/s end to end (5,000 jobs, workers on)", func(p depPoint) float64 { return p.jobsRate }, fmtN, true},
		{"  of which submits accepted/s", func(p depPoint) float64 { return p.jobsSubmitRate }, fmtN, true},
		{"  capacity-sharing msgs/s meanwhile", func(p depPoint) float64 { return p.jobsShareMsgs }, fmtN, true},
		{"gateway+workers RSS, peak", func(p depPoint) float64 { return p.rssMB }, fmtMB, true},
	}
	return sweep(ctx, counts, "deployments", "deployments sweep (ratio to the first point)", depRun, rows)
}

// figure is one line of a sweep's table: a value of each point.
type figure[P any] struct {
	name   string
	f      func(P) float64
	format func(float64) string
	ratio  bool
}

// sweep measures each point once with run and prints rows over them.
func sweep[P any](ctx context.Context, ns []int, unit, title string, run func(context.Context, int) (*P, error), rows []figure[P]) error {
	var pts []P
	for _, n := range ns {
		p, err := run(ctx, n)
		if err != nil {
			return fmt.Errorf("%d %s: %w", n, unit, err)
		}
		pts = append(pts, *p)
	}
	t := &table{title: title}
	for _, n := range ns {
		t.points = append(t.points, fmt.Sprintf("%d %s", n, unit))
	}
	for _, r := range rows {
		x := t.add(r.name, r.format, r.ratio)
		for _, p := range pts {
			x.vals = append(x.vals, r.f(p))
		}
	}
	t.print()
	return nil
}

func depRun(ctx context.Context, n int) (*depPoint, error) {
	f := &dev.File{Worker: config.Worker{Concurrency: concurrency},
		Retention: config.Retention{Jobs: -1, Batches: -1, Uploads: -1, Webhooks: -1, FailedWebhooks: -1, UsageMonths: -1}}
	var names []string
	for i := 0; i < n; i++ {
		name := fmt.Sprintf("d%02d", i)
		names = append(names, name)
		f.Deployments = append(f.Deployments, dev.FileDeployment{Name: name, Model: "gpt-4o", Kind: config.Standard, TPM: 1 << 40, RPM: 1 << 40,
			Sim: sim.Deployment{CompletionTokens: 8}})
	}
	f.Models = []config.Model{{Name: "gpt-4o", Deployments: names}}
	e, err := start(ctx, f)
	if err != nil {
		return nil, err
	}
	defer e.stop()
	if err := e.startWorkers(ctx); err != nil {
		return nil, err
	}
	// Every capacity message any process sends.
	nc, err := nats.Connect(e.s.NATSURL)
	if err != nil {
		return nil, err
	}
	defer nc.Close()
	var msgs, bytesN atomic.Int64
	sub, err := nc.Subscribe("levee.capacity.>", func(m *nats.Msg) {
		msgs.Add(1)
		bytesN.Add(int64(len(m.Data)))
	})
	if err != nil {
		return nil, err
	}
	defer sub.Unsubscribe()
	_ = nc.Flush()

	chat := []byte(`{"model":"gpt-4o","max_tokens":8,"messages":[{"role":"user","content":"Summarize the river's course in one line."}]}`)
	d0 := e.s.Config.Deployments[0]
	direct := func() (time.Duration, error) {
		return call(e.client, d0.Endpoint+"/openai/deployments/"+d0.Name+"/chat/completions?api-version=2024-10-21", "api-key", d0.Credential, chat)
	}
	through := func() (time.Duration, error) {
		return call(e.client, e.s.BaseURL+"/v1/chat/completions", "Authorization", "Bearer "+e.s.APIKey, chat)
	}
	for i := 0; i < 200; i++ { // warm both paths
		if _, err := direct(); err != nil {
			return nil, err
		}
		if _, err := through(); err != nil {
			return nil, err
		}
	}
	p := &depPoint{}
	var dp50, dp99, lp50, lp99, a50, a99 []float64
	for round := 0; round < 7; round++ {
		var dl, ll []time.Duration
		for i := 0; i < 300; i++ {
			d, err := direct()
			if err != nil {
				return nil, err
			}
			l, err := through()
			if err != nil {
				return nil, err
			}
			dl, ll = append(dl, d), append(ll, l)
		}
		dp50, dp99 = append(dp50, ms64(pct(dl, 50))), append(dp99, ms64(pct(dl, 99)))
		lp50, lp99 = append(lp50, ms64(pct(ll, 50))), append(lp99, ms64(pct(ll, 99)))
		a50, a99 = append(a50, lp50[round]-dp50[round]), append(a99, lp99[round]-dp99[round])
	}
	p.directP50, p.directP99, p.leveeP50, p.leveeP99 = median(dp50), median(dp99), median(lp50), median(lp99)
	p.addedP50, p.addedP99 = median(a50), median(a99)

	// Open loop at 500 calls/s for 5 s: the sharing chatter and CPU per call.
	const rate, secs = 500, 5
	m0, b0, c0 := msgs.Load(), bytesN.Load(), cpu()
	t0 := time.Now()
	var wg sync.WaitGroup
	var failed atomic.Int64
	for i := 0; i < rate*secs; i++ {
		at := t0.Add(time.Duration(i) * time.Second / rate)
		time.Sleep(time.Until(at))
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := through(); err != nil {
				failed.Add(1)
			}
		}()
	}
	wg.Wait()
	el := time.Since(t0).Seconds()
	if failed.Load() > 0 {
		return nil, fmt.Errorf("%d of %d synchronous calls failed", failed.Load(), rate*secs)
	}
	p.cpuPerCallUS = float64(cpu()-c0) / float64(time.Microsecond) / (rate * secs)
	p.shareMsgs = float64(msgs.Load()-m0) / el
	p.shareBytes = float64(bytesN.Load()-b0) / el
	if p.shareMsgs == 0 {
		return nil, errors.New("no capacity-sharing message seen during synchronous load")
	}

	// Jobs end to end with the workers on.
	const jobs = 5000
	if profileDir != "" {
		f, err := os.Create(filepath.Join(profileDir, fmt.Sprintf("jobs-%d-deployments.pprof", n)))
		if err != nil {
			return nil, err
		}
		if err := pprof.StartCPUProfile(f); err != nil {
			return nil, err
		}
		defer func() { pprof.StopCPUProfile(); f.Close() }()
	}
	m0 = msgs.Load()
	t0 = time.Now()
	_, submitted, err := e.submitMany(jobs, 32, func(int) string { return e.s.APIKey }, jobBody("low"))
	if err != nil {
		return nil, err
	}
	p.jobsSubmitRate = jobs / submitted.Seconds()
	pool := e.s.Store.Pool()
	for {
		var open int
		if err := pool.QueryRow(ctx, `SELECT count(*) FROM jobs WHERE status IN ('queued','running')`).Scan(&open); err != nil {
			return nil, err
		}
		if open == 0 {
			break
		}
		if time.Since(t0) > 5*time.Minute {
			return nil, fmt.Errorf("gave up with %d jobs open", open)
		}
		time.Sleep(20 * time.Millisecond)
	}
	el = time.Since(t0).Seconds()
	var ok int
	if err := pool.QueryRow(ctx, `SELECT count(*) FROM jobs WHERE status = 'succeeded'`).Scan(&ok); err != nil {
		return nil, err
	}
	if ok != jobs {
		return nil, fmt.Errorf("%d of %d jobs succeeded", ok, jobs)
	}
	p.jobsRate = jobs / el
	p.jobsShareMsgs = float64(msgs.Load()-m0) / el
	_, peak, err := rssKB(os.Getpid())
	if err != nil {
		return nil, err
	}
	p.rssMB = mb(peak)
	fmt.Printf("  %2d deployments: added p50 %.3f ms p99 %.3f ms; %.0f sharing msgs/s at %d calls/s; %.0f jobs/s\n",
		n, p.addedP50, p.addedP99, p.shareMsgs, rate, p.jobsRate)
	return p, nil
}

func call(c *http.Client, url, header, value string, body []byte) (time.Duration, error) {
	req, _ := http.NewRequest(http.MethodPost, url, bytes.NewReader(body))
	req.Header.Set(header, value)
	req.Header.Set("Content-Type", "application/json")
	t := time.Now()
	resp, err := c.Do(req)
	if err != nil {
		return 0, err
	}
	raw, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	d := time.Since(t)
	if resp.StatusCode != http.StatusOK {
		return 0, fmt.Errorf("%s: %d %s", url, resp.StatusCode, raw)
	}
	return d, nil
}

func median(xs []float64) float64 {
	s := slices.Clone(xs)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}
