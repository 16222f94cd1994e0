package store

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
)

// ResponseRoute says which deployment holds a stored response, and whose it
// is.
type ResponseRoute struct {
	ID            string
	TenantID      uuid.UUID
	Deployment    string
	ContextTokens int
	ExpiresAt     time.Time
}

// RecordResponse remembers where a response is stored until ttl passes. A
// response id recorded again (the same id from a retried write) keeps its
// first tenant: an id is never handed from one tenant to another.
func (s *Store) RecordResponse(ctx context.Context, r *ResponseRoute, ttl time.Duration) error {
	_, err := s.pool.Exec(ctx, `INSERT INTO response_routes (id, tenant_id, deployment, context_tokens, expires_at)
		VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5))
		ON CONFLICT (id) DO UPDATE SET context_tokens = EXCLUDED.context_tokens, expires_at = EXCLUDED.expires_at
			WHERE response_routes.tenant_id = EXCLUDED.tenant_id`,
		r.ID, r.TenantID, r.Deployment, r.ContextTokens, ttl.Seconds())
	if err != nil {
		return fmt.Errorf("store: record response: %w", err)
	}
	return nil
}

// ResponseRouteOf finds where tenant's response id is stored; another
// tenant's id, an unknown one and an expired one are all ErrNotFound.
func (s *Store) ResponseRouteOf(ctx context.Context, tenant uuid.UUID, id string) (*ResponseRoute, error) {
	r := &ResponseRoute{ID: id}
	err := s.pool.QueryRow(ctx, `SELECT tenant_id, deployment, context_tokens, expires_at FROM response_routes
		WHERE id = $1 AND tenant_id = $2 AND expires_at > now()`, id, tenant).Scan(&r.TenantID, &r.Deployment, &r.ContextTokens, &r.ExpiresAt)
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
