package store

import (
	"context"
	"errors"
	"fmt"
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
// response id recorded again (the same id from a retried write) keeps its
// first tenant: an id is never handed from one tenant to another.
func (s *Store) RecordResponse(ctx context.Context, r *ResponseRoute, ttl time.Duration) error {
	_, err := s.pool.Exec(ctx, `INSERT INTO response_routes (id, tenant_id, deployment, context_tokens, expires_at, upstream_id)
		VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5), nullif($6, ''))
		ON CONFLICT (id) DO UPDATE SET context_tokens = EXCLUDED.context_tokens, expires_at = EXCLUDED.expires_at
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
