package store

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"time"

	"github.com/jackc/pgx/v5"
)

// partitionLockKey is the pg_advisory_xact_lock key that serializes ledger
// partition maintenance across every Levee process sharing the database.
const partitionLockKey int64 = 0x6c65766565_7074 // "levee" "pt"

// partitionsAhead is how many months, counting the current one, are given a
// partition in advance. Three leaves a process a full month of hourly
// retries before its rows could fall into the default partition.
const partitionsAhead = 3

// MaintainPartitions gives usage_events a partition for the month of now and
// the next two (UTC months), and moves any rows found in the default
// partition into their month's partition, creating it if need be.
//
// Rows land in the default partition when a process outlives the months it
// created; a month's partition cannot be created while the default holds
// rows of that month, so the rows must move first. Each month is settled in
// its own transaction under an advisory lock, so processes running this at
// once take turns and find the work done. When there is nothing to do it
// costs two quick queries.
func (s *Store) MaintainPartitions(ctx context.Context, now time.Time) error {
	months, err := s.unsettledMonths(ctx, now)
	if err != nil {
		return err
	}
	var errs []error
	for _, m := range months {
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("store: partitions: %w", err)
		}
		// One bad month must not keep the others from being settled.
		err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error { return settleMonth(ctx, tx, m) })
		if err != nil {
			errs = append(errs, fmt.Errorf("store: partition %s: %w", partitionName(m), err))
		}
	}
	return errors.Join(errs...)
}

// RunPartitionMaintenance calls MaintainPartitions every interval until ctx
// ends. Migrate has run it once at start-up. A failure is only logged:
// until the next try, rows of a month without a partition wait safely in the
// default partition.
func (s *Store) RunPartitionMaintenance(ctx context.Context, every time.Duration, now func() time.Time, log *slog.Logger) {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			if err := s.MaintainPartitions(ctx, now()); err != nil && ctx.Err() == nil {
				log.Warn("ledger partition maintenance failed; will retry", "every", every, "err", err)
			}
		}
	}
}

// unsettledMonths returns, in order, the first instants (UTC) of the months
// that have rows in the default partition or that are due a partition and
// have none. It takes no locks: settleMonth checks again under the lock.
func (s *Store) unsettledMonths(ctx context.Context, now time.Time) ([]time.Time, error) {
	// Rows outside years 1 to 9999 (or at ±infinity) could not be named by a
	// usage_events_YYYYMM partition; they stay in the default, where no
	// monthly partition will ever collide with them.
	rows, err := s.pool.Query(ctx, `
		SELECT DISTINCT date_trunc('month', created_at AT TIME ZONE 'UTC')
		FROM usage_events_default
		WHERE created_at >= '0001-01-01 00:00:00+00' AND created_at < '10000-01-01 00:00:00+00'`)
	if err != nil {
		return nil, fmt.Errorf("store: partitions: %w", err)
	}
	months, err := pgx.CollectRows(rows, pgx.RowTo[time.Time])
	if err != nil {
		return nil, fmt.Errorf("store: partitions: %w", err)
	}
	rows, err = s.pool.Query(ctx, `
		SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
		WHERE i.inhparent = 'usage_events'::regclass`)
	if err != nil {
		return nil, fmt.Errorf("store: partitions: %w", err)
	}
	names, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return nil, fmt.Errorf("store: partitions: %w", err)
	}
	for i := range months {
		months[i] = monthOf(months[i])
	}
	first := monthOf(now)
	for i := 0; i < partitionsAhead; i++ {
		m := first.AddDate(0, i, 0)
		if !slices.Contains(names, partitionName(m)) {
			months = append(months, m)
		}
	}
	slices.SortFunc(months, time.Time.Compare)
	return slices.Compact(months), nil
}

// settleMonth makes sure month m has an attached partition and that the
// default partition holds none of its rows. It runs in its own transaction.
func settleMonth(ctx context.Context, tx pgx.Tx, m time.Time) error {
	if _, err := tx.Exec(ctx, `SELECT pg_advisory_xact_lock($1)`, partitionLockKey); err != nil {
		return err
	}
	name := partitionName(m)
	var exists, attached bool
	err := tx.QueryRow(ctx, `
		SELECT to_regclass($1) IS NOT NULL,
			EXISTS (SELECT 1 FROM pg_inherits WHERE inhrelid = to_regclass($1) AND inhparent = 'usage_events'::regclass)`,
		name).Scan(&exists, &attached)
	if err != nil {
		return err
	}
	from, to := m, m.AddDate(0, 1, 0)
	move := func(into string) error {
		_, err := tx.Exec(ctx, `
			WITH m AS (DELETE FROM usage_events_default WHERE created_at >= $1 AND created_at < $2 RETURNING *)
			INSERT INTO `+into+` SELECT * FROM m`, from, to)
		return err
	}
	if attached {
		// The default cannot hold rows of an attached month unless the
		// partition's bounds are not this UTC month (one made by hand, or
		// with date bounds read in another time zone); inserting through the
		// parent puts each row where it belongs instead of failing.
		return move("usage_events")
	}
	ident := pgx.Identifier{name}.Sanitize()
	lo, hi := boundLiteral(from), boundLiteral(to)
	if !exists {
		// INCLUDING INDEXES builds the ledger's index now, so ATTACH adopts
		// it instead of building it while writers wait.
		if _, err := tx.Exec(ctx, `CREATE TABLE `+ident+
			` (LIKE usage_events INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING INDEXES)`); err != nil {
			return err
		}
	}
	// The bulk of the rows moves while writers carry on; they are not
	// visible elsewhere until this transaction commits with them attached.
	if err := move(ident); err != nil {
		return err
	}
	// With this constraint ATTACH knows the table's rows fit its bounds and
	// skips scanning them while writers wait.
	check := pgx.Identifier{name + "_bounds"}.Sanitize()
	if _, err := tx.Exec(ctx, `ALTER TABLE `+ident+` ADD CONSTRAINT `+check+
		` CHECK (created_at >= `+lo+` AND created_at < `+hi+`)`); err != nil {
		return err
	}
	// SHARE on the parent waits for writers in flight and holds off new
	// ones (readers go on), so no row of this month can reach the default
	// between the last move and ATTACH, which would then fail. Writers lock
	// the parent before the partition, and so does this, so neither can
	// deadlock the other.
	if _, err := tx.Exec(ctx, `LOCK TABLE ONLY usage_events IN SHARE MODE`); err != nil {
		return err
	}
	if err := move(ident); err != nil {
		return err
	}
	if _, err := tx.Exec(ctx, `ALTER TABLE usage_events ATTACH PARTITION `+ident+
		` FOR VALUES FROM (`+lo+`) TO (`+hi+`)`); err != nil {
		return err
	}
	_, err = tx.Exec(ctx, `ALTER TABLE `+ident+` DROP CONSTRAINT `+check)
	return err
}

// monthOf returns the first instant of t's month in UTC.
func monthOf(t time.Time) time.Time {
	t = t.UTC()
	return time.Date(t.Year(), t.Month(), 1, 0, 0, 0, 0, time.UTC)
}

func partitionName(m time.Time) string {
	return fmt.Sprintf("usage_events_%04d%02d", m.Year(), m.Month())
}

// boundLiteral spells a UTC instant with its offset, so Postgres does not
// read it in the session's time zone.
func boundLiteral(t time.Time) string {
	return "'" + t.UTC().Format(time.DateTime) + "+00'"
}
