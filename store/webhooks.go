package store

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
)

// WebhookEndpoint is a tenant's receiver of events.
type WebhookEndpoint struct {
	ID             uuid.UUID
	TenantID       uuid.UUID
	URL            string
	Secret         string
	OldSecret      string
	OldSecretUntil *time.Time
	Events         []string
	Enabled        bool
	DisabledReason string
	CreatedAt      time.Time
}

const endpointColumns = `id, tenant_id, url, secret, coalesce(old_secret, ''), old_secret_until, events, enabled, coalesce(disabled_reason, ''), created_at`

func scanEndpoint(row pgx.Row) (*WebhookEndpoint, error) {
	e := &WebhookEndpoint{}
	err := row.Scan(&e.ID, &e.TenantID, &e.URL, &e.Secret, &e.OldSecret, &e.OldSecretUntil, &e.Events, &e.Enabled, &e.DisabledReason, &e.CreatedAt)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, ErrNotFound
	}
	return e, err
}

// CreateWebhookEndpoint stores an endpoint with its secret.
func (s *Store) CreateWebhookEndpoint(ctx context.Context, tenant uuid.UUID, url, secret string, events []string) (*WebhookEndpoint, error) {
	id, _ := uuid.NewV7()
	if events == nil {
		events = []string{}
	}
	return scanEndpoint(s.pool.QueryRow(ctx, `INSERT INTO webhook_endpoints (id, tenant_id, url, secret, events) VALUES ($1, $2, $3, $4, $5)
		RETURNING `+endpointColumns, id, tenant, url, secret, events))
}

// WebhookEndpoints lists a tenant's endpoints.
func (s *Store) WebhookEndpoints(ctx context.Context, tenant uuid.UUID) ([]*WebhookEndpoint, error) {
	rows, err := s.pool.Query(ctx, `SELECT `+endpointColumns+` FROM webhook_endpoints WHERE tenant_id = $1 ORDER BY id`, tenant)
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (*WebhookEndpoint, error) { return scanEndpoint(r) })
}

// GetWebhookEndpoint returns a tenant's endpoint.
func (s *Store) GetWebhookEndpoint(ctx context.Context, tenant, id uuid.UUID) (*WebhookEndpoint, error) {
	return scanEndpoint(s.pool.QueryRow(ctx, `SELECT `+endpointColumns+` FROM webhook_endpoints WHERE id = $1 AND tenant_id = $2`, id, tenant))
}

// UpdateWebhookEndpoint enables or disables an endpoint and/or sets its
// event filter (nil leaves it).
func (s *Store) UpdateWebhookEndpoint(ctx context.Context, tenant, id uuid.UUID, enabled *bool, events []string) (*WebhookEndpoint, error) {
	return scanEndpoint(s.pool.QueryRow(ctx, `UPDATE webhook_endpoints SET enabled = coalesce($3, enabled), events = coalesce($4, events),
		disabled_reason = CASE WHEN coalesce($3, enabled) THEN NULL ELSE coalesce(disabled_reason, 'disabled by the tenant') END
		WHERE id = $1 AND tenant_id = $2 RETURNING `+endpointColumns, id, tenant, enabled, events))
}

// RotateWebhookSecret sets a new secret; the old one keeps signing too
// (both signatures are sent) for the given overlap.
func (s *Store) RotateWebhookSecret(ctx context.Context, tenant, id uuid.UUID, secret string, overlap time.Duration) (*WebhookEndpoint, error) {
	return scanEndpoint(s.pool.QueryRow(ctx, `UPDATE webhook_endpoints SET old_secret = secret, old_secret_until = now() + $4::interval, secret = $3
		WHERE id = $1 AND tenant_id = $2 RETURNING `+endpointColumns, id, tenant, secret, overlap.String()))
}

// DeleteWebhookEndpoint removes an endpoint and its deliveries.
func (s *Store) DeleteWebhookEndpoint(ctx context.Context, tenant, id uuid.UUID) error {
	tag, err := s.pool.Exec(ctx, `DELETE FROM webhook_endpoints WHERE id = $1 AND tenant_id = $2`, id, tenant)
	if err == nil && tag.RowsAffected() == 0 {
		return ErrNotFound
	}
	return err
}

// Delivery is one event on its way to one target.
type Delivery struct {
	ID          uuid.UUID
	EventID     uuid.UUID
	TenantID    uuid.UUID
	EndpointID  *uuid.UUID
	URL         string
	Status      string
	Attempts    int
	NextAttempt time.Time
	LastStatus  int
	LastError   string
	CreatedAt   time.Time
	DeliveredAt *time.Time
	// For sending: the event and the secrets to sign with.
	Type      string
	Data      []byte
	EventAt   time.Time
	Secrets   []string
	Attempted []DeliveryAttempt
}

// DeliveryAttempt is one try.
type DeliveryAttempt struct {
	Attempt    int
	At         time.Time
	StatusCode int
	Error      string
	Duration   time.Duration
}

const deliveryColumns = `d.id, d.event_id, d.tenant_id, d.endpoint_id, d.url, d.status, d.attempts, d.next_attempt_at, coalesce(d.last_status, 0),
	coalesce(d.last_error, ''), d.created_at, d.delivered_at, ev.type, ev.data::text, ev.created_at,
	array_remove(ARRAY[coalesce(d.secret, we.secret), CASE WHEN we.old_secret_until > now() THEN we.old_secret END], NULL)`

func scanDelivery(row pgx.Row) (*Delivery, error) {
	d := &Delivery{}
	var data string
	err := row.Scan(&d.ID, &d.EventID, &d.TenantID, &d.EndpointID, &d.URL, &d.Status, &d.Attempts, &d.NextAttempt, &d.LastStatus,
		&d.LastError, &d.CreatedAt, &d.DeliveredAt, &d.Type, &data, &d.EventAt, &d.Secrets)
	d.Data = []byte(data)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, ErrNotFound
	}
	return d, err
}

// ClaimDeliveries takes up to limit due deliveries, holding each for lease
// (pushing its next attempt out), so several senders never take the same.
func (s *Store) ClaimDeliveries(ctx context.Context, limit int, lease time.Duration) ([]*Delivery, error) {
	rows, err := s.pool.Query(ctx, `WITH c AS (
			UPDATE webhook_deliveries SET next_attempt_at = now() + $2::interval WHERE id IN (
				SELECT id FROM webhook_deliveries WHERE status = 'pending' AND next_attempt_at <= now()
				ORDER BY next_attempt_at LIMIT $1 FOR UPDATE SKIP LOCKED)
			RETURNING *)
		SELECT `+deliveryColumns+` FROM c d JOIN webhook_events ev ON ev.id = d.event_id
		LEFT JOIN webhook_endpoints we ON we.id = d.endpoint_id`, limit, lease.String())
	if err != nil {
		return nil, fmt.Errorf("store: claim deliveries: %w", err)
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (*Delivery, error) { return scanDelivery(r) })
}

// AttemptResult is what one try of a delivery came to.
type AttemptResult struct {
	StatusCode int
	Error      string
	Duration   time.Duration
	// Outcome: "delivered", "failed" (final) or "retry" at Next.
	Outcome string
	Next    time.Time
	// DisableEndpoint: the receiver answered 410 Gone.
	DisableEndpoint bool
}

// RecordAttempt stores a try and its consequence, in one transaction.
func (s *Store) RecordAttempt(ctx context.Context, d *Delivery, r *AttemptResult) error {
	return pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		var n int
		if err := tx.QueryRow(ctx, `UPDATE webhook_deliveries SET attempts = attempts + 1, last_status = nullif($2, 0), last_error = nullif($3, ''),
				status = CASE $4 WHEN 'retry' THEN 'pending' ELSE $4 END, next_attempt_at = $5,
				delivered_at = CASE WHEN $4 = 'delivered' THEN now() END
			WHERE id = $1 RETURNING attempts`, d.ID, r.StatusCode, r.Error, r.Outcome, r.Next).Scan(&n); err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, `INSERT INTO webhook_attempts (delivery_id, attempt, status_code, error, duration_us) VALUES ($1, $2, nullif($3, 0), nullif($4, ''), $5)`,
			d.ID, n, r.StatusCode, r.Error, r.Duration.Microseconds()); err != nil {
			return err
		}
		if r.DisableEndpoint && d.EndpointID != nil {
			_, err := tx.Exec(ctx, `UPDATE webhook_endpoints SET enabled = false, disabled_reason = 'the receiver answered 410 Gone' WHERE id = $1`, *d.EndpointID)
			return err
		}
		return nil
	})
}

// EndpointDeliveries lists an endpoint's deliveries, newest first, with attempts.
func (s *Store) EndpointDeliveries(ctx context.Context, tenant, endpoint uuid.UUID, limit int) ([]*Delivery, error) {
	rows, err := s.pool.Query(ctx, `SELECT `+deliveryColumns+` FROM webhook_deliveries d JOIN webhook_events ev ON ev.id = d.event_id
		LEFT JOIN webhook_endpoints we ON we.id = d.endpoint_id WHERE d.endpoint_id = $1 AND d.tenant_id = $2 ORDER BY d.created_at DESC LIMIT $3`, endpoint, tenant, limit)
	if err != nil {
		return nil, err
	}
	ds, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (*Delivery, error) { return scanDelivery(r) })
	if err != nil {
		return nil, err
	}
	for _, d := range ds {
		arows, err := s.pool.Query(ctx, `SELECT attempt, at, coalesce(status_code, 0), coalesce(error, ''), duration_us FROM webhook_attempts WHERE delivery_id = $1 ORDER BY attempt`, d.ID)
		if err != nil {
			return nil, err
		}
		d.Attempted, err = pgx.CollectRows(arows, func(r pgx.CollectableRow) (DeliveryAttempt, error) {
			var a DeliveryAttempt
			var us int64
			err := r.Scan(&a.Attempt, &a.At, &a.StatusCode, &a.Error, &us)
			a.Duration = time.Duration(us) * time.Microsecond
			return a, err
		})
		if err != nil {
			return nil, err
		}
	}
	return ds, nil
}

// ResendDelivery queues a delivery again, now (same event, same webhook-id).
func (s *Store) ResendDelivery(ctx context.Context, tenant, id uuid.UUID) error {
	tag, err := s.pool.Exec(ctx, `UPDATE webhook_deliveries SET status = 'pending', next_attempt_at = now() WHERE id = $1 AND tenant_id = $2`, id, tenant)
	if err == nil && tag.RowsAffected() == 0 {
		return ErrNotFound
	}
	return err
}
