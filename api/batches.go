package api

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/google/uuid"
	"github.com/labstack/echo/v4"
	"go.opentelemetry.io/otel/trace"

	"github.com/levee-gw/levee/batch"
	"github.com/levee-gw/levee/store"
	"github.com/levee-gw/levee/strictjson"
)

// Limits of a batch input file (OpenAI's).
const (
	maxFileBytes = 200 << 20
	maxFileLines = 50_000
	maxLineBytes = 16 << 20
)

const (
	filePrefix  = "file-"
	batchPrefix = "batch_"
)

type fileObject struct {
	ID            string  `json:"id"`
	Object        string  `json:"object"`
	Bytes         int64   `json:"bytes"`
	CreatedAt     int64   `json:"created_at"`
	Filename      string  `json:"filename"`
	Purpose       string  `json:"purpose"`
	Status        string  `json:"status"`
	StatusDetails *string `json:"status_details"`
	ExpiresAt     *int64  `json:"expires_at"`
}

// renderFile is a file as OpenAI shows one. A batch's output and error
// files go when retention takes the batch (retention.batches after it
// ended, which is when they were made).
func (s *Server) renderFile(f *store.File) *fileObject {
	o := &fileObject{ID: filePrefix + f.ID.String(), Object: "file", Bytes: f.Bytes, CreatedAt: f.CreatedAt.Unix(),
		Filename: f.Filename, Purpose: f.Purpose, Status: "processed"}
	switch {
	case f.ExpiresAt != nil:
		o.ExpiresAt = unixOrNil(*f.ExpiresAt)
	case f.Kind != "upload" && s.cfg.Retention.Batches > 0:
		at := f.CreatedAt.Add(s.cfg.Retention.Batches).Unix()
		o.ExpiresAt = &at
	}
	return o
}

func parsePrefixed(s, prefix string) (uuid.UUID, bool) {
	rest, ok := strings.CutPrefix(s, prefix)
	if !ok {
		return uuid.Nil, false
	}
	id, err := uuid.Parse(rest)
	return id, err == nil
}

// byID fetches the caller's tenant's resource named by the path's id (prefix
// plus a UUID). An id that is malformed, unknown or another tenant's is
// notFound alike.
func byID[T any](c echo.Context, prefix string, notFound func(string) *Error,
	fetch func(ctx context.Context, tenant, id uuid.UUID) (T, error)) (T, error) {
	var zero T
	id, ok := parsePrefixed(c.Param("id"), prefix)
	if !ok {
		return zero, notFound(c.Param("id"))
	}
	v, err := fetch(c.Request().Context(), keyOf(c).TenantID, id)
	if errors.Is(err, store.ErrNotFound) {
		return zero, notFound(c.Param("id"))
	}
	return v, err
}

func fileNotFound(id string) *Error {
	return &Error{Status: http.StatusNotFound, Type: "invalid_request_error", Param: "file_id", Code: "file_not_found",
		Message: fmt.Sprintf("No file found with id '%s'.", strictjson.Clip(id))}
}

func (s *Server) getFile(c echo.Context) error {
	f, err := byID(c, filePrefix, fileNotFound, s.batches.GetFile)
	if err != nil {
		return err
	}
	return c.JSON(http.StatusOK, s.renderFile(f))
}

func (s *Server) listFiles(c echo.Context) error {
	limit, after, err := pageParams(c, filePrefix)
	if err != nil {
		return err
	}
	files, more, err := s.batches.ListFiles(c.Request().Context(), keyOf(c).TenantID, after, limit)
	if err != nil {
		return err
	}
	return c.JSON(http.StatusOK, listResponse(files, s.renderFile, func(o *fileObject) string { return o.ID }, more))
}

func (s *Server) deleteFile(c echo.Context) error {
	id, ok := parsePrefixed(c.Param("id"), filePrefix)
	if !ok {
		return fileNotFound(c.Param("id"))
	}
	err := s.batches.DeleteFile(c.Request().Context(), keyOf(c).TenantID, id)
	if errors.Is(err, store.ErrNotFound) {
		return fileNotFound(c.Param("id"))
	}
	if err != nil {
		return err
	}
	return c.JSON(http.StatusOK, map[string]any{"id": c.Param("id"), "object": "file", "deleted": true})
}

// fileContent streams a file: an upload's lines as they were sent, or a
// batch's output or error lines produced from its jobs as they are read.
func (s *Server) fileContent(c echo.Context) error {
	f, err := byID(c, filePrefix, fileNotFound, func(ctx context.Context, tenant, id uuid.UUID) (*store.File, error) {
		ctx, cancel := s.dbContext(ctx)
		defer cancel()
		return s.batches.GetFile(ctx, tenant, id)
	})
	if err != nil {
		return err
	}
	return s.writeFile(c, f)
}

// writeFile streams f's content: an upload's lines as they were sent, or a
// batch's output or error lines produced from its jobs as they are read.
func (s *Server) writeFile(c echo.Context, f *store.File) error {
	ctx := c.Request().Context()
	w := c.Response()
	w.Header().Set("Content-Type", "application/jsonl")
	w.WriteHeader(http.StatusOK)
	bw := bufio.NewWriterSize(&paced{w: w, rc: http.NewResponseController(w.Writer)}, 64<<10)
	defer bw.Flush()
	if f.Kind == "upload" {
		return s.batches.EachFileLine(ctx, f.ID, func(l *store.FileLine) error {
			bw.Write(l.Raw)
			return bw.WriteByte('\n')
		})
	}
	if f.BatchID == nil {
		return nil
	}
	enc := json.NewEncoder(bw)
	return s.batches.EachBatchResult(ctx, *f.BatchID, f.Kind == "batch_error", func(j *store.Job, customID string) error {
		line := map[string]any{"id": "batch_req_" + strings.ReplaceAll(j.ID.String(), "-", ""), "custom_id": customID, "response": nil, "error": nil}
		if j.ResultStatus != 0 {
			body := json.RawMessage(j.ResultBody)
			if !json.Valid(body) {
				body, _ = json.Marshal(string(j.ResultBody))
			}
			line["response"] = map[string]any{"status_code": j.ResultStatus, "request_id": "job_" + j.ID.String(), "body": body}
		}
		if j.Status != store.JobSucceeded {
			line["error"] = map[string]string{"code": j.ErrorCode, "message": j.ErrorMessage}
		}
		return enc.Encode(line)
	})
}

// paced gives a client writeTimeout to take each buffer of a long response:
// one that stops reading is cut off instead of holding the handler.
type paced struct {
	w  io.Writer
	rc *http.ResponseController
}

const writeTimeout = 30 * time.Second

func (p *paced) Write(b []byte) (int, error) {
	_ = p.rc.SetWriteDeadline(time.Now().Add(writeTimeout))
	return p.w.Write(b)
}

func pageParams(c echo.Context, prefix string) (int, uuid.UUID, error) {
	limit := 20
	if v := c.QueryParam("limit"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 || n > 100 {
			return 0, uuid.Nil, invalid("limit", "invalid_limit", "limit must be between 1 and 100.")
		}
		limit = n
	}
	var after uuid.UUID
	if v := c.QueryParam("after"); v != "" {
		id, ok := parsePrefixed(v, prefix)
		if !ok {
			return 0, uuid.Nil, invalid("after", "invalid_cursor", "after must be an id from a previous page.")
		}
		after = id
	}
	return limit, after, nil
}

type batchObject struct {
	ID               string          `json:"id"`
	Object           string          `json:"object"`
	Endpoint         string          `json:"endpoint"`
	Errors           json.RawMessage `json:"errors"`
	InputFileID      string          `json:"input_file_id"`
	CompletionWindow string          `json:"completion_window"`
	Status           string          `json:"status"`
	OutputFileID     *string         `json:"output_file_id"`
	ErrorFileID      *string         `json:"error_file_id"`
	CreatedAt        int64           `json:"created_at"`
	InProgressAt     *int64          `json:"in_progress_at"`
	ExpiresAt        int64           `json:"expires_at"`
	FinalizingAt     *int64          `json:"finalizing_at"`
	CompletedAt      *int64          `json:"completed_at"`
	FailedAt         *int64          `json:"failed_at"`
	ExpiredAt        *int64          `json:"expired_at"`
	CancellingAt     *int64          `json:"cancelling_at"`
	CancelledAt      *int64          `json:"cancelled_at"`
	RequestCounts    map[string]int  `json:"request_counts"`
	Usage            *usageObject    `json:"usage"`
	Metadata         json.RawMessage `json:"metadata"`
}

func fileRef(id *uuid.UUID) *string {
	if id == nil {
		return nil
	}
	s := filePrefix + id.String()
	return &s
}

func renderBatch(b *store.Batch) *batchObject {
	o := &batchObject{ID: batchPrefix + b.ID.String(), Object: "batch", Endpoint: b.Endpoint, Errors: b.Errors,
		InputFileID: filePrefix + b.InputFileID.String(), CompletionWindow: b.CompletionWindow, Status: b.Status,
		OutputFileID: fileRef(b.OutputFileID), ErrorFileID: fileRef(b.ErrorFileID), CreatedAt: b.CreatedAt.Unix(),
		InProgressAt: unix(b.InProgressAt), ExpiresAt: b.ExpiresAt.Unix(), FinalizingAt: unix(b.FinalizingAt),
		CompletedAt: unix(b.CompletedAt), FailedAt: unix(b.FailedAt), ExpiredAt: unix(b.ExpiredAt),
		CancellingAt: unix(b.CancellingAt), CancelledAt: unix(b.CancelledAt),
		RequestCounts: map[string]int{"total": b.Total, "completed": b.Completed, "failed": b.Failed}, Metadata: b.Metadata,
		Usage: newUsage(b.PromptTokens, b.CompletionTokens, b.CostNanos)}
	if len(o.Errors) == 0 {
		o.Errors = json.RawMessage("null")
	}
	if len(o.Metadata) == 0 {
		o.Metadata = json.RawMessage("null")
	}
	return o
}

func batchNotFound(id string) *Error {
	return &Error{Status: http.StatusNotFound, Type: "invalid_request_error", Param: "batch_id", Code: "batch_not_found",
		Message: fmt.Sprintf("No batch found with id '%s'.", strictjson.Clip(id))}
}

// createBatch is POST /v1/batches. The batch is returned in validating; its
// lines become jobs in the background.
func (s *Server) createBatch(c echo.Context) error {
	if s.queue == nil || s.runner == nil {
		return s.queueUnavailable()
	}
	key := keyOf(c)
	raw, err := s.readBody(c)
	if err != nil {
		return err
	}
	var req struct {
		InputFileID      string          `json:"input_file_id"`
		Endpoint         string          `json:"endpoint"`
		CompletionWindow string          `json:"completion_window"`
		Metadata         json.RawMessage `json:"metadata"`
	}
	if err := decodeJSON(raw, &req); err != nil {
		return err
	}
	if req.CompletionWindow != "24h" {
		return invalid("completion_window", "invalid_request", "completion_window must be 24h.")
	}
	op, endpoint, ok := batch.Endpoint(req.Endpoint)
	if !ok {
		return invalid("endpoint", "invalid_request", "endpoint must be /v1/chat/completions, /v1/completions, /v1/embeddings or /v1/responses.")
	}
	if err := allowGroup(key, op.Group()); err != nil {
		return err
	}
	if err := checkMetadata(req.Metadata); err != nil {
		return err
	}
	fid, ok := parsePrefixed(req.InputFileID, filePrefix)
	if !ok {
		return fileNotFound(req.InputFileID)
	}
	ctx := c.Request().Context()
	f, err := s.batches.GetFile(ctx, key.TenantID, fid)
	if errors.Is(err, store.ErrNotFound) || (err == nil && f.Kind != "upload") {
		return fileNotFound(req.InputFileID)
	}
	if err != nil {
		return err
	}
	if _, lineEndpoint, _ := batch.Endpoint(f.URL); lineEndpoint != endpoint {
		return invalid("endpoint", "url_mismatch", "The input file's lines use %s, not %s.", f.URL, req.Endpoint)
	}
	if key.Scopes.Models != nil {
		// Every line's model must be one the key may use: the batch is
		// refused whole rather than run in part.
		models, err := s.batches.FileModels(ctx, fid)
		if err != nil {
			return err
		}
		for _, m := range models {
			g, ok := s.broker.Resolve(m)
			if !ok {
				continue // an unknown model fails its line at validation
			}
			if err := s.allowModel(key, g, "input_file_id"); err != nil {
				return err
			}
		}
	}
	b, err := s.batches.CreateBatch(ctx, &store.CreateBatchParams{TenantID: key.TenantID, KeyID: key.ID, TokenCaller: key.Token, InputFileID: fid, Endpoint: req.Endpoint,
		Window: 24 * time.Hour, Metadata: req.Metadata})
	if errors.Is(err, store.ErrNotFound) { // the file expired (or was deleted) meanwhile
		return fileNotFound(req.InputFileID)
	}
	if errors.Is(err, store.ErrCallerGone) {
		return callerGone()
	}
	if err != nil {
		return err
	}
	// The batch's lines carry the trace context of its creation, for
	// their runs to link to; nothing else of the request outlives it.
	bctx := trace.ContextWithSpanContext(context.Background(), trace.SpanContextFromContext(c.Request().Context()))
	go func() {
		if err := s.runner.Start(bctx, b); err != nil {
			s.log.Error("starting batch", "batch", b.ID, "err", err) // the runner retries validating batches
		}
	}()
	return c.JSON(http.StatusOK, renderBatch(b))
}

func (s *Server) getBatch(c echo.Context) error {
	b, err := byID(c, batchPrefix, batchNotFound, s.batches.GetBatch)
	if err != nil {
		return err
	}
	return c.JSON(http.StatusOK, renderBatch(b))
}

func (s *Server) cancelBatch(c echo.Context) error {
	b, err := byID(c, batchPrefix, batchNotFound, s.batches.CancelBatch)
	if err != nil {
		return err
	}
	return c.JSON(http.StatusOK, renderBatch(b))
}

func (s *Server) listBatches(c echo.Context) error {
	limit, after, err := pageParams(c, batchPrefix)
	if err != nil {
		return err
	}
	list, more, err := s.batches.ListBatches(c.Request().Context(), keyOf(c).TenantID, after, limit)
	if err != nil {
		return err
	}
	return c.JSON(http.StatusOK, listResponse(list, renderBatch, func(o *batchObject) string { return o.ID }, more))
}
