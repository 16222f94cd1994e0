package api

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime/multipart"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/google/uuid"
	"github.com/labstack/echo/v4"

	"github.com/levee-gw/levee/batch"
	"github.com/levee-gw/levee/store"
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
}

func renderFile(f *store.File) *fileObject {
	return &fileObject{ID: filePrefix + f.ID.String(), Object: "file", Bytes: f.Bytes, CreatedAt: f.CreatedAt.Unix(),
		Filename: f.Filename, Purpose: f.Purpose, Status: "processed"}
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
		Message: fmt.Sprintf("No file found with id '%s'.", id)}
}

// inputLine is one line of a batch input file.
type inputLine struct {
	CustomID *string         `json:"custom_id"`
	Method   string          `json:"method"`
	URL      string          `json:"url"`
	Body     json.RawMessage `json:"body"`
}

type lineProblems struct {
	list  []string
	count int
}

func (p *lineProblems) add(line int, code, msg string) {
	p.count++
	if len(p.list) < 20 {
		p.list = append(p.list, fmt.Sprintf("line %d: %s (%s)", line, msg, code))
	}
}

// uploadFile is POST /v1/files: multipart with `file` and `purpose=batch`.
// The file is validated line by line as it streams in and written to
// Postgres in chunks; nothing holds it whole.
func (s *Server) uploadFile(c echo.Context) error {
	key := keyOf(c)
	r := c.Request()
	if r.ContentLength > maxFileBytes+(1<<20) {
		return &Error{Status: http.StatusRequestEntityTooLarge, Type: "invalid_request_error", Param: "file", Code: "file_too_large",
			Message: fmt.Sprintf("A batch input file may be at most %d bytes.", maxFileBytes)}
	}
	r.Body = http.MaxBytesReader(c.Response(), r.Body, maxFileBytes+(1<<20))
	mr, err := r.MultipartReader()
	if err != nil {
		return invalid("file", "invalid_request", "Upload the file as multipart/form-data with fields file and purpose.")
	}
	ctx := r.Context()
	var purpose string
	var f *store.File
	for {
		part, err := mr.NextPart()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return uploadError(err)
		}
		switch part.FormName() {
		case "purpose":
			b, _ := io.ReadAll(io.LimitReader(part, 64))
			purpose = strings.TrimSpace(string(b))
		case "file":
			if f != nil {
				return invalid("file", "invalid_request", "Send one file per upload.")
			}
			if f, err = s.importFile(ctx, key.TenantID, part); err != nil {
				return err
			}
		}
		part.Close()
	}
	if f == nil {
		return invalid("file", "invalid_request", "The file field is required.")
	}
	if purpose != "batch" {
		_ = s.batches.DeleteFile(context.WithoutCancel(ctx), key.TenantID, f.ID)
		return invalid("purpose", "invalid_request", "purpose must be batch; got %q.", purpose)
	}
	return c.JSON(http.StatusOK, renderFile(f))
}

func uploadError(err error) error {
	var mbe *http.MaxBytesError
	if errors.As(err, &mbe) {
		return &Error{Status: http.StatusRequestEntityTooLarge, Type: "invalid_request_error", Param: "file", Code: "file_too_large",
			Message: fmt.Sprintf("A batch input file may be at most %d bytes.", maxFileBytes)}
	}
	return invalid("file", "invalid_request", "Could not read the upload: %v", err)
}

// importFile validates and stores the lines of an uploaded batch file.
func (s *Server) importFile(ctx context.Context, tenant uuid.UUID, part *multipart.Part) (*store.File, error) {
	name := part.FileName()
	if name == "" {
		name = "upload.jsonl"
	}
	imp, err := s.batches.BeginFileImport(ctx, tenant, name, "batch")
	if err != nil {
		return nil, err
	}
	committed := false
	defer func() {
		if !committed {
			imp.Rollback(context.WithoutCancel(ctx))
		}
	}()
	sc := bufio.NewScanner(part)
	sc.Buffer(make([]byte, 64<<10), maxLineBytes)
	var (
		problems lineProblems
		seen     = map[string]int{}
		url      string
		bytesIn  int64
		n, line  int
	)
	for sc.Scan() {
		line++
		raw := sc.Bytes()
		bytesIn += int64(len(raw)) + 1
		if len(bytes.TrimSpace(raw)) == 0 {
			continue
		}
		n++
		if n > maxFileLines {
			problems.add(line, "too_many_tasks", fmt.Sprintf("a batch may have at most %d requests", maxFileLines))
			break
		}
		var l inputLine
		if err := json.Unmarshal(raw, &l); err != nil {
			problems.add(line, "invalid_json_line", "not valid JSON")
			continue
		}
		switch {
		case l.CustomID == nil || *l.CustomID == "":
			problems.add(line, "invalid_request", "custom_id is required")
			continue
		case seen[*l.CustomID] > 0:
			problems.add(line, "duplicate_custom_id", fmt.Sprintf("custom_id %q was already used on line %d", *l.CustomID, seen[*l.CustomID]))
			continue
		case l.Method != "POST":
			problems.add(line, "invalid_request", "method must be POST")
			continue
		case len(bytes.TrimSpace(l.Body)) == 0 || bytes.TrimSpace(l.Body)[0] != '{':
			problems.add(line, "invalid_request", "body must be a JSON object")
			continue
		}
		if _, _, ok := batch.Endpoint(l.URL); !ok {
			problems.add(line, "invalid_request", fmt.Sprintf("url %q is not a supported endpoint", l.URL))
			continue
		}
		if url == "" {
			url = l.URL
		} else if l.URL != url {
			problems.add(line, "url_mismatch", fmt.Sprintf("every line must use the same url (%s), not %s", url, l.URL))
			continue
		}
		seen[*l.CustomID] = line
		if problems.count == 0 {
			if err := imp.Add(ctx, line, *l.CustomID, raw); err != nil {
				return nil, err
			}
		}
	}
	if err := sc.Err(); err != nil {
		if errors.Is(err, bufio.ErrTooLong) {
			problems.add(line+1, "invalid_request", fmt.Sprintf("a line may be at most %d bytes", maxLineBytes))
		} else {
			return nil, uploadError(err)
		}
	}
	if n == 0 && problems.count == 0 {
		problems.add(1, "empty_file", "the file has no requests")
	}
	if problems.count > 0 {
		more := ""
		if problems.count > len(problems.list) {
			more = fmt.Sprintf("; and %d more", problems.count-len(problems.list))
		}
		return nil, invalid("file", "invalid_file", "The batch input file has %d problem(s): %s%s.", problems.count, strings.Join(problems.list, "; "), more)
	}
	f, err := imp.Commit(ctx, bytesIn, url)
	if err != nil {
		return nil, err
	}
	committed = true
	return f, nil
}

func (s *Server) getFile(c echo.Context) error {
	f, err := byID(c, filePrefix, fileNotFound, s.batches.GetFile)
	if err != nil {
		return err
	}
	return c.JSON(http.StatusOK, renderFile(f))
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
	return c.JSON(http.StatusOK, listResponse(files, renderFile, func(o *fileObject) string { return o.ID }, more))
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
	f, err := byID(c, filePrefix, fileNotFound, s.batches.GetFile)
	if err != nil {
		return err
	}
	ctx := c.Request().Context()
	w := c.Response()
	w.Header().Set("Content-Type", "application/jsonl")
	w.WriteHeader(http.StatusOK)
	bw := bufio.NewWriterSize(w, 64<<10)
	defer bw.Flush()
	if f.Kind == "upload" {
		return s.batches.EachFileLine(ctx, f.ID, func(_ int, _ string, raw []byte) error {
			bw.Write(raw)
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
		RequestCounts: map[string]int{"total": b.Total, "completed": b.Completed, "failed": b.Failed}, Metadata: b.Metadata}
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
		Message: fmt.Sprintf("No batch found with id '%s'.", id)}
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
	if err := json.Unmarshal(raw, &req); err != nil {
		return invalid("", "invalid_request", "We could not parse the JSON body of your request: %v", err)
	}
	if req.CompletionWindow != "24h" {
		return invalid("completion_window", "invalid_request", "completion_window must be 24h.")
	}
	_, endpoint, ok := batch.Endpoint(req.Endpoint)
	if !ok {
		return invalid("endpoint", "invalid_request", "endpoint must be /v1/chat/completions, /v1/completions or /v1/embeddings.")
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
	b, err := s.batches.CreateBatch(ctx, &store.CreateBatchParams{TenantID: key.TenantID, InputFileID: fid, Endpoint: req.Endpoint,
		Window: 24 * time.Hour, Metadata: req.Metadata})
	if err != nil {
		return err
	}
	go func() {
		if err := s.runner.Start(context.Background(), b); err != nil {
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
