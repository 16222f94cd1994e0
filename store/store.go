// Package store owns Levee's Postgres state: the schema (applied from
// migrations/ with goose), tenants and their API keys, and the usage ledger
// with its daily rollup. Methods take a context first and return typed errors
// (ErrNotFound, ErrExists) where callers branch on them.
package store

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jackc/pgx/v5/stdlib"
	"github.com/pressly/goose/v3"
	"github.com/pressly/goose/v3/lock"

	"github.com/levee-gw/levee/migrations"
)

var (
	// ErrNotFound is returned when a looked-up row does not exist.
	ErrNotFound = errors.New("not found")
	// ErrExists is returned when a row with the same unique name exists.
	ErrExists = errors.New("already exists")
)

// Store is a pool of connections to Levee's database.
type Store struct {
	pool *pgxpool.Pool

	// Concurrent job inserts, claims and outcomes share statements.
	inserts  *groupCommit[*InsertJobParams, InsertedJob]
	starts   *groupCommit[startCall, started]
	finishes *groupCommit[*FinishJobParams, bool]

	markOnce  sync.Once
	marks     chan publishMark
	markMu    sync.Mutex // held by a mark's write and by ForgetPublished
	markEpoch atomic.Int64
	markDone  chan struct{}
}

// Open connects to url with a pool of at most maxConns connections (0: the
// URL's pool_max_conns, else pgx's default); it does not migrate.
func Open(ctx context.Context, url string, maxConns int) (*Store, error) {
	cfg, err := pgxpool.ParseConfig(url)
	if err != nil {
		return nil, fmt.Errorf("store: parse database url: %w", err)
	}
	if maxConns > 0 {
		cfg.MaxConns = int32(maxConns)
	}
	// A server that does not answer a connection attempt must not hold
	// the caller longer than this (callers bound their queries too).
	if cfg.ConnConfig.ConnectTimeout == 0 || cfg.ConnConfig.ConnectTimeout > 5*time.Second {
		cfg.ConnConfig.ConnectTimeout = 5 * time.Second
	}
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("store: %w", err)
	}
	s := &Store{pool: pool}
	s.inserts = &groupCommit[*InsertJobParams, InsertedJob]{flush: s.insertJobs, max: groupMax, limit: insertFlushes, timeout: groupTimeout}
	s.starts = &groupCommit[startCall, started]{flush: s.startJobs, key: func(c startCall) any { return c.id },
		max: groupMax, limit: groupFlushes, timeout: groupTimeout}
	s.finishes = &groupCommit[*FinishJobParams, bool]{flush: s.finishJobs, key: func(p *FinishJobParams) any { return p.ID },
		max: groupMax, limit: groupFlushes, timeout: groupTimeout}
	return s, nil
}

// Close writes pending publish marks and closes the pool.
func (s *Store) Close() {
	if s.marks != nil {
		close(s.marks)
		<-s.markDone
	}
	s.pool.Close()
}

// PublishEpoch counts the times JetStream's stream was found lost
// (ForgetPublished). Read it before publishing, and pass it to
// MarkPublishedSoon: a mark of a message published into a stream that was
// lost since is not written.
func (s *Store) PublishEpoch() int64 { return s.markEpoch.Load() }

// MarkPublishedSoon records, within a few tens of milliseconds and batched
// with others, that a job's message reached JetStream. Only outbox relays
// read the mark, and they leave a new job to its own process far longer
// (outbox.InlineClaim). A job that started meanwhile was marked by its start
// and is not written again.
func (s *Store) MarkPublishedSoon(id uuid.UUID, epoch int64) {
	s.markOnce.Do(func() {
		s.marks, s.markDone = make(chan publishMark, 4096), make(chan struct{})
		go s.markLoop()
	})
	s.marks <- publishMark{id, epoch}
}

type publishMark struct {
	id    uuid.UUID
	epoch int64
}

func (s *Store) markLoop() {
	defer close(s.markDone)
	var marks []publishMark
	t := time.NewTicker(20 * time.Millisecond)
	defer t.Stop()
	flush := func() {
		if len(marks) == 0 {
			return
		}
		// Marks of a stream lost since are dropped: their jobs must be
		// published again. Holding markMu keeps ForgetPublished from
		// running between the check and the write.
		s.markMu.Lock()
		ids := make([]uuid.UUID, 0, len(marks))
		for _, m := range marks {
			if m.epoch == s.markEpoch.Load() {
				ids = append(ids, m.id)
			}
		}
		if len(ids) > 0 {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			_ = s.MarkPublished(ctx, ids...) // a lost mark only means a harmless republish
			cancel()
		}
		s.markMu.Unlock()
		marks = marks[:0]
	}
	for {
		select {
		case m, ok := <-s.marks:
			if !ok {
				flush()
				return
			}
			marks = append(marks, m)
			if len(marks) >= 1000 {
				flush()
			}
		case <-t.C:
			flush()
		}
	}
}

// Pool exposes the pool to code in this module that needs raw access (tests).
func (s *Store) Pool() *pgxpool.Pool { return s.pool }

// Ping checks that Postgres answers.
func (s *Store) Ping(ctx context.Context) error { return s.pool.Ping(ctx) }

// Migrate applies every pending migration, holding a session-level
// advisory lock meanwhile, so several processes starting at once on a new
// or older database take turns (goose does not lock unless asked).
func (s *Store) Migrate(ctx context.Context) error {
	db := stdlib.OpenDBFromPool(s.pool)
	defer db.Close()
	// A process waiting for another one's migrations retries each second
	// (goose's default is every 5 s), for up to 5 minutes.
	locker, err := lock.NewPostgresSessionLocker(lock.WithLockTimeout(1, 300))
	if err != nil {
		return fmt.Errorf("store: migrations: %w", err)
	}
	p, err := goose.NewProvider(goose.DialectPostgres, db, migrations.FS, goose.WithSessionLocker(locker))
	if err != nil {
		return fmt.Errorf("store: migrations: %w", err)
	}
	// Checked without the lock first: processes starting together on an
	// up-to-date database do not queue behind each other.
	if pending, err := p.HasPending(ctx); err != nil || pending {
		if _, err := p.Up(ctx); err != nil {
			return fmt.Errorf("store: migrate: %w", err)
		}
	}
	return s.MaintainPartitions(ctx, time.Now())
}

func isDuplicate(err error) bool {
	var pe *pgconn.PgError
	return errors.As(err, &pe) && (pe.Code == "23505" || pe.Code == "42P07")
}
