package store_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/levee-gw/levee/store"
)

const day = 24 * time.Hour

// fixture writes rows as they would be after weeks of use, with times
// relative to a fake now.
type fixture struct {
	t    *testing.T
	pool *pgxpool.Pool
	now  time.Time
}

func (f *fixture) exec(sql string, args ...any) {
	f.t.Helper()
	if _, err := f.pool.Exec(context.Background(), sql, args...); err != nil {
		f.t.Fatalf("%s: %v", sql, err)
	}
}

func (f *fixture) count(sql string, args ...any) int {
	f.t.Helper()
	var n int
	if err := f.pool.QueryRow(context.Background(), sql, args...).Scan(&n); err != nil {
		f.t.Fatalf("%s: %v", sql, err)
	}
	return n
}

func (f *fixture) tenant(st *store.Store, name string) uuid.UUID {
	t, err := st.CreateTenant(context.Background(), &store.CreateTenantParams{Name: name, Actor: "test"})
	if err != nil {
		f.t.Fatal(err)
	}
	return t.ID
}

// job inserts a job that finished (or not, finished nil) ago before now.
func (f *fixture) job(tenant uuid.UUID, status string, finished *time.Duration, batch *uuid.UUID) uuid.UUID {
	id, _ := uuid.NewV7()
	var at *time.Time
	if finished != nil {
		x := f.now.Add(-*finished)
		at = &x
	}
	f.exec(`INSERT INTO jobs (id, tenant_id, endpoint, model, body, body_hash, priority, status, finished_at, batch_id, created_at)
		VALUES ($1, $2, '/v1/chat/completions', 'gpt-4o', '{}', '\x00', 'low', $3, $4, $5, $6)`, id, tenant, status, at, batch, f.now.Add(-400*day))
	return id
}

func ago(d time.Duration) *time.Duration { return &d }

func TestRetentionSweepsEachKind(t *testing.T) {
	_, st, _ := migrated(t)
	f := &fixture{t: t, pool: st.Pool(), now: time.Now().Add(40 * day)}
	ten := f.tenant(st, "acme")
	r := store.Retention{Jobs: 30 * day, Batches: 30 * day, Webhooks: 30 * day, FailedWebhooks: 90 * day, UsageMonths: 13, Batch: 2}

	// Jobs: only finished standalone jobs past 30 days go.
	oldJob := f.job(ten, "succeeded", ago(40*day), nil)
	oldFailed := f.job(ten, "failed", ago(31*day), nil)
	recent := f.job(ten, "succeeded", ago(10*day), nil)
	running := f.job(ten, "running", nil, nil)
	queued := f.job(ten, "queued", nil, nil)

	// Batches: one ended 40 days ago (5 jobs, output and error files), one
	// ended 10 days ago, one still in progress with an old job.
	batch := func(status string, ended time.Duration, jobs int) uuid.UUID {
		id, _ := uuid.NewV7()
		in, _ := uuid.NewV7()
		f.exec(`INSERT INTO batches (id, tenant_id, input_file_id, endpoint, completion_window, status, expires_at, completed_at)
			VALUES ($1, $2, $3, '/v1/chat/completions', '24h', $4, $5, $6)`, id, ten, in, status, f.now, f.now.Add(-ended))
		for i := 0; i < jobs; i++ {
			f.job(ten, "succeeded", ago(ended+day), &id)
		}
		for _, kind := range []string{"batch_output", "batch_error"} {
			fid, _ := uuid.NewV7()
			f.exec(`INSERT INTO files (id, tenant_id, filename, purpose, kind, batch_id) VALUES ($1, $2, 'x', 'batch_output', $3, $4)`, fid, ten, kind, id)
		}
		return id
	}
	oldBatch := batch("completed", 40*day, 5)
	newBatch := batch("completed", 10*day, 2)
	openBatch := batch("in_progress", 40*day, 1)

	// Files: an upload past its expires_at (its 25 lines), one not yet, one
	// that never expires.
	file := func(expires *time.Time, lines int) uuid.UUID {
		id, _ := uuid.NewV7()
		f.exec(`INSERT INTO files (id, tenant_id, filename, purpose, kind, expires_at) VALUES ($1, $2, 'in.jsonl', 'batch', 'upload', $3)`, id, ten, expires)
		for i := 0; i < lines; i++ {
			f.exec(`INSERT INTO file_lines (file_id, line, custom_id, raw) VALUES ($1, $2, $3, '{}')`, id, i, fmt.Sprint("c", i))
		}
		return id
	}
	past, future := f.now.Add(-time.Minute), f.now.Add(time.Hour)
	expired, notYet, never := file(&past, 25), file(&future, 3), file(nil, 3)

	// Webhooks: delivered 40 days ago goes; failed 40 days ago stays (90);
	// failed 100 days ago goes; an event goes with its last delivery.
	delivery := func(status string, age time.Duration) uuid.UUID {
		ev, _ := uuid.NewV7()
		id, _ := uuid.NewV7()
		f.exec(`INSERT INTO webhook_events (id, tenant_id, type, data, created_at) VALUES ($1, $2, 'job.completed', '{}', $3)`, ev, ten, f.now.Add(-age))
		f.exec(`INSERT INTO webhook_deliveries (id, event_id, tenant_id, url, status, created_at) VALUES ($1, $2, $3, 'https://example.com', $4, $5)`,
			id, ev, ten, status, f.now.Add(-age))
		return ev
	}
	evDelivered := delivery("delivered", 40*day)
	evFailedKept := delivery("failed", 40*day)
	evFailedOld := delivery("failed", 100*day)
	evPending := delivery("pending", 100*day)

	// Usage: a month 15 months back, settled into its own partition, goes;
	// the daily rollup stays.
	old := time.Date(f.now.Year(), f.now.Month(), 1, 0, 0, 0, 0, time.UTC).AddDate(0, -15, 3)
	f.exec(`INSERT INTO usage_events (created_at, request_id, tenant_id, deployment, model, operation, status, prompt_tokens, completion_tokens, latency_us, priority)
		VALUES ($1, 'req_old', $2, 'd', 'gpt-4o', 'chat', 200, 1, 1, 1, 'high')`, old, ten)
	f.exec(`INSERT INTO usage_daily (tenant_id, day, model, requests) VALUES ($1, $2, 'gpt-4o', 1)`, ten, old)
	if err := st.MaintainPartitions(context.Background(), f.now); err != nil {
		t.Fatal(err)
	}
	oldPart := fmt.Sprintf("usage_events_%04d%02d", old.Year(), old.Month())
	if f.count(`SELECT count(*) FROM pg_class WHERE relname = $1`, oldPart) != 1 {
		t.Fatalf("the fixture's month has no partition %s", oldPart)
	}

	swept, err := st.Sweep(context.Background(), f.now, r)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("swept: %v", swept)
	gone := func(what, table string, id uuid.UUID) {
		t.Helper()
		if f.count(`SELECT count(*) FROM `+table+` WHERE id = $1`, id) != 0 {
			t.Errorf("%s should be gone", what)
		}
	}
	kept := func(what, table string, id uuid.UUID) {
		t.Helper()
		if f.count(`SELECT count(*) FROM `+table+` WHERE id = $1`, id) != 1 {
			t.Errorf("%s should be kept", what)
		}
	}
	gone("a job finished 40 days ago", "jobs", oldJob)
	gone("a job failed 31 days ago", "jobs", oldFailed)
	kept("a job finished 10 days ago", "jobs", recent)
	kept("a running job", "jobs", running)
	kept("a queued job", "jobs", queued)
	gone("a batch ended 40 days ago", "batches", oldBatch)
	if n := f.count(`SELECT count(*) FROM jobs WHERE batch_id = $1`, oldBatch); n != 0 {
		t.Errorf("%d jobs of the swept batch are left", n)
	}
	if n := f.count(`SELECT count(*) FROM files WHERE batch_id = $1`, oldBatch); n != 0 {
		t.Errorf("%d files of the swept batch are left", n)
	}
	kept("a batch ended 10 days ago", "batches", newBatch)
	if n := f.count(`SELECT count(*) FROM jobs WHERE batch_id = $1`, newBatch); n != 2 {
		t.Errorf("the kept batch has %d of its 2 jobs", n)
	}
	kept("a batch in progress", "batches", openBatch)
	if n := f.count(`SELECT count(*) FROM jobs WHERE batch_id = $1`, openBatch); n != 1 {
		t.Error("a batch in progress lost its job")
	}
	gone("an expired upload", "files", expired)
	if n := f.count(`SELECT count(*) FROM file_lines WHERE file_id = $1`, expired); n != 0 {
		t.Errorf("%d lines of the expired upload are left", n)
	}
	kept("an upload not yet expired", "files", notYet)
	kept("an upload without expiry", "files", never)
	gone("an event delivered 40 days ago", "webhook_events", evDelivered)
	kept("an event whose delivery failed 40 days ago", "webhook_events", evFailedKept)
	gone("an event whose delivery failed 100 days ago", "webhook_events", evFailedOld)
	kept("an event still being delivered", "webhook_events", evPending)
	if f.count(`SELECT count(*) FROM pg_class WHERE relname = $1`, oldPart) != 0 {
		t.Errorf("partition %s should be dropped", oldPart)
	}
	if f.count(`SELECT count(*) FROM usage_daily WHERE tenant_id = $1`, ten) != 1 {
		t.Error("the daily usage rollup must be kept")
	}
	want := map[string]int64{"jobs": 2, "batches": 1, "batch_jobs": 5, "files": 3, "file_lines": 25, "webhook_deliveries": 2, "webhook_events": 2, "usage_partitions": 1}
	for k, v := range want {
		if swept[k] != v {
			t.Errorf("swept[%s] = %d, want %d", k, swept[k], v)
		}
	}
	// A second pass finds nothing more.
	again, err := st.Sweep(context.Background(), f.now, r)
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range again {
		if v != 0 {
			t.Errorf("a second pass swept %d %s", v, k)
		}
	}
	// Retention ≤ 0 keeps a kind forever.
	f.job(ten, "succeeded", ago(400*day), nil)
	if s, _ := st.Sweep(context.Background(), f.now, store.Retention{Batch: 10}); s["jobs"] != 0 {
		t.Errorf("with no job retention, %d jobs went", s["jobs"])
	}
}

// Several processes sweep at once: each row goes once, nobody fails or
// waits on another's rows.
func TestTwoSweepersAtOnce(t *testing.T) {
	_, st, _ := migrated(t)
	f := &fixture{t: t, pool: st.Pool(), now: time.Now()}
	ten := f.tenant(st, "acme")
	f.exec(`INSERT INTO jobs (id, tenant_id, endpoint, model, body, body_hash, priority, status, finished_at)
		SELECT gen_random_uuid(), $1, '/v1/chat/completions', 'gpt-4o', '{}', '\x00', 'low', 'succeeded', $2 FROM generate_series(1, 3000)`,
		ten, f.now.Add(-40*day))
	var wg sync.WaitGroup
	var mu sync.Mutex
	total := int64(0)
	for i := 0; i < 2; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s, err := st.Sweep(context.Background(), f.now, store.Retention{Jobs: 30 * day, Batch: 100})
			if err != nil {
				t.Errorf("sweeping alongside another: %v", err)
			}
			mu.Lock()
			total += s["jobs"]
			mu.Unlock()
		}()
	}
	wg.Wait()
	if total != 3000 || f.count(`SELECT count(*) FROM jobs`) != 0 {
		t.Fatalf("two sweepers removed %d of 3000 jobs; %d left", total, f.count(`SELECT count(*) FROM jobs`))
	}
}

// A purge takes all of one tenant's data, in chunks, and nothing of
// another's; it reports what went.
func TestPurgeTenant(t *testing.T) {
	_, st, _ := migrated(t)
	f := &fixture{t: t, pool: st.Pool(), now: time.Now()}
	ctx := context.Background()
	fill := func(name string) uuid.UUID {
		ten := f.tenant(st, name)
		for i := 0; i < 7; i++ {
			f.job(ten, "succeeded", ago(time.Hour), nil)
		}
		f.job(ten, "queued", nil, nil)
		if _, _, err := st.CreateKey(ctx, &store.CreateKeyParams{TenantID: ten, TenantName: name, Name: name + "-key", Actor: "test"}); err != nil {
			t.Fatal(err)
		}
		fid, _ := uuid.NewV7()
		f.exec(`INSERT INTO files (id, tenant_id, filename, purpose, kind) VALUES ($1, $2, 'in.jsonl', 'batch', 'upload')`, fid, ten)
		f.exec(`INSERT INTO file_lines (file_id, line, custom_id, raw) SELECT $1, g, 'c' || g, '{}' FROM generate_series(1, 30) g`, fid)
		ev, _ := uuid.NewV7()
		f.exec(`INSERT INTO webhook_events (id, tenant_id, type, data) VALUES ($1, $2, 'job.completed', '{}')`, ev, ten)
		f.exec(`INSERT INTO webhook_deliveries (id, event_id, tenant_id, url) VALUES (gen_random_uuid(), $1, $2, 'https://example.com')`, ev, ten)
		f.exec(`INSERT INTO usage_events (created_at, request_id, tenant_id, deployment, model, operation, status, prompt_tokens, completion_tokens, latency_us, priority)
			SELECT now(), 'r' || g, $1, 'd', 'gpt-4o', 'chat', 200, 1, 1, 1, 'high' FROM generate_series(1, 12) g`, ten)
		f.exec(`INSERT INTO usage_daily (tenant_id, day, model, requests) VALUES ($1, current_date, 'gpt-4o', 12)`, ten)
		return ten
	}
	a, b := fill("a"), fill("b")
	purged, err := st.PurgeTenant(ctx, a, 5, "test")
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("purged: %v", purged)
	want := map[string]int64{"jobs": 8, "files": 1, "file_lines": 30, "webhook_deliveries": 1, "webhook_events": 1, "usage_events": 12, "usage_daily": 1,
		"api_keys": 1, "tenants": 1}
	for k, v := range want {
		if purged[k] != v {
			t.Errorf("purged[%s] = %d, want %d", k, purged[k], v)
		}
	}
	for _, table := range []string{"jobs", "files", "webhook_deliveries", "webhook_events", "usage_events", "usage_daily", "api_keys"} {
		if n := f.count(`SELECT count(*) FROM `+table+` WHERE tenant_id = $1`, a); n != 0 {
			t.Errorf("%d rows of the purged tenant left in %s", n, table)
		}
		if n := f.count(`SELECT count(*) FROM `+table+` WHERE tenant_id = $1`, b); n == 0 {
			t.Errorf("the other tenant lost its %s", table)
		}
	}
	if n := f.count(`SELECT count(*) FROM tenants WHERE id = $1`, a); n != 0 {
		t.Error("the tenant row is left")
	}
	if n := f.count(`SELECT count(*) FROM audit_log WHERE action = 'tenant.purge' AND target_id = $1`, a.String()); n != 1 {
		t.Error("the purge is not in the audit log")
	}
	if _, err := st.PurgeTenant(ctx, a, 5, "test"); err != store.ErrNotFound {
		t.Fatalf("purging a purged tenant: %v", err)
	}
}

// Rows another sweeper holds are skipped, not waited for (without SKIP
// LOCKED this test would hang), and the rest are all taken.
func TestSweepGoesOnPastRowsAnotherHolds(t *testing.T) {
	_, st, _ := migrated(t)
	ctx := context.Background()
	f := &fixture{t: t, pool: st.Pool(), now: time.Now()}
	ten := f.tenant(st, "acme")
	f.exec(`INSERT INTO jobs (id, tenant_id, endpoint, model, body, body_hash, priority, status, finished_at)
		SELECT gen_random_uuid(), $1, '/v1/chat/completions', 'gpt-4o', '{}', '\x00', 'low', 'succeeded', $2::timestamptz - g * interval '1 second'
		FROM generate_series(1, 1000) g`, ten, f.now.Add(-40*day))
	tx, err := st.Pool().Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback(ctx)
	// The 5 oldest, which the first chunk would take, are held.
	if _, err := tx.Exec(ctx, `SELECT id FROM jobs ORDER BY finished_at LIMIT 5 FOR UPDATE`); err != nil {
		t.Fatal(err)
	}
	swept, err := st.Sweep(ctx, f.now, store.Retention{Jobs: 30 * day, Batch: 100})
	if err != nil {
		t.Fatal(err)
	}
	if swept["jobs"] != 995 {
		t.Fatalf("swept %d of the 995 jobs nobody held", swept["jobs"])
	}
}

// A purge does not wait for the tenant's synchronous calls: keys are
// revoked, but a stream in flight ends later, and its usage row and stored
// response are written after the purge (by this or another process's
// ledger). They must not bring the purged tenant's data back.
func TestPurgeLeavesNothingForCallsInFlight(t *testing.T) {
	_, st, _ := migrated(t)
	f := &fixture{t: t, pool: st.Pool(), now: time.Now()}
	ctx := context.Background()
	a, b := f.tenant(st, "a"), f.tenant(st, "b")
	ledger := st.NewLedger(store.LedgerConfig{FlushInterval: 10 * time.Millisecond, BatchSize: 100, BufferSize: 100, MaxPending: 1000}, slog.Default())
	defer ledger.Close(ctx)
	if _, err := st.PurgeTenant(ctx, a, 5, "test"); err != nil {
		t.Fatal(err)
	}
	// The calls that were in flight end now.
	for i, ten := range []uuid.UUID{a, b, a} {
		ledger.Record(store.UsageEvent{At: time.Now(), RequestID: fmt.Sprintf("late-%d", i), TenantID: ten, Deployment: "d", Model: "gpt-4o",
			Operation: "chat", Status: 200, PromptTokens: 10, CompletionTokens: 5, Priority: "high"})
	}
	if err := ledger.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	for _, ten := range []uuid.UUID{a, b} {
		if err := st.RecordResponse(ctx, &store.ResponseRoute{ID: "resp_" + ten.String(), TenantID: ten, Deployment: "d"}, time.Hour); err != nil {
			t.Fatal(err)
		}
	}
	for _, table := range []string{"usage_events", "usage_daily", "response_routes"} {
		if n := f.count(`SELECT count(*) FROM `+table+` WHERE tenant_id = $1`, a); n != 0 {
			t.Errorf("%d rows of the purged tenant written to %s after its purge", n, table)
		}
		if n := f.count(`SELECT count(*) FROM `+table+` WHERE tenant_id = $1`, b); n == 0 {
			t.Errorf("the other tenant's %s row was not written", table)
		}
	}
}

// A batch turns its input file's lines into jobs when it is validated,
// which may be after the file's expires_at (a batch created just before,
// or validated again after a restart). The sweeper must not take the lines
// from under it: the batch would run part of the file, or fail it as empty.
func TestSweepKeepsTheInputOfAValidatingBatch(t *testing.T) {
	_, st, _ := migrated(t)
	f := &fixture{t: t, pool: st.Pool(), now: time.Now()}
	ctx := context.Background()
	ten := f.tenant(st, "acme")
	in, _ := uuid.NewV7()
	f.exec(`INSERT INTO files (id, tenant_id, filename, purpose, kind, expires_at) VALUES ($1, $2, 'in.jsonl', 'batch', 'upload', $3)`, in, ten, f.now.Add(-time.Minute))
	f.exec(`INSERT INTO file_lines (file_id, line, custom_id, raw) SELECT $1, g, 'c' || g, '{}' FROM generate_series(1, 25) g`, in)
	bid, _ := uuid.NewV7()
	f.exec(`INSERT INTO batches (id, tenant_id, input_file_id, endpoint, completion_window, status, expires_at)
		VALUES ($1, $2, $3, '/v1/chat/completions', '24h', 'validating', $4)`, bid, ten, in, f.now.Add(day))
	r := store.Retention{Batch: 2}
	if _, err := st.Sweep(ctx, f.now, r); err != nil {
		t.Fatal(err)
	}
	if n := f.count(`SELECT count(*) FROM file_lines WHERE file_id = $1`, in); n != 25 {
		t.Fatalf("the sweeper left %d of the 25 lines of a validating batch's input file", n)
	}
	// Once its lines are jobs, the file goes.
	f.exec(`UPDATE batches SET status = 'in_progress' WHERE id = $1`, bid)
	if _, err := st.Sweep(ctx, f.now, r); err != nil {
		t.Fatal(err)
	}
	if n := f.count(`SELECT count(*) FROM files WHERE id = $1`, in); n != 0 {
		t.Fatal("the expired file stayed once its batch had started")
	}

	// A file past its expires_at, not swept yet, takes no new batch.
	late, _ := uuid.NewV7()
	f.exec(`INSERT INTO files (id, tenant_id, filename, purpose, kind, expires_at) VALUES ($1, $2, 'in.jsonl', 'batch', 'upload', now() - interval '1 second')`, late, ten)
	f.exec(`INSERT INTO file_lines (file_id, line, custom_id, raw) VALUES ($1, 1, 'c1', '{}')`, late)
	_, err := st.CreateBatch(ctx, &store.CreateBatchParams{TenantID: ten, InputFileID: late, Endpoint: "/v1/chat/completions", Window: day})
	if !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("a batch on an expired file: %v, want ErrNotFound", err)
	}
	live, _ := uuid.NewV7()
	f.exec(`INSERT INTO files (id, tenant_id, filename, purpose, kind, expires_at) VALUES ($1, $2, 'in.jsonl', 'batch', 'upload', now() + interval '1 hour')`, live, ten)
	if _, err := st.CreateBatch(ctx, &store.CreateBatchParams{TenantID: ten, InputFileID: live, Endpoint: "/v1/chat/completions", Window: day}); err != nil {
		t.Fatalf("a batch on a file not expired: %v", err)
	}
}

// Dropping an old usage partition detaches it, which takes the strongest
// lock on usage_events. Behind a long reader of the table (pg_dump, an
// analyst's query) that lock waits, and every insert of usage (each job's
// end, each ledger write) would queue behind it until the reader ends. The
// sweeper gives up quickly instead and tries again at a later pass.
func TestPartitionDropDoesNotStallUsageWrites(t *testing.T) {
	_, st, _ := migrated(t)
	f := &fixture{t: t, pool: st.Pool(), now: time.Now()}
	ctx := context.Background()
	ten := f.tenant(st, "acme")
	old := time.Date(f.now.Year(), f.now.Month(), 1, 0, 0, 0, 0, time.UTC).AddDate(0, -15, 3)
	insert := func(ctx context.Context, at time.Time) error {
		_, err := st.Pool().Exec(ctx, `INSERT INTO usage_events (created_at, request_id, tenant_id, deployment, model, operation, status, prompt_tokens, completion_tokens, latency_us, priority)
			VALUES ($1, gen_random_uuid()::text, $2, 'd', 'gpt-4o', 'chat', 200, 1, 1, 1, 'high')`, at, ten)
		return err
	}
	if err := insert(ctx, old); err != nil {
		t.Fatal(err)
	}
	if err := st.MaintainPartitions(ctx, f.now); err != nil {
		t.Fatal(err)
	}
	// A long reader of usage_events.
	reader, err := st.Pool().Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer reader.Rollback(ctx)
	if _, err := reader.Exec(ctx, `SELECT count(*) FROM usage_events`); err != nil {
		t.Fatal(err)
	}
	swept := make(chan error, 1)
	go func() {
		_, err := st.Sweep(ctx, f.now, store.Retention{UsageMonths: 13, Batch: 100})
		swept <- err
	}()
	time.Sleep(300 * time.Millisecond) // the sweep is waiting for its lock
	wctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if err := insert(wctx, f.now); err != nil {
		t.Fatalf("a usage write while a partition drop waits behind a reader: %v", err)
	}
	select {
	case err := <-swept:
		if err != nil {
			t.Fatalf("a sweep that could not drop a partition yet: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the sweep still waits behind the reader")
	}
	_ = reader.Rollback(ctx)
	// Once the reader is gone, the next pass drops it.
	s, err := st.Sweep(ctx, f.now, store.Retention{UsageMonths: 13, Batch: 100})
	if err != nil || s["usage_partitions"] != 1 {
		t.Fatalf("the next pass: %v, %v", s, err)
	}
}

// A first pass over a database that kept everything until retention was
// turned on meets thousands of ended batches and expired uploads at once.
// Each lookup of the next one passed the ids of every one removed so far,
// which made the pass quadratic: 8,000 batches took 4 minutes, against 7 s
// now. The bound here is loose (4,000 batches and 2,000 files under the
// race detector on two loaded cores: 335 s before, 12 s after).
func TestSweepOfManyBatchesAndFilesIsLinear(t *testing.T) {
	_, st, _ := migrated(t)
	f := &fixture{t: t, pool: st.Pool(), now: time.Now()}
	ten := f.tenant(st, "acme")
	f.exec(`INSERT INTO batches (id, tenant_id, input_file_id, endpoint, completion_window, status, expires_at, completed_at)
		SELECT gen_random_uuid(), $1, gen_random_uuid(), '/v1/chat/completions', '24h', 'completed', now(), now() - interval '40 days' - g * interval '1 second'
		FROM generate_series(1, 4000) g`, ten)
	f.exec(`INSERT INTO files (id, tenant_id, filename, purpose, kind, expires_at)
		SELECT gen_random_uuid(), $1, 'in.jsonl', 'batch', 'upload', now() - g * interval '1 second' FROM generate_series(1, 2000) g`, ten)
	start := time.Now()
	s, err := st.Sweep(context.Background(), f.now, store.Retention{Batches: 30 * day, Batch: 1000})
	took := time.Since(start)
	if err != nil || s["batches"] != 4000 || s["files"] != 2000 {
		t.Fatalf("swept %v, %v", s, err)
	}
	t.Logf("4,000 batches and 2,000 files in %v", took)
	if took > 25*time.Second {
		t.Errorf("the pass took %v", took)
	}
}
