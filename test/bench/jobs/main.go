// Command jobs is `make bench-jobs`: end-to-end jobs per second. It runs the
// whole stack in this process (private Postgres, embedded NATS, a simulator
// with no latency and no limits, the gateway with its workers), submits
// -jobs jobs over HTTP from -clients concurrent clients, and reports the
// submit rate and the end-to-end rate: from the first submit to the last job
// succeeded.
package main

import (
	"bytes"
	"context"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"runtime/pprof"
	"sync"
	"sync/atomic"
	"time"

	"github.com/levee-gw/levee/config"
	"github.com/levee-gw/levee/dev"
	"github.com/levee-gw/levee/sim"
)

func main() {
	n := flag.Int("jobs", 10000, "jobs to submit")
	clients := flag.Int("clients", 32, "concurrent submitting clients")
	concurrency := flag.Int("concurrency", 256, "worker concurrency")
	cpuprofile := flag.String("cpuprofile", "", "write a CPU profile of the run here")
	flag.Parse()
	if *cpuprofile != "" {
		f, err := os.Create(*cpuprofile)
		if err == nil {
			_ = pprof.StartCPUProfile(f)
			defer pprof.StopCPUProfile()
		}
	}
	if err := run(*n, *clients, *concurrency); err != nil {
		fmt.Fprintln(os.Stderr, "bench-jobs:", err)
		pprof.StopCPUProfile()
		os.Exit(1)
	}
}

func run(n, clients, concurrency int) error {
	ctx := context.Background()
	f := &dev.File{
		Deployments: []dev.FileDeployment{{Name: "d", Model: "gpt-4o", Kind: config.Provisioned, TPM: 1 << 40, RPM: 1 << 40,
			Sim: sim.Deployment{TPM: 0, CompletionTokens: 8}}},
		Models: []config.Model{{Name: "gpt-4o", Deployments: []string{"d"}}},
		Worker: config.Worker{Concurrency: concurrency},
	}
	s, stop, err := dev.StartEphemeral(ctx, f)
	if err != nil {
		return err
	}
	defer stop()

	body := []byte(`{"endpoint":"/v1/chat/completions","priority":"low","body":{"model":"gpt-4o","max_tokens":8,"messages":[{"role":"user","content":"Summarize the river's course in one line."}]}}`)
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: clients * 2}}
	var next, failed atomic.Int64
	start := time.Now()
	var wg sync.WaitGroup
	for c := 0; c < clients; c++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for next.Add(1) <= int64(n) {
				req, _ := http.NewRequest(http.MethodPost, s.BaseURL+"/v1/jobs", bytes.NewReader(body))
				req.Header.Set("Authorization", "Bearer "+s.APIKey)
				resp, err := client.Do(req)
				if err != nil {
					failed.Add(1)
					continue
				}
				_, _ = io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode != 202 {
					failed.Add(1)
				}
			}
		}()
	}
	wg.Wait()
	submitted := time.Since(start)
	var done, open int
	for {
		if err := s.Store.Pool().QueryRow(ctx, `SELECT count(*) FILTER (WHERE status = 'succeeded'), count(*) FILTER (WHERE status IN ('queued','running')) FROM jobs`).Scan(&done, &open); err != nil {
			return err
		}
		if open == 0 {
			break
		}
		if time.Since(start) > 10*time.Minute {
			return fmt.Errorf("gave up with %d jobs open", open)
		}
		time.Sleep(20 * time.Millisecond)
	}
	total := time.Since(start)
	var usageRows int
	_ = s.Store.Pool().QueryRow(ctx, `SELECT count(*) FROM usage_events WHERE request_id LIKE 'job_%'`).Scan(&usageRows)
	fmt.Printf("levee bench-jobs: %d jobs, %d clients, worker concurrency %d, zero-latency simulator without limits\n", n, clients, concurrency)
	fmt.Printf("  submitted in %v: %.0f jobs/s accepted (%d refused)\n", submitted.Round(time.Millisecond), float64(n)/submitted.Seconds(), failed.Load())
	fmt.Printf("  all ended in %v: %.0f jobs/s end to end\n", total.Round(time.Millisecond), float64(n)/total.Seconds())
	fmt.Printf("  succeeded %d, usage rows %d, upstream calls %d\n", done, usageRows, s.Sim.Stats()["d"].Admitted)
	return nil
}
