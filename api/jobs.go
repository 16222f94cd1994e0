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
	"unicode/utf8"

	"github.com/google/uuid"
	"github.com/labstack/echo/v4"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/trace"

	"github.com/levee-gw/levee/broker"
	"github.com/levee-gw/levee/outbox"
	"github.com/levee-gw/levee/store"
	"github.com/levee-gw/levee/strictjson"
	"github.com/levee-gw/levee/tracing"
	"github.com/levee-gw/levee/webhook"
)

// JobStore keeps jobs.
type JobStore interface {
	InsertJob(ctx context.Context, p *store.InsertJobParams) (*store.Job, bool, error)
	InsertJobs(ctx context.Context, ps []*store.InsertJobParams) ([]store.InsertedJob, bool, error)
	GetJob(ctx context.Context, tenant, id uuid.UUID) (*store.Job, error)
	ListJobs(ctx context.Context, p *store.ListJobsParams) ([]*store.Job, bool, error)
	CancelJob(ctx context.Context, tenant, id uuid.UUID) (*store.Job, error)
	DeleteJob(ctx context.Context, tenant, id uuid.UUID) error
	AddResponseEvents(ctx context.Context, job uuid.UUID, events []store.ResponseEvent) error
	ResponseEventsAfter(ctx context.Context, job uuid.UUID, after, limit int) ([]store.ResponseEvent, error)
}

// JobQueue carries the notices about jobs between processes.
type JobQueue interface {
	WaitDone(id uuid.UUID) (wait func(ctx context.Context, tick time.Duration) bool, stop func(), err error)
	NotifyCancelled(id uuid.UUID)
	Ready(ctx context.Context) error
}

// Outbox publishes accepted jobs: at once while the client waits if NATS is
// there, else later, from Postgres.
type Outbox interface {
	Publish(ctx context.Context, j *store.Job) bool
	PublishMany(ctx context.Context, jobs []*store.Job) int
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
	PromptTokens     int64 `json:"prompt_tokens"`
	CompletionTokens int64 `json:"completion_tokens"`
	TotalTokens      int64 `json:"total_tokens"`
	// Cost is in the gateway's currency (/v1/usage says which).
	Cost json.Number `json:"cost"`
}

func newUsage(prompt, completion, costNanos int64) *usageObject {
	return &usageObject{PromptTokens: prompt, CompletionTokens: completion, TotalTokens: prompt + completion, Cost: money(costNanos)}
}

// money renders billionths of a currency unit as an exact decimal number.
func money(nanos int64) json.Number { return json.Number(store.FormatNanos(nanos)) }

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
		o.Usage = newUsage(int64(j.PromptTokens), int64(j.CompletionTokens), j.CostNanos)
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
	"/v1/responses":        broker.OpResponses,
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

// submitJob is POST /v1/jobs: one job, or an array of them.
func (s *Server) submitJob(c echo.Context) error {
	if s.queue == nil {
		return s.queueUnavailable()
	}
	key := keyOf(c)
	raw, err := s.readBody(c)
	if err != nil {
		return err
	}
	if t := bytes.TrimLeft(raw, " \t\r\n"); len(t) > 0 && t[0] == '[' {
		return s.submitJobs(c, raw)
	}
	var jr jobRequest
	if err := decodeJSON(raw, &jr); err != nil {
		return err
	}
	ctx := c.Request().Context()
	p, err := s.jobParams(ctx, key, &jr, nil)
	if err != nil {
		return err
	}
	if p.IdempotencyKey, err = idempotencyKey(c.Request()); err != nil {
		return err
	}
	j, created, err := s.enqueue(ctx, p, nil)
	if err != nil {
		return err
	}
	c.Response().Header().Set("Location", "/v1/jobs/"+jobPrefix+j.ID.String())
	o := renderJob(j)
	if o.Webhook != nil && created {
		o.Webhook.Secret = p.WebhookSecret // shown once, when the job is created
	}
	return c.JSON(http.StatusAccepted, o)
}

// maxBulkJobs bounds the jobs of one bulk submit.
const maxBulkJobs = 1000

// submitJobs is POST /v1/jobs with an array: up to maxBulkJobs jobs, each
// validated as a single submit, stored in one statement and published
// together. It is all or nothing: one invalid job refuses the call, naming
// it ("[3].body.model"), and none is stored. An Idempotency-Key names the
// whole array: job i is kept under the key and i, so a retried array
// returns the same jobs.
func (s *Server) submitJobs(c echo.Context, raw []byte) error {
	key := keyOf(c)
	ctx := c.Request().Context()
	var items []json.RawMessage
	if err := decodeJSON(raw, &items); err != nil {
		// strictjson names a field of the third job "2.field".
		var e *Error
		if errors.As(err, &e) {
			if i, rest, ok := strings.Cut(e.Param, "."); ok {
				if _, aerr := strconv.Atoi(i); aerr == nil {
					return within(&Error{Status: e.Status, Type: e.Type, Code: e.Code, Param: rest,
						Message: strings.Replace(e.Message, e.Param, "["+i+"]."+rest, 1)}, "["+i+"]")
				}
			}
		}
		return err
	}
	if len(items) == 0 {
		return invalid("", "invalid_request", "The array of jobs is empty.")
	}
	if len(items) > maxBulkJobs {
		return invalid("", "too_many_jobs", "At most %d jobs may be submitted in one call; this one has %d.", maxBulkJobs, len(items))
	}
	idem, err := idempotencyKey(c.Request())
	if err != nil {
		return err
	}
	checked := map[string]error{} // webhook URLs, checked once a call
	ps := make([]*store.InsertJobParams, len(items))
	for i, item := range items {
		at := "[" + strconv.Itoa(i) + "]"
		var jr jobRequest
		if t := bytes.TrimSpace(item); len(t) == 0 || t[0] != '{' {
			return invalid(at, "invalid_request", "Each job must be a JSON object, as a single submit's body.")
		}
		if err := decodeJSON(item, &jr); err != nil {
			return within(err, at)
		}
		p, err := s.jobParams(ctx, key, &jr, checked)
		if err != nil {
			return within(err, at)
		}
		if idem != "" {
			// A unit separator cannot be in a single submit's key
			// (printable ASCII), so the two never collide.
			p.IdempotencyKey = idem + "\x1f" + strconv.Itoa(i)
		}
		ps[i] = p
	}
	jobs, created, err := s.enqueueMany(ctx, ps)
	if err != nil {
		return err
	}
	data := make([]*jobObject, len(jobs))
	for i, j := range jobs {
		data[i] = renderJob(j)
		if data[i].Webhook != nil && created[i] {
			data[i].Webhook.Secret = ps[i].WebhookSecret
		}
	}
	return c.JSON(http.StatusAccepted, map[string]any{"object": "list", "data": data})
}

// within names a bulk submit's job in its error's param.
func within(err error, at string) error {
	var e *Error
	if !errors.As(err, &e) {
		return err
	}
	ne := *e
	ne.Param = at
	if e.Param != "" {
		ne.Param = at + "." + e.Param
	}
	return &ne
}

// jobParams validates a job request as the job its key may submit. checked,
// when not nil, keeps the verdicts on webhook URLs already checked in this
// call.
func (s *Server) jobParams(ctx context.Context, key *store.Key, jr *jobRequest, checked map[string]error) (*store.InsertJobParams, error) {
	op, ok := jobEndpoints[jr.Endpoint]
	if !ok {
		return nil, invalid("endpoint", "invalid_endpoint", "endpoint must be one of /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/responses; got %q.", strictjson.Clip(jr.Endpoint))
	}
	if len(bytes.TrimSpace(jr.Body)) == 0 || bytes.TrimSpace(jr.Body)[0] != '{' {
		return nil, invalid("body", "invalid_request", "body must be the JSON object of the call, as sent to %s.", jr.Endpoint)
	}
	g, req, err := s.checkCall(op, jr.Body, "body.")
	if err != nil {
		return nil, err
	}
	// A job is a call too: its key must be allowed the call's endpoint
	// group and model, as well as jobs.
	if err := allowGroup(key, op.Group()); err != nil {
		return nil, err
	}
	if err := s.allowModel(key, g, "body.model"); err != nil {
		return nil, err
	}
	if req.Stream {
		return nil, invalid("body.stream", "invalid_request", "A job cannot stream; leave stream unset.")
	}
	if req.Background {
		return nil, invalid("body.background", "invalid_request", "A job is already in the background; leave background unset.")
	}
	// A job continuing a stored response runs where it is stored.
	// Its worker names the continued response as the deployment knows it.
	if g, _, err = s.pinResponse(ctx, key, req, g, "body.previous_response_id"); err != nil {
		return nil, err
	}
	prio := jr.Priority
	if prio == "" {
		prio = "normal"
		if key.DefaultPriority == "low" || key.Scopes.MaxPriority == "low" {
			prio = "low"
		}
	}
	if prio != "normal" && prio != "low" {
		return nil, invalid("priority", "invalid_priority", "priority must be normal or low, not %q.", strictjson.Clip(prio))
	}
	if err := allowPriority(key, prio, "priority"); err != nil {
		return nil, err
	}
	if err := checkMetadata(jr.Metadata); err != nil {
		return nil, err
	}
	p := &store.InsertJobParams{TenantID: key.TenantID, KeyID: key.ID, TokenCaller: key.Token, Endpoint: jr.Endpoint,
		Model: g.Name, Body: jr.Body, Priority: prio, Metadata: jr.Metadata}
	if jr.Webhook != nil {
		err, seen := checked[jr.Webhook.URL]
		if !seen {
			err = s.guard.Check(ctx, jr.Webhook.URL)
			if checked != nil {
				checked[jr.Webhook.URL] = err
			}
		}
		if err != nil {
			return nil, invalid("webhook.url", "invalid_url", "%v.", err)
		}
		p.WebhookURL, p.WebhookSecret = jr.Webhook.URL, jr.Webhook.Secret
		if p.WebhookSecret == "" {
			p.WebhookSecret = webhook.NewSecret()
		} else if !webhook.ValidSecret(p.WebhookSecret) {
			return nil, invalid("webhook.secret", "invalid_secret", "webhook.secret must be whsec_ followed by base64 of 24 to 64 bytes.")
		}
	}
	return p, nil
}

// checkCall validates a job's call body the way the synchronous path does.
func (s *Server) checkCall(op broker.Op, body []byte, paramPrefix string) (*broker.Group, *broker.Request, error) {
	g, req, err := s.broker.Admit(op, body, nil)
	if err != nil {
		return nil, nil, admitError(err, paramPrefix)
	}
	return g, req, nil
}

// Metadata bounds (OpenAI's): pairs, and characters of a key and a value.
const (
	maxMetadataPairs = 16
	maxMetadataKey   = 64
	maxMetadataValue = 512
)

// checkMetadata validates metadata: an object of at most 16 string pairs,
// bounded, that Postgres can store (no NUL) and a client can read back.
func checkMetadata(raw json.RawMessage) error {
	if len(raw) == 0 || string(raw) == "null" {
		return nil
	}
	var m map[string]string
	if err := strictjson.Unmarshal(raw, &m); err != nil {
		return invalid("metadata", "invalid_metadata", "metadata must be an object of string values.")
	}
	if len(m) > maxMetadataPairs {
		return invalid("metadata", "invalid_metadata", "metadata may have at most %d keys.", maxMetadataPairs)
	}
	for k, v := range m {
		if utf8.RuneCountInString(k) > maxMetadataKey || utf8.RuneCountInString(v) > maxMetadataValue {
			return invalid("metadata", "invalid_metadata", "metadata keys are at most %d characters and values at most %d.", maxMetadataKey, maxMetadataValue)
		}
		if !strictjson.ValidText(k) || !strictjson.ValidText(v) {
			return invalid("metadata", "invalid_metadata", "metadata keys and values may not contain NUL or other control characters.")
		}
	}
	return nil
}

// decodeJSON reads a request body of the API's own (not a call to a
// deployment) as strictly as a call body.
func decodeJSON(raw []byte, v any) error {
	if err := strictjson.Unmarshal(raw, v); err != nil {
		var se *strictjson.Error
		if errors.As(err, &se) {
			return invalid(se.Param, "invalid_request", "%s", se.Msg)
		}
		return invalid("", "invalid_request", "We could not parse the JSON body of your request.")
	}
	return nil
}

// callerGone answers a caller whose key was revoked, or tenant deleted,
// while its request was on its way: as a key that no longer works.
func callerGone() *Error {
	return &Error{Status: http.StatusUnauthorized, Type: "invalid_request_error", Code: "invalid_api_key",
		Message: "This API key was revoked, or its tenant deleted, while the request was being read; nothing was accepted."}
}

// enqueue accepts a job: once its row is committed it is durable and the
// client gets its 202, whatever NATS is doing; publishing it is the
// outbox's certain consequence (at once if NATS is there, else as soon as it
// is back). beforePublish, if set, runs between the two (a deferred call
// subscribes to the job's end there, so the notice cannot be missed).
func (s *Server) enqueue(ctx context.Context, p *store.InsertJobParams, beforePublish func(*store.Job)) (*store.Job, bool, error) {
	p.PublishClaim = outbox.InlineClaim
	j, created, err := s.jobs.InsertJob(ctx, p)
	if errors.Is(err, store.ErrCallerGone) {
		return nil, false, callerGone()
	}
	if errors.Is(err, store.ErrIdempotencyMismatch) {
		return nil, false, &Error{Status: http.StatusConflict, Type: "invalid_request_error", Param: "Idempotency-Key", Code: "idempotency_key_reused",
			Message: "This Idempotency-Key was already used with a different request."}
	}
	if err != nil {
		return nil, false, err
	}
	if span := trace.SpanFromContext(ctx); span.IsRecording() {
		span.SetAttributes(tracing.AttrJob.String(jobPrefix+j.ID.String()), tracing.AttrTenant.String(j.TenantID.String()),
			tracing.AttrModel.String(j.Model), tracing.AttrPriority.String(j.Priority))
	}
	if beforePublish != nil {
		beforePublish(j)
	}
	// A replay of a job accepted earlier is already on its way.
	if created {
		s.outbox.Publish(ctx, j)
		if s.wake != nil {
			s.wake()
		}
	}
	return j, created, nil
}

// enqueueMany accepts the jobs of a bulk submit, all or none, and publishes
// those it created together (see enqueue).
func (s *Server) enqueueMany(ctx context.Context, ps []*store.InsertJobParams) ([]*store.Job, []bool, error) {
	for _, p := range ps {
		p.PublishClaim = outbox.InlineClaim
	}
	res, ok, err := s.jobs.InsertJobs(ctx, ps)
	if err != nil {
		return nil, nil, err
	}
	if !ok {
		for i, r := range res {
			switch {
			case errors.Is(r.Err, store.ErrCallerGone):
				return nil, nil, callerGone()
			case errors.Is(r.Err, store.ErrIdempotencyMismatch):
				return nil, nil, &Error{Status: http.StatusConflict, Type: "invalid_request_error", Param: "Idempotency-Key", Code: "idempotency_key_reused",
					Message: fmt.Sprintf("This Idempotency-Key was already used with a different array (job %d differs); nothing was accepted.", i)}
			case r.Err != nil:
				return nil, nil, r.Err
			}
		}
	}
	jobs, created := make([]*store.Job, len(res)), make([]bool, len(res))
	var fresh []*store.Job
	for i, r := range res {
		jobs[i], created[i] = r.Job, r.Created
		if r.Created {
			fresh = append(fresh, r.Job)
		}
	}
	if span := trace.SpanFromContext(ctx); span.IsRecording() {
		span.SetAttributes(tracing.AttrTenant.String(jobs[0].TenantID.String()), attribute.Int("levee.jobs", len(jobs)))
	}
	if len(fresh) > 0 {
		s.outbox.PublishMany(ctx, fresh)
		if s.wake != nil {
			s.wake()
		}
	}
	return jobs, created, nil
}

func jobNotFound(id string) *Error {
	return &Error{Status: http.StatusNotFound, Type: "invalid_request_error", Param: "id", Code: "job_not_found",
		Message: fmt.Sprintf("No job found with id '%s'.", strictjson.Clip(id))}
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

// idempotencyKey reads the Idempotency-Key header: at most 255 visible
// ASCII characters (as Stripe's), so it is stored and compared as sent.
func idempotencyKey(r *http.Request) (string, error) {
	k := r.Header.Get("Idempotency-Key")
	if len(k) > 255 {
		return "", invalid("Idempotency-Key", "invalid_request", "Idempotency-Key must be at most 255 characters.")
	}
	for i := 0; i < len(k); i++ {
		if k[i] < 0x20 || k[i] > 0x7e {
			return "", invalid("Idempotency-Key", "invalid_request", "Idempotency-Key must be printable ASCII.")
		}
	}
	return k, nil
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
	idem, err := idempotencyKey(c.Request())
	if err != nil {
		return err
	}
	p := &store.InsertJobParams{TenantID: key.TenantID, KeyID: key.ID, TokenCaller: key.Token, Endpoint: "/v1/" + op.Path(), Model: g.Name, Body: body,
		Priority: priority, IdempotencyKey: idem}
	// Without the end notice (NATS away) the wait still ends: Postgres is
	// read again every tick.
	waitFn := func(ctx context.Context, tick time.Duration) bool { sleep(ctx, tick); return false }
	stop := func() {}
	defer func() { stop() }()
	ictx, cancel := s.dbContext(ctx)
	j, _, err := s.enqueue(ictx, p, func(j *store.Job) {
		if w, st, err := s.queue.WaitDone(j.ID); err == nil {
			waitFn, stop = w, st
		}
	})
	cancel()
	if err != nil {
		return err
	}
	getJob := func(ctx context.Context) (*store.Job, error) {
		ctx, cancel := s.dbContext(ctx)
		defer cancel()
		return s.jobs.GetJob(ctx, key.TenantID, j.ID)
	}
	h := c.Response().Header()
	h.Set("x-levee-job", jobPrefix+j.ID.String())
	deadline := time.Now().Add(wait)
	for {
		cur, err := getJob(ctx)
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
	cur, err := getJob(context.WithoutCancel(ctx))
	if err != nil {
		cur = j
	}
	return c.JSON(http.StatusAccepted, renderJob(cur))
}

func sleep(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-t.C:
	}
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
