package store_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"maps"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/levee-gw/levee/store"
)

func utc(year int, month time.Month, day, hour, min int) time.Time {
	return time.Date(year, month, day, hour, min, 0, 0, time.UTC)
}

func maintain(t *testing.T, st *store.Store, clock time.Time) {
	t.Helper()
	if err := st.MaintainPartitions(context.Background(), clock); err != nil {
		t.Fatalf("maintaining partitions at %s: %v", clock.Format(time.DateOnly), err)
	}
}

// insertRows writes n ledger rows a second apart from at, with plain INSERTs
// (FinishJob's path).
func insertRows(ctx context.Context, st *store.Store, at time.Time, n int) error {
	_, err := st.Pool().Exec(ctx, `
		INSERT INTO usage_events (created_at, request_id, tenant_id, deployment, model, operation,
			status, prompt_tokens, completion_tokens, latency_us, priority)
		SELECT $1::timestamptz + i * interval '1 second', 'req_' || gen_random_uuid(), gen_random_uuid(),
			'd', 'm', 'chat/completions', 200, 3, 4, 1000, 'high'
		FROM generate_series(0, $2 - 1) i`, at, n)
	return err
}

func mustInsert(t *testing.T, st *store.Store, at time.Time, n int) {
	t.Helper()
	if err := insertRows(context.Background(), st, at, n); err != nil {
		t.Fatal(err)
	}
}

// record writes n rows a minute apart from at through the ledger (COPY) and
// waits until they are written.
func record(t *testing.T, l *store.Ledger, tenant uuid.UUID, at time.Time, n int) {
	t.Helper()
	for i := 0; i < n; i++ {
		l.Record(store.UsageEvent{At: at.Add(time.Duration(i) * time.Minute), RequestID: uuid.NewString(), TenantID: tenant,
			Deployment: "d", Model: "m", Operation: "chat/completions", Status: 200, PromptTokens: 3, CompletionTokens: 4, Priority: "high"})
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := l.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	if l.Dropped() != 0 {
		t.Fatalf("the ledger dropped %d rows", l.Dropped())
	}
}

func countBy(t *testing.T, st *store.Store, query string) map[string]int64 {
	t.Helper()
	rows, err := st.Pool().Query(context.Background(), query)
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]int64{}
	var k string
	var n int64
	_, err = pgx.ForEachRow(rows, []any{&k, &n}, func() error { got[k] = n; return nil })
	if err != nil {
		t.Fatal(err)
	}
	return got
}

// rowsByMonth counts the ledger's rows per UTC month, "YYYYMM".
func rowsByMonth(t *testing.T, st *store.Store) map[string]int64 {
	t.Helper()
	return countBy(t, st, `SELECT to_char(created_at AT TIME ZONE 'UTC', 'YYYYMM'), count(*) FROM usage_events GROUP BY 1`)
}

// rowsByPartition counts the ledger's rows per partition that holds them.
func rowsByPartition(t *testing.T, st *store.Store) map[string]int64 {
	t.Helper()
	return countBy(t, st, `SELECT tableoid::regclass::text, count(*) FROM usage_events GROUP BY 1`)
}

// assertSettled checks that the ledger holds exactly want rows per month,
// each month's rows in its own partition, none twice, and the default
// partition none.
func assertSettled(t *testing.T, st *store.Store, want map[string]int64) {
	t.Helper()
	if got := rowsByMonth(t, st); !maps.Equal(got, want) {
		t.Fatalf("rows per month: %v, want %v", got, want)
	}
	byPart := rowsByPartition(t, st)
	for m, n := range want {
		if got := byPart["usage_events_"+m]; got != n {
			t.Errorf("usage_events_%s holds %d rows, want %d (all rows by partition: %v)", m, got, n, byPart)
		}
	}
	if n := byPart["usage_events_default"]; n != 0 {
		t.Errorf("the default partition holds %d rows", n)
	}
	var doubled int64
	if err := st.Pool().QueryRow(context.Background(),
		`SELECT count(*) - count(DISTINCT request_id) FROM usage_events`).Scan(&doubled); err != nil {
		t.Fatal(err)
	}
	if doubled != 0 {
		t.Errorf("%d rows are doubled", doubled)
	}
}

// assertPartitions checks that each month, "YYYYMM", has an attached
// partition.
func assertPartitions(t *testing.T, st *store.Store, months ...string) {
	t.Helper()
	for _, m := range months {
		var attached bool
		err := st.Pool().QueryRow(context.Background(), `
			SELECT EXISTS (SELECT 1 FROM pg_inherits
				WHERE inhrelid = to_regclass($1) AND inhparent = 'usage_events'::regclass)`,
			"usage_events_"+m).Scan(&attached)
		if err != nil {
			t.Fatal(err)
		}
		if !attached {
			t.Errorf("usage_events_%s is not a partition of usage_events", m)
		}
	}
}

// A process runs from January across two month boundaries into March,
// with rows dated ahead of its partitions, and is then restarted in June.
func TestPartitionsFollowTheClockAcrossMonthsAndARestart(t *testing.T) {
	pg, st, _ := migrated(t)
	ctx := context.Background()
	tenant, err := st.CreateTenant(ctx, &store.CreateTenantParams{Name: "acme"})
	if err != nil {
		t.Fatal(err)
	}
	l := st.NewLedger(store.LedgerConfig{FlushInterval: 10 * time.Millisecond, BatchSize: 100, BufferSize: 1000, MaxPending: 10_000},
		slog.New(slog.NewTextHandler(io.Discard, nil)))
	defer l.Close(ctx)

	maintain(t, st, utc(2031, 1, 20, 12, 0))
	assertPartitions(t, st, "203101", "203102", "203103")

	record(t, l, tenant.ID, utc(2031, 1, 20, 12, 0), 40)
	mustInsert(t, st, utc(2031, 1, 31, 23, 59).Add(45*time.Second), 30) // 15 run into February
	record(t, l, tenant.ID, utc(2031, 3, 31, 23, 30), 20)
	record(t, l, tenant.ID, utc(2031, 4, 1, 0, 0), 25)                  // April has no partition yet
	mustInsert(t, st, utc(2031, 4, 30, 23, 59).Add(55*time.Second), 10) // 5 run into May
	want := map[string]int64{"203101": 40 + 15, "203102": 15, "203103": 20, "203104": 25 + 5, "203105": 5}
	if got := rowsByMonth(t, st); !maps.Equal(got, want) {
		t.Fatalf("rows per month: %v, want %v", got, want)
	}
	if got := rowsByPartition(t, st)["usage_events_default"]; got != 35 {
		t.Fatalf("the default partition holds %d rows, want April's and May's 35", got)
	}

	// The hourly timer fires after two month boundaries have passed.
	maintain(t, st, utc(2031, 3, 5, 8, 0))
	assertPartitions(t, st, "203103", "203104", "203105")
	assertSettled(t, st, want)

	record(t, l, tenant.ID, utc(2031, 6, 15, 0, 0), 35) // June has no partition
	mustInsert(t, st, utc(2031, 6, 30, 23, 59), 60)
	want["203106"] += 35 + 60
	if got := rowsByPartition(t, st)["usage_events_default"]; got != 95 {
		t.Fatalf("the default partition holds %d rows, want June's 95", got)
	}
	if err := l.Close(ctx); err != nil {
		t.Fatal(err)
	}

	// A restart in June, by a process whose sessions are not in UTC: the
	// partitions' bounds must still be UTC months.
	re, err := store.Open(ctx, pg.URL+"&timezone=America/Los_Angeles", 0)
	if err != nil {
		t.Fatal(err)
	}
	defer re.Close()
	t.Run("start-up with the clock in June", func(t *testing.T) {
		maintain(t, re, utc(2031, 6, 10, 9, 0))
		assertPartitions(t, re, "203106", "203107", "203108")
		assertSettled(t, re, want)
	})
	t.Run("rows at the UTC month boundaries land in their month", func(t *testing.T) {
		for _, at := range []time.Time{utc(2031, 6, 30, 23, 59), utc(2031, 7, 1, 0, 0), utc(2031, 7, 1, 3, 0), utc(2031, 8, 31, 22, 0)} {
			mustInsert(t, re, at, 1)
			want[at.Format("200601")]++
		}
		assertSettled(t, re, want)
	})
	t.Run("Migrate with rows in the default partition", func(t *testing.T) {
		mustInsert(t, re, utc(2031, 11, 2, 0, 0), 15) // no partition yet
		want["203111"] += 15
		if err := re.Migrate(ctx); err != nil {
			t.Fatal(err)
		}
		assertSettled(t, re, want)
		assertPartitions(t, re, "203111")
	})
}

// Before MaintainPartitions, start-up created next month's partition with
// CREATE TABLE ... PARTITION OF, which fails once the default holds rows of
// that month. Processes still running that code must start again once
// MaintainPartitions has run.
func TestPartitionOfFailsOnDefaultRowsAndMaintainPartitionsRecovers(t *testing.T) {
	_, st, _ := migrated(t)
	ctx := context.Background()
	maintain(t, st, utc(2031, 1, 20, 0, 0))
	mustInsert(t, st, utc(2031, 5, 3, 0, 0), 25) // lands in the default

	const oldStartup = `CREATE TABLE IF NOT EXISTS usage_events_203105 PARTITION OF usage_events
		FOR VALUES FROM ('2031-05-01') TO ('2031-06-01')`
	_, err := st.Pool().Exec(ctx, oldStartup)
	var pe *pgconn.PgError
	if !errors.As(err, &pe) || !strings.Contains(pe.Message, "updated partition constraint for default partition") {
		t.Fatalf("the old start-up with May's rows in the default: %v; want the default partition's constraint violated", err)
	}

	maintain(t, st, utc(2031, 4, 10, 0, 0))
	assertSettled(t, st, map[string]int64{"203105": 25})
	assertPartitions(t, st, "203104", "203105", "203106")
	if _, err := st.Pool().Exec(ctx, oldStartup); err != nil {
		t.Fatalf("the old start-up after MaintainPartitions: %v", err)
	}
}

// Every process runs maintenance, so several can run it at once, while
// writers keep adding rows to the months being moved.
func TestPartitionMaintenanceConcurrently(t *testing.T) {
	_, st, _ := migrated(t)
	ctx := context.Background()
	maintain(t, st, utc(2031, 1, 20, 0, 0))
	months := []time.Time{utc(2031, 4, 1, 0, 0), utc(2031, 5, 31, 23, 0), utc(2031, 7, 10, 0, 0), utc(2031, 12, 1, 0, 0), utc(2032, 2, 1, 0, 0)}
	for _, m := range months {
		mustInsert(t, st, m, 500)
	}

	type written struct {
		rows int
		err  error
	}
	stop, started, writer := make(chan struct{}), make(chan struct{}), make(chan written, 1)
	go func() {
		var w written
		for i := 0; ; i++ {
			select {
			case <-stop:
				writer <- w
				return
			default:
			}
			if w.err = insertRows(ctx, st, months[i%len(months)].Add(time.Duration(i)*time.Minute), 5); w.err != nil {
				writer <- w
				return
			}
			w.rows += 5
			if i == 0 {
				close(started)
			}
		}
	}()
	<-started

	const maintainers = 4
	errs := make([]error, maintainers)
	var wg sync.WaitGroup
	begin := make(chan struct{})
	for i := range maintainers {
		wg.Go(func() {
			<-begin
			errs[i] = st.MaintainPartitions(ctx, utc(2031, 3, 5, 0, 0))
		})
	}
	close(begin)
	wg.Wait()
	close(stop)
	w := <-writer
	if w.err != nil {
		t.Fatalf("a writer failed during maintenance: %v", w.err)
	}
	t.Logf("the writer added %d rows during maintenance", w.rows)
	for i, err := range errs {
		if err != nil {
			t.Errorf("maintainer %d: %v", i, err)
		}
	}

	// Rows written after the last pass looked at the default wait there for
	// the next pass.
	maintain(t, st, utc(2031, 3, 5, 0, 0))
	var total int64
	for _, n := range rowsByMonth(t, st) {
		total += n
	}
	if want := int64(len(months)*500 + w.rows); total != want {
		t.Fatalf("%d rows after maintenance, want %d", total, want)
	}
	assertSettled(t, st, rowsByMonth(t, st))
	assertPartitions(t, st, "203103", "203104", "203105", "203107", "203112", "203202")
}

// lockedBuffer lets the maintenance goroutine log while the test reads.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

func TestRunPartitionMaintenanceLogsFailuresAndCarriesOn(t *testing.T) {
	_, st, _ := migrated(t)
	ctx := context.Background()
	// A table in the way of December's partition makes every pass fail on
	// that month.
	if _, err := st.Pool().Exec(ctx, `CREATE TABLE usage_events_203112 (x integer)`); err != nil {
		t.Fatal(err)
	}
	var logs lockedBuffer
	log := slog.New(slog.NewTextHandler(&logs, nil))
	rctx, cancel := context.WithCancel(ctx)
	defer cancel()
	// Each pass reads the clock first, so a pass has finished once the
	// next one has read it.
	clocks := make(chan struct{})
	now := func() time.Time {
		select {
		case clocks <- struct{}{}:
		case <-rctx.Done():
		}
		return utc(2031, 11, 10, 0, 0)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		st.RunPartitionMaintenance(rctx, time.Millisecond, now, log)
	}()
	// fullPass returns once a pass that began after the call has finished.
	fullPass := func() { <-clocks; <-clocks }

	fullPass()
	if got := logs.String(); !strings.Contains(got, "level=WARN") || !strings.Contains(got, "usage_events_203112") {
		t.Fatalf("a failed pass logged %q", got)
	}
	assertPartitions(t, st, "203111", "203201") // the other months are done regardless

	if _, err := st.Pool().Exec(ctx, `DROP TABLE usage_events_203112`); err != nil {
		t.Fatal(err)
	}
	fullPass()
	cancel()
	<-done
	assertPartitions(t, st, "203111", "203112", "203201")
}
