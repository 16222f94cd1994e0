// Command scale is `make bench-scale`: how Levee's hot paths hold up on a
// database that has run for a while. It runs the whole stack in this
// process, measures the hot paths on the empty database, fills Postgres in
// bulk with COPY (finished jobs with results, a tenant with -tenant-jobs of
// them, uploads and their lines, webhook events and deliveries, the usage
// ledger and its rollup), measures again, then times one retention pass
// while a prober claims jobs, and prints the table. Any figure it cannot
// measure ends it with an error.
package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"

	"github.com/levee-gw/levee/config"
	"github.com/levee-gw/levee/dev"
	"github.com/levee-gw/levee/sim"
	"github.com/levee-gw/levee/store"
)

func main() {
	jobs := flag.Int("jobs", 10_000_000, "finished jobs to fill the database with")
	tenantJobs := flag.Int("tenant-jobs", 1_000_000, "of which the measured tenant's")
	tenants := flag.Int("tenants", 1000, "other tenants sharing the rest")
	flag.Parse()
	if err := run(*jobs, *tenantJobs, *tenants); err != nil {
		fmt.Fprintln(os.Stderr, "bench-scale:", err)
		os.Exit(1)
	}
}

type figures struct {
	submitP50, submitP99 time.Duration
	endToEnd             float64 // jobs/s
	listP50, listP99     time.Duration
	deepP50, deepP99     time.Duration
	usageP50, usageP99   time.Duration
}

func run(n, tenantJobs, tenants int) error {
	ctx := context.Background()
	f := &dev.File{
		Deployments: []dev.FileDeployment{{Name: "d", Model: "gpt-4o", Kind: config.Provisioned, TPM: 1 << 40, RPM: 1 << 40,
			Sim: sim.Deployment{CompletionTokens: 8}}},
		Models: []config.Model{{Name: "gpt-4o", Deployments: []string{"d"}}},
		// The stack's own sweeper keeps everything: the pass measured is
		// the bench's alone.
		Retention: config.Retention{Jobs: -1, Batches: -1, Uploads: -1, Webhooks: -1, FailedWebhooks: -1, UsageMonths: -1},
	}
	s, stop, err := dev.StartEphemeral(ctx, f)
	if err != nil {
		return err
	}
	defer stop()
	var tenant uuid.UUID
	if err := s.Store.Pool().QueryRow(ctx, `SELECT tenant_id FROM api_keys LIMIT 1`).Scan(&tenant); err != nil {
		return err
	}
	b := &bench{s: s, client: &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 64}}}

	fmt.Printf("levee bench-scale: %d finished jobs (%d of one tenant, the rest over %d tenants)\n", n, tenantJobs, tenants)
	empty, err := b.measure(ctx)
	if err != nil {
		return fmt.Errorf("empty database: %w", err)
	}
	start := time.Now()
	if err := fill(ctx, s.Store, tenant, n, tenantJobs, tenants); err != nil {
		return fmt.Errorf("filling: %w", err)
	}
	var size string
	_ = s.Store.Pool().QueryRow(ctx, `SELECT pg_size_pretty(pg_database_size(current_database()))`).Scan(&size)
	fmt.Printf("  filled in %v; database %s\n", time.Since(start).Round(time.Second), size)
	full, err := b.measure(ctx)
	if err != nil {
		return fmt.Errorf("full database: %w", err)
	}
	row := func(what string, a, z time.Duration) {
		fmt.Printf("  %-34s %10v %10v  %5.2f×\n", what, a.Round(10*time.Microsecond), z.Round(10*time.Microsecond), float64(z)/float64(a))
	}
	fmt.Printf("  %-34s %10s %10s  %s\n", "", "empty", "full", "ratio")
	row("submit p50", empty.submitP50, full.submitP50)
	row("submit p99", empty.submitP99, full.submitP99)
	fmt.Printf("  %-34s %10.0f %10.0f  %5.2f×\n", "jobs end to end (claim+finish)/s", empty.endToEnd, full.endToEnd, empty.endToEnd/full.endToEnd)
	row("GET /v1/jobs first page p50", empty.listP50, full.listP50)
	row("GET /v1/jobs first page p99", empty.listP99, full.listP99)
	row("GET /v1/jobs deep page p50", empty.deepP50, full.deepP50)
	row("GET /v1/jobs deep page p99", empty.deepP99, full.deepP99)
	row("GET /v1/usage (30 days) p50", empty.usageP50, full.usageP50)
	row("GET /v1/usage (30 days) p99", empty.usageP99, full.usageP99)

	if err := explain(ctx, s.Store, tenant); err != nil {
		return err
	}
	return retention(ctx, s.Store, b)
}

type bench struct {
	s      *dev.Stack
	client *http.Client
}

func (b *bench) do(method, path string, body []byte, want int) (time.Duration, []byte, error) {
	req, _ := http.NewRequest(method, b.s.BaseURL+path, bytes.NewReader(body))
	req.Header.Set("Authorization", "Bearer "+b.s.APIKey)
	t := time.Now()
	resp, err := b.client.Do(req)
	if err != nil {
		return 0, nil, err
	}
	raw, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	d := time.Since(t)
	if resp.StatusCode != want {
		return 0, nil, fmt.Errorf("%s %s: %d %s", method, path, resp.StatusCode, raw)
	}
	return d, raw, nil
}

const jobBody = `{"endpoint":"/v1/chat/completions","priority":"low","body":{"model":"gpt-4o","max_tokens":8,"messages":[{"role":"user","content":"Summarize the river's course in one line."}]}}`

// measure takes every figure once on the database as it is.
func (b *bench) measure(ctx context.Context) (*figures, error) {
	f := &figures{}
	// Submit latency and end to end: 4,000 jobs from 8 clients.
	const total, clients = 4000, 8
	var (
		mu    sync.Mutex
		lat   []time.Duration
		next  atomic.Int64
		first error
	)
	var before int
	if err := b.s.Store.Pool().QueryRow(ctx, `SELECT count(*) FROM jobs WHERE status = 'succeeded'`).Scan(&before); err != nil {
		return nil, err
	}
	start := time.Now()
	var wg sync.WaitGroup
	for c := 0; c < clients; c++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for next.Add(1) <= total {
				d, _, err := b.do(http.MethodPost, "/v1/jobs", []byte(jobBody), 202)
				mu.Lock()
				if err != nil && first == nil {
					first = err
				}
				lat = append(lat, d)
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	if first != nil {
		return nil, first
	}
	for {
		var open int
		if err := b.s.Store.Pool().QueryRow(ctx, `SELECT count(*) FROM jobs WHERE status IN ('queued', 'running')`).Scan(&open); err != nil {
			return nil, err
		}
		if open == 0 {
			break
		}
		if time.Since(start) > 5*time.Minute {
			return nil, fmt.Errorf("%d jobs still open after 5 minutes", open)
		}
		time.Sleep(20 * time.Millisecond)
	}
	f.endToEnd = total / time.Since(start).Seconds()
	f.submitP50, f.submitP99 = pct(lat, 50), pct(lat, 99)

	// The tenant's jobs, first page and one deep in the list.
	var deep uuid.UUID
	if err := b.s.Store.Pool().QueryRow(ctx, `SELECT tenant_id FROM api_keys LIMIT 1`).Scan(&deep); err != nil {
		return nil, err
	}
	var mid uuid.UUID
	if err := b.s.Store.Pool().QueryRow(ctx, `SELECT id FROM jobs WHERE tenant_id = $1 AND batch_id IS NULL ORDER BY id LIMIT 1 OFFSET (
		SELECT count(*) / 2 FROM jobs WHERE tenant_id = $1 AND batch_id IS NULL)`, deep).Scan(&mid); err != nil {
		return nil, err
	}
	var err error
	if f.listP50, f.listP99, err = b.repeat(300, "/v1/jobs?limit=20"); err != nil {
		return nil, err
	}
	if f.deepP50, f.deepP99, err = b.repeat(300, "/v1/jobs?limit=20&after=job_"+mid.String()); err != nil {
		return nil, err
	}
	if f.usageP50, f.usageP99, err = b.repeat(300, "/v1/usage?start_date="+time.Now().AddDate(0, 0, -29).Format(time.DateOnly)); err != nil {
		return nil, err
	}
	return f, nil
}

func (b *bench) repeat(n int, path string) (p50, p99 time.Duration, err error) {
	lat := make([]time.Duration, 0, n)
	for i := 0; i < n; i++ {
		d, _, err := b.do(http.MethodGet, path, nil, 200)
		if err != nil {
			return 0, 0, err
		}
		lat = append(lat, d)
	}
	return pct(lat, 50), pct(lat, 99), nil
}

func pct(ds []time.Duration, p int) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	return s[min(len(s)-1, len(s)*p/100)]
}

// v7 is a UUIDv7 for instant t, so filled rows sort by time as real ones.
func v7(t time.Time) uuid.UUID {
	var u uuid.UUID
	_, _ = rand.Read(u[:])
	ms := uint64(t.UnixMilli())
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], ms)
	copy(u[0:6], b[2:8])
	u[6] = (u[6] & 0x0f) | 0x70
	u[8] = (u[8] & 0x3f) | 0x80
	return u
}

// fill copies n finished jobs into Postgres over the last 60 days: tenantJobs
// of them the measured tenant's, the rest over other tenants; one usage
// event per job (and the daily rollup), a webhook event and delivery for
// one job in ten, and an upload of 100 lines per 10,000 jobs.
func fill(ctx context.Context, st *store.Store, tenant uuid.UUID, n, tenantJobs, tenants int) error {
	pool := st.Pool()
	others := make([]uuid.UUID, tenants)
	if _, err := pool.CopyFrom(ctx, pgx.Identifier{"tenants"}, []string{"id", "name"}, pgx.CopyFromSlice(tenants, func(i int) ([]any, error) {
		others[i] = uuid.New()
		return []any{others[i], fmt.Sprintf("scale-%04d", i)}, nil
	})); err != nil {
		return err
	}
	now := time.Now()
	span := 60 * 24 * time.Hour
	body := []byte(`{"model":"gpt-4o","max_tokens":8,"messages":[{"role":"user","content":"Summarize the river's course in one line."}]}`)
	result := []byte(`{"id":"chatcmpl-x","object":"chat.completion","model":"gpt-4o","choices":[{"index":0,"message":{"role":"assistant","content":"The river runs from the hills to the sea."},"finish_reason":"stop"}],"usage":{"prompt_tokens":17,"completion_tokens":8,"total_tokens":25}}`)
	hash := make([]byte, 32)
	const chunk = 500_000
	for done := 0; done < n; done += chunk {
		m := min(chunk, n-done)
		t0 := time.Now()
		type jrow struct {
			id     uuid.UUID
			tenant uuid.UUID
			at     time.Time
		}
		rows := make([]jrow, m)
		for i := range rows {
			k := done + i
			at := now.Add(-span + time.Duration(float64(span)*float64(k)/float64(n)))
			ten := tenant
			if k%n >= 0 && (k*tenantJobs/n) == ((k+1)*tenantJobs/n) {
				ten = others[k%tenants]
			}
			rows[i] = jrow{v7(at), ten, at}
		}
		if _, err := pool.CopyFrom(ctx, pgx.Identifier{"jobs"}, []string{"id", "tenant_id", "endpoint", "model", "body", "body_hash", "priority", "status",
			"attempts", "deployment", "prompt_tokens", "completion_tokens", "result_status", "result_body", "created_at", "started_at", "finished_at", "published_at"},
			pgx.CopyFromSlice(m, func(i int) ([]any, error) {
				r := rows[i]
				return []any{r.id, r.tenant, "/v1/chat/completions", "gpt-4o", body, hash, "low", "succeeded", 1, "d", 17, 8, 200, result,
					r.at, r.at, r.at.Add(time.Second), r.at}, nil
			})); err != nil {
			return fmt.Errorf("jobs: %w", err)
		}
		if _, err := pool.CopyFrom(ctx, pgx.Identifier{"usage_events"}, []string{"created_at", "request_id", "tenant_id", "deployment", "model", "operation",
			"status", "prompt_tokens", "completion_tokens", "latency_us", "priority"},
			pgx.CopyFromSlice(m, func(i int) ([]any, error) {
				r := rows[i]
				return []any{r.at, "job_" + r.id.String(), r.tenant, "d", "gpt-4o", "chat/completions", 200, 17, 8, 900_000, "low"}, nil
			})); err != nil {
			return fmt.Errorf("usage events: %w", err)
		}
		var evs [][]any
		var dels [][]any
		for i := 0; i < m; i += 10 {
			r := rows[i]
			ev := v7(r.at)
			evs = append(evs, []any{ev, r.tenant, "job.completed", []byte(`{"id":"job_x","status":"succeeded"}`), r.at})
			dels = append(dels, []any{v7(r.at), ev, r.tenant, "https://hooks.example.com/levee", "delivered", 1, r.at, r.at})
		}
		if _, err := pool.CopyFrom(ctx, pgx.Identifier{"webhook_events"}, []string{"id", "tenant_id", "type", "data", "created_at"}, pgx.CopyFromRows(evs)); err != nil {
			return fmt.Errorf("webhook events: %w", err)
		}
		if _, err := pool.CopyFrom(ctx, pgx.Identifier{"webhook_deliveries"}, []string{"id", "event_id", "tenant_id", "url", "status", "attempts", "created_at", "delivered_at"},
			pgx.CopyFromRows(dels)); err != nil {
			return fmt.Errorf("webhook deliveries: %w", err)
		}
		var files, lines [][]any
		for i := 0; i < m; i += 10_000 {
			r := rows[i]
			id := v7(r.at)
			files = append(files, []any{id, r.tenant, "in.jsonl", "batch", "upload", 100 * 200, 100, r.at, r.at.Add(30 * 24 * time.Hour)})
			for l := 1; l <= 100; l++ {
				lines = append(lines, []any{id, l, fmt.Sprintf("req-%d", l), body})
			}
		}
		if _, err := pool.CopyFrom(ctx, pgx.Identifier{"files"}, []string{"id", "tenant_id", "filename", "purpose", "kind", "bytes", "lines", "created_at", "expires_at"},
			pgx.CopyFromRows(files)); err != nil {
			return fmt.Errorf("files: %w", err)
		}
		if _, err := pool.CopyFrom(ctx, pgx.Identifier{"file_lines"}, []string{"file_id", "line", "custom_id", "raw"}, pgx.CopyFromRows(lines)); err != nil {
			return fmt.Errorf("file lines: %w", err)
		}
		fmt.Printf("  filled %d of %d jobs (%.0f rows/s)\n", done+m, n, float64(m)/time.Since(t0).Seconds())
	}
	// The daily rollup, as the ledger would have kept it.
	if _, err := pool.Exec(ctx, `INSERT INTO usage_daily (tenant_id, day, model, key_id, deployment, requests, prompt_tokens, completion_tokens)
		SELECT tenant_id, (created_at AT TIME ZONE 'UTC')::date, model, '00000000-0000-0000-0000-000000000000', deployment, count(*), sum(prompt_tokens), sum(completion_tokens)
		FROM usage_events WHERE request_id LIKE 'job_%' GROUP BY 1, 2, 3, 5
		ON CONFLICT (tenant_id, day, model, key_id, deployment) DO UPDATE SET requests = usage_daily.requests + excluded.requests`); err != nil {
		return fmt.Errorf("usage rollup: %w", err)
	}
	// Rows of past months landed in the default partition; settle them as
	// the maintenance would.
	if err := st.MaintainPartitions(ctx, now); err != nil {
		return err
	}
	_, err := pool.Exec(ctx, `VACUUM ANALYZE`)
	return err
}

// explain prints the plan shape of each hot statement on the full database.
func explain(ctx context.Context, st *store.Store, tenant uuid.UUID) error {
	var someID uuid.UUID
	if err := st.Pool().QueryRow(ctx, `SELECT id FROM jobs WHERE tenant_id = $1 ORDER BY id DESC LIMIT 1`, tenant).Scan(&someID); err != nil {
		return err
	}
	qs := []struct{ name, sql string }{
		{"claim (StartJob)", `EXPLAIN UPDATE jobs SET status = 'running' WHERE id = '` + someID.String() +
			`' AND (CASE WHEN status = 'queued' THEN true WHEN status = 'running' THEN lease_until < now() ELSE false END)`},
		{"list a tenant's jobs", `EXPLAIN SELECT id FROM jobs WHERE tenant_id = '` + tenant.String() + `' AND batch_id IS NULL AND id < 'ffffffff-ffff-ffff-ffff-ffffffffffff' ORDER BY id DESC LIMIT 21`},
		{"unpublished (outbox)", `EXPLAIN SELECT id FROM jobs WHERE status = 'queued' AND published_at IS NULL AND publish_claim < now() LIMIT 100`},
		{"queue depth (metrics)", `EXPLAIN SELECT priority, model, tenant_id, count(*) FROM jobs WHERE status IN ('queued', 'running') GROUP BY 1, 2, 3`},
		{"usage (30 days)", `EXPLAIN SELECT day, model, sum(requests) FROM usage_daily WHERE tenant_id = '` + tenant.String() + `' AND day BETWEEN current_date - 29 AND current_date GROUP BY 1, 2`},
		{"retention: jobs", `EXPLAIN DELETE FROM jobs WHERE id IN (SELECT id FROM jobs WHERE batch_id IS NULL AND status IN ('succeeded', 'failed', 'cancelled')
			AND finished_at < now() - interval '30 days' ORDER BY finished_at LIMIT 1000 FOR UPDATE SKIP LOCKED)`},
	}
	fmt.Println("  plans on the full database:")
	for _, q := range qs {
		rows, err := st.Pool().Query(ctx, q.sql)
		if err != nil {
			return fmt.Errorf("explain %s: %w", q.name, err)
		}
		lines, err := pgx.CollectRows(rows, pgx.RowTo[string])
		if err != nil {
			return err
		}
		var nodes []string
		for _, l := range lines {
			if i := strings.Index(l, "->"); i >= 0 {
				l = l[i+2:]
			}
			l = strings.TrimSpace(l)
			if j := strings.Index(l, "  (cost"); j > 0 {
				nodes = append(nodes, l[:j])
			}
		}
		fmt.Printf("    %-22s %s\n", q.name, strings.Join(nodes, " → "))
	}
	return nil
}

// retention times one sweep of everything past 30 days (about half the
// fill) while a prober starts queued jobs, as workers do, and reports the
// slowest start.
func retention(ctx context.Context, st *store.Store, b *bench) error {
	pool := st.Pool()
	var tenant uuid.UUID
	if err := pool.QueryRow(ctx, `SELECT tenant_id FROM api_keys LIMIT 1`).Scan(&tenant); err != nil {
		return err
	}
	// Queued jobs for the prober, kept from the workers by a future lease.
	const probes = 20000
	if _, err := pool.Exec(ctx, `INSERT INTO jobs (id, tenant_id, endpoint, model, body, body_hash, priority, status, lease_until, published_at)
		SELECT gen_random_uuid(), $1, '/v1/chat/completions', 'gpt-4o', '{}', '\x00', 'low', 'queued', NULL, now() FROM generate_series(1, $2)`, tenant, probes); err != nil {
		return err
	}
	rows, err := pool.Query(ctx, `SELECT id FROM jobs WHERE status = 'queued' AND tenant_id = $1`, tenant)
	if err != nil {
		return err
	}
	ids, err := pgx.CollectRows(rows, pgx.RowTo[uuid.UUID])
	if err != nil {
		return err
	}
	var (
		stop     atomic.Bool
		mu       sync.Mutex
		lat      []time.Duration
		probeErr error
		wg       sync.WaitGroup
	)
	probe := func(from int) {
		defer wg.Done()
		for i := from; i < len(ids) && !stop.Load(); i += 2 {
			t := time.Now()
			_, err := st.StartJob(ctx, ids[i], time.Hour)
			d := time.Since(t)
			mu.Lock()
			if err != nil && !errors.Is(err, store.ErrJobLeased) && !errors.Is(err, store.ErrJobTerminal) && probeErr == nil {
				probeErr = err
			}
			lat = append(lat, d)
			mu.Unlock()
			time.Sleep(2 * time.Millisecond)
		}
	}
	wg.Add(2)
	go probe(0)
	go probe(1)
	start := time.Now()
	swept, err := st.Sweep(ctx, time.Now(), store.Retention{Jobs: 30 * 24 * time.Hour, Batches: 30 * 24 * time.Hour, Webhooks: 30 * 24 * time.Hour,
		FailedWebhooks: 90 * 24 * time.Hour, UsageMonths: 13, Batch: 1000})
	took := time.Since(start)
	stop.Store(true)
	wg.Wait()
	if err != nil {
		return fmt.Errorf("retention pass: %w", err)
	}
	if probeErr != nil {
		return fmt.Errorf("claims during the retention pass: %w", probeErr)
	}
	var removed int64
	for _, v := range swept {
		removed += v
	}
	fmt.Printf("  retention pass: %v, %d rows (%.0f rows/s): %v\n", took.Round(time.Millisecond), removed, float64(removed)/took.Seconds(), swept)
	fmt.Printf("  claims during it: %d, p50 %v, p99 %v, slowest %v (goal: never over 50ms)\n", len(lat),
		pct(lat, 50).Round(time.Microsecond), pct(lat, 99).Round(time.Microsecond), pct(lat, 100).Round(time.Microsecond))
	if len(lat) < 100 {
		return fmt.Errorf("only %d claims measured during the retention pass", len(lat))
	}
	return nil
}
