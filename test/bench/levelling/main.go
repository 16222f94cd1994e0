// Command levelling is `make bench-levelling`: queue-based load levelling
// against the simulator with a provisioned 60k-TPM and a standard 120k-TPM
// gpt-4o deployment and realistic latency. Phase 1 (baseline) sends steady
// high-priority synchronous traffic at about 40 % of capacity. Phase 2 keeps
// that traffic and adds a backlog of low-priority jobs. It reports TPM
// utilization while the backlog exists, how full the provisioned deployment
// was, client-visible 429s and latency of the synchronous calls against the
// baseline, upstream 429s, jobs lost or completed twice, and the time to
// drain (measured with -drain, else projected from the measured rate).
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/levee-gw/levee/config"
	"github.com/levee-gw/levee/dev"
	"github.com/levee-gw/levee/sim"
	"github.com/levee-gw/levee/store"
)

// responsesBacklog: the backlog is background responses.
var responsesBacklog bool

func main() {
	jobs := flag.Int("jobs", 20000, "low-priority jobs in the backlog")
	baseline := flag.Duration("baseline", 60*time.Second, "length of the sync-only phase")
	window := flag.Duration("window", 3*time.Minute, "how long to measure while the backlog exists")
	drain := flag.Bool("drain", false, "wait for the whole backlog to drain")
	share := flag.Float64("sync-share", 0.4, "synchronous traffic as a share of total TPM")
	reserve := flag.Float64("reserve", 0.05, "share of each deployment workers leave to synchronous traffic")
	flag.BoolVar(&debug, "debug", false, "print when sync calls were refused and the headroom each second")
	flag.BoolVar(&responsesBacklog, "responses", false, "make the backlog background responses (POST /v1/responses, background) instead of jobs")
	flag.Parse()
	if err := run(*jobs, *baseline, *window, *drain, *share, *reserve); err != nil {
		fmt.Fprintln(os.Stderr, "bench-levelling:", err)
		os.Exit(1)
	}
}

var debug bool

const (
	ptuTPM, stdTPM = 60_000, 120_000
	syncMax        = 300 // max_tokens of a synchronous call
	jobMax         = 400 // max_tokens of a job: above TPM/RPM, so tokens bind
)

type syncStats struct {
	mu       sync.Mutex
	lat      []time.Duration
	statuses map[int]int
	refused  []time.Time
}

func (s *syncStats) add(d time.Duration, status int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.statuses[status]++
	if status == 429 {
		s.refused = append(s.refused, time.Now())
	}
	if status == 200 {
		s.lat = append(s.lat, d)
	}
}

func (s *syncStats) p(q int) time.Duration {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.lat) == 0 {
		return 0
	}
	l := slices.Clone(s.lat)
	slices.Sort(l)
	return l[min(len(l)*q/100, len(l)-1)]
}

func run(nJobs int, baseline, window time.Duration, drain bool, share, reserve float64) error {
	ctx := context.Background()
	lat := sim.Deployment{TTFT: 250 * time.Millisecond, PerToken: 12 * time.Millisecond, Jitter: 0.3, CompletionTokens: 60}
	f := &dev.File{
		Deployments: []dev.FileDeployment{
			{Name: "gpt-4o-ptu", Model: "gpt-4o", Kind: config.Provisioned, TPM: ptuTPM, SyncReserve: reserve, Sim: lat},
			{Name: "gpt-4o-standard", Model: "gpt-4o", Kind: config.Standard, TPM: stdTPM, SyncReserve: reserve, Sim: lat},
		},
		Models: []config.Model{{Name: "gpt-4o", Deployments: []string{"gpt-4o-ptu", "gpt-4o-standard"}, MaxTokens: 4096}},
		Worker: config.Worker{Concurrency: 256, SyncReserve: reserve},
	}
	s, stopStack, err := dev.StartEphemeral(ctx, f)
	if err != nil {
		return err
	}
	defer stopStack()
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 256}, Timeout: 2 * time.Minute}
	post := func(path string, body []byte, hdr ...string) (int, []byte) {
		req, _ := http.NewRequest(http.MethodPost, s.BaseURL+path, bytes.NewReader(body))
		req.Header.Set("Authorization", "Bearer "+s.APIKey)
		for i := 0; i+1 < len(hdr); i += 2 {
			req.Header.Set(hdr[i], hdr[i+1])
		}
		resp, err := client.Do(req)
		if err != nil {
			return 0, nil
		}
		defer resp.Body.Close()
		raw, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, raw
	}
	syncBody := []byte(fmt.Sprintf(`{"model":"gpt-4o","max_tokens":%d,"messages":[{"role":"system","content":"You are a support assistant."},{"role":"user","content":"A customer asks where their parcel is; draft a short, kind answer."}]}`, syncMax))
	syncEst := 30 + syncMax
	rate := share * float64(ptuTPM+stdTPM) / float64(syncEst) / 60 // calls per second

	// Open-loop synchronous traffic into the given stats until stop.
	runSync := func(st *syncStats, stop <-chan struct{}, wg *sync.WaitGroup) {
		defer wg.Done()
		interval := time.Duration(float64(time.Second) / rate)
		t := time.NewTicker(interval)
		defer t.Stop()
		var inner sync.WaitGroup
		for {
			select {
			case <-stop:
				inner.Wait()
				return
			case <-t.C:
				inner.Add(1)
				go func() {
					defer inner.Done()
					start := time.Now()
					status, _ := post("/v1/chat/completions", syncBody)
					st.add(time.Since(start), status)
				}()
			}
		}
	}
	fmt.Printf("levee bench-levelling: PTU %d TPM + standard %d TPM (RPM 6 per 1k TPM), latency %v + %v/token\n", ptuTPM, stdTPM, lat.TTFT, lat.PerToken)
	fmt.Printf("  sync traffic: %.2f calls/s of ~%d tokens (%.0f%% of capacity); reserve %.0f%%; backlog %d jobs of ~%d tokens\n",
		rate, syncEst, share*100, reserve*100, nJobs, 30+jobMax)

	// Phase 1: baseline.
	base := &syncStats{statuses: map[int]int{}}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go runSync(base, stop, &wg)
	time.Sleep(baseline)
	close(stop)
	wg.Wait()
	s.Sim.Reset()

	// Phase 2: the same traffic plus the backlog.
	loaded := &syncStats{statuses: map[int]int{}}
	stop = make(chan struct{})
	wg.Add(1)
	go runSync(loaded, stop, &wg)
	jobBody := []byte(fmt.Sprintf(`{"endpoint":"/v1/chat/completions","priority":"low","body":{"model":"gpt-4o","max_tokens":%d,"messages":[{"role":"user","content":"Classify this support ticket and extract the order number: 'My order 4411 arrived broken.'"}]}}`, jobMax))
	responseBody := []byte(fmt.Sprintf(`{"model":"gpt-4o","background":true,"max_output_tokens":%d,"input":"Classify this support ticket and extract the order number: 'My order 4411 arrived broken.'"}`, max(jobMax, 16)))
	var ids sync.Map
	var next, refused atomic.Int64
	phase2 := time.Now()
	var sub sync.WaitGroup
	for c := 0; c < 16; c++ {
		sub.Add(1)
		go func() {
			defer sub.Done()
			for next.Add(1) <= int64(nJobs) {
				path, body, accepted := "/v1/jobs", jobBody, 202
				if responsesBacklog {
					path, body, accepted = "/v1/responses", responseBody, 200
				}
				status, raw := post(path, body)
				if status != accepted {
					refused.Add(1)
					continue
				}
				var j struct {
					ID string `json:"id"`
				}
				_ = json.Unmarshal(raw, &j)
				if responsesBacklog {
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
	sub.Wait()
	submitted := time.Since(phase2)

	// Measure utilization over the window, after the first minute (the
	// deployments' sliding minutes still held baseline traffic before it).
	type sample struct {
		at       time.Time
		ptu, std int64
	}
	take := func() sample {
		st := s.Sim.Stats()
		return sample{time.Now(), st["gpt-4o-ptu"].TokensAdmitted, st["gpt-4o-standard"].TokensAdmitted}
	}
	// Utilization is what the deployments' own sliding minutes hold,
	// sampled each second while the backlog exists.
	var occPTU, occStd, occN float64
	open := func() int {
		var n int
		_ = s.Store.Pool().QueryRow(ctx, `SELECT count(*) FROM jobs WHERE status IN ('queued','running')`).Scan(&n)
		return n
	}
	var heads []string
	if debug {
		go func() {
			for t := 0; t < 120; t++ {
				time.Sleep(time.Second)
				line := fmt.Sprintf("t=%3ds", t+1)
				for _, d := range s.Gateway.Broker.Deployments() {
					tok, req := d.Capacity.Headroom(time.Now())
					line += fmt.Sprintf("  %s tok %6d req %4d", d.Name, tok, req)
				}
				heads = append(heads, line)
			}
		}()
	}
	warm := phase2.Add(time.Minute)
	time.Sleep(time.Until(warm))
	first := take()
	doneAtFirst := nJobs - open()
	end := warm.Add(window)
	last := first
	backlogGone := time.Time{}
	for time.Now().Before(end) || (drain && backlogGone.IsZero()) {
		time.Sleep(time.Second)
		if open() > 0 {
			last = take() // utilization counts only while the backlog exists
			st := s.Sim.Stats()
			occPTU += float64(st["gpt-4o-ptu"].WindowTokens) / ptuTPM
			occStd += float64(st["gpt-4o-standard"].WindowTokens) / stdTPM
			occN++
		} else if backlogGone.IsZero() {
			backlogGone = time.Now()
			if !drain {
				break
			}
		}
	}
	close(stop)
	wg.Wait()
	minutes := last.at.Sub(first.at).Minutes()
	admitted := float64(last.ptu-first.ptu+last.std-first.std) / minutes / (ptuTPM + stdTPM)
	ptuUtil, stdUtil := occPTU/max(occN, 1), occStd/max(occN, 1)
	total := (ptuUtil*ptuTPM + stdUtil*stdTPM) / (ptuTPM + stdTPM)
	remaining := open()
	drained := nJobs - remaining - doneAtFirst
	rateJobs := float64(drained) / time.Since(first.at).Minutes()

	var stored, twice, lost int
	_ = s.Store.Pool().QueryRow(ctx, `SELECT count(*) FROM jobs`).Scan(&stored)
	_ = s.Store.Pool().QueryRow(ctx, `SELECT count(*) FROM (SELECT request_id FROM usage_events WHERE request_id LIKE 'job_%' GROUP BY request_id HAVING count(*) > 1) d`).Scan(&twice)
	ids.Range(func(k, _ any) bool {
		var st string
		if err := s.Store.Pool().QueryRow(ctx, `SELECT status FROM jobs WHERE id = $1`, k.(string)[4:]).Scan(&st); err != nil || st == "failed" {
			lost++
		}
		return true
	})
	var calls, up429 int64
	for _, st := range s.Sim.Stats() {
		calls += st.Calls
		up429 += st.Refused
	}

	if debug {
		byTen := map[int]int{}
		for _, at := range loaded.refused {
			byTen[int(at.Sub(phase2).Seconds())/10*10]++
		}
		fmt.Printf("sync 429s by 10 s since the backlog arrived: %v\n", byTen)
		for _, h := range heads {
			fmt.Println(h)
		}
	}
	fmt.Printf("\nbaseline (sync only, %v): %d calls, statuses %v, p50 %v, p99 %v\n", baseline, len(base.lat), base.statuses, base.p(50).Round(time.Millisecond), base.p(99).Round(time.Millisecond))
	fmt.Printf("with backlog: %d jobs accepted in %v (%d refused)\n", nJobs-int(refused.Load()), submitted.Round(time.Millisecond), refused.Load())
	fmt.Printf("  measured %.1f min while the backlog existed (from 1 min after it arrived)\n", minutes)
	fmt.Printf("  TPM utilization (mean of each deployment's sliding minute, sampled every second): %.1f%% of total\n", total*100)
	fmt.Printf("    provisioned %.1f%%, standard %.1f%% (provisioned is filled first; standard takes the rest)\n", ptuUtil*100, stdUtil*100)
	fmt.Printf("    tokens admitted per minute over the window: %.1f%% of total TPM\n", admitted*100)
	fmt.Printf("  sync calls: %d, statuses %v, p50 %v (baseline %v), p99 %v (baseline %v)\n", len(loaded.lat), loaded.statuses,
		loaded.p(50).Round(time.Millisecond), base.p(50).Round(time.Millisecond), loaded.p(99).Round(time.Millisecond), base.p(99).Round(time.Millisecond))
	fmt.Printf("  upstream 429s: %d of %d calls (%.2f%%)\n", up429, calls, 100*float64(up429)/float64(max(calls, 1)))
	fmt.Printf("  jobs lost (missing or failed): %d; jobs completed twice: %d; stored %d\n", lost, twice, stored)
	if !backlogGone.IsZero() {
		fmt.Printf("  time to drain: %v (measured)\n", backlogGone.Sub(phase2).Round(time.Second))
	} else {
		fmt.Printf("  drained %.0f jobs/min; %d left; time to drain %d jobs: %v (projected from the measured rate; -drain measures it)\n",
			rateJobs, remaining, nJobs, (time.Duration(float64(nJobs) / rateJobs * float64(time.Minute))).Round(time.Second))
	}
	return nil
}
