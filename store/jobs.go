package store

import (
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
)

// Job statuses.
const (
	JobQueued    = "queued"
	JobRunning   = "running"
	JobSucceeded = "succeeded"
	JobFailed    = "failed"
	JobCancelled = "cancelled"
)

var (
	// ErrIdempotencyMismatch: the Idempotency-Key was used with another body.
	ErrIdempotencyMismatch = errors.New("idempotency key reused with a different request")
	// ErrJobTerminal: the job has already ended.
	ErrJobTerminal = errors.New("job has already ended")
	// ErrJobLeased: another worker holds the job.
	ErrJobLeased = errors.New("job is held by another worker")
)

// Job is a queued call and, once it ends, its outcome.
type Job struct {
	ID               uuid.UUID
	TenantID         uuid.UUID
	KeyID            uuid.UUID
	Endpoint         string
	Model            string
	Body             []byte
	Priority         string
	Status           string
	Metadata         json.RawMessage
	WebhookURL       string
	Attempts         int
	Deployment       string
	PromptTokens     int
	CompletionTokens int
	CostNanos        int64
	ResultStatus     int
	ResultBody       []byte
	ErrorCode        string
	ErrorMessage     string
	CreatedAt        time.Time
	StartedAt        *time.Time
	FinishedAt       *time.Time
	LeaseUntil       *time.Time
	// Background is a background response (POST /v1/responses with
	// background); ResponseStatus is its Response's status once it ended.
	Background     bool
	ResponseStatus string
	// BatchID is the batch a line's job belongs to (nil: none).
	BatchID *uuid.UUID
}

// Terminal reports whether the job has ended.
func (j *Job) Terminal() bool {
	return j.Status == JobSucceeded || j.Status == JobFailed || j.Status == JobCancelled
}

const jobColumns = `id, tenant_id, coalesce(key_id, '00000000-0000-0000-0000-000000000000'), endpoint, model, body, priority, status,
	metadata, coalesce(webhook_url, ''), attempts, coalesce(deployment, ''), coalesce(prompt_tokens, 0), coalesce(completion_tokens, 0),
	coalesce(cost_nanos, 0), coalesce(result_status, 0), result_body, coalesce(error_code, ''), coalesce(error_message, ''), created_at, started_at, finished_at, lease_until,
	background, coalesce(response_status, ''), batch_id`

// dest is where a row of jobColumns is scanned to.
func (j *Job) dest() []any {
	return []any{&j.ID, &j.TenantID, &j.KeyID, &j.Endpoint, &j.Model, &j.Body, &j.Priority, &j.Status,
		&j.Metadata, &j.WebhookURL, &j.Attempts, &j.Deployment, &j.PromptTokens, &j.CompletionTokens,
		&j.CostNanos, &j.ResultStatus, &j.ResultBody, &j.ErrorCode, &j.ErrorMessage, &j.CreatedAt, &j.StartedAt, &j.FinishedAt, &j.LeaseUntil,
		&j.Background, &j.ResponseStatus, &j.BatchID}
}

func scanJob(row pgx.Row) (*Job, error) {
	j := &Job{}
	err := row.Scan(j.dest()...)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, ErrNotFound
	}
	return j, err
}

// InsertJobParams describe a new job.
type InsertJobParams struct {
	TenantID       uuid.UUID
	KeyID          uuid.UUID
	Endpoint       string
	Model          string
	Body           []byte
	Priority       string
	Metadata       json.RawMessage
	WebhookURL     string
	WebhookSecret  string
	IdempotencyKey string
	// TokenCaller: KeyID is a token caller's id, with no stored key to
	// check.
	TokenCaller bool
	// Background makes it a background response.
	Background bool
	// PublishClaim holds the job back from outbox relays for a moment,
	// while the process that accepted it publishes it itself.
	PublishClaim time.Duration
}

// ErrCallerGone: the tenant was deleted or the key revoked; nothing was
// accepted.
var ErrCallerGone = errors.New("store: the tenant is deleted or the key revoked")

// InsertJob stores a queued job. With an idempotency key already used by the
// tenant it returns that job (created false), or ErrIdempotencyMismatch when
// the request differs; for a deleted tenant or a revoked key, ErrCallerGone.
func (s *Store) InsertJob(ctx context.Context, p *InsertJobParams) (*Job, bool, error) {
	h := sha256.New()
	for _, part := range [][]byte{[]byte(p.Endpoint), {0}, []byte(p.Priority), {0}, p.Body, {0}, p.Metadata, {0}, []byte(p.WebhookURL)} {
		h.Write(part)
	}
	hash := h.Sum(nil)
	id, err := uuid.NewV7()
	if err != nil {
		return nil, false, err
	}
	if len(p.Metadata) == 0 {
		p.Metadata = json.RawMessage("{}")
	}
	var key, idem, hook, hookSecret any
	if p.KeyID != uuid.Nil {
		key = p.KeyID
	}
	if p.IdempotencyKey != "" {
		idem = p.IdempotencyKey
	}
	if p.WebhookURL != "" {
		hook, hookSecret = p.WebhookURL, p.WebhookSecret
	}
	// A job is accepted only for a tenant that is not deleted and a key
	// that is not revoked. The tenant's row is share-locked: a deletion in
	// progress (which locks it for update, then cancels the tenant's jobs)
	// is waited for and then seen, so no job slips in behind it.
	j, err := scanJob(s.pool.QueryRow(ctx, `
		WITH t AS (SELECT id FROM tenants WHERE id = $2 AND deleted_at IS NULL FOR SHARE)
		INSERT INTO jobs (id, tenant_id, key_id, endpoint, model, body, body_hash, priority, status, metadata, webhook_url, idempotency_key, webhook_secret, publish_claim, background)
		SELECT $1, t.id, $3, $4, $5, $6, $7, $8, 'queued', $9, $10, $11, $12, now() + $13::interval, $15 FROM t
		WHERE $3::uuid IS NULL OR $14 OR EXISTS (SELECT 1 FROM api_keys WHERE id = $3 AND revoked_at IS NULL)
		ON CONFLICT (tenant_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
		RETURNING `+jobColumns,
		id, p.TenantID, key, p.Endpoint, p.Model, p.Body, hash, p.Priority, p.Metadata, hook, idem, hookSecret, p.PublishClaim.String(), p.TokenCaller, p.Background))
	if err == nil {
		return j, true, nil
	}
	if !errors.Is(err, ErrNotFound) {
		return nil, false, fmt.Errorf("store: insert job: %w", err)
	}
	if p.IdempotencyKey == "" {
		return nil, false, ErrCallerGone
	}
	var existing []byte
	j, err = scanJob(s.pool.QueryRow(ctx, `SELECT `+jobColumns+` FROM jobs WHERE tenant_id = $1 AND idempotency_key = $2`, p.TenantID, p.IdempotencyKey))
	if errors.Is(err, ErrNotFound) {
		return nil, false, ErrCallerGone
	}
	if err != nil {
		return nil, false, fmt.Errorf("store: idempotent job: %w", err)
	}
	if err := s.pool.QueryRow(ctx, `SELECT body_hash FROM jobs WHERE id = $1`, j.ID).Scan(&existing); err != nil {
		return nil, false, fmt.Errorf("store: idempotent job: %w", err)
	}
	if string(existing) != string(hash) {
		return j, false, ErrIdempotencyMismatch
	}
	return j, false, nil
}

// MarkPublished records that jobs' messages reached JetStream.
func (s *Store) MarkPublished(ctx context.Context, ids ...uuid.UUID) error {
	_, err := s.pool.Exec(ctx, `UPDATE jobs SET published_at = now() WHERE id = ANY($1)`, ids)
	return err
}

// ForgetPublished clears every queued job's publish mark, so they are all
// published again (after JetStream lost its stream), and says how many.
func (s *Store) ForgetPublished(ctx context.Context) (int64, error) {
	tag, err := s.pool.Exec(ctx, `UPDATE jobs SET published_at = NULL WHERE status = 'queued'`)
	if err != nil {
		return 0, fmt.Errorf("store: forget published: %w", err)
	}
	return tag.RowsAffected(), nil
}

// DeleteJob removes a tenant's ended job (a deleted background response);
// its usage stays in the ledger. ErrNotFound if there is none that ended.
func (s *Store) DeleteJob(ctx context.Context, tenant, id uuid.UUID) error {
	tag, err := s.pool.Exec(ctx, `DELETE FROM jobs WHERE id = $1 AND tenant_id = $2 AND status IN ('succeeded', 'failed', 'cancelled')`, id, tenant)
	if err != nil {
		return fmt.Errorf("store: delete job: %w", err)
	}
	if tag.RowsAffected() == 0 {
		return ErrNotFound
	}
	return nil
}

// GetJob returns a tenant's job; another tenant's id is ErrNotFound.
func (s *Store) GetJob(ctx context.Context, tenant, id uuid.UUID) (*Job, error) {
	return scanJob(s.pool.QueryRow(ctx, `SELECT `+jobColumns+` FROM jobs WHERE id = $1 AND tenant_id = $2`, id, tenant))
}

// JobByID returns any job (workers).
func (s *Store) JobByID(ctx context.Context, id uuid.UUID) (*Job, error) {
	return scanJob(s.pool.QueryRow(ctx, `SELECT `+jobColumns+` FROM jobs WHERE id = $1`, id))
}

// ListJobsParams page through a tenant's jobs, newest first.
type ListJobsParams struct {
	TenantID uuid.UUID
	Status   string
	// After is the last id of the previous page.
	After uuid.UUID
	Limit int
}

// ListJobs returns up to Limit jobs and whether more follow.
func (s *Store) ListJobs(ctx context.Context, p *ListJobsParams) ([]*Job, bool, error) {
	after := p.After
	if after == uuid.Nil {
		after = uuid.Max
	}
	rows, err := s.pool.Query(ctx, `SELECT `+jobColumns+` FROM jobs
		WHERE tenant_id = $1 AND batch_id IS NULL AND id < $2 AND ($3 = '' OR status = $3)
		ORDER BY id DESC LIMIT $4`, p.TenantID, after, p.Status, p.Limit+1)
	if err != nil {
		return nil, false, fmt.Errorf("store: list jobs: %w", err)
	}
	out, err := collectJobs(rows)
	if err != nil {
		return nil, false, err
	}
	out, more := page(out, p.Limit)
	return out, more, nil
}

// CancelJob cancels a tenant's job unless it has ended. A queued job is never
// started after this returns: starting requires the queued (or running)
// status this sets aside.
func (s *Store) CancelJob(ctx context.Context, tenant, id uuid.UUID) (*Job, error) {
	_, err := s.pool.Exec(ctx, `WITH j AS (UPDATE jobs SET status = 'cancelled', finished_at = now(), lease_until = NULL
		WHERE id = $1 AND tenant_id = $2 AND `+isOpen+`
		RETURNING id, tenant_id, webhook_url, webhook_secret, batch_id, status, background, response_status), e AS (`+jobEventSQL+`) SELECT 1`, id, tenant)
	if err != nil {
		return nil, fmt.Errorf("store: cancel job: %w", err)
	}
	return s.GetJob(ctx, tenant, id)
}

// The states a statement on one job (by id) requires are tested in a CASE,
// which the planner cannot read as the predicate of the partial indexes on
// open jobs (jobs_open, jobs_unpublished). Written plainly, with statistics
// taken before a backlog arrived (autovacuum analyzes a 10M-row table only
// after a million changes), the planner took such an index for these
// lookups and read every open job for each: 45 ms a claim on a full
// database with a fresh backlog (make bench-scale). By the primary key it
// is one row, whatever the statistics say.
const (
	isOpen      = `(CASE WHEN status IN ('queued', 'running') THEN true ELSE false END)`
	isRunning   = `(CASE WHEN status = 'running' THEN true ELSE false END)`
	isClaimable = `(CASE WHEN status = 'queued' THEN true WHEN status = 'running' THEN lease_until < now() ELSE false END)`
)

// StartJob claims a job for one attempt, holding it until lease. It fails
// with ErrJobTerminal when the job has ended and ErrJobLeased while another
// worker's lease is live.
func (s *Store) StartJob(ctx context.Context, id uuid.UUID, lease time.Duration) (*Job, error) {
	j, err := scanJob(s.pool.QueryRow(ctx, `UPDATE jobs SET status = 'running', attempts = attempts + 1,
			started_at = coalesce(started_at, now()), lease_until = now() + $2::interval
		WHERE id = $1 AND `+isClaimable+`
		RETURNING `+jobColumns, id, lease.String()))
	if err == nil {
		return j, nil
	}
	if !errors.Is(err, ErrNotFound) {
		return nil, fmt.Errorf("store: start job: %w", err)
	}
	cur, err := s.JobByID(ctx, id)
	if err != nil {
		return nil, err
	}
	if cur.Terminal() {
		return cur, ErrJobTerminal
	}
	return cur, ErrJobLeased
}

// ExtendLease keeps a long-running job held. It reports false when the job
// is no longer running (cancelled meanwhile).
func (s *Store) ExtendLease(ctx context.Context, id uuid.UUID, lease time.Duration) (bool, error) {
	tag, err := s.pool.Exec(ctx, `UPDATE jobs SET lease_until = now() + $2::interval WHERE id = $1 AND `+isRunning, id, lease.String())
	if err != nil {
		return false, err
	}
	return tag.RowsAffected() == 1, nil
}

// RequeueJob returns a running job to the queue (its message was nak'ed).
// countAttempt false takes back the attempt StartJob counted, for waits that
// were not the job's fault (no capacity, shutdown).
func (s *Store) RequeueJob(ctx context.Context, id uuid.UUID, countAttempt bool) error {
	dec := 1
	if countAttempt {
		dec = 0
	}
	_, err := s.pool.Exec(ctx, `UPDATE jobs SET status = 'queued', lease_until = NULL, attempts = attempts - $2
		WHERE id = $1 AND `+isRunning, id, dec)
	return err
}

// FinishJobParams are a job's outcome.
type FinishJobParams struct {
	ID               uuid.UUID
	Status           string // succeeded or failed
	Deployment       string
	ResultStatus     int
	ResultBody       []byte
	ErrorCode        string
	ErrorMessage     string
	PromptTokens     int
	CompletionTokens int
	CostNanos        int64
	Latency          time.Duration
	Attempts         int
	// ResponseStatus is a background response's own status (completed,
	// incomplete, failed), for its state and its webhook event.
	ResponseStatus string
}

// FinishJob records an outcome exactly once: one statement ends the job only
// if it is still running and, only from the row that update returns, writes
// its usage row and its rollup. A single statement is atomic, and costs one
// round trip. It returns false when the job had already ended (a redelivery,
// or a cancel that came first): nothing is written then.
func (s *Store) FinishJob(ctx context.Context, p *FinishJobParams) (bool, error) {
	status := p.ResultStatus
	if status == 0 && p.Status == JobFailed {
		status = 502
	}
	isErr := 0
	if status >= 400 {
		isErr = 1
	}
	var n int
	err := s.pool.QueryRow(ctx, `
		WITH j AS (
			UPDATE jobs SET status = $2, deployment = nullif($3, ''), result_status = nullif($4, 0), result_body = $5,
				error_code = nullif($6, ''), error_message = nullif($7, ''), prompt_tokens = $8, completion_tokens = $9,
				cost_nanos = $14, finished_at = now(), lease_until = NULL, response_status = nullif($15, '')
			WHERE id = $1 AND `+isRunning+`
			RETURNING id, tenant_id, key_id, model, endpoint, priority, finished_at, webhook_url, webhook_secret, batch_id, status, background, response_status
		), e AS (`+jobEventSQL+`), u AS (
			INSERT INTO usage_events (created_at, request_id, tenant_id, key_id, deployment, model, operation,
				status, prompt_tokens, completion_tokens, latency_us, priority, attempts, cost_nanos)
			SELECT finished_at, 'job_' || id, tenant_id, key_id, $3, model, endpoint, $10, $8, $9, $11, priority, $12, $14 FROM j
		), r AS (
			INSERT INTO usage_daily (tenant_id, day, model, key_id, deployment, requests, errors, prompt_tokens, completion_tokens, cost_nanos)
			SELECT tenant_id, (finished_at AT TIME ZONE 'UTC')::date, model, coalesce(key_id, '00000000-0000-0000-0000-000000000000'), $3, 1, $13, $8, $9, $14 FROM j
			ON CONFLICT (tenant_id, day, model, key_id, deployment) DO UPDATE SET
				requests = usage_daily.requests + 1,
				errors = usage_daily.errors + EXCLUDED.errors,
				prompt_tokens = usage_daily.prompt_tokens + EXCLUDED.prompt_tokens,
				completion_tokens = usage_daily.completion_tokens + EXCLUDED.completion_tokens,
				cost_nanos = usage_daily.cost_nanos + EXCLUDED.cost_nanos
		)
		SELECT count(*) FROM j`,
		p.ID, p.Status, p.Deployment, p.ResultStatus, p.ResultBody, p.ErrorCode, p.ErrorMessage, p.PromptTokens, p.CompletionTokens,
		status, p.Latency.Microseconds(), max(p.Attempts, 1), isErr, p.CostNanos, p.ResponseStatus).Scan(&n)
	if err != nil {
		return false, fmt.Errorf("store: finish job: %w", err)
	}
	return n == 1, nil
}

// jobEventSQL emits the webhook event of the jobs in CTE j (not a batch's
// lines: batches have their own events), only when someone will receive it,
// and its deliveries: to the job's own webhook.url if it has one, else to
// the tenant's matching endpoints.
// It runs inside the statement that ends the job, so the outbox row exists
// exactly when the job has ended.
const jobEventSQL = `
	INSERT INTO webhook_events (id, tenant_id, type, data)
	SELECT gen_random_uuid(), j.tenant_id, j.event, j.data FROM (
		-- A background response's events are OpenAI's: response.completed,
		-- incomplete, failed or cancelled, naming the response.
		SELECT j.*, CASE WHEN j.background THEN 'response.' || CASE j.status
				WHEN 'succeeded' THEN coalesce(j.response_status, 'completed') WHEN 'failed' THEN 'failed' ELSE 'cancelled' END
			ELSE 'job.' || j.status END AS event,
			CASE WHEN j.background THEN jsonb_build_object('id', 'resp_lv' || replace(j.id::text, '-', ''))
			ELSE jsonb_build_object('id', 'job_' || j.id, 'status', j.status) END AS data
		FROM j) j
	WHERE j.batch_id IS NULL AND (j.webhook_url IS NOT NULL OR EXISTS (
		SELECT 1 FROM webhook_endpoints we WHERE we.tenant_id = j.tenant_id AND we.enabled
			AND (cardinality(we.events) = 0 OR j.event = ANY (we.events))))
	RETURNING id, tenant_id, type
), d AS (
	INSERT INTO webhook_deliveries (id, event_id, tenant_id, endpoint_id, url, secret)
	SELECT gen_random_uuid(), e.id, e.tenant_id, NULL, j.webhook_url, j.webhook_secret FROM e, j WHERE j.webhook_url IS NOT NULL
	UNION ALL
	SELECT gen_random_uuid(), e.id, e.tenant_id, we.id, we.url, NULL FROM e, j, webhook_endpoints we
	WHERE j.webhook_url IS NULL AND we.tenant_id = e.tenant_id AND we.enabled AND (cardinality(we.events) = 0 OR e.type = ANY (we.events))`

// ClaimUnpublished takes up to limit queued jobs whose publish is not
// confirmed and whose claim has passed — accepted while NATS was away, or by
// a process that died before publishing — and claims them for claim, so
// concurrent relays take different ones. A relay that fails to publish
// leaves them to be claimed again when the claim passes.
func (s *Store) ClaimUnpublished(ctx context.Context, limit int, claim time.Duration) ([]*Job, error) {
	rows, err := s.pool.Query(ctx, `UPDATE jobs SET publish_claim = now() + $2::interval WHERE id IN (
			SELECT id FROM jobs WHERE status = 'queued' AND published_at IS NULL AND publish_claim <= now()
			ORDER BY publish_claim LIMIT $1 FOR UPDATE SKIP LOCKED)
		RETURNING id, tenant_id, priority, model`, limit, claim.String())
	if err != nil {
		return nil, fmt.Errorf("store: claim unpublished jobs: %w", err)
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (*Job, error) {
		j := &Job{}
		return j, r.Scan(&j.ID, &j.TenantID, &j.Priority, &j.Model)
	})
}

// SweepJobs finds running jobs whose message may be missing: held by a
// worker whose lease ran out long ago (JetStream would have redelivered a
// message it still had). It stamps them, so concurrent sweepers do not take
// the same ones, and an unconfirmed republish is tried again after
// olderThan. Queued jobs are the outbox relay's (ClaimUnpublished).
func (s *Store) SweepJobs(ctx context.Context, olderThan time.Duration, limit int) ([]*Job, error) {
	rows, err := s.pool.Query(ctx, `UPDATE jobs SET published_at = now() WHERE id IN (
			SELECT id FROM jobs
			WHERE status = 'running' AND lease_until < now() - $1::interval AND coalesce(published_at, created_at) < now() - $1::interval
			ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED)
		RETURNING `+jobColumns, olderThan.String(), limit)
	if err != nil {
		return nil, fmt.Errorf("store: sweep jobs: %w", err)
	}
	return collectJobs(rows)
}

// page trims a query's limit+1 rows to limit and says whether more follow.
func page[T any](rows []T, limit int) ([]T, bool) {
	if len(rows) > limit {
		return rows[:limit], true
	}
	return rows, false
}

func collectJobs(rows pgx.Rows) ([]*Job, error) {
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (*Job, error) { return scanJob(r) })
}

// QueueStat is the open work of one priority.
type QueueStat struct {
	Priority string
	Model    string
	Tenant   string // the tenant's name
	Queued   int64
	Running  int64
	Oldest   *time.Time
}

// QueueStats summarizes open jobs by priority, model and tenant (for
// metrics).
func (s *Store) QueueStats(ctx context.Context) ([]QueueStat, error) {
	rows, err := s.pool.Query(ctx, `SELECT q.priority, q.model, coalesce(t.name, q.tenant_id::text), q.queued, q.running, q.oldest FROM (
		SELECT priority, model, tenant_id, count(*) FILTER (WHERE status = 'queued') AS queued, count(*) FILTER (WHERE status = 'running') AS running,
			min(created_at) FILTER (WHERE status = 'queued') AS oldest
		FROM jobs WHERE status IN ('queued', 'running') GROUP BY priority, model, tenant_id) q LEFT JOIN tenants t ON t.id = q.tenant_id`)
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (QueueStat, error) {
		var q QueueStat
		err := r.Scan(&q.Priority, &q.Model, &q.Tenant, &q.Queued, &q.Running, &q.Oldest)
		return q, err
	})
}
