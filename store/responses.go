package store

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
)

// backgroundPrefix starts the ids of background responses, which are
// Levee's own (a job's id): a shape no deployment's id has.
const backgroundPrefix = "resp_lv"

// BackgroundResponseID is the response id of background-response job id.
func BackgroundResponseID(id uuid.UUID) string {
	return backgroundPrefix + strings.ReplaceAll(id.String(), "-", "")
}

// ParseBackgroundResponseID reads a job id from a background response's id.
func ParseBackgroundResponseID(s string) (uuid.UUID, bool) {
	hex, ok := strings.CutPrefix(s, backgroundPrefix)
	if !ok || len(hex) != 32 {
		return uuid.Nil, false
	}
	id, err := uuid.Parse(hex)
	return id, err == nil
}

// ResponseRoute says which deployment holds a stored response, and whose it
// is.
type ResponseRoute struct {
	ID         string
	TenantID   uuid.UUID
	Deployment string
	// UpstreamID is the deployment's id of it, when not ID.
	UpstreamID    string
	ContextTokens int
	ExpiresAt     time.Time
}

// Upstream is the id the deployment knows the response by.
func (r *ResponseRoute) Upstream() string {
	if r.UpstreamID != "" {
		return r.UpstreamID
	}
	return r.ID
}

// RecordResponse remembers where a response is stored until ttl passes. A
// response id recorded again (a background response run again after its
// worker died) takes the new deployment and upstream id, but keeps its
// first tenant: an id is never handed from one tenant to another.
func (s *Store) RecordResponse(ctx context.Context, r *ResponseRoute, ttl time.Duration) error {
	// Only for a tenant that still exists (locked until the insert
	// commits): a response in flight when its tenant was purged is not
	// recorded after the purge.
	_, err := s.pool.Exec(ctx, `INSERT INTO response_routes (id, tenant_id, deployment, context_tokens, expires_at, upstream_id)
		SELECT $1, $2, $3, $4, now() + make_interval(secs => $5), nullif($6, '')
		WHERE EXISTS (SELECT 1 FROM tenants WHERE id = $2 FOR KEY SHARE)
		ON CONFLICT (id) DO UPDATE SET context_tokens = EXCLUDED.context_tokens, expires_at = EXCLUDED.expires_at,
			deployment = EXCLUDED.deployment, upstream_id = EXCLUDED.upstream_id
			WHERE response_routes.tenant_id = EXCLUDED.tenant_id`,
		r.ID, r.TenantID, r.Deployment, r.ContextTokens, ttl.Seconds(), r.UpstreamID)
	if err != nil {
		return fmt.Errorf("store: record response: %w", err)
	}
	return nil
}

// ResponseRouteOf finds where tenant's response id is stored; another
// tenant's id, an unknown one and an expired one are all ErrNotFound.
func (s *Store) ResponseRouteOf(ctx context.Context, tenant uuid.UUID, id string) (*ResponseRoute, error) {
	r := &ResponseRoute{ID: id}
	err := s.pool.QueryRow(ctx, `SELECT tenant_id, deployment, coalesce(upstream_id, ''), context_tokens, expires_at FROM response_routes
		WHERE id = $1 AND tenant_id = $2 AND expires_at > now()`, id, tenant).Scan(&r.TenantID, &r.Deployment, &r.UpstreamID, &r.ContextTokens, &r.ExpiresAt)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, ErrNotFound
	}
	if err != nil {
		return nil, fmt.Errorf("store: response route: %w", err)
	}
	return r, nil
}

// ForgetResponse drops the route of a deleted response.
func (s *Store) ForgetResponse(ctx context.Context, tenant uuid.UUID, id string) error {
	if _, err := s.pool.Exec(ctx, `DELETE FROM response_routes WHERE id = $1 AND tenant_id = $2`, id, tenant); err != nil {
		return fmt.Errorf("store: forget response: %w", err)
	}
	return nil
}

// PruneResponses drops expired routes, a bounded batch at a time.
func (s *Store) PruneResponses(ctx context.Context) (int64, error) {
	var total int64
	for {
		tag, err := s.pool.Exec(ctx, `DELETE FROM response_routes WHERE id IN
			(SELECT id FROM response_routes WHERE expires_at <= now() LIMIT 10000)`)
		if err != nil {
			return total, fmt.Errorf("store: prune responses: %w", err)
		}
		total += tag.RowsAffected()
		if tag.RowsAffected() < 10000 {
			return total, nil
		}
	}
}

// StreamOffset is added to the numbers of a deployment's events for a
// streamed background response: Levee's own response.created and
// response.queued are 0 and 1, and the deployment's response.created (its
// 0) is not relayed, so its in_progress (1) becomes 2.
const StreamOffset = 1

// ResponseEvent is one event of a streamed background response.
type ResponseEvent struct {
	Seq  int
	Type string
	Data []byte
}

// AddResponseEvents stores events of a background response. An event whose
// number is stored already is kept as it was: a rerun after a worker died
// does not rewrite what clients may have read.
func (s *Store) AddResponseEvents(ctx context.Context, job uuid.UUID, events []ResponseEvent) error {
	if len(events) == 0 {
		return nil
	}
	seqs, types, data := make([]int32, len(events)), make([]string, len(events)), make([][]byte, len(events))
	for i, e := range events {
		seqs[i], types[i], data[i] = int32(e.Seq), e.Type, e.Data
	}
	_, err := s.pool.Exec(ctx, `INSERT INTO response_events (job_id, seq, type, data)
		SELECT $1, s, t, d FROM unnest($2::int[], $3::text[], $4::bytea[]) AS e(s, t, d)
		ON CONFLICT DO NOTHING`, job, seqs, types, data)
	if err != nil {
		return fmt.Errorf("store: response events: %w", err)
	}
	return nil
}

// LastResponseEvent is the number of a background response's last stored
// event (-1: none).
func (s *Store) LastResponseEvent(ctx context.Context, job uuid.UUID) (int, error) {
	var n int
	if err := s.pool.QueryRow(ctx, `SELECT coalesce(max(seq), -1) FROM response_events WHERE job_id = $1`, job).Scan(&n); err != nil {
		return 0, fmt.Errorf("store: response events: %w", err)
	}
	return n, nil
}

// ResponseEventsAfter returns up to limit events of a background response
// numbered after after, in order.
func (s *Store) ResponseEventsAfter(ctx context.Context, job uuid.UUID, after, limit int) ([]ResponseEvent, error) {
	rows, err := s.pool.Query(ctx, `SELECT seq, type, data FROM response_events WHERE job_id = $1 AND seq > $2 ORDER BY seq LIMIT $3`,
		job, after, limit)
	if err != nil {
		return nil, fmt.Errorf("store: response events: %w", err)
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (ResponseEvent, error) {
		var e ResponseEvent
		err := r.Scan(&e.Seq, &e.Type, &e.Data)
		return e, err
	})
}

// RunResponsePruning drops expired response routes and the events of
// streams that ended more than streamRetention ago, every every, until ctx
// ends.
func (s *Store) RunResponsePruning(ctx context.Context, every, streamRetention time.Duration, log *slog.Logger) {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if _, err := s.PruneResponses(ctx); err != nil && ctx.Err() == nil {
			log.Warn("pruning expired response routes failed; will retry", "every", every, "err", err)
		}
		if _, err := s.pool.Exec(ctx, `DELETE FROM response_events e USING jobs j
			WHERE e.job_id = j.id AND j.finished_at < now() - make_interval(secs => $1)`, streamRetention.Seconds()); err != nil && ctx.Err() == nil {
			log.Warn("pruning streamed response events failed; will retry", "every", every, "err", err)
		}
	}
}
