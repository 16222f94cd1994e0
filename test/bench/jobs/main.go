// Command jobs is `make bench-jobs`: end-to-end jobs per second. It runs the
// whole stack in this process (private Postgres, embedded NATS, a simulator
// with no latency and no limits, the gateway with its workers), submits jobs
// over HTTP, and reports the submit rate and the end-to-end rate: from the
// first submit to the last job succeeded. It does so twice on fresh stacks:
// one job per POST /v1/jobs from -clients clients, then arrays of -bulk jobs.
//
// The machine is shared and small, so it also reports the CPU each run cost
// per job (this process, which is the gateway, its workers, NATS, the
// simulator and the load generator; and Postgres), which other work on the
// machine does not inflate the way it does wall time.
package main

import (
	"bytes"
	"context"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"runtime/pprof"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/levee-gw/levee/config"
	"github.com/levee-gw/levee/dev"
	"github.com/levee-gw/levee/sim"
)

func main() {
	n := flag.Int("jobs", 20000, "jobs to submit in each run")
	clients := flag.Int("clients", 32, "concurrent submitting clients, one job per request")
	bulk := flag.Int("bulk", 100, "jobs per request in the bulk run (0: skip it)")
	bulkClients := flag.Int("bulk-clients", 4, "concurrent submitting clients in the bulk run")
	concurrency := flag.Int("concurrency", 256, "worker concurrency")
	cpuprofile := flag.String("cpuprofile", "", "write a CPU profile of the runs here")
	flag.Parse()
	if *cpuprofile != "" {
		f, err := os.Create(*cpuprofile)
		if err == nil {
			_ = pprof.StartCPUProfile(f)
		}
	}
	fmt.Printf("levee bench-jobs: %d jobs a run, worker concurrency %d, zero-latency simulator without limits; load %s\n", *n, *concurrency, loadavg())
	runs := []struct {
		name       string
		per, conns int
	}{{"one job per request", 1, *clients}}
	if *bulk > 0 {
		runs = append(runs, struct {
			name       string
			per, conns int
		}{fmt.Sprintf("arrays of %d", *bulk), *bulk, *bulkClients})
	}
	for _, r := range runs {
		if err := run(r.name, *n, r.per, r.conns, *concurrency); err != nil {
			pprof.StopCPUProfile()
			fmt.Fprintln(os.Stderr, "bench-jobs:", err)
			os.Exit(1)
		}
	}
	pprof.StopCPUProfile()
}

const job = `{"endpoint":"/v1/chat/completions","priority":"low","body":{"model":"gpt-4o","max_tokens":8,"messages":[{"role":"user","content":"Summarize the river's course in one line."}]}}`

func run(name string, n, per, clients, concurrency int) error {
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
	postmaster, err := postmasterPID(s.Postgres.Dir)
	if err != nil {
		return fmt.Errorf("cannot measure Postgres's CPU: %w", err)
	}

	body := []byte(job)
	if per > 1 {
		body = []byte("[" + strings.TrimSuffix(strings.Repeat(job+",", per), ",") + "]")
	}
	requests := (n + per - 1) / per
	n = requests * per
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: clients * 2}}
	var next, failed atomic.Int64
	var firstErr atomic.Value
	selfCPU0, pgCPU0 := selfCPU(), processCPU(postmaster)
	start := time.Now()
	var wg sync.WaitGroup
	for c := 0; c < clients; c++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for next.Add(1) <= int64(requests) {
				req, _ := http.NewRequest(http.MethodPost, s.BaseURL+"/v1/jobs", bytes.NewReader(body))
				req.Header.Set("Authorization", "Bearer "+s.APIKey)
				resp, err := client.Do(req)
				if err != nil {
					failed.Add(int64(per))
					firstErr.CompareAndSwap(nil, err.Error())
					continue
				}
				raw, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				if resp.StatusCode != 202 {
					failed.Add(int64(per))
					firstErr.CompareAndSwap(nil, fmt.Sprintf("%d %s", resp.StatusCode, raw))
				}
			}
		}()
	}
	wg.Wait()
	submitted := time.Since(start)
	if failed.Load() > 0 {
		return fmt.Errorf("%s: %d jobs refused (first: %v)", name, failed.Load(), firstErr.Load())
	}
	// Polled through the open jobs' partial index, not a scan of them all:
	// the bench's own reads would otherwise be a share of Postgres's CPU.
	var open int
	for {
		if err := s.Store.Pool().QueryRow(ctx, `SELECT count(*) FROM jobs WHERE status IN ('queued','running')`).Scan(&open); err != nil {
			return err
		}
		if open == 0 {
			break
		}
		if time.Since(start) > 10*time.Minute {
			return fmt.Errorf("%s: gave up with %d jobs open", name, open)
		}
		time.Sleep(50 * time.Millisecond)
	}
	total := time.Since(start)
	var done int
	if err := s.Store.Pool().QueryRow(ctx, `SELECT count(*) FROM jobs WHERE status = 'succeeded'`).Scan(&done); err != nil {
		return err
	}
	selfUsed, pgUsed := selfCPU()-selfCPU0, processCPU(postmaster)-pgCPU0
	var usageRows int
	if err := s.Store.Pool().QueryRow(ctx, `SELECT count(*) FROM usage_events WHERE request_id LIKE 'job_%'`).Scan(&usageRows); err != nil {
		return err
	}
	calls := s.Sim.Stats()["d"].Admitted
	if done != n || usageRows != n || calls != int64(n) {
		return fmt.Errorf("%s: %d jobs submitted, but %d succeeded, %d usage rows, %d upstream calls", name, n, done, usageRows, calls)
	}
	if os.Getenv("PGSTATS") != "" {
		_, _ = s.Store.Pool().Exec(ctx, `CREATE EXTENSION IF NOT EXISTS pg_stat_statements`)
		rows, err := s.Store.Pool().Query(ctx, `SELECT calls, round(total_exec_time)::bigint, rows, left(regexp_replace(query, '\s+', ' ', 'g'), 90) FROM pg_stat_statements ORDER BY total_exec_time DESC LIMIT 15`)
		if err == nil {
			for rows.Next() {
				var c, t, r int64
				var q string
				_ = rows.Scan(&c, &t, &r, &q)
				fmt.Printf("  pg %7d calls %6d ms %7d rows  %s\n", c, t, r, q)
			}
		}
	}
	perJob := func(d time.Duration) float64 { return float64(d.Microseconds()) / float64(n) }
	cpu := perJob(selfUsed + pgUsed)
	fmt.Printf("%s, %d clients:\n", name, clients)
	fmt.Printf("  submitted in %v: %.0f jobs/s accepted\n", submitted.Round(time.Millisecond), float64(n)/submitted.Seconds())
	fmt.Printf("  all ended in %v: %.0f jobs/s end to end\n", total.Round(time.Millisecond), float64(n)/total.Seconds())
	fmt.Printf("  CPU per job: %.0f µs (this process %.0f µs: gateway, workers, NATS, simulator, load generator; Postgres %.0f µs): 2 cores' worth is %.0f jobs/s\n",
		cpu, perJob(selfUsed), perJob(pgUsed), 2e6/cpu)
	fmt.Printf("  succeeded %d, usage rows %d, upstream calls %d; load %s\n", done, usageRows, calls, loadavg())
	return nil
}

func selfCPU() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func postmasterPID(dir string) (int, error) {
	raw, err := os.ReadFile(filepath.Join(dir, "postmaster.pid"))
	if err != nil {
		return 0, err
	}
	first, _, _ := strings.Cut(string(raw), "\n")
	return strconv.Atoi(strings.TrimSpace(first))
}

// processCPU is the CPU used by a process and its children, live (their own
// counters) and ended (the parent's counters of the children it reaped).
func processCPU(pid int) time.Duration {
	ticks := func(p int, withChildren bool) (int64, int) {
		raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", p))
		if err != nil {
			return 0, -1
		}
		// Fields after the command, which is in parentheses.
		f := strings.Fields(string(raw[bytes.LastIndexByte(raw, ')')+2:]))
		ppid, _ := strconv.Atoi(f[1])
		var t int64
		for i, k := range []int{11, 12, 13, 14} { // utime stime cutime cstime
			if i >= 2 && !withChildren {
				break
			}
			v, _ := strconv.ParseInt(f[k], 10, 64)
			t += v
		}
		return t, ppid
	}
	total, _ := ticks(pid, true)
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		p, err := strconv.Atoi(e.Name())
		if err != nil || p == pid {
			continue
		}
		if t, ppid := ticks(p, false); ppid == pid {
			total += t
		}
	}
	return time.Duration(total) * 10 * time.Millisecond // USER_HZ is 100 on Linux
}

func loadavg() string {
	raw, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "unknown"
	}
	f := strings.Fields(string(raw))
	return strings.Join(f[:3], " ")
}
