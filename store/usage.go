package store

import (
	"context"
	"fmt"
	"log/slog"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgtype"
)

// UsageEvent is one call's line in the ledger, success or failure.
type UsageEvent struct {
	At               time.Time
	RequestID        string
	TenantID         uuid.UUID
	KeyID            uuid.UUID
	Deployment       string
	Model            string
	Operation        string
	Status           int
	PromptTokens     int
	CompletionTokens int
	Latency          time.Duration
	Priority         string
	Attempts         int
	// CostNanos is what the call cost, in billionths of the configured
	// currency.
	CostNanos int64
}

// LedgerConfig tunes the writer.
type LedgerConfig struct {
	FlushInterval time.Duration
	BatchSize     int
	// BufferSize is the hand-off channel; MaxPending bounds the rows held
	// in memory while Postgres is unreachable.
	BufferSize int
	MaxPending int
}

// Ledger takes usage events off the request path: Record only queues. One
// goroutine moves queued events into a pending backlog at all times; another
// writes the backlog in batches with COPY plus one rollup upsert per (tenant,
// day, model). A failed batch stays pending and is retried, so a Postgres
// blip delays usage rows but does not lose them; only a backlog past
// MaxPending (or a full hand-off channel) drops rows, and counts them.
type Ledger struct {
	s       *Store
	cfg     LedgerConfig
	log     *slog.Logger
	ch      chan UsageEvent
	flushes chan chan struct{}
	done    chan struct{}
	dropped atomic.Int64
	written atomic.Int64
	closed  atomic.Bool
	once    sync.Once

	mu      sync.Mutex
	pending []UsageEvent
	kick    chan struct{}
	full    chan struct{} // the channel is half full: collect now
}

// NewLedger starts the writer; Close flushes and stops it.
func (s *Store) NewLedger(cfg LedgerConfig, log *slog.Logger) *Ledger {
	l := &Ledger{s: s, cfg: cfg, log: log, ch: make(chan UsageEvent, cfg.BufferSize), done: make(chan struct{}),
		flushes: make(chan chan struct{}), kick: make(chan struct{}, 1), full: make(chan struct{}, 1)}
	writerFlush := make(chan chan struct{})
	go l.collect(writerFlush)
	go l.write(writerFlush)
	return l
}

// Record queues an event without blocking. After Close it only counts
// the event as dropped: nothing would write it.
func (l *Ledger) Record(e UsageEvent) {
	if l.closed.Load() {
		l.drop()
		return
	}
	select {
	case l.ch <- e:
	default:
		l.drop()
		return
	}
	// Between ticks the channel fills at the call rate; when it is half full
	// the collector is woken rather than waiting for the tick. At ordinary
	// rates this never happens, so Record wakes nothing.
	if len(l.ch) >= cap(l.ch)/2 {
		select {
		case l.full <- struct{}{}:
		default:
		}
	}
}

func (l *Ledger) drop() {
	if l.dropped.Add(1)%1000 == 1 {
		l.log.Error("usage backlog full; dropping usage events", "dropped", l.dropped.Load())
	}
}

// Dropped and Written are counters for metrics.
func (l *Ledger) Dropped() int64 { return l.dropped.Load() }
func (l *Ledger) Written() int64 { return l.written.Load() }

// Backlog is how many recorded events are not written yet: it grows while
// Postgres is unreachable.
func (l *Ledger) Backlog() int {
	l.mu.Lock()
	n := len(l.pending)
	l.mu.Unlock()
	return n + len(l.ch)
}

// Flush waits until everything recorded before the call is written.
func (l *Ledger) Flush(ctx context.Context) error {
	ack := make(chan struct{})
	select {
	case l.flushes <- ack:
	case <-ctx.Done():
		return ctx.Err()
	}
	select {
	case <-ack:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Close writes what is queued (bounded by ctx) and stops the writer.
func (l *Ledger) Close(ctx context.Context) error {
	var err error
	l.once.Do(func() {
		l.closed.Store(true)
		err = l.Flush(ctx)
		close(l.done)
	})
	return err
}

func (l *Ledger) add(e UsageEvent) {
	l.mu.Lock()
	full := len(l.pending) >= l.cfg.MaxPending
	if !full {
		l.pending = append(l.pending, e)
	}
	n := len(l.pending)
	l.mu.Unlock()
	if full {
		l.drop()
		return
	}
	if n >= l.cfg.BatchSize {
		select {
		case l.kick <- struct{}{}:
		default:
		}
	}
}

// collectEvery is how often queued events move to the backlog. Collecting
// on a tick instead of receiving each event means Record never wakes a
// goroutine: on a small machine that wake-up (another thread started, on the
// CPU the deployment or the client needs next) was measurable in every
// call's latency. The channel holds BufferSize events between ticks, and
// Record wakes the collector early only when it is half full.
const collectEvery = 10 * time.Millisecond

// collect moves events from the channel to the backlog, never blocking on
// Postgres; a flush request first takes everything already queued.
func (l *Ledger) collect(writerFlush chan<- chan struct{}) {
	t := time.NewTicker(collectEvery)
	defer t.Stop()
	drain := func() {
		for {
			select {
			case e := <-l.ch:
				l.add(e)
			default:
				return
			}
		}
	}
	for {
		select {
		case <-t.C:
			drain()
		case <-l.full:
			drain()
		case ack := <-l.flushes:
			drain()
			select {
			case writerFlush <- ack:
			case <-l.done:
				return
			}
		case <-l.done:
			return
		}
	}
}

// write writes the backlog in batches; on failure it keeps the batch and
// tries again after a pause. A flush request is answered once the backlog
// that existed when it arrived is written.
func (l *Ledger) write(flushes <-chan chan struct{}) {
	t := time.NewTicker(l.cfg.FlushInterval)
	defer t.Stop()
	var waiting []chan struct{}
	// writeAll writes until the backlog is empty; false if a write failed.
	writeAll := func() bool {
		for {
			l.mu.Lock()
			n := min(len(l.pending), l.cfg.BatchSize)
			batch := l.pending[:n]
			l.mu.Unlock()
			if n == 0 {
				return true
			}
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			err := l.s.writeUsage(ctx, batch)
			cancel()
			if err != nil {
				l.log.Warn("writing usage failed; will retry", "rows", n, "err", err)
				return false
			}
			l.written.Add(int64(n))
			l.mu.Lock()
			l.pending = l.pending[n:]
			if len(l.pending) == 0 {
				// Written through: the next events fill the same array from
				// its start (no new array, growing, every flush) unless a
				// burst made it large, which is let go.
				l.pending = nil
				if cap(batch) <= 2*l.cfg.BatchSize {
					l.pending = batch[:0]
				}
			}
			l.mu.Unlock()
		}
	}
	for {
		select {
		case <-l.done:
			return
		case ack := <-flushes:
			waiting = append(waiting, ack)
		case <-l.kick:
		case <-t.C:
		}
		if writeAll() {
			for _, ack := range waiting {
				close(ack)
			}
			waiting = nil
			continue
		}
		select {
		case <-time.After(500 * time.Millisecond):
		case <-l.done:
			return
		}
	}
}

var usageColumns = []string{"created_at", "request_id", "tenant_id", "key_id", "deployment", "model", "operation",
	"status", "prompt_tokens", "completion_tokens", "latency_us", "priority", "attempts", "cost_nanos"}

type rollupKey struct {
	tenant     uuid.UUID
	day        time.Time
	model      string
	key        uuid.UUID
	deployment string
}

type rollup struct{ requests, errors, prompt, completion, cost int64 }

// usageSource feeds events to COPY one row at a time into one reused
// slice (pgx encodes each row before it asks for the next). The ids go as
// pgtype.UUID, which pgx encodes as it is: a uuid.UUID goes through
// driver.Valuer, a string and a parse back, about 35 allocations per row,
// most of a flush's garbage.
type usageSource struct {
	events []UsageEvent
	i      int
	vals   []any
}

func (s *usageSource) Next() bool {
	if s.i >= len(s.events) {
		return false
	}
	e := &s.events[s.i]
	s.i++
	s.vals = append(s.vals[:0], e.At, e.RequestID, pgtype.UUID{Bytes: e.TenantID, Valid: true}, pgtype.UUID{Bytes: e.KeyID, Valid: e.KeyID != uuid.Nil},
		e.Deployment, e.Model, e.Operation, int32(e.Status), int32(e.PromptTokens), int32(e.CompletionTokens), e.Latency.Microseconds(),
		e.Priority, int32(max(e.Attempts, 1)), e.CostNanos)
	return true
}

func (s *usageSource) Values() ([]any, error) { return s.vals, nil }
func (s *usageSource) Err() error             { return nil }

func (s *Store) writeUsage(ctx context.Context, events []UsageEvent) error {
	return pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error { return writeUsageTx(ctx, tx, events) })
}

// writeUsageTx appends events to the ledger and the daily rollup inside tx.
// Events of a tenant that no longer exists are dropped: a call in flight
// when its tenant was purged ends after the purge, and its usage must not
// bring the tenant's data back. The tenants written for are locked (FOR KEY
// SHARE) until the end of tx, so a purge running meanwhile deletes the rows
// after they are written (see PurgeTenant), never before.
func writeUsageTx(ctx context.Context, tx pgx.Tx, events []UsageEvent) error {
	seen := make(map[uuid.UUID]bool, 4)
	tenants := make([]uuid.UUID, 0, 4)
	for _, e := range events {
		if !seen[e.TenantID] {
			seen[e.TenantID] = true
			tenants = append(tenants, e.TenantID)
		}
	}
	trows, err := tx.Query(ctx, `SELECT id FROM tenants WHERE id = ANY($1) FOR KEY SHARE`, tenants)
	if err != nil {
		return fmt.Errorf("lock usage tenants: %w", err)
	}
	live, err := pgx.CollectRows(trows, pgx.RowTo[uuid.UUID])
	if err != nil {
		return fmt.Errorf("lock usage tenants: %w", err)
	}
	if len(live) < len(tenants) {
		alive := make(map[uuid.UUID]bool, len(live))
		for _, id := range live {
			alive[id] = true
		}
		events = slices.DeleteFunc(slices.Clone(events), func(e UsageEvent) bool { return !alive[e.TenantID] })
		if len(events) == 0 {
			return nil
		}
	}
	sums := map[rollupKey]*rollup{}
	for _, e := range events {
		k := rollupKey{e.TenantID, e.At.UTC().Truncate(24 * time.Hour), e.Model, e.KeyID, e.Deployment}
		r := sums[k]
		if r == nil {
			r = &rollup{}
			sums[k] = r
		}
		r.requests++
		if e.Status >= 400 || e.Status == 0 {
			r.errors++
		}
		r.prompt += int64(e.PromptTokens)
		r.completion += int64(e.CompletionTokens)
		r.cost += e.CostNanos
	}
	src := &usageSource{events: events, vals: make([]any, 0, len(usageColumns))}
	if len(events) == 1 {
		// One row (a finished job): an INSERT is cheaper than a COPY round.
		src.Next()
		if _, err := tx.Exec(ctx, `INSERT INTO usage_events (created_at, request_id, tenant_id, key_id, deployment, model, operation,
			status, prompt_tokens, completion_tokens, latency_us, priority, attempts, cost_nanos) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14)`, src.vals...); err != nil {
			return fmt.Errorf("insert usage: %w", err)
		}
	} else if _, err := tx.CopyFrom(ctx, pgx.Identifier{"usage_events"}, usageColumns, src); err != nil {
		return fmt.Errorf("copy usage: %w", err)
	}
	b := &pgx.Batch{}
	for k, r := range sums {
		b.Queue(`INSERT INTO usage_daily (tenant_id, day, model, key_id, deployment, requests, errors, prompt_tokens, completion_tokens, cost_nanos)
			VALUES ($1, $2, $3, $9, $10, $4, $5, $6, $7, $8)
			ON CONFLICT (tenant_id, day, model, key_id, deployment) DO UPDATE SET
				requests = usage_daily.requests + EXCLUDED.requests,
				errors = usage_daily.errors + EXCLUDED.errors,
				prompt_tokens = usage_daily.prompt_tokens + EXCLUDED.prompt_tokens,
				completion_tokens = usage_daily.completion_tokens + EXCLUDED.completion_tokens,
				cost_nanos = usage_daily.cost_nanos + EXCLUDED.cost_nanos`,
			k.tenant, k.day, k.model, r.requests, r.errors, r.prompt, r.completion, r.cost, k.key, k.deployment)
	}
	return tx.SendBatch(ctx, b).Close()
}

// UsageRow is one (day, model) line of a tenant's usage.
type UsageRow struct {
	Day              time.Time
	Model            string
	Requests         int64
	Errors           int64
	PromptTokens     int64
	CompletionTokens int64
	CostNanos        int64
}

// UsageParams select a tenant's usage between two days, inclusive.
type UsageParams struct {
	TenantID uuid.UUID
	From, To time.Time
}

// Usage reads the daily rollup, never the raw ledger.
func (s *Store) Usage(ctx context.Context, p *UsageParams) ([]UsageRow, error) {
	rows, err := s.pool.Query(ctx, `
		SELECT day, model, sum(requests)::bigint, sum(errors)::bigint, sum(prompt_tokens)::bigint, sum(completion_tokens)::bigint, sum(cost_nanos)::bigint
		FROM usage_daily WHERE tenant_id = $1 AND day BETWEEN $2 AND $3
		GROUP BY day, model ORDER BY day, model`, p.TenantID, p.From, p.To)
	if err != nil {
		return nil, fmt.Errorf("store: usage: %w", err)
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (UsageRow, error) {
		var u UsageRow
		err := r.Scan(&u.Day, &u.Model, &u.Requests, &u.Errors, &u.PromptTokens, &u.CompletionTokens, &u.CostNanos)
		return u, err
	})
}

// UsageGroups are what a usage export may be grouped by.
var UsageGroups = []string{"day", "tenant", "key", "model", "deployment"}

// UsageExportParams select the rollup between two days (inclusive), of one
// tenant if TenantID is set, grouped by GroupBy (of UsageGroups; none: one
// line of totals).
type UsageExportParams struct {
	From, To time.Time
	TenantID uuid.UUID
	GroupBy  []string
}

// UsageExportRow is one group's usage; the fields of the dimensions not
// grouped by are zero.
type UsageExportRow struct {
	Day              time.Time
	TenantID         uuid.UUID
	Tenant           string
	KeyID            uuid.UUID
	KeyName          string
	KeyPrefix        string
	Model            string
	Deployment       string
	Requests         int64
	Errors           int64
	PromptTokens     int64
	CompletionTokens int64
	CostNanos        int64
}

// UsageExportColumns names the columns of an export grouped by groupBy, in
// the order Values gives them: the admin API and the CLI write the same.
func UsageExportColumns(groupBy []string) []string {
	var cols []string
	for _, g := range UsageGroups {
		if !slices.Contains(groupBy, g) {
			continue
		}
		switch g {
		case "tenant":
			cols = append(cols, "tenant_id", "tenant")
		case "key":
			cols = append(cols, "key_id", "key_name", "key_prefix")
		default:
			cols = append(cols, g)
		}
	}
	return append(cols, "requests", "errors", "prompt_tokens", "completion_tokens", "total_tokens", "cost")
}

// Values renders r as UsageExportColumns(groupBy) names them; usage of no
// key (uuid.Nil) has an empty key_id.
func (r *UsageExportRow) Values(groupBy []string) []string {
	var out []string
	for _, g := range UsageGroups {
		if !slices.Contains(groupBy, g) {
			continue
		}
		switch g {
		case "day":
			out = append(out, r.Day.Format(time.DateOnly))
		case "tenant":
			out = append(out, r.TenantID.String(), r.Tenant)
		case "key":
			id := ""
			if r.KeyID != uuid.Nil {
				id = r.KeyID.String()
			}
			out = append(out, id, r.KeyName, r.KeyPrefix)
		case "model":
			out = append(out, r.Model)
		case "deployment":
			out = append(out, r.Deployment)
		}
	}
	return append(out, strconv.FormatInt(r.Requests, 10), strconv.FormatInt(r.Errors, 10), strconv.FormatInt(r.PromptTokens, 10),
		strconv.FormatInt(r.CompletionTokens, 10), strconv.FormatInt(r.PromptTokens+r.CompletionTokens, 10), FormatNanos(r.CostNanos))
}

// CSVCells makes cells safe to open in a spreadsheet: a cell that starts
// with =, +, -, @, a tab or a carriage return (a key's name, say) would be
// read as a formula, so it gets a leading apostrophe (OWASP's advice).
// Numbers are never changed: they are written unsigned or with a digit
// first, except negative costs, which are not produced.
func CSVCells(cells []string) []string {
	for i, c := range cells {
		if c != "" && strings.ContainsRune("=+-@\t\r", rune(c[0])) {
			cells[i] = "'" + c
		}
	}
	return cells
}

// FormatNanos writes an amount of nano-units of a currency as a decimal,
// exactly: no float rounding, no trailing zeros.
func FormatNanos(nanos int64) string {
	sign := ""
	if nanos < 0 {
		sign, nanos = "-", -nanos
	}
	whole, frac := nanos/1_000_000_000, nanos%1_000_000_000
	if frac == 0 {
		return sign + strconv.FormatInt(whole, 10)
	}
	return strings.TrimRight(fmt.Sprintf("%s%d.%09d", sign, whole, frac), "0")
}

// exportPage is how many groups one query of an export reads.
const exportPage = 1000

// ExportUsage calls each for every group, in order, reading the rollup a
// page at a time: no connection is held while each writes to a client, and
// nothing is held in memory but a page.
func (s *Store) ExportUsage(ctx context.Context, p *UsageExportParams, each func(*UsageExportRow) error) error {
	// The dimensions are columns of usage_daily, so a page continues after
	// the last group with a row comparison on them, before grouping.
	var cols []string
	for _, g := range UsageGroups {
		if !slices.Contains(p.GroupBy, g) {
			continue
		}
		cols = append(cols, map[string]string{"day": "u.day", "tenant": "u.tenant_id", "key": "u.key_id", "model": "u.model", "deployment": "u.deployment"}[g])
	}
	for _, g := range p.GroupBy {
		if !slices.Contains(UsageGroups, g) {
			return fmt.Errorf("store: usage export: cannot group by %q", g)
		}
	}
	var last []any
	for {
		args := []any{p.From, p.To, nullUUID(p.TenantID)}
		where := `u.day BETWEEN $1 AND $2 AND ($3::uuid IS NULL OR u.tenant_id = $3)`
		if last != nil {
			ph := make([]string, len(last))
			for i := range last {
				args = append(args, last[i])
				ph[i] = fmt.Sprintf("$%d", len(args))
			}
			where += ` AND (` + strings.Join(cols, ", ") + `) > (` + strings.Join(ph, ", ") + `)`
		}
		sel, group, order := "", "", ""
		if len(cols) > 0 {
			sel = strings.Join(cols, ", ") + ", "
			group = " GROUP BY " + strings.Join(cols, ", ")
			order = " ORDER BY " + strings.Join(cols, ", ")
		}
		q := `SELECT ` + sel + `sum(u.requests)::bigint, sum(u.errors)::bigint, sum(u.prompt_tokens)::bigint, sum(u.completion_tokens)::bigint,
			sum(u.cost_nanos)::bigint FROM usage_daily u WHERE ` + where + group + order + fmt.Sprintf(" LIMIT %d", exportPage)
		rows, err := s.pool.Query(ctx, q, args...)
		if err != nil {
			return fmt.Errorf("store: usage export: %w", err)
		}
		var page []UsageExportRow
		var keys [][]any
		for rows.Next() {
			var r UsageExportRow
			var dest []any
			for _, c := range cols {
				dest = append(dest, map[string]any{"u.day": &r.Day, "u.tenant_id": &r.TenantID, "u.key_id": &r.KeyID, "u.model": &r.Model, "u.deployment": &r.Deployment}[c])
			}
			if err := rows.Scan(append(dest, &r.Requests, &r.Errors, &r.PromptTokens, &r.CompletionTokens, &r.CostNanos)...); err != nil {
				rows.Close()
				return fmt.Errorf("store: usage export: %w", err)
			}
			k := make([]any, len(cols))
			for i, c := range cols {
				k[i] = map[string]any{"u.day": r.Day, "u.tenant_id": r.TenantID, "u.key_id": r.KeyID, "u.model": r.Model, "u.deployment": r.Deployment}[c]
			}
			page, keys = append(page, r), append(keys, k)
		}
		rows.Close()
		if err := rows.Err(); err != nil {
			return fmt.Errorf("store: usage export: %w", err)
		}
		if err := s.nameUsage(ctx, page); err != nil {
			return err
		}
		for i := range page {
			if err := each(&page[i]); err != nil {
				return err
			}
		}
		if len(page) < exportPage || len(cols) == 0 {
			return nil
		}
		last = keys[len(keys)-1]
	}
}

// nameUsage fills the tenants' and keys' names of a page in one query.
func (s *Store) nameUsage(ctx context.Context, page []UsageExportRow) error {
	var tenants, keys []uuid.UUID
	for _, r := range page {
		if r.TenantID != uuid.Nil {
			tenants = append(tenants, r.TenantID)
		}
		if r.KeyID != uuid.Nil {
			keys = append(keys, r.KeyID)
		}
	}
	if len(tenants) == 0 && len(keys) == 0 {
		return nil
	}
	rows, err := s.pool.Query(ctx, `SELECT 't', id, name, '' FROM tenants WHERE id = ANY($1)
		UNION ALL SELECT 'k', id, name, prefix FROM api_keys WHERE id = ANY($2)`, tenants, keys)
	if err != nil {
		return fmt.Errorf("store: usage names: %w", err)
	}
	type named struct{ name, prefix string }
	tn, kn := map[uuid.UUID]named{}, map[uuid.UUID]named{}
	for rows.Next() {
		var kind string
		var id uuid.UUID
		var n named
		if err := rows.Scan(&kind, &id, &n.name, &n.prefix); err != nil {
			rows.Close()
			return fmt.Errorf("store: usage names: %w", err)
		}
		if kind == "t" {
			tn[id] = n
		} else {
			kn[id] = n
		}
	}
	rows.Close()
	for i := range page {
		page[i].Tenant = tn[page[i].TenantID].name
		k := kn[page[i].KeyID]
		page[i].KeyName, page[i].KeyPrefix = k.name, k.prefix
	}
	return rows.Err()
}
