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

// InsertedJob is the outcome of one job of InsertJobs.
type InsertedJob struct {
	Job *Job
	// Created is false for a job accepted earlier under the same
	// Idempotency-Key (Job is that job).
	Created bool
	// Err is ErrIdempotencyMismatch or ErrCallerGone, or nil.
	Err error
}

// InsertJob stores a queued job. With an idempotency key already used by the
// tenant it returns that job (created false), or ErrIdempotencyMismatch when
// the request differs; for a deleted tenant or a revoked key, ErrCallerGone.
// Concurrent calls share one statement (see groupCommit).
func (s *Store) InsertJob(ctx context.Context, p *InsertJobParams) (*Job, bool, error) {
	if err := ctx.Err(); err != nil {
		return nil, false, err
	}
	r, err := s.inserts.do(ctx, p)
	if err != nil {
		return nil, false, err
	}
	return r.Job, r.Created, r.Err
}

// InsertJobs stores jobs in one statement (a bulk submit) and returns their
// outcomes in order, each as InsertJob's. It is all or nothing: when any
// job has an Err (a reused Idempotency-Key, a caller gone), none is stored,
// and the outcomes say which.
func (s *Store) InsertJobs(ctx context.Context, ps []*InsertJobParams) ([]InsertedJob, bool, error) {
	tx, err := s.pool.Begin(ctx)
	if err != nil {
		return nil, false, fmt.Errorf("store: insert jobs: %w", err)
	}
	defer func() { _ = tx.Rollback(context.WithoutCancel(ctx)) }()
	out, err := insertJobs(ctx, tx, ps)
	if err != nil {
		return nil, false, err
	}
	for _, r := range out {
		if r.Err != nil {
			return out, false, nil
		}
	}
	if err := tx.Commit(ctx); err != nil {
		return nil, false, fmt.Errorf("store: insert jobs: %w", err)
	}
	return out, true, nil
}

// querier is a pool or a transaction.
type querier interface {
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

func (s *Store) insertJobs(ctx context.Context, ps []*InsertJobParams) ([]InsertedJob, error) {
	return insertJobs(ctx, s.pool, ps)
}

func insertJobs(ctx context.Context, q querier, ps []*InsertJobParams) ([]InsertedJob, error) {
	n := len(ps)
	var (
		ids, tenants                                 = make([][16]byte, n), make([][16]byte, n)
		keys, endpoints, models, prios, metas, hooks = make([]string, n), make([]string, n), make([]string, n), make([]string, n), make([]string, n), make([]string, n)
		idems, secrets, claims                       = make([]string, n), make([]string, n), make([]string, n)
		bodies, hashes                               = make([][]byte, n), make([][]byte, n)
		tokenCallers, background                     = make([]bool, n), make([]bool, n)
	)
	for i, p := range ps {
		h := sha256.New()
		for _, part := range [][]byte{[]byte(p.Endpoint), {0}, []byte(p.Priority), {0}, p.Body, {0}, p.Metadata, {0}, []byte(p.WebhookURL)} {
			h.Write(part)
		}
		hashes[i] = h.Sum(nil)
		id, err := uuid.NewV7()
		if err != nil {
			return nil, err
		}
		ids[i], tenants[i] = id, p.TenantID // as [16]byte: pgx encodes uuid.UUID through its string
		if p.KeyID != uuid.Nil {
			keys[i] = p.KeyID.String()
		}
		endpoints[i], models[i], bodies[i], prios[i] = p.Endpoint, p.Model, p.Body, p.Priority
		metas[i] = "{}"
		if len(p.Metadata) > 0 {
			metas[i] = string(p.Metadata)
		}
		if p.WebhookURL != "" {
			hooks[i], secrets[i] = p.WebhookURL, p.WebhookSecret
		}
		idems[i], claims[i] = p.IdempotencyKey, p.PublishClaim.String()
		tokenCallers[i], background[i] = p.TokenCaller, p.Background
	}
	// A job is accepted only for a tenant that is not deleted and a key
	// that is not revoked. The tenants' rows are share-locked: a deletion
	// in progress (which locks its tenant for update, then cancels the
	// tenant's jobs) is waited for and then seen, so no job slips in
	// behind it. Two jobs of one statement under one Idempotency-Key are
	// one job: the second is skipped, and found below.
	rows, err := q.Query(ctx, `
		WITH p AS (
			SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::bytea[], $7::bytea[], $8::text[],
				$9::text[], $10::text[], $11::text[], $12::text[], $13::text[], $14::bool[], $15::bool[])
			AS p(id, tenant_id, key_id, endpoint, model, body, body_hash, priority, metadata, webhook_url, idempotency_key, webhook_secret,
				publish_claim, token_caller, background)
		), t AS (
			SELECT id FROM tenants WHERE id IN (SELECT tenant_id FROM p) AND deleted_at IS NULL ORDER BY id FOR SHARE
		)
		INSERT INTO jobs (id, tenant_id, key_id, endpoint, model, body, body_hash, priority, status, metadata, webhook_url, idempotency_key, webhook_secret, publish_claim, background)
		SELECT p.id, p.tenant_id, nullif(p.key_id, '')::uuid, p.endpoint, p.model, p.body, p.body_hash, p.priority, 'queued', p.metadata::jsonb,
			nullif(p.webhook_url, ''), nullif(p.idempotency_key, ''), nullif(p.webhook_secret, ''), now() + p.publish_claim::interval, p.background
		FROM p JOIN t ON t.id = p.tenant_id
		WHERE p.key_id = '' OR p.token_caller OR EXISTS (SELECT 1 FROM api_keys k WHERE k.id = nullif(p.key_id, '')::uuid AND k.revoked_at IS NULL)
		ORDER BY p.id
		ON CONFLICT (tenant_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
		RETURNING `+jobColumns,
		ids, tenants, keys, endpoints, models, bodies, hashes, prios, metas, hooks, idems, secrets, claims, tokenCallers, background)
	if err != nil {
		return nil, fmt.Errorf("store: insert jobs: %w", err)
	}
	inserted, err := collectJobs(rows)
	if err != nil {
		return nil, fmt.Errorf("store: insert jobs: %w", err)
	}
	byID := make(map[uuid.UUID]*Job, len(inserted))
	for _, j := range inserted {
		byID[j.ID] = j
	}
	out := make([]InsertedJob, n)
	for i, p := range ps {
		if j := byID[uuid.UUID(ids[i])]; j != nil {
			out[i] = InsertedJob{Job: j, Created: true}
			continue
		}
		if p.IdempotencyKey == "" {
			out[i].Err = ErrCallerGone
			continue
		}
		j, err := idempotentJob(ctx, q, p.TenantID, p.IdempotencyKey, hashes[i])
		if err != nil && !errors.Is(err, ErrIdempotencyMismatch) && !errors.Is(err, ErrCallerGone) {
			return nil, err
		}
		out[i] = InsertedJob{Job: j, Err: err}
	}
	return out, nil
}

// idempotentJob is the job a tenant accepted earlier under an Idempotency-Key:
// ErrIdempotencyMismatch (with the job) when its request hashed otherwise,
// ErrCallerGone when there is none (the insert was refused for its caller).
func idempotentJob(ctx context.Context, q querier, tenant uuid.UUID, key string, hash []byte) (*Job, error) {
	var existing []byte
	j := &Job{}
	err := q.QueryRow(ctx, `SELECT `+jobColumns+`, body_hash FROM jobs WHERE tenant_id = $1 AND idempotency_key = $2`, tenant, key).
		Scan(append(j.dest(), &existing)...)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, ErrCallerGone
	}
	if err != nil {
		return nil, fmt.Errorf("store: idempotent job: %w", err)
	}
	if string(existing) != string(hash) {
		return j, ErrIdempotencyMismatch
	}
	return j, nil
}

// MarkPublished records that jobs' messages reached JetStream.
func (s *Store) MarkPublished(ctx context.Context, ids ...uuid.UUID) error {
	// A job that started meanwhile was marked by its start (StartJob): not
	// writing it again spares a row version and its index entries.
	_, err := s.pool.Exec(ctx, `UPDATE jobs SET published_at = now()
		WHERE id = ANY($1) AND (CASE WHEN status = 'queued' THEN published_at IS NULL ELSE false END)`, rawUUIDs(ids))
	return err
}

// rawUUIDs are ids as pgx encodes fastest: uuid.UUID goes through its
// string form (driver.Valuer), [16]byte straight to binary.
func rawUUIDs(ids []uuid.UUID) [][16]byte {
	out := make([][16]byte, len(ids))
	for i, id := range ids {
		out[i] = id
	}
	return out
}

// ForgetPublished clears every queued job's publish mark, so they are all
// published again (after JetStream lost its stream), and says how many.
// This process's marks not yet written were of messages in the lost stream:
// they are dropped, and none is written while this runs.
func (s *Store) ForgetPublished(ctx context.Context) (int64, error) {
	s.markMu.Lock()
	defer s.markMu.Unlock()
	s.markEpoch.Add(1)
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
		RETURNING id, tenant_id, webhook_url, webhook_secret, batch_id, status, background, response_status), ev AS MATERIALIZED (`+jobEventSQL+`) SELECT 1`, id, tenant)
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
// worker's lease is live. Concurrent calls share one statement.
func (s *Store) StartJob(ctx context.Context, id uuid.UUID, lease time.Duration) (*Job, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	r, err := s.starts.do(ctx, startCall{id: id, lease: lease})
	if err != nil {
		return nil, fmt.Errorf("store: start job: %w", err)
	}
	return r.job, r.err
}

type startCall struct {
	id    uuid.UUID
	lease time.Duration
}

type started struct {
	job *Job
	err error
}

func (s *Store) startJobs(ctx context.Context, in []startCall) ([]started, error) {
	out := make([]started, len(in))
	// No job is in one statement twice (s.starts is keyed by job): two
	// deliveries of one job would both seem to claim it.
	ids, leases := make([][16]byte, len(in)), make([]string, len(in))
	at := make(map[uuid.UUID]int, len(in))
	for i, c := range in {
		at[c.id] = i
		ids[i], leases[i] = c.id, c.lease.String()
	}
	// A started job's message was published: its start is its publish
	// mark too, so most jobs need no separate mark (MarkPublishedSoon).
	rows, err := s.pool.Query(ctx, `UPDATE jobs SET status = 'running', attempts = attempts + 1,
			started_at = coalesce(started_at, now()), lease_until = now() + p.lease::interval, published_at = coalesce(published_at, now())
		FROM unnest($1::uuid[], $2::text[]) AS p(job_id, lease)
		WHERE jobs.id = ANY($1) AND jobs.id = p.job_id AND `+isClaimable+`
		RETURNING `+jobColumns, ids, leases)
	if err != nil {
		return nil, err
	}
	claimed, err := collectJobs(rows)
	if err != nil {
		return nil, err
	}
	for _, j := range claimed {
		out[at[j.ID]].job = j
		delete(at, j.ID)
	}
	if len(at) > 0 {
		// Not claimed: ended, leased by a live worker, or gone.
		rest := make([][16]byte, 0, len(at))
		for id := range at {
			rest = append(rest, id)
		}
		rows, err := s.pool.Query(ctx, `SELECT `+jobColumns+` FROM jobs WHERE id = ANY($1)`, rest)
		if err != nil {
			return nil, err
		}
		cur, err := collectJobs(rows)
		if err != nil {
			return nil, err
		}
		for _, j := range cur {
			i := at[j.ID]
			out[i].job, out[i].err = j, ErrJobLeased
			if j.Terminal() {
				out[i].err = ErrJobTerminal
			}
			delete(at, j.ID)
		}
		for _, i := range at {
			out[i].err = ErrNotFound
		}
	}
	return out, nil
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
// its usage row and its rollup. A single statement is atomic. It returns
// false when the job had already ended (a redelivery, or a cancel that came
// first): nothing is written then. Concurrent calls share one statement,
// whose rollup adds each (tenant, day, model, key, deployment) once.
func (s *Store) FinishJob(ctx context.Context, p *FinishJobParams) (bool, error) {
	if err := ctx.Err(); err != nil {
		return false, err
	}
	applied, err := s.finishes.do(ctx, p)
	if err != nil {
		return false, fmt.Errorf("store: finish job: %w", err)
	}
	return applied, nil
}

func (s *Store) finishJobs(ctx context.Context, ps []*FinishJobParams) ([]bool, error) {
	n := len(ps)
	var (
		ids                                                  = make([][16]byte, 0, n)
		statuses, deployments, codes, messages, respStatuses = make([]string, 0, n), make([]string, 0, n), make([]string, 0, n), make([]string, 0, n), make([]string, 0, n)
		resultStatuses, prompts, completions, httpStatuses   = make([]int32, 0, n), make([]int32, 0, n), make([]int32, 0, n), make([]int32, 0, n)
		attempts, isErr                                      = make([]int32, 0, n), make([]int32, 0, n)
		latencies, costs                                     = make([]int64, 0, n), make([]int64, 0, n)
		bodies                                               = make([][]byte, 0, n)
		at                                                   = make(map[uuid.UUID]int, n)
	)
	for i, p := range ps {
		// No job is in one statement twice (s.finishes is keyed by job):
		// a second outcome of one job must not seem applied too.
		at[p.ID] = i
		status := p.ResultStatus
		if status == 0 && p.Status == JobFailed {
			status = 502
		}
		e := int32(0)
		if status >= 400 {
			e = 1
		}
		ids, statuses, deployments = append(ids, p.ID), append(statuses, p.Status), append(deployments, p.Deployment)
		resultStatuses, bodies = append(resultStatuses, int32(p.ResultStatus)), append(bodies, p.ResultBody)
		codes, messages = append(codes, p.ErrorCode), append(messages, p.ErrorMessage)
		prompts, completions = append(prompts, int32(p.PromptTokens)), append(completions, int32(p.CompletionTokens))
		httpStatuses, latencies, attempts = append(httpStatuses, int32(status)), append(latencies, p.Latency.Microseconds()), append(attempts, int32(max(p.Attempts, 1)))
		isErr, costs, respStatuses = append(isErr, e), append(costs, p.CostNanos), append(respStatuses, p.ResponseStatus)
	}
	// The rollup's rows are taken in one order by every statement, so two
	// statements adding to the same rows wait for each other instead of
	// deadlocking.
	rows, err := s.pool.Query(ctx, `
		WITH p AS (
			SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::int[], $5::bytea[], $6::text[], $7::text[], $8::int[], $9::int[],
				$10::int[], $11::bigint[], $12::int[], $13::int[], $14::bigint[], $15::text[])
			AS p(job_id, new_status, new_deployment, new_result_status, new_result_body, new_error_code, new_error_message, new_prompt,
				new_completion, http_status, latency_us, attempt_count, is_error, new_cost, new_response_status)
		), j AS (
			UPDATE jobs SET status = p.new_status, deployment = nullif(p.new_deployment, ''), result_status = nullif(p.new_result_status, 0),
				result_body = p.new_result_body, error_code = nullif(p.new_error_code, ''), error_message = nullif(p.new_error_message, ''),
				prompt_tokens = p.new_prompt, completion_tokens = p.new_completion, cost_nanos = p.new_cost, finished_at = now(),
				lease_until = NULL, response_status = nullif(p.new_response_status, '')
			FROM p
			WHERE jobs.id = ANY($1) AND jobs.id = p.job_id AND `+isRunning+`
			RETURNING jobs.id, jobs.tenant_id, jobs.key_id, jobs.model, jobs.endpoint, jobs.priority, jobs.finished_at, jobs.webhook_url,
				jobs.webhook_secret, jobs.batch_id, jobs.status, jobs.background, jobs.response_status,
				p.new_deployment, p.new_prompt, p.new_completion, p.http_status, p.latency_us, p.attempt_count, p.is_error, p.new_cost
		), ev AS MATERIALIZED (`+jobEventSQL+`), u AS (
			INSERT INTO usage_events (created_at, request_id, tenant_id, key_id, deployment, model, operation,
				status, prompt_tokens, completion_tokens, latency_us, priority, attempts, cost_nanos)
			SELECT finished_at, 'job_' || id, tenant_id, key_id, new_deployment, model, endpoint, http_status, new_prompt, new_completion,
				latency_us, priority, attempt_count, new_cost FROM j
		), r AS (
			INSERT INTO usage_daily (tenant_id, day, model, key_id, deployment, requests, errors, prompt_tokens, completion_tokens, cost_nanos)
			SELECT tenant_id, (finished_at AT TIME ZONE 'UTC')::date, model, coalesce(key_id, '00000000-0000-0000-0000-000000000000'), new_deployment,
				count(*), sum(is_error), sum(new_prompt), sum(new_completion), sum(new_cost)
			FROM j GROUP BY 1, 2, 3, 4, 5 ORDER BY 1, 2, 3, 4, 5
			ON CONFLICT (tenant_id, day, model, key_id, deployment) DO UPDATE SET
				requests = usage_daily.requests + EXCLUDED.requests,
				errors = usage_daily.errors + EXCLUDED.errors,
				prompt_tokens = usage_daily.prompt_tokens + EXCLUDED.prompt_tokens,
				completion_tokens = usage_daily.completion_tokens + EXCLUDED.completion_tokens,
				cost_nanos = usage_daily.cost_nanos + EXCLUDED.cost_nanos
		)
		SELECT id FROM j`,
		ids, statuses, deployments, resultStatuses, bodies, codes, messages, prompts, completions,
		httpStatuses, latencies, attempts, isErr, costs, respStatuses)
	if err != nil {
		return nil, err
	}
	ended, err := pgx.CollectRows(rows, pgx.RowTo[uuid.UUID])
	if err != nil {
		return nil, err
	}
	out := make([]bool, n)
	for _, id := range ended {
		out[at[id]] = true
	}
	return out, nil
}

// jobEventSQL (as CTE ev) emits the webhook event of the jobs in CTE j (not a batch's
// lines: batches have their own events), only when someone will receive it,
// and its deliveries: to the job's own webhook.url if it has one, else to
// the tenant's matching endpoints.
// It runs inside the statement that ends the job, so the outbox row exists
// exactly when the job has ended.
const jobEventSQL = `
	SELECT gen_random_uuid() AS event_id, j.tenant_id, j.webhook_url, j.webhook_secret, j.event, j.data FROM (
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
), e AS (
	INSERT INTO webhook_events (id, tenant_id, type, data) SELECT event_id, tenant_id, event, data FROM ev
), d AS (
	-- Each event's deliveries, joined by the event: one statement may end
	-- many jobs.
	INSERT INTO webhook_deliveries (id, event_id, tenant_id, endpoint_id, url, secret)
	SELECT gen_random_uuid(), ev.event_id, ev.tenant_id, NULL, ev.webhook_url, ev.webhook_secret FROM ev WHERE ev.webhook_url IS NOT NULL
	UNION ALL
	SELECT gen_random_uuid(), ev.event_id, ev.tenant_id, we.id, we.url, NULL FROM ev JOIN webhook_endpoints we ON we.tenant_id = ev.tenant_id
	WHERE ev.webhook_url IS NULL AND we.enabled AND (cardinality(we.events) = 0 OR ev.event = ANY (we.events))`

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
