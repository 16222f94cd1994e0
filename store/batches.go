package store

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
)

// File is an uploaded batch input or a batch's output or error file.
type File struct {
	ID        uuid.UUID
	TenantID  uuid.UUID
	Filename  string
	Purpose   string
	Kind      string
	Bytes     int64
	Lines     int
	URL       string
	BatchID   *uuid.UUID
	CreatedAt time.Time
	// ExpiresAt is when an upload goes (nil: never); batch output and
	// error files go with their batch.
	ExpiresAt *time.Time
}

const fileColumns = `id, tenant_id, filename, purpose, kind, bytes, lines, coalesce(url, ''), batch_id, created_at, expires_at`

func scanFile(row pgx.Row) (*File, error) {
	f := &File{}
	err := row.Scan(&f.ID, &f.TenantID, &f.Filename, &f.Purpose, &f.Kind, &f.Bytes, &f.Lines, &f.URL, &f.BatchID, &f.CreatedAt, &f.ExpiresAt)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, ErrNotFound
	}
	return f, err
}

// FileLine is one line of an uploaded file: as uploaded, where its body
// sits in it, and the model the body names (BodyLen 0 and Model "" for files
// stored before these were kept).
type FileLine struct {
	Line            int
	CustomID        string
	Raw             []byte
	BodyAt, BodyLen int
	Model           string
}

// Body is the line's body as uploaded, or nil if its place is not known.
func (l *FileLine) Body() []byte {
	if l.BodyLen == 0 || l.BodyAt+l.BodyLen > len(l.Raw) {
		return nil
	}
	return l.Raw[l.BodyAt : l.BodyAt+l.BodyLen]
}

// ImportFileParams describe an upload that was received whole and validated
// before any of it reaches Postgres: no connection waits on a client.
type ImportFileParams struct {
	TenantID          uuid.UUID
	Filename, Purpose string
	// URL is the lines' common endpoint; Bytes the file's size.
	URL   string
	Bytes int64
	// Next returns the lines in order, then io.EOF.
	Next func() (*FileLine, error)
	// ExpiresAfter is how long after its creation the file goes (0: never).
	ExpiresAfter time.Duration
}

// ImportFile stores an upload in one transaction: the file row and its
// lines, copied in with COPY. Either the whole file is stored or nothing.
func (s *Store) ImportFile(ctx context.Context, p *ImportFileParams) (*File, error) {
	id, _ := uuid.NewV7()
	f := &File{ID: id, TenantID: p.TenantID, Filename: p.Filename, Purpose: p.Purpose, Kind: "upload", Bytes: p.Bytes, URL: p.URL}
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		if err := tx.QueryRow(ctx, `INSERT INTO files (id, tenant_id, filename, purpose, kind, bytes, url, expires_at)
			VALUES ($1, $2, $3, $4, 'upload', $5, $6, CASE WHEN $7::bigint > 0 THEN now() + make_interval(secs => $7::bigint) END) RETURNING created_at, expires_at`,
			f.ID, f.TenantID, f.Filename, f.Purpose, f.Bytes, f.URL, int64(p.ExpiresAfter/time.Second)).Scan(&f.CreatedAt, &f.ExpiresAt); err != nil {
			return err
		}
		var row []any
		n, err := tx.CopyFrom(ctx, pgx.Identifier{"file_lines"}, []string{"file_id", "line", "custom_id", "raw", "body_at", "body_len", "model"}, pgx.CopyFromFunc(func() ([]any, error) {
			l, err := p.Next()
			if err != nil {
				if errors.Is(err, io.EOF) {
					return nil, nil
				}
				return nil, err
			}
			row = append(row[:0], f.ID, int32(l.Line), l.CustomID, l.Raw, int32(l.BodyAt), int32(l.BodyLen), l.Model)
			return row, nil
		}))
		if err != nil {
			return err
		}
		f.Lines = int(n)
		_, err = tx.Exec(ctx, `UPDATE files SET lines = $2 WHERE id = $1`, f.ID, f.Lines)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("store: import file: %w", err)
	}
	return f, nil
}

// GetFile returns a tenant's file; another tenant's is ErrNotFound.
func (s *Store) GetFile(ctx context.Context, tenant, id uuid.UUID) (*File, error) {
	return scanFile(s.pool.QueryRow(ctx, `SELECT `+fileColumns+` FROM files WHERE id = $1 AND tenant_id = $2`, id, tenant))
}

// ListFiles pages through a tenant's files, newest first.
func (s *Store) ListFiles(ctx context.Context, tenant, after uuid.UUID, limit int) ([]*File, bool, error) {
	if after == uuid.Nil {
		after = uuid.Max
	}
	rows, err := s.pool.Query(ctx, `SELECT `+fileColumns+` FROM files WHERE tenant_id = $1 AND id < $2 ORDER BY id DESC LIMIT $3`, tenant, after, limit+1)
	if err != nil {
		return nil, false, fmt.Errorf("store: files: %w", err)
	}
	out, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (*File, error) { return scanFile(r) })
	if err != nil {
		return nil, false, err
	}
	out, more := page(out, limit)
	return out, more, nil
}

// DeleteFile removes a tenant's uploaded file and its lines.
func (s *Store) DeleteFile(ctx context.Context, tenant, id uuid.UUID) error {
	tag, err := s.pool.Exec(ctx, `DELETE FROM files WHERE id = $1 AND tenant_id = $2`, id, tenant)
	if err != nil {
		return fmt.Errorf("store: delete file: %w", err)
	}
	if tag.RowsAffected() == 0 {
		return ErrNotFound
	}
	return nil
}

// Pages of rows read before they are handed on: whatever fn does with them
// (write to a slow client), no connection is held meanwhile. Reading one
// page may take pageTimeout at most, so a database that stops answering
// ends the read instead of holding it.
const (
	pageRows    = 1000
	pageBytes   = 4 << 20
	pageTimeout = 30 * time.Second
)

// EachFileLine calls fn with an uploaded file's lines in order, a page at a
// time.
func (s *Store) EachFileLine(ctx context.Context, fileID uuid.UUID, fn func(*FileLine) error) error {
	return eachPage(ctx, func(ctx context.Context, after int) (pgx.Rows, error) {
		return s.pool.Query(ctx, `SELECT line, custom_id, raw, coalesce(body_at, 0), coalesce(body_len, 0), coalesce(model, '') FROM file_lines
			WHERE file_id = $1 AND line > $2 ORDER BY line LIMIT $3`, fileID, after, pageRows)
	}, func(rows pgx.Rows) (*FileLine, int, int, error) {
		l := &FileLine{}
		err := rows.Scan(&l.Line, &l.CustomID, &l.Raw, &l.BodyAt, &l.BodyLen, &l.Model)
		return l, l.Line, len(l.Raw), err
	}, fn)
}

// eachPage pages through an ordered query by its line number: query(after)
// returns the rows after a line, scan reads one (with its line and size),
// and fn runs on each once the page is read and its connection released.
func eachPage[T any](ctx context.Context, query func(ctx context.Context, after int) (pgx.Rows, error), scan func(pgx.Rows) (T, int, int, error), fn func(T) error) error {
	after := -1
	for {
		page, size, err := readPage(ctx, &after, query, scan)
		if err != nil {
			return err
		}
		for _, v := range page {
			if err := fn(v); err != nil {
				return err
			}
		}
		if len(page) == 0 || (len(page) < pageRows && size < pageBytes) {
			return nil
		}
		if err := ctx.Err(); err != nil {
			return err
		}
	}
}

// readPage reads the rows after *after, moving it to the last one read.
func readPage[T any](ctx context.Context, after *int, query func(ctx context.Context, after int) (pgx.Rows, error), scan func(pgx.Rows) (T, int, int, error)) ([]T, int, error) {
	ctx, cancel := context.WithTimeout(ctx, pageTimeout)
	defer cancel()
	rows, err := query(ctx, *after)
	if err != nil {
		return nil, 0, fmt.Errorf("store: page: %w", err)
	}
	defer rows.Close()
	var page []T
	size := 0
	for size < pageBytes && rows.Next() {
		v, line, n, err := scan(rows)
		if err != nil {
			return nil, 0, fmt.Errorf("store: page: %w", err)
		}
		page, *after, size = append(page, v), line, size+n
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return nil, 0, fmt.Errorf("store: page: %w", err)
	}
	return page, size, nil
}

// Batch is an OpenAI-style batch.
type Batch struct {
	ID               uuid.UUID
	TenantID         uuid.UUID
	InputFileID      uuid.UUID
	Endpoint         string
	CompletionWindow string
	Status           string
	Metadata         json.RawMessage
	Errors           json.RawMessage
	Total            int
	OutputFileID     *uuid.UUID
	ErrorFileID      *uuid.UUID
	CreatedAt        time.Time
	InProgressAt     *time.Time
	ExpiresAt        time.Time
	FinalizingAt     *time.Time
	CompletedAt      *time.Time
	FailedAt         *time.Time
	ExpiredAt        *time.Time
	CancellingAt     *time.Time
	CancelledAt      *time.Time
	// Counts are live, from the batch's jobs, and so is their usage.
	Completed, Failed                         int
	PromptTokens, CompletionTokens, CostNanos int64
}

const batchColumns = batchOwnColumns + `,
	(SELECT count(*) FROM jobs j WHERE j.batch_id = b.id AND j.status = 'succeeded'),
	(SELECT count(*) FROM jobs j WHERE j.batch_id = b.id AND j.status IN ('failed', 'cancelled')),
	u.prompt, u.completion, u.cost`

const batchOwnColumns = `b.id, b.tenant_id, b.input_file_id, b.endpoint, b.completion_window, b.status, b.metadata, b.errors, b.total,
	b.output_file_id, b.error_file_id, b.created_at, b.in_progress_at, b.expires_at, b.finalizing_at, b.completed_at, b.failed_at,
	b.expired_at, b.cancelling_at, b.cancelled_at`

// batchColumnsWithoutCounts is batchColumns for the runner, which reads open
// batches twice a second and needs only their state: counting a large
// batch's jobs took it 40–90 ms of Postgres each time.
const batchColumnsWithoutCounts = batchOwnColumns + `, 0, 0, 0::bigint, 0::bigint, 0::bigint`

// batchFrom is the FROM clause batchColumns read: the batch and its jobs'
// usage so far.
const batchFrom = ` FROM batches b, LATERAL (SELECT coalesce(sum(prompt_tokens), 0) AS prompt, coalesce(sum(completion_tokens), 0) AS completion,
	coalesce(sum(cost_nanos), 0) AS cost FROM jobs j WHERE j.batch_id = b.id) u`

func scanBatch(row pgx.Row) (*Batch, error) {
	b := &Batch{}
	err := row.Scan(&b.ID, &b.TenantID, &b.InputFileID, &b.Endpoint, &b.CompletionWindow, &b.Status, &b.Metadata, &b.Errors, &b.Total,
		&b.OutputFileID, &b.ErrorFileID, &b.CreatedAt, &b.InProgressAt, &b.ExpiresAt, &b.FinalizingAt, &b.CompletedAt, &b.FailedAt,
		&b.ExpiredAt, &b.CancellingAt, &b.CancelledAt, &b.Completed, &b.Failed, &b.PromptTokens, &b.CompletionTokens, &b.CostNanos)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, ErrNotFound
	}
	return b, err
}

// CreateBatchParams describe a new batch.
type CreateBatchParams struct {
	TenantID uuid.UUID
	// KeyID made it (uuid.Nil: none); its lines' jobs are its calls.
	// TokenCaller: KeyID is a token caller's, with no stored key to check.
	KeyID       uuid.UUID
	TokenCaller bool
	InputFileID uuid.UUID
	Endpoint    string
	Window      time.Duration
	Metadata    json.RawMessage
}

// CreateBatch stores a batch in validating.
func (s *Store) CreateBatch(ctx context.Context, p *CreateBatchParams) (*Batch, error) {
	id, _ := uuid.NewV7()
	var meta any
	if len(p.Metadata) > 0 {
		meta = p.Metadata
	}
	// Only for a live tenant and key, waiting behind a deletion of the
	// tenant in progress (see InsertJob), and an input file that has not
	// expired (the sweeper may be removing its lines).
	var made, fileLive bool
	err := s.pool.QueryRow(ctx, `WITH t AS (SELECT id FROM tenants WHERE id = $2 AND deleted_at IS NULL FOR SHARE),
		f AS (SELECT id FROM files WHERE id = $3 AND tenant_id = $2 AND (expires_at IS NULL OR expires_at > now()) FOR SHARE),
		b AS (INSERT INTO batches (id, tenant_id, key_id, input_file_id, endpoint, completion_window, status, metadata, expires_at)
			SELECT $1, t.id, $7, f.id, $4, '24h', 'validating', $5, now() + $6::interval FROM t, f
			WHERE $7::uuid IS NULL OR $8 OR EXISTS (SELECT 1 FROM api_keys WHERE id = $7 AND revoked_at IS NULL)
			RETURNING id)
		SELECT EXISTS (SELECT 1 FROM b), EXISTS (SELECT 1 FROM f)`,
		id, p.TenantID, p.InputFileID, p.Endpoint, meta, p.Window.String(), nullUUID(p.KeyID), p.TokenCaller).Scan(&made, &fileLive)
	if err != nil {
		return nil, fmt.Errorf("store: create batch: %w", err)
	}
	if !fileLive {
		return nil, ErrNotFound
	}
	if !made {
		return nil, ErrCallerGone
	}
	return s.GetBatch(ctx, p.TenantID, id)
}

// GetBatch returns a tenant's batch with live counts.
func (s *Store) GetBatch(ctx context.Context, tenant, id uuid.UUID) (*Batch, error) {
	return scanBatch(s.pool.QueryRow(ctx, `SELECT `+batchColumns+batchFrom+` WHERE b.id = $1 AND b.tenant_id = $2`, id, tenant))
}

// ListBatches pages through a tenant's batches, newest first.
func (s *Store) ListBatches(ctx context.Context, tenant, after uuid.UUID, limit int) ([]*Batch, bool, error) {
	if after == uuid.Nil {
		after = uuid.Max
	}
	rows, err := s.pool.Query(ctx, `SELECT `+batchColumns+batchFrom+` WHERE b.tenant_id = $1 AND b.id < $2 ORDER BY b.id DESC LIMIT $3`, tenant, after, limit+1)
	if err != nil {
		return nil, false, fmt.Errorf("store: batches: %w", err)
	}
	out, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (*Batch, error) { return scanBatch(r) })
	if err != nil {
		return nil, false, err
	}
	out, more := page(out, limit)
	return out, more, nil
}

// OpenBatches lists batches a manager must move on (any tenant).
func (s *Store) OpenBatches(ctx context.Context) ([]*Batch, error) {
	rows, err := s.pool.Query(ctx, `SELECT `+batchColumnsWithoutCounts+` FROM batches b WHERE b.status IN ('validating', 'in_progress', 'finalizing', 'cancelling') ORDER BY b.id`)
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (*Batch, error) { return scanBatch(r) })
}

// batchPublishClaim leaves a starting batch's jobs to its own publisher
// for a minute before outbox relays take over the ones it did not publish.
const batchPublishClaim = time.Minute

// StartBatch turns every line of the batch's input file into a queued job
// at batch priority, inside Postgres (no line passes through memory), and
// moves the batch to in_progress, in one transaction: either all lines are
// jobs or none. models maps each body.model used to the alias its job runs
// under. It returns the job ids; they still have to be published (the
// sweeper publishes any that are not).
func (s *Store) StartBatch(ctx context.Context, b *Batch, endpoint string, models map[string]string) ([]uuid.UUID, error) {
	var from, to []string
	for k, v := range models {
		from, to = append(from, k), append(to, v)
	}
	var ids []uuid.UUID
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		var total int
		if err := tx.QueryRow(ctx, `SELECT count(*) FROM file_lines WHERE file_id = $1`, b.InputFileID).Scan(&total); err != nil {
			return err
		}
		tag, err := tx.Exec(ctx, `UPDATE batches SET status = 'in_progress', in_progress_at = now(), total = $2 WHERE id = $1 AND status = 'validating'`, b.ID, total)
		if err != nil {
			return err
		}
		if tag.RowsAffected() == 0 {
			return ErrJobTerminal // another process started it, or it was cancelled
		}
		rows, err := tx.Query(ctx, `
			INSERT INTO jobs (id, tenant_id, key_id, endpoint, model, body, body_hash, priority, status, metadata, batch_id, custom_id, line, publish_claim)
			SELECT gen_random_uuid(), $2, (SELECT key_id FROM batches WHERE id = $4), $3, m.alias,
				CASE WHEN fl.body_len IS NOT NULL THEN substring(fl.raw FROM fl.body_at + 1 FOR fl.body_len)
					ELSE convert_to((convert_from(fl.raw, 'UTF8')::jsonb -> 'body')::text, 'UTF8') END,
				'\x'::bytea, 'batch', 'queued', '{}', $4, fl.custom_id, fl.line, now() + $7::interval
			FROM file_lines fl
			JOIN unnest($5::text[], $6::text[]) AS m(model, alias)
				ON m.model = coalesce(fl.model, convert_from(fl.raw, 'UTF8')::jsonb -> 'body' ->> 'model')
			WHERE fl.file_id = $1
			RETURNING id`, b.InputFileID, b.TenantID, endpoint, b.ID, from, to, batchPublishClaim.String())
		if err != nil {
			return err
		}
		ids, err = pgx.CollectRows(rows, pgx.RowTo[uuid.UUID])
		if err != nil {
			return err
		}
		if len(ids) != total {
			return fmt.Errorf("store: batch %s: %d of %d lines became jobs", b.ID, len(ids), total)
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("store: start batch: %w", err)
	}
	return ids, nil
}

// FailBatch ends a batch that did not validate, with its errors.
func (s *Store) FailBatch(ctx context.Context, b *Batch, errs json.RawMessage) error {
	return pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		tag, err := tx.Exec(ctx, `UPDATE batches SET status = 'failed', failed_at = now(), errors = $2 WHERE id = $1 AND status = 'validating'`, b.ID, errs)
		if err != nil || tag.RowsAffected() == 0 {
			return err
		}
		return batchEvent(ctx, tx, b, "failed")
	})
}

// batchEvent writes batch.<status>'s event and its deliveries to the
// tenant's matching endpoints, in the transaction that ends the batch.
func batchEvent(ctx context.Context, tx pgx.Tx, b *Batch, status string) error {
	_, err := tx.Exec(ctx, `WITH e AS (
			INSERT INTO webhook_events (id, tenant_id, type, data)
			SELECT gen_random_uuid(), $1, 'batch.' || $2::text, jsonb_build_object('id', 'batch_' || $3::uuid::text, 'status', $2::text)
			WHERE EXISTS (SELECT 1 FROM webhook_endpoints we WHERE we.tenant_id = $1 AND we.enabled
				AND (cardinality(we.events) = 0 OR 'batch.' || $2::text = ANY (we.events)))
			RETURNING id, tenant_id, type)
		INSERT INTO webhook_deliveries (id, event_id, tenant_id, endpoint_id, url)
		SELECT gen_random_uuid(), e.id, e.tenant_id, we.id, we.url FROM e JOIN webhook_endpoints we
			ON we.tenant_id = e.tenant_id AND we.enabled AND (cardinality(we.events) = 0 OR e.type = ANY (we.events))`,
		b.TenantID, status, b.ID)
	return err
}

// CancelBatch moves a batch to cancelling and cancels its queued lines at
// once: none of them is sent upstream after this returns.
func (s *Store) CancelBatch(ctx context.Context, tenant, id uuid.UUID) (*Batch, error) {
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		tag, err := tx.Exec(ctx, `UPDATE batches SET status = 'cancelling', cancelling_at = now()
			WHERE id = $1 AND tenant_id = $2 AND status IN ('validating', 'in_progress')`, id, tenant)
		if err != nil || tag.RowsAffected() == 0 {
			return err
		}
		_, err = tx.Exec(ctx, `UPDATE jobs SET status = 'cancelled', finished_at = now(), error_code = 'batch_cancelled',
			error_message = 'The batch was cancelled before this request ran.' WHERE batch_id = $1 AND status = 'queued'`, id)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("store: cancel batch: %w", err)
	}
	return s.GetBatch(ctx, tenant, id)
}

// ExpireBatchLines cancels the queued lines of a batch whose window passed.
func (s *Store) ExpireBatchLines(ctx context.Context, id uuid.UUID) error {
	_, err := s.pool.Exec(ctx, `UPDATE jobs SET status = 'cancelled', finished_at = now(), error_code = 'batch_expired',
		error_message = 'This request could not be executed before the completion window expired.' WHERE batch_id = $1 AND status = 'queued'`, id)
	return err
}

// OpenBatchJobs counts a batch's jobs not yet ended.
func (s *Store) OpenBatchJobs(ctx context.Context, id uuid.UUID) (int, error) {
	var n int
	err := s.pool.QueryRow(ctx, `SELECT count(*) FROM jobs WHERE batch_id = $1 AND status IN ('queued', 'running')`, id).Scan(&n)
	return n, err
}

// EndBatch moves a batch from one of from to status (finalizing, or an end
// state, which also creates its output and error files). False if another
// process moved it first.
func (s *Store) EndBatch(ctx context.Context, b *Batch, from []string, status string) (bool, error) {
	moved := false
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		stamp := map[string]string{"finalizing": "finalizing_at", "completed": "completed_at", "expired": "expired_at", "cancelled": "cancelled_at"}[status]
		if stamp == "" {
			return fmt.Errorf("store: batch status %q", status)
		}
		var out, errf any
		if status != "finalizing" {
			o, _ := uuid.NewV7()
			e, _ := uuid.NewV7()
			out, errf = o, e
		}
		tag, err := tx.Exec(ctx, `UPDATE batches SET status = $2, `+stamp+` = now(), output_file_id = coalesce($4, output_file_id),
			error_file_id = coalesce($5, error_file_id) WHERE id = $1 AND status = ANY($3)`, b.ID, status, from, out, errf)
		if err != nil || tag.RowsAffected() == 0 {
			return err
		}
		moved = true
		if out == nil {
			return nil
		}
		if err := batchEvent(ctx, tx, b, status); err != nil {
			return err
		}
		_, err = tx.Exec(ctx, `INSERT INTO files (id, tenant_id, filename, purpose, kind, bytes, lines, batch_id)
			SELECT $2::uuid, $1::uuid, 'batch_' || replace($4::uuid::text, '-', '') || '_output.jsonl', 'batch_output', 'batch_output', 0,
				(SELECT count(*) FROM jobs WHERE batch_id = $4::uuid AND status = 'succeeded'), $4::uuid
			UNION ALL
			SELECT $3::uuid, $1::uuid, 'batch_' || replace($4::uuid::text, '-', '') || '_error.jsonl', 'batch_output', 'batch_error', 0,
				(SELECT count(*) FROM jobs WHERE batch_id = $4::uuid AND status IN ('failed', 'cancelled')), $4::uuid`, b.TenantID, out, errf, b.ID)
		return err
	})
	if err != nil {
		return false, fmt.Errorf("store: end batch: %w", err)
	}
	return moved, nil
}

// EachBatchResult calls fn with a batch's ended jobs of one kind (output:
// the succeeded ones; error: failed and cancelled), in line order, a page at
// a time.
func (s *Store) EachBatchResult(ctx context.Context, batchID uuid.UUID, errorsFile bool, fn func(j *Job, customID string) error) error {
	statuses := []string{JobSucceeded}
	if errorsFile {
		statuses = []string{JobFailed, JobCancelled}
	}
	type row struct {
		j   *Job
		cid string
	}
	return eachPage(ctx, func(ctx context.Context, after int) (pgx.Rows, error) {
		return s.pool.Query(ctx, `SELECT `+jobColumns+`, coalesce(custom_id, ''), line FROM jobs
			WHERE batch_id = $1 AND status = ANY($2) AND line > $3 ORDER BY line LIMIT $4`, batchID, statuses, after, pageRows)
	}, func(rows pgx.Rows) (row, int, int, error) {
		j := &Job{}
		var cid string
		var line int
		err := rows.Scan(append(j.dest(), &cid, &line)...)
		return row{j, cid}, line, len(j.Body) + len(j.ResultBody), err
	}, func(r row) error { return fn(r.j, r.cid) })
}

// JobRefs lists a batch's queued jobs (id and model) to publish.
func (s *Store) JobRefs(ctx context.Context, batchID uuid.UUID) ([]*Job, error) {
	rows, err := s.pool.Query(ctx, `SELECT id, model FROM jobs WHERE batch_id = $1 AND status = 'queued' ORDER BY line`, batchID)
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (*Job, error) {
		j := &Job{}
		return j, r.Scan(&j.ID, &j.Model)
	})
}

// FileModels lists the models an uploaded file's lines name (lines stored
// before models were recorded name none).
func (s *Store) FileModels(ctx context.Context, file uuid.UUID) ([]string, error) {
	rows, err := s.pool.Query(ctx, `SELECT DISTINCT model FROM file_lines WHERE file_id = $1 AND model IS NOT NULL AND model <> '' ORDER BY model`, file)
	if err != nil {
		return nil, fmt.Errorf("store: file models: %w", err)
	}
	return pgx.CollectRows(rows, pgx.RowTo[string])
}
