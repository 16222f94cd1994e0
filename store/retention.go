package store

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"sort"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// Retention says how long finished work is kept; a duration ≤ 0 keeps it
// forever. Batch is the rows one statement deletes at most.
type Retention struct {
	// Jobs: a finished job outside a batch, by when it finished.
	Jobs time.Duration
	// Batches: an ended batch with its jobs (its output and error files are
	// made from them) and those files, by when it ended.
	Batches time.Duration
	// Webhooks: delivered deliveries and their attempts; FailedWebhooks:
	// failed ones (kept longer, for looking into). An event goes with its
	// last delivery.
	Webhooks, FailedWebhooks time.Duration
	// UsageMonths: whole months of raw usage_events kept besides the
	// current one; older monthly partitions are detached and dropped.
	// usage_daily, which usage reports and chargeback read, is kept.
	UsageMonths int
	Batch       int
}

// Swept counts what one pass removed, by kind.
type Swept map[string]int64

// keyEventsKept is how long key_events rows are kept: processes read only
// the last 10 s of them.
const keyEventsKept = 24 * time.Hour

// Sweep removes what the retention allows, as of now, in statements of at
// most r.Batch rows, each its own transaction: no lock is held for long,
// and rows another sweeper holds are skipped (SKIP LOCKED), so several
// processes may sweep at once. Uploaded files go when their expires_at
// passes, whatever r says.
func (s *Store) Sweep(ctx context.Context, now time.Time, r Retention) (Swept, error) {
	if r.Batch <= 0 {
		r.Batch = 1000
	}
	out := Swept{}
	steps := []struct {
		kind string
		on   bool
		run  func() (int64, error)
	}{
		{"jobs", r.Jobs > 0, func() (int64, error) {
			return s.sweepChunks(ctx, `DELETE FROM jobs WHERE id IN (SELECT id FROM jobs
				WHERE batch_id IS NULL AND status IN ('succeeded', 'failed', 'cancelled') AND finished_at < $1
				ORDER BY finished_at LIMIT $2 FOR UPDATE SKIP LOCKED)`, now.Add(-r.Jobs), r.Batch)
		}},
		{"batches", r.Batches > 0, func() (int64, error) { return s.sweepBatches(ctx, now.Add(-r.Batches), r.Batch, out) }},
		{"files", true, func() (int64, error) { return s.sweepFiles(ctx, now, r.Batch, out) }},
		{"webhook_deliveries", r.Webhooks > 0, func() (int64, error) {
			return s.sweepChunks(ctx, `DELETE FROM webhook_deliveries WHERE id IN (SELECT id FROM webhook_deliveries
				WHERE status = 'delivered' AND created_at < $1 LIMIT $2 FOR UPDATE SKIP LOCKED)`, now.Add(-r.Webhooks), r.Batch)
		}},
		{"webhook_deliveries", r.FailedWebhooks > 0, func() (int64, error) {
			return s.sweepChunks(ctx, `DELETE FROM webhook_deliveries WHERE id IN (SELECT id FROM webhook_deliveries
				WHERE status = 'failed' AND created_at < $1 LIMIT $2 FOR UPDATE SKIP LOCKED)`, now.Add(-r.FailedWebhooks), r.Batch)
		}},
		{"webhook_events", r.Webhooks > 0, func() (int64, error) {
			// An event is kept while any delivery of it is.
			return s.sweepChunks(ctx, `DELETE FROM webhook_events WHERE id IN (SELECT e.id FROM webhook_events e
				WHERE e.created_at < $1 AND NOT EXISTS (SELECT 1 FROM webhook_deliveries d WHERE d.event_id = e.id)
				LIMIT $2 FOR UPDATE SKIP LOCKED)`, now.Add(-r.Webhooks), r.Batch)
		}},
		{"key_events", true, func() (int64, error) {
			return s.sweepChunks(ctx, `DELETE FROM key_events WHERE ctid IN (SELECT ctid FROM key_events WHERE at < $1 LIMIT $2 FOR UPDATE SKIP LOCKED)`,
				now.Add(-keyEventsKept), r.Batch)
		}},
		{"usage_partitions", r.UsageMonths > 0, func() (int64, error) { return s.dropUsagePartitions(ctx, now, r.UsageMonths) }},
	}
	for _, st := range steps {
		if !st.on {
			continue
		}
		n, err := st.run()
		out[st.kind] += n
		if err != nil {
			return out, fmt.Errorf("store: sweep %s: %w", st.kind, err)
		}
	}
	return out, nil
}

// sweepChunks runs a DELETE taking ($1 what: a cutoff or an id, $2 limit)
// until it deletes fewer than limit rows. Rows another sweeper holds do not
// shorten a chunk (the LIMIT is above the row locking, so skipped rows are
// replaced by the next ones): a short chunk is the end of what is due.
func (s *Store) sweepChunks(ctx context.Context, sql string, what any, limit int) (int64, error) {
	var total int64
	for {
		tag, err := s.pool.Exec(ctx, sql, what, limit)
		if err != nil {
			return total, err
		}
		total += tag.RowsAffected()
		if tag.RowsAffected() < int64(limit) || ctx.Err() != nil {
			return total, ctx.Err()
		}
	}
}

// sweepBatches removes ended batches older than cutoff, one at a time: its
// jobs a chunk at a time, then its output and error files and itself.
func (s *Store) sweepBatches(ctx context.Context, cutoff time.Time, limit int, out Swept) (int64, error) {
	var n int64
	seen := map[uuid.UUID]bool{}
	for ctx.Err() == nil {
		var id uuid.UUID
		err := s.pool.QueryRow(ctx, `SELECT id FROM batches WHERE status IN ('completed', 'failed', 'expired', 'cancelled')
			AND coalesce(completed_at, failed_at, expired_at, cancelled_at) < $1 AND NOT (id = ANY($2))
			ORDER BY coalesce(completed_at, failed_at, expired_at, cancelled_at) LIMIT 1`, cutoff, keys(seen)).Scan(&id)
		if errors.Is(err, pgx.ErrNoRows) {
			return n, nil
		}
		if err != nil {
			return n, err
		}
		jobs, err := s.sweepChunks(ctx, `DELETE FROM jobs WHERE id IN (SELECT id FROM jobs WHERE batch_id = $1 LIMIT $2 FOR UPDATE SKIP LOCKED)`, id, limit)
		out["batch_jobs"] += jobs
		if err != nil {
			return n, err
		}
		gone := false
		err = pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
			// Another sweeper may still hold some of its jobs: then the
			// batch waits for the next pass.
			var left bool
			if err := tx.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM jobs WHERE batch_id = $1)`, id).Scan(&left); err != nil || left {
				return err
			}
			tag, err := tx.Exec(ctx, `DELETE FROM files WHERE batch_id = $1 AND kind IN ('batch_output', 'batch_error')`, id)
			if err != nil {
				return err
			}
			out["files"] += tag.RowsAffected()
			tag, err = tx.Exec(ctx, `DELETE FROM batches WHERE id = $1`, id)
			n += tag.RowsAffected()
			gone = tag.RowsAffected() > 0
			return err
		})
		if err != nil {
			return n, err
		}
		// Only a batch left behind is passed over by the next lookups: the
		// list goes with every query, and listing every batch removed made
		// a pass over many of them quadratic (8,000 took 4 minutes).
		if !gone {
			seen[id] = true
		}
	}
	return n, ctx.Err()
}

func keys(m map[uuid.UUID]bool) []uuid.UUID {
	out := make([]uuid.UUID, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	return out
}

// sweepFiles removes uploads past their expires_at: their lines a chunk at
// a time, then the file.
func (s *Store) sweepFiles(ctx context.Context, now time.Time, limit int, out Swept) (int64, error) {
	var n int64
	seen := map[uuid.UUID]bool{}
	for ctx.Err() == nil {
		var id uuid.UUID
		// A file that is the input of a batch still validating is kept
		// until the batch has made its lines jobs (or failed): the lines
		// are read then, which may be after the file expired.
		err := s.pool.QueryRow(ctx, `SELECT id FROM files f WHERE expires_at < $1 AND NOT (id = ANY($2))`+notValidating+`
			ORDER BY expires_at LIMIT 1`, now, keys(seen)).Scan(&id)
		if errors.Is(err, pgx.ErrNoRows) {
			return n, nil
		}
		if err != nil {
			return n, err
		}
		// Checked again by each chunk: a batch created on the file meanwhile
		// stops its deletion.
		lines, err := s.sweepChunks(ctx, `DELETE FROM file_lines WHERE file_id = $1 AND line IN (
			SELECT line FROM file_lines WHERE file_id = $1 ORDER BY line LIMIT $2 FOR UPDATE SKIP LOCKED)
			AND EXISTS (SELECT 1 FROM files f WHERE f.id = $1`+notValidating+`)`, id, limit*10)
		out["file_lines"] += lines
		if err != nil {
			return n, err
		}
		tag, err := s.pool.Exec(ctx, `DELETE FROM files f WHERE id = $1 AND NOT EXISTS (SELECT 1 FROM file_lines l WHERE l.file_id = f.id)`, id)
		if err != nil {
			return n, err
		}
		n += tag.RowsAffected()
		if tag.RowsAffected() == 0 { // left for a later pass (as batches above)
			seen[id] = true
		}
	}
	return n, ctx.Err()
}

// notValidating is a condition on files f: no batch still validating reads
// it.
const notValidating = ` AND NOT EXISTS (SELECT 1 FROM batches b WHERE b.input_file_id = f.id AND b.status = 'validating')`

// dropUsagePartitions detaches and drops the monthly usage_events
// partitions wholly older than keep months before now's month.
func (s *Store) dropUsagePartitions(ctx context.Context, now time.Time, keep int) (int64, error) {
	now = now.UTC()
	oldest := time.Date(now.Year(), now.Month(), 1, 0, 0, 0, 0, time.UTC).AddDate(0, -keep, 0)
	rows, err := s.pool.Query(ctx, `SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
		WHERE i.inhparent = 'usage_events'::regclass AND c.relname ~ '^usage_events_[0-9]{6}$'`)
	if err != nil {
		return 0, err
	}
	names, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return 0, err
	}
	sort.Strings(names)
	var n int64
	for _, name := range names {
		m, err := time.Parse("200601", name[len("usage_events_"):])
		if err != nil || !m.Before(oldest) {
			continue
		}
		// Under the partition maintenance lock: it creates and settles
		// partitions, and must not meet one half detached.
		err = pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
			if _, err := tx.Exec(ctx, `SELECT pg_advisory_xact_lock($1)`, partitionLockKey); err != nil {
				return err
			}
			// DETACH takes an ACCESS EXCLUSIVE lock on usage_events. Behind
			// a long reader (pg_dump, an analyst's query) it would wait,
			// and every usage insert would queue behind it: give up soon
			// instead, and try again at a later pass.
			if _, err := tx.Exec(ctx, `SET LOCAL lock_timeout = '1s'`); err != nil {
				return err
			}
			var still bool
			if err := tx.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_inherits WHERE inhrelid = to_regclass($1))`, name).Scan(&still); err != nil || !still {
				return err
			}
			if _, err := tx.Exec(ctx, `ALTER TABLE usage_events DETACH PARTITION `+pgx.Identifier{name}.Sanitize()); err != nil {
				return err
			}
			_, err := tx.Exec(ctx, `DROP TABLE `+pgx.Identifier{name}.Sanitize())
			return err
		})
		if pe := (*pgconn.PgError)(nil); errors.As(err, &pe) && pe.Code == "55P03" { // lock_not_available
			return n, nil
		}
		if err != nil {
			return n, err
		}
		n++
	}
	return n, nil
}

// RunSweeper sweeps every interval until ctx ends, calling done with what
// each pass removed (and its error, which is only logged: the next pass
// takes up where it stopped).
func (s *Store) RunSweeper(ctx context.Context, every time.Duration, now func() time.Time, r Retention, done func(Swept, error), log *slog.Logger) {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		swept, err := s.Sweep(ctx, now(), r)
		if ctx.Err() != nil {
			return
		}
		if err != nil {
			log.Warn("retention sweep failed; the next one continues", "every", every, "err", err)
		}
		done(swept, err)
	}
}

// PurgeTenant deletes a tenant and everything of it: jobs and results,
// files, batches, webhook endpoints, events and deliveries, keys, limits,
// budgets, usage (raw and daily) and stored-response routes. Work in
// progress is cancelled first, as by DeleteTenant. Rows go in statements
// of at most batch rows, so a large tenant never holds a long lock; a
// purge cut short is resumed by running it again. The audit log keeps the
// purge, with its counts.
func (s *Store) PurgeTenant(ctx context.Context, id uuid.UUID, batch int, actor string) (Swept, error) {
	if batch <= 0 {
		batch = 1000
	}
	var exists bool
	if err := s.pool.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM tenants WHERE id = $1)`, id).Scan(&exists); err != nil {
		return nil, fmt.Errorf("store: purge: %w", err)
	}
	if !exists {
		return nil, ErrNotFound
	}
	if err := s.DeleteTenant(ctx, id, true, actor); err != nil && !errors.Is(err, ErrNotFound) {
		return nil, fmt.Errorf("store: purge: %w", err)
	}
	out := Swept{}
	chunked := []struct{ kind, sql string }{
		{"jobs", `DELETE FROM jobs WHERE id IN (SELECT id FROM jobs WHERE tenant_id = $1 LIMIT $2)`},
		{"file_lines", `DELETE FROM file_lines WHERE (file_id, line) IN (SELECT l.file_id, l.line FROM files f JOIN file_lines l ON l.file_id = f.id
			WHERE f.tenant_id = $1 LIMIT $2)`},
		{"files", `DELETE FROM files WHERE id IN (SELECT id FROM files WHERE tenant_id = $1 LIMIT $2)`},
		{"batches", `DELETE FROM batches WHERE id IN (SELECT id FROM batches WHERE tenant_id = $1 LIMIT $2)`},
		{"webhook_deliveries", `DELETE FROM webhook_deliveries WHERE id IN (SELECT id FROM webhook_deliveries WHERE tenant_id = $1 LIMIT $2)`},
		{"webhook_events", `DELETE FROM webhook_events WHERE id IN (SELECT id FROM webhook_events WHERE tenant_id = $1 LIMIT $2)`},
		{"usage_events", `DELETE FROM usage_events WHERE tenant_id = $1 AND (created_at, request_id) IN (
			SELECT created_at, request_id FROM usage_events WHERE tenant_id = $1 LIMIT $2)`},
		{"usage_daily", `DELETE FROM usage_daily WHERE (tenant_id, day, model, key_id, deployment) IN (
			SELECT tenant_id, day, model, key_id, deployment FROM usage_daily WHERE tenant_id = $1 LIMIT $2)`},
		{"response_routes", `DELETE FROM response_routes WHERE id IN (SELECT id FROM response_routes WHERE tenant_id = $1 LIMIT $2)`},
	}
	for _, c := range chunked {
		n, err := s.sweepChunks(ctx, c.sql, id, batch)
		out[c.kind] += n
		if err != nil {
			return out, fmt.Errorf("store: purge %s: %w", c.kind, err)
		}
	}
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		// The tenant's row first: a usage write or a stored response of a
		// call that was in flight holds it (FOR KEY SHARE) until it
		// commits, and what it wrote is removed here; one that comes after
		// finds no tenant and writes nothing.
		if _, err := tx.Exec(ctx, `SELECT 1 FROM tenants WHERE id = $1 FOR UPDATE`, id); err != nil {
			return err
		}
		for _, c := range []struct{ kind, sql string }{
			{"usage_events", `DELETE FROM usage_events WHERE tenant_id = $1`},
			{"usage_daily", `DELETE FROM usage_daily WHERE tenant_id = $1`},
			{"response_routes", `DELETE FROM response_routes WHERE tenant_id = $1`},
		} {
			tag, err := tx.Exec(ctx, c.sql, id)
			if err != nil {
				return err
			}
			out[c.kind] += tag.RowsAffected()
		}
		var keys, endpoints int64
		if err := tx.QueryRow(ctx, `SELECT (SELECT count(*) FROM api_keys WHERE tenant_id = $1), (SELECT count(*) FROM webhook_endpoints WHERE tenant_id = $1)`, id).
			Scan(&keys, &endpoints); err != nil {
			return err
		}
		before, err := rowJSON(ctx, tx, tenantAuditColumns, id)
		if err != nil {
			return err
		}
		// Keys, limits, budgets and webhook endpoints go with the row.
		if _, err := tx.Exec(ctx, `DELETE FROM tenants WHERE id = $1`, id); err != nil {
			return err
		}
		out["api_keys"], out["webhook_endpoints"], out["tenants"] = keys, endpoints, 1
		after, _ := json.Marshal(out)
		return audit(ctx, tx, actor, "tenant.purge", "tenant", id.String(), id, before, after)
	})
	if err != nil {
		return out, fmt.Errorf("store: purge: %w", err)
	}
	return out, nil
}
