package api

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/google/uuid"
	"github.com/labstack/echo/v4"

	"github.com/levee-gw/levee/broker"
	"github.com/levee-gw/levee/store"
	"github.com/levee-gw/levee/webhook"
)

// JobStore keeps jobs.
type JobStore interface {
	InsertJob(ctx context.Context, p *store.InsertJobParams) (*store.Job, bool, error)
	MarkPublishedSoon(id uuid.UUID)
	DeleteJob(ctx context.Context, id uuid.UUID) error
	GetJob(ctx context.Context, tenant, id uuid.UUID) (*store.Job, error)
	ListJobs(ctx context.Context, p *store.ListJobsParams) ([]*store.Job, bool, error)
	CancelJob(ctx context.Context, tenant, id uuid.UUID) (*store.Job, error)
}

// JobQueue is where accepted jobs are published.
type JobQueue interface {
	Publish(ctx context.Context, id uuid.UUID, priority, model string, tenant uuid.UUID) error
	WaitDone(id uuid.UUID) (wait func(ctx context.Context, tick time.Duration) bool, stop func(), err error)
	NotifyCancelled(id uuid.UUID)
	Ready(ctx context.Context) error
}

const jobPrefix = "job_"

type jobObject struct {
	ID          string          `json:"id"`
	Object      string          `json:"object"`
	Status      string          `json:"status"`
	Endpoint    string          `json:"endpoint"`
	Model       string          `json:"model"`
	Priority    string          `json:"priority"`
	Metadata    json.RawMessage `json:"metadata"`
	Attempts    int             `json:"attempts"`
	CreatedAt   int64           `json:"created_at"`
	StartedAt   *int64          `json:"started_at"`
	CompletedAt *int64          `json:"completed_at"`
	Deployment  *string         `json:"deployment"`
	Usage       *usageObject    `json:"usage"`
	Result      *resultObject   `json:"result,omitempty"`
	Error       *jobError       `json:"error,omitempty"`
	Webhook     *webhookObject  `json:"webhook,omitempty"`
}

type usageObject struct {
	PromptTokens     int `json:"prompt_tokens"`
	CompletionTokens int `json:"completion_tokens"`
	TotalTokens      int `json:"total_tokens"`
}

type resultObject struct {
	StatusCode int             `json:"status_code"`
	Body       json.RawMessage `json:"body"`
}

type jobError struct {
	Code    string `json:"code"`
	Message string `json:"message"`
}

type webhookObject struct {
	URL string `json:"url"`
	// Secret is shown once, in the response that created the job.
	Secret string `json:"secret,omitempty"`
}

func unix(t *time.Time) *int64 {
	if t == nil {
		return nil
	}
	v := t.Unix()
	return &v
}

func renderJob(j *store.Job) *jobObject {
	o := &jobObject{ID: jobPrefix + j.ID.String(), Object: "job", Status: j.Status, Endpoint: j.Endpoint, Model: j.Model,
		Priority: j.Priority, Metadata: j.Metadata, Attempts: j.Attempts, CreatedAt: j.CreatedAt.Unix(),
		StartedAt: unix(j.StartedAt), CompletedAt: unix(j.FinishedAt)}
	if len(o.Metadata) == 0 {
		o.Metadata = json.RawMessage("{}")
	}
	if j.Deployment != "" {
		d := j.Deployment
		o.Deployment = &d
	}
	if j.Terminal() && j.Status != store.JobCancelled {
		o.Usage = &usageObject{j.PromptTokens, j.CompletionTokens, j.PromptTokens + j.CompletionTokens}
	}
	if j.ResultStatus != 0 {
		body := json.RawMessage(j.ResultBody)
		if !json.Valid(body) {
			body, _ = json.Marshal(string(j.ResultBody))
		}
		o.Result = &resultObject{StatusCode: j.ResultStatus, Body: body}
	}
	if j.Status == store.JobFailed {
		o.Error = &jobError{Code: j.ErrorCode, Message: j.ErrorMessage}
	}
	if j.WebhookURL != "" {
		o.Webhook = &webhookObject{URL: j.WebhookURL}
	}
	return o
}

var jobEndpoints = map[string]broker.Op{
	"/v1/chat/completions": broker.OpChat,
	"/v1/completions":      broker.OpCompletions,
	"/v1/embeddings":       broker.OpEmbeddings,
}

type jobRequest struct {
	Endpoint string          `json:"endpoint"`
	Body     json.RawMessage `json:"body"`
	Priority string          `json:"priority"`
	Metadata json.RawMessage `json:"metadata"`
	Webhook  *webhookObject  `json:"webhook"`
}

func (s *Server) queueUnavailable() *Error {
	return &Error{Status: http.StatusServiceUnavailable, Type: "server_error", Code: "queue_unavailable",
		Message: "The job queue is not available on this gateway.", RetryAfter: time.Second}
}

// submitJob is POST /v1/jobs.
func (s *Server) submitJob(c echo.Context) error {
	if s.queue == nil {
		return s.queueUnavailable()
	}
	key := keyOf(c)
	raw, err := s.readBody(c)
	if err != nil {
		return err
	}
	var jr jobRequest
	if err := json.Unmarshal(raw, &jr); err != nil {
		return invalid("", "invalid_request", "We could not parse the JSON body of your request: %v", err)
	}
	op, ok := jobEndpoints[jr.Endpoint]
	if !ok {
		return invalid("endpoint", "invalid_endpoint", "endpoint must be one of /v1/chat/completions, /v1/completions, /v1/embeddings; got %q.", jr.Endpoint)
	}
	if len(bytes.TrimSpace(jr.Body)) == 0 || bytes.TrimSpace(jr.Body)[0] != '{' {
		return invalid("body", "invalid_request", "body must be the JSON object of the call, as sent to %s.", jr.Endpoint)
	}
	g, req, err := s.checkCall(op, jr.Body, "body.")
	if err != nil {
		return err
	}
	if req.Stream {
		return invalid("body.stream", "invalid_request", "A job cannot stream; leave stream unset.")
	}
	prio := jr.Priority
	if prio == "" {
		prio = "normal"
		if key.DefaultPriority == "low" {
			prio = "low"
		}
	}
	if prio != "normal" && prio != "low" {
		return invalid("priority", "invalid_priority", "priority must be normal or low, not %q.", prio)
	}
	if err := checkMetadata(jr.Metadata); err != nil {
		return err
	}
	hook, hookSecret := "", ""
	if jr.Webhook != nil {
		if err := s.guard.Check(c.Request().Context(), jr.Webhook.URL); err != nil {
			return invalid("webhook.url", "invalid_url", "%v.", err)
		}
		hook, hookSecret = jr.Webhook.URL, jr.Webhook.Secret
		if hookSecret == "" {
			hookSecret = webhook.NewSecret()
		} else if !webhook.ValidSecret(hookSecret) {
			return invalid("webhook.secret", "invalid_secret", "webhook.secret must be whsec_ followed by base64 of 24 to 64 bytes.")
		}
	}
	idem := c.Request().Header.Get("Idempotency-Key")
	if len(idem) > 255 {
		return invalid("Idempotency-Key", "invalid_request", "Idempotency-Key must be at most 255 characters.")
	}
	j, created, err := s.enqueue(c.Request().Context(), &store.InsertJobParams{TenantID: key.TenantID, KeyID: key.ID, Endpoint: jr.Endpoint,
		Model: g.Name, Body: jr.Body, Priority: prio, Metadata: jr.Metadata, WebhookURL: hook, WebhookSecret: hookSecret, IdempotencyKey: idem})
	if err != nil {
		return err
	}
	c.Response().Header().Set("Location", "/v1/jobs/"+jobPrefix+j.ID.String())
	o := renderJob(j)
	if o.Webhook != nil && created {
		o.Webhook.Secret = hookSecret // shown once, when the job is created
	}
	return c.JSON(http.StatusAccepted, o)
}

// checkCall validates a call body the way the synchronous path does.
func (s *Server) checkCall(op broker.Op, body []byte, paramPrefix string) (*broker.Group, *broker.Request, error) {
	req, err := broker.ParseRequest(op, body)
	if err != nil {
		return nil, nil, prefixParam(badRequest(err), paramPrefix)
	}
	if req.Model == "" {
		return nil, nil, invalid(paramPrefix+"model", "missing_model", "You must provide a model parameter.")
	}
	g, ok := s.broker.Resolve(req.Model)
	if !ok {
		return nil, nil, &Error{Status: http.StatusNotFound, Type: "invalid_request_error", Param: paramPrefix + "model", Code: "model_not_found",
			Message: fmt.Sprintf("The model `%s` does not exist or you do not have access to it.", req.Model)}
	}
	if err := g.Check(req); err != nil {
		return nil, nil, prefixParam(badRequest(err), paramPrefix)
	}
	return g, req, nil
}

func prefixParam(err error, prefix string) error {
	var e *Error
	if errors.As(err, &e) && e.Param != "" {
		e.Param = prefix + e.Param
	}
	return err
}

func checkMetadata(raw json.RawMessage) error {
	if len(raw) == 0 || string(raw) == "null" {
		return nil
	}
	var m map[string]string
	if err := json.Unmarshal(raw, &m); err != nil {
		return invalid("metadata", "invalid_metadata", "metadata must be an object of string values.")
	}
	if len(m) > 16 {
		return invalid("metadata", "invalid_metadata", "metadata may have at most 16 keys.")
	}
	for k, v := range m {
		if len(k) > 64 || len(v) > 512 {
			return invalid("metadata", "invalid_metadata", "metadata keys are at most 64 characters and values at most 512.")
		}
	}
	return nil
}

// enqueue stores a job and publishes it; a 202 is only ever returned when
// both happened. A publish that fails takes the row back and answers 503.
func (s *Server) enqueue(ctx context.Context, p *store.InsertJobParams) (*store.Job, bool, error) {
	j, created, err := s.jobs.InsertJob(ctx, p)
	if errors.Is(err, store.ErrIdempotencyMismatch) {
		return nil, false, &Error{Status: http.StatusConflict, Type: "invalid_request_error", Param: "Idempotency-Key", Code: "idempotency_key_reused",
			Message: "This Idempotency-Key was already used with a different request."}
	}
	if err != nil {
		return nil, false, err
	}
	if !created && j.Status != store.JobQueued {
		return j, false, nil // replay of a job already under way or done
	}
	if err := s.queue.Publish(ctx, j.ID, j.Priority, j.Model, j.TenantID); err != nil {
		if created {
			if derr := s.jobs.DeleteJob(context.WithoutCancel(ctx), j.ID); derr != nil {
				// The row stays queued and unpublished: the sweeper publishes
				// it, so the job will run although the client saw a 503.
				s.log.Error("rolling back an unpublished job", "job", j.ID, "err", derr)
			}
		}
		s.log.Warn("publishing job", "err", err)
		return nil, false, s.queueUnavailable()
	}
	s.jobs.MarkPublishedSoon(j.ID)
	if s.wake != nil {
		s.wake()
	}
	return j, created, nil
}

func jobNotFound(id string) *Error {
	return &Error{Status: http.StatusNotFound, Type: "invalid_request_error", Param: "id", Code: "job_not_found",
		Message: fmt.Sprintf("No job found with id '%s'.", id)}
}

func (s *Server) getJob(c echo.Context) error {
	if s.queue == nil {
		return s.queueUnavailable()
	}
	j, err := byID(c, jobPrefix, jobNotFound, s.jobs.GetJob)
	if err != nil {
		return err
	}
	return c.JSON(http.StatusOK, renderJob(j))
}

func (s *Server) listJobs(c echo.Context) error {
	if s.queue == nil {
		return s.queueUnavailable()
	}
	p := &store.ListJobsParams{TenantID: keyOf(c).TenantID, Status: c.QueryParam("status"), Limit: 20}
	switch p.Status {
	case "", store.JobQueued, store.JobRunning, store.JobSucceeded, store.JobFailed, store.JobCancelled:
	default:
		return invalid("status", "invalid_status", "status must be queued, running, succeeded, failed or cancelled.")
	}
	if v := c.QueryParam("limit"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 || n > 100 {
			return invalid("limit", "invalid_limit", "limit must be between 1 and 100.")
		}
		p.Limit = n
	}
	if v := c.QueryParam("after"); v != "" {
		id, ok := parsePrefixed(v, jobPrefix)
		if !ok {
			return invalid("after", "invalid_cursor", "after must be a job id.")
		}
		p.After = id
	}
	jobs, more, err := s.jobs.ListJobs(c.Request().Context(), p)
	if err != nil {
		return err
	}
	return c.JSON(http.StatusOK, listResponse(jobs, renderJob, func(o *jobObject) string { return o.ID }, more))
}

// listResponse is OpenAI's list envelope for a page of objects.
func listResponse[T, O any](items []T, render func(T) O, id func(O) string, more bool) map[string]any {
	data := make([]O, len(items))
	for i, it := range items {
		data[i] = render(it)
	}
	out := map[string]any{"object": "list", "data": data, "has_more": more, "first_id": nil, "last_id": nil}
	if len(data) > 0 {
		out["first_id"], out["last_id"] = id(data[0]), id(data[len(data)-1])
	}
	return out
}

func (s *Server) cancelJob(c echo.Context) error {
	if s.queue == nil {
		return s.queueUnavailable()
	}
	j, err := byID(c, jobPrefix, jobNotFound, s.jobs.CancelJob)
	if err != nil {
		return err
	}
	if j.Status == store.JobSucceeded || j.Status == store.JobFailed {
		return &Error{Status: http.StatusConflict, Type: "invalid_request_error", Code: "job_already_ended",
			Message: fmt.Sprintf("Job %s already %s; it cannot be cancelled.", c.Param("id"), j.Status)}
	}
	// A worker may be in the middle of the call: have it stop spending.
	s.queue.NotifyCancelled(j.ID)
	return c.JSON(http.StatusOK, renderJob(j))
}

// preferWait reads RFC 7240's Prefer: wait=N (seconds), bounded by config.
func (s *Server) preferWait(r *http.Request) time.Duration {
	d := s.cfg.Queue.DefaultWait
	for _, v := range r.Header.Values("Prefer") {
		for _, part := range strings.Split(v, ",") {
			if n, ok := strings.CutPrefix(strings.TrimSpace(part), "wait="); ok {
				if secs, err := strconv.Atoi(strings.TrimSpace(n)); err == nil && secs >= 0 {
					d = time.Duration(secs) * time.Second
				}
			}
		}
	}
	return min(d, s.cfg.Queue.MaxWait)
}

// deferred serves a low-priority call to a synchronous endpoint: it becomes a
// job, and the connection waits for the job's result up to Prefer: wait. In
// time, the client gets the normal response (SDKs need no change); if not, a
// 202 with the job to poll.
func (s *Server) deferred(c echo.Context, op broker.Op, g *broker.Group, body []byte, priority string) error {
	key := keyOf(c)
	ctx := c.Request().Context()
	wait := s.preferWait(c.Request())
	p := &store.InsertJobParams{TenantID: key.TenantID, KeyID: key.ID, Endpoint: "/v1/" + op.Path(), Model: g.Name, Body: body,
		Priority: priority, IdempotencyKey: c.Request().Header.Get("Idempotency-Key")}
	// Subscribe before publishing, so the end notice cannot be missed; the
	// job id is only known after the insert, so the insert comes first.
	j, created, err := s.jobs.InsertJob(ctx, p)
	if errors.Is(err, store.ErrIdempotencyMismatch) {
		return &Error{Status: http.StatusConflict, Type: "invalid_request_error", Param: "Idempotency-Key", Code: "idempotency_key_reused",
			Message: "This Idempotency-Key was already used with a different request."}
	}
	if err != nil {
		return err
	}
	waitFn, stop, err := s.queue.WaitDone(j.ID)
	if err != nil {
		return s.queueUnavailable()
	}
	defer stop()
	if created || j.Status == store.JobQueued {
		if err := s.queue.Publish(ctx, j.ID, j.Priority, j.Model, j.TenantID); err != nil {
			if created {
				_ = s.jobs.DeleteJob(context.WithoutCancel(ctx), j.ID)
			}
			return s.queueUnavailable()
		}
		s.jobs.MarkPublishedSoon(j.ID)
		if s.wake != nil {
			s.wake()
		}
	}
	h := c.Response().Header()
	h.Set("x-levee-job", jobPrefix+j.ID.String())
	deadline := time.Now().Add(wait)
	for {
		cur, err := s.jobs.GetJob(ctx, key.TenantID, j.ID)
		if err == nil && cur.Terminal() {
			return s.respondWithJob(c, cur)
		}
		left := time.Until(deadline)
		if left <= 0 || ctx.Err() != nil {
			break
		}
		waitFn(ctx, min(left, time.Second))
	}
	h.Set("Location", "/v1/jobs/"+jobPrefix+j.ID.String())
	h.Set("Preference-Applied", fmt.Sprintf("wait=%d", int(wait.Seconds())))
	cur, err := s.jobs.GetJob(context.WithoutCancel(ctx), key.TenantID, j.ID)
	if err != nil {
		cur = j
	}
	return c.JSON(http.StatusAccepted, renderJob(cur))
}

// respondWithJob answers a deferred call with its job's outcome, as the
// synchronous call would have been answered.
func (s *Server) respondWithJob(c echo.Context, j *store.Job) error {
	if j.Deployment != "" {
		c.Response().Header().Set("x-levee-deployment", j.Deployment)
	}
	if j.ResultStatus != 0 {
		c.Response().Header().Set("Content-Type", "application/json")
		c.Response().WriteHeader(j.ResultStatus)
		_, err := c.Response().Write(j.ResultBody)
		return err
	}
	if j.Status == store.JobCancelled {
		return &Error{Status: http.StatusConflict, Type: "invalid_request_error", Code: "job_cancelled", Message: "The job behind this call was cancelled."}
	}
	return &Error{Status: http.StatusBadGateway, Type: "server_error", Code: j.ErrorCode, Message: j.ErrorMessage}
}
