// Command levelling is `make bench-levelling`: queue-based load levelling
// against the simulator with a provisioned 60k-TPM and a standard 120k-TPM
// gpt-4o deployment and realistic latency, with Levee's default
// configuration (the synchronous reserve is automatic). It runs three
// scenarios, each on a fresh stack:
//
//   - steady: synchronous calls at 40 % of the total TPM, first alone (the
//     latency baseline), then beside a backlog of low-priority jobs;
//   - spike: synchronous calls at 10 % beside the backlog, rising to 80 %
//     within one second (its baseline: the same rise without a backlog);
//   - night: no synchronous calls, only the backlog.
//
// Each is judged from the deployments' own counters (the simulator's): TPM
// utilization while the backlog exists (the mean of each deployment's
// sliding minute, sampled every second), client-visible 429s on the
// synchronous calls while a deployment serving the model had room for one,
// their p50/p99 against the baseline, upstream 429s as a share of calls, and
// jobs lost or completed twice. It prints PASS or MISS per goal, and exits
// non-zero when a figure cannot be measured.
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/levee-gw/levee/config"
	"github.com/levee-gw/levee/dev"
	"github.com/levee-gw/levee/sim"
	"github.com/levee-gw/levee/store"
)

const (
	ptuTPM, stdTPM = 60_000, 120_000
	totalTPM       = ptuTPM + stdTPM
	syncMax        = 300 // max_tokens of a synchronous call
	jobMax         = 400 // max_tokens of a job: above TPM/RPM, so tokens bind
	syncEst        = 30 + syncMax
)

// Goals of issue 13.
const (
	goalSteady   = 0.97
	goalSpike    = 0.95
	goalNight    = 0.97
	goalP99      = 1.10 // p99 within +10 % of the baseline
	goalUpstream = 0.005
)

type options struct {
	jobs      int
	baseline  time.Duration
	warm      time.Duration
	window    time.Duration
	reserve   string
	responses bool
	debug     bool
}

func main() {
	var o options
	flag.IntVar(&o.jobs, "jobs", 3000, "low-priority jobs in each scenario's backlog (enough to outlast it)")
	flag.DurationVar(&o.baseline, "baseline", 60*time.Second, "length of the synchronous-only baseline of the steady and spike scenarios")
	flag.DurationVar(&o.warm, "warm", 60*time.Second, "time with the backlog before measuring (the sliding minutes fill)")
	flag.DurationVar(&o.window, "window", 2*time.Minute, "how long each scenario is measured while the backlog exists")
	flag.StringVar(&o.reserve, "reserve", "", "override worker.sync_reserve (auto or a share); default: Levee's default")
	scenarios := flag.String("scenarios", "steady,spike,night", "which scenarios to run, comma separated")
	flag.BoolVar(&o.responses, "responses", false, "make the backlog background responses (POST /v1/responses, background) instead of jobs")
	flag.BoolVar(&o.debug, "debug", false, "print each deployment's utilization and reserve every 10 s")
	flag.Parse()
	var reserve config.SyncReserve
	if o.reserve != "" {
		if err := yamlReserve(o.reserve, &reserve); err != nil {
			fail(err)
		}
	}
	fmt.Printf("levee bench-levelling: PTU %d TPM + standard %d TPM (RPM 6 per 1k TPM), latency 250ms + 12ms/token; sync calls of ~%d tokens, jobs of ~%d\n",
		ptuTPM, stdTPM, syncEst, 30+jobMax)
	if o.reserve == "" {
		fmt.Println("  configuration: Levee's defaults (worker.sync_reserve auto, floor 2 %, cap 50 %)")
	} else {
		fmt.Printf("  configuration: worker.sync_reserve %s\n", reserve)
	}
	started := time.Now()
	var results []*result
	for _, name := range strings.Split(*scenarios, ",") {
		sc, ok := scenarioNamed(strings.TrimSpace(name))
		if !ok {
			fail(fmt.Errorf("unknown scenario %q (steady, spike, night)", name))
		}
		r, err := run(o, reserve, sc)
		if err != nil {
			fail(fmt.Errorf("%s: %w", sc.name, err))
		}
		results = append(results, r)
	}
	fmt.Printf("\nsummary (%v in all)\n", time.Since(started).Round(time.Second))
	unmeasured := false
	for _, r := range results {
		for _, g := range r.goals {
			fmt.Printf("  %-7s %-62s %s\n", r.name, g.what, g.verdict())
			unmeasured = unmeasured || !g.measured
		}
	}
	if unmeasured {
		fail(errors.New("a figure could not be measured (see UNMEASURED above)"))
	}
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "bench-levelling:", err)
	os.Exit(1)
}

func yamlReserve(s string, r *config.SyncReserve) error {
	c, err := config.Parse([]byte("worker: {sync_reserve: "+s+"}\ndeployments: [{name: d, model: gpt-4o, endpoint: 'http://x', credential_env: K, tpm: 1000}]\n"),
		func(string) string { return "k" })
	if err != nil {
		return err
	}
	*r = c.Worker.SyncReserve
	return nil
}

// scenario is a synchronous load profile: share(t) of the total TPM at t
// since the backlog arrived (or since the baseline started).
type scenario struct {
	name    string
	share   func(t time.Duration) float64
	goal    float64
	measure time.Duration // when measuring starts, after the warm-up
	// baselineShare is the baseline's profile; nil: no baseline.
	baselineShare func(t time.Duration) float64
}

func scenarioNamed(name string) (scenario, bool) {
	steady := func(time.Duration) float64 { return 0.4 }
	switch name {
	case "steady":
		return scenario{name: "steady", share: steady, goal: goalSteady, baselineShare: steady}, true
	case "spike":
		// The spike starts when measuring does: at the end of the warm-up
		// (spikeAt is set by run).
		return scenario{name: "spike", goal: goalSpike}, true
	case "night":
		return scenario{name: "night", share: func(time.Duration) float64 { return 0 }, goal: goalNight}, true
	}
	return scenario{}, false
}

// spike rises from 10 % to 80 % of the total TPM within one second at at.
func spike(at time.Duration) func(time.Duration) float64 {
	return func(t time.Duration) float64 {
		switch {
		case t < at:
			return 0.1
		case t < at+time.Second:
			return 0.1 + 0.7*float64(t-at)/float64(time.Second)
		}
		return 0.8
	}
}

type goal struct {
	what     string
	measured bool
	met      bool
	figure   string
}

func (g goal) verdict() string {
	switch {
	case !g.measured:
		return "UNMEASURED " + g.figure
	case g.met:
		return "PASS " + g.figure
	}
	return "MISS " + g.figure
}

type result struct {
	name  string
	goals []goal
}

// syncStats are the synchronous calls of one phase.
type syncStats struct {
	mu        sync.Mutex
	lat       []time.Duration
	statuses  map[int]int
	whileRoom int // 429s while a deployment had room for the call
}

func (s *syncStats) p(q float64) time.Duration {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.lat) == 0 {
		return 0
	}
	l := slices.Clone(s.lat)
	slices.Sort(l)
	return l[min(int(float64(len(l))*q), len(l)-1)]
}

type bench struct {
	o      options
	s      *dev.Stack
	client *http.Client
}

func (b *bench) post(path string, body []byte) (int, []byte) {
	req, _ := http.NewRequest(http.MethodPost, b.s.BaseURL+path, bytes.NewReader(body))
	req.Header.Set("Authorization", "Bearer "+b.s.APIKey)
	resp, err := b.client.Do(req)
	if err != nil {
		return 0, nil
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, raw
}

var syncBody = []byte(fmt.Sprintf(`{"model":"gpt-4o","max_tokens":%d,"messages":[{"role":"system","content":"You are a support assistant."},{"role":"user","content":"A customer asks where their parcel is; draft a short, kind answer."}]}`, syncMax))

// load sends open-loop synchronous calls, Poisson arrivals at share(t) of
// the total TPM, until stop; t counts from start.
func (b *bench) load(st *syncStats, start time.Time, share func(time.Duration) float64, stop <-chan struct{}) {
	rng := rand.New(rand.NewPCG(uint64(start.UnixNano()), 7))
	var inner sync.WaitGroup
	defer inner.Wait()
	for {
		rate := share(time.Since(start)) * totalTPM / 60 / syncEst // calls per second
		wait := 100 * time.Millisecond
		if rate > 0 {
			wait = time.Duration(rng.ExpFloat64() / rate * float64(time.Second))
		}
		select {
		case <-stop:
			return
		case <-time.After(wait):
		}
		if rate <= 0 {
			continue
		}
		inner.Add(1)
		go func() {
			defer inner.Done()
			t := time.Now()
			status, _ := b.post("/v1/chat/completions", syncBody)
			d := time.Since(t)
			room := false
			if status == http.StatusTooManyRequests {
				// Judged by the deployments' own minutes, right after the
				// refusal.
				for _, s := range b.s.Sim.Stats() {
					room = room || s.TPM-s.WindowTokens >= syncEst
				}
			}
			st.mu.Lock()
			st.statuses[status]++
			if status == http.StatusOK {
				st.lat = append(st.lat, d)
			}
			if room {
				st.whileRoom++
			}
			st.mu.Unlock()
		}()
	}
}

func (b *bench) submit(n int) (*sync.Map, int, error) {
	jobBody := []byte(fmt.Sprintf(`{"endpoint":"/v1/chat/completions","priority":"low","body":{"model":"gpt-4o","max_tokens":%d,"messages":[{"role":"user","content":"Classify this support ticket and extract the order number: 'My order 4411 arrived broken.'"}]}}`, jobMax))
	responseBody := []byte(fmt.Sprintf(`{"model":"gpt-4o","background":true,"max_output_tokens":%d,"input":"Classify this support ticket and extract the order number: 'My order 4411 arrived broken.'"}`, jobMax))
	var ids sync.Map
	var next, refused atomic.Int64
	var wg sync.WaitGroup
	for c := 0; c < 16; c++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for next.Add(1) <= int64(n) {
				path, body, accepted := "/v1/jobs", jobBody, http.StatusAccepted
				if b.o.responses {
					path, body, accepted = "/v1/responses", responseBody, http.StatusOK
				}
				status, raw := b.post(path, body)
				if status != accepted {
					refused.Add(1)
					continue
				}
				var j struct {
					ID string `json:"id"`
				}
				_ = json.Unmarshal(raw, &j)
				if b.o.responses {
					// A background response is the job of its id.
					id, ok := store.ParseBackgroundResponseID(j.ID)
					if !ok {
						refused.Add(1)
						continue
					}
					j.ID = "job_" + id.String()
				}
				ids.Store(j.ID, true)
			}
		}()
	}
	wg.Wait()
	if r := refused.Load(); r > 0 {
		return nil, 0, fmt.Errorf("%d of %d jobs were not accepted", r, n)
	}
	return &ids, n, nil
}

func (b *bench) open(ctx context.Context) (int, error) {
	var n int
	err := b.s.Store.Pool().QueryRow(ctx, `SELECT count(*) FROM jobs WHERE status IN ('queued','running')`).Scan(&n)
	return n, err
}

func counters(st map[string]sim.Stats) (calls, refused int64) {
	for _, s := range st {
		calls += s.Calls
		refused += s.Refused
	}
	return
}

func run(o options, reserve config.SyncReserve, sc scenario) (*result, error) {
	ctx := context.Background()
	lat := sim.Deployment{TTFT: 250 * time.Millisecond, PerToken: 12 * time.Millisecond, Jitter: 0.3, CompletionTokens: 60}
	f := &dev.File{
		Deployments: []dev.FileDeployment{
			{Name: "gpt-4o-ptu", Model: "gpt-4o", Kind: config.Provisioned, TPM: ptuTPM, Sim: lat},
			{Name: "gpt-4o-standard", Model: "gpt-4o", Kind: config.Standard, TPM: stdTPM, Sim: lat},
		},
		Models: []config.Model{{Name: "gpt-4o", Deployments: []string{"gpt-4o-ptu", "gpt-4o-standard"}, MaxTokens: 4096}},
		Worker: config.Worker{SyncReserve: reserve},
	}
	s, stopStack, err := dev.StartEphemeral(ctx, f)
	if err != nil {
		return nil, err
	}
	defer stopStack()
	b := &bench{o: o, s: s, client: &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 256}, Timeout: 2 * time.Minute}}
	fmt.Printf("\n== %s\n", sc.name)
	if sc.name == "spike" {
		sc.share = spike(o.warm)
		sc.baselineShare = spike(min(o.baseline/4, 15*time.Second))
	}

	// The baseline: the same synchronous profile, without a backlog.
	base := &syncStats{statuses: map[int]int{}}
	if sc.baselineShare != nil {
		stop := make(chan struct{})
		done := make(chan struct{})
		go func() { b.load(base, time.Now(), sc.baselineShare, stop); close(done) }()
		time.Sleep(o.baseline)
		close(stop)
		<-done
		fmt.Printf("  baseline (no backlog, %v): %d calls, statuses %v, p50 %v, p99 %v\n", o.baseline, len(base.lat), base.statuses,
			base.p(0.5).Round(time.Millisecond), base.p(0.99).Round(time.Millisecond))
	}

	// The backlog, then the synchronous profile beside it.
	t0 := time.Now()
	ids, n, err := b.submit(o.jobs)
	if err != nil {
		return nil, err
	}
	fmt.Printf("  backlog: %d jobs accepted in %v\n", n, time.Since(t0).Round(time.Millisecond))
	loaded := &syncStats{statuses: map[int]int{}}
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() { b.load(loaded, t0, sc.share, stop); close(done) }()

	time.Sleep(time.Until(t0.Add(o.warm)))
	// The synchronous calls counted are those of the measured window.
	loaded.mu.Lock()
	loaded.lat, loaded.statuses, loaded.whileRoom = nil, map[int]int{}, 0
	loaded.mu.Unlock()
	calls0, refused0 := counters(s.Sim.Stats())
	var occ = map[string]float64{}
	var samples float64
	end := time.Now().Add(o.window)
	backlogGone := false
	for tick := 0; time.Now().Before(end); tick++ {
		time.Sleep(time.Second)
		left, err := b.open(ctx)
		if err != nil {
			return nil, err
		}
		if left == 0 {
			backlogGone = true
			break
		}
		st := s.Sim.Stats()
		for name, d := range st {
			occ[name] += float64(d.WindowTokens) / float64(d.TPM)
		}
		samples++
		if o.debug && tick%10 == 9 {
			line := fmt.Sprintf("    t=%3.0fs", time.Since(t0).Seconds())
			for _, d := range s.Gateway.Broker.Deployments() {
				minute, _, _ := d.Capacity.Charged(time.Now())
				line += fmt.Sprintf("  %s %5.1f%% (Levee's view %5.1f%%, reserve %4.1f%%, background slots %d)", d.Name, 100*float64(st[d.Name].WindowTokens)/float64(st[d.Name].TPM),
					100*float64(minute)/float64(st[d.Name].TPM), 100*d.Capacity.SyncReserve(time.Now()), d.Capacity.Slots(time.Now(), 30+jobMax))
			}
			fmt.Println(line)
		}
	}
	calls1, refused1 := counters(s.Sim.Stats())
	close(stop)
	<-done

	var twice, lost int
	_ = s.Store.Pool().QueryRow(ctx, `SELECT count(*) FROM (SELECT request_id FROM usage_events WHERE request_id LIKE 'job_%' GROUP BY request_id HAVING count(*) > 1) d`).Scan(&twice)
	ids.Range(func(k, _ any) bool {
		var st string
		if err := s.Store.Pool().QueryRow(ctx, `SELECT status FROM jobs WHERE id = $1`, k.(string)[4:]).Scan(&st); err != nil || st == "failed" {
			lost++
		}
		return true
	})

	r := &result{name: sc.name}
	ptu, std := occ["gpt-4o-ptu"]/max(samples, 1), occ["gpt-4o-standard"]/max(samples, 1)
	util := (ptu*ptuTPM + std*stdTPM) / totalTPM
	figure := fmt.Sprintf("%.1f %% (provisioned %.1f %%, standard %.1f %%; %.0f samples)", util*100, ptu*100, std*100, samples)
	if backlogGone {
		figure += " — the backlog ran out: raise -jobs"
	}
	r.goals = append(r.goals, goal{what: fmt.Sprintf("utilization while the backlog exists ≥ %.0f %%", sc.goal*100),
		measured: samples >= 10, met: util >= sc.goal, figure: figure})
	fmt.Printf("  measured %v from %v after the backlog arrived\n", o.window, o.warm)
	fmt.Printf("  TPM utilization: %s\n", figure)

	loaded.mu.Lock()
	syncCalls, sync429, whileRoom := 0, loaded.statuses[http.StatusTooManyRequests], loaded.whileRoom
	for _, c := range loaded.statuses {
		syncCalls += c
	}
	statuses := fmt.Sprint(loaded.statuses)
	loaded.mu.Unlock()
	if sc.name != "night" {
		r.goals = append(r.goals, goal{what: "client 429s on sync calls while a deployment had room = 0",
			measured: syncCalls > 0, met: whileRoom == 0, figure: fmt.Sprintf("%d (of %d 429s, %d calls)", whileRoom, sync429, syncCalls)})
		p50, p99, b50, b99 := loaded.p(0.5), loaded.p(0.99), base.p(0.5), base.p(0.99)
		r.goals = append(r.goals, goal{what: "sync p99 within +10 % of no backlog",
			measured: p99 > 0 && b99 > 0, met: float64(p99) <= goalP99*float64(b99),
			figure: fmt.Sprintf("p99 %v vs %v (%+.1f %%), p50 %v vs %v", p99.Round(time.Millisecond), b99.Round(time.Millisecond),
				100*(float64(p99)/float64(max(b99, 1))-1), p50.Round(time.Millisecond), b50.Round(time.Millisecond))})
		fmt.Printf("  sync calls: %d, statuses %s; 429s while a deployment had room: %d\n", syncCalls, statuses, whileRoom)
		fmt.Printf("  sync p50 %v (baseline %v), p99 %v (baseline %v)\n", p50.Round(time.Millisecond), b50.Round(time.Millisecond), p99.Round(time.Millisecond), b99.Round(time.Millisecond))
	}
	calls, up429 := calls1-calls0, refused1-refused0
	share := float64(up429) / float64(max(calls, 1))
	r.goals = append(r.goals, goal{what: "upstream 429s ≤ 0.5 % of calls", measured: calls > 0, met: share <= goalUpstream,
		figure: fmt.Sprintf("%.2f %% (%d of %d)", share*100, up429, calls)})
	r.goals = append(r.goals, goal{what: "jobs lost / completed twice = 0 / 0", measured: true, met: lost == 0 && twice == 0,
		figure: fmt.Sprintf("%d / %d", lost, twice)})
	fmt.Printf("  upstream 429s: %d of %d calls (%.2f %%); jobs lost %d, completed twice %d\n", up429, calls, share*100, lost, twice)
	// Why the workers may have taken less than the reserve left them.
	fmt.Printf("  workers: consumers found saturated (a pull unanswered for 50 ms, then skipped 2 s) %.0f times; jobs put back for no capacity %.0f times\n",
		b.metric("levee_worker_saturated_consumers_total"), b.metric(`levee_job_retries_total{reason="no_capacity"}`))
	return r, nil
}

// metric sums the samples of the gateway's /metrics whose name (with its
// labels, if given) starts with prefix; -1 if /metrics cannot be read.
func (b *bench) metric(prefix string) float64 {
	resp, err := b.client.Get(b.s.BaseURL + "/metrics")
	if err != nil {
		return -1
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	var sum float64
	for _, line := range strings.Split(string(raw), "\n") {
		if strings.HasPrefix(line, prefix) {
			var v float64
			if _, err := fmt.Sscan(line[strings.LastIndexByte(line, ' ')+1:], &v); err == nil {
				sum += v
			}
		}
	}
	return sum
}
