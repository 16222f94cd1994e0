package api

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"time"

	"github.com/labstack/echo/v4"

	"github.com/levee-gw/levee/broker"
	"github.com/levee-gw/levee/quota"
	"github.com/levee-gw/levee/store"
	"github.com/levee-gw/levee/strictjson"
	"github.com/levee-gw/levee/tracing"
)

// readBody reads the request body within the configured limit.
func (s *Server) readBody(c echo.Context) ([]byte, error) {
	r := c.Request()
	limit := s.cfg.MaxBodyBytes
	tooLarge := func() error {
		return &Error{Status: http.StatusRequestEntityTooLarge, Type: "invalid_request_error", Code: "request_too_large",
			Message: fmt.Sprintf("Request body is larger than the limit of %d bytes.", limit)}
	}
	if r.ContentLength > limit {
		return nil, tooLarge()
	}
	n := r.ContentLength
	if n < 0 || n > 1<<20 {
		n = 4096
	}
	// One byte more than announced, so the read that meets the end needs
	// no larger buffer (bytes.Buffer.ReadFrom would grow any buffer with
	// less than 512 bytes free: a copy of every small body).
	b, err := readInto(make([]byte, 0, n+1), http.MaxBytesReader(c.Response(), r.Body, limit))
	var mbe *http.MaxBytesError
	switch {
	case errors.As(err, &mbe):
		return nil, tooLarge()
	case errors.Is(err, errBodyTooSlow):
		return nil, bodyTooSlow()
	case err != nil:
		return nil, invalid("", "invalid_body", "Could not read the request body.")
	}
	return b, nil
}

// readInto is io.ReadAll into b's spare capacity, growing it only when
// full.
func readInto(b []byte, r io.Reader) ([]byte, error) {
	for {
		n, err := r.Read(b[len(b):cap(b)])
		b = b[:len(b)+n]
		if err != nil {
			if errors.Is(err, io.EOF) {
				err = nil
			}
			return b, err
		}
		if len(b) == cap(b) {
			b = append(b, 0)[:len(b)]
		}
	}
}

// proxyAzure serves /openai/deployments/{deployment}/{op}: the deployment in
// the path is an alias (routed over its group) or a deployment name (pinned).
func (s *Server) proxyAzure(op broker.Op) echo.HandlerFunc {
	return func(c echo.Context) error {
		name := c.Param("deployment")
		g, ok := s.broker.Resolve(name)
		if !ok {
			return &Error{Status: http.StatusNotFound, Type: "invalid_request_error", Code: "DeploymentNotFound",
				Message: fmt.Sprintf("The API deployment %q does not exist or you do not have access to it.", strictjson.Clip(name))}
		}
		return s.proxy(c, op, g)
	}
}

// proxyOpenAI serves /v1/{op} and /openai/v1/{op}: the body's model names
// the alias or deployment.
func (s *Server) proxyOpenAI(op broker.Op) echo.HandlerFunc {
	return func(c echo.Context) error { return s.proxy(c, op, nil) }
}

func (s *Server) proxy(c echo.Context, op broker.Op, g *broker.Group) (err error) {
	start := time.Now()
	key := keyOf(c)
	reqID := s.requestID()
	c.Response().Header().Set("x-request-id", reqID)
	// Every authenticated call becomes a ledger row, rejected ones included.
	ev := store.UsageEvent{RequestID: reqID, TenantID: key.TenantID, KeyID: key.ID, Operation: op.String(), Priority: key.DefaultPriority}
	if g != nil {
		ev.Model = g.Name
	}
	deferred := false
	defer func() {
		if deferred {
			return // the job records its own usage, exactly once
		}
		var ae *Error
		if errors.As(err, &ae) {
			ev.Status = ae.Status
		} else if err != nil {
			ev.Status = http.StatusInternalServerError
		}
		ev.At, ev.Latency = start, time.Since(start)
		s.ledger.Record(ev)
		if s.tracer.Enabled() {
			s.traceCall(c, &ev)
		}
		s.metrics.requests.WithLabelValues(metricModel(g), strconv.Itoa(ev.Status)).Inc()
		s.metrics.duration.WithLabelValues(metricModel(g)).Observe(ev.Latency.Seconds())
	}()
	body, err := s.readBody(c)
	if err != nil {
		return err
	}
	g, req, err := s.broker.Admit(op, body, g)
	if g != nil {
		ev.Model = g.Name
	} else if req != nil && req.Model != "" {
		// The name is the client's, not one Levee serves: it is not worth
		// a line of its own in the tenant's usage (nor the room).
		ev.Model = unknownModel
	}
	if err != nil {
		return admitError(err, "")
	}
	if err := s.allowModel(key, g, "model"); err != nil {
		return err
	}
	if ev.Priority, err = priorityOf(c, key); err != nil {
		return err
	}
	// upstreamPrev is the continued response's id as its deployment knows
	// it, when that differs from the caller's (a background response's).
	upstreamPrev := ""
	if op == broker.OpResponses {
		var up string
		if g, up, err = s.pinResponse(c.Request().Context(), key, req, g, "previous_response_id"); err != nil {
			return err
		}
		sentNow := !req.Background && (ev.Priority == "high" || req.Stream || s.queue == nil)
		if up != req.PreviousResponseID && sentNow {
			// Sent now: named as the deployment knows it, and named back
			// in the answer. (Queued work is renamed by its worker.)
			upstreamPrev = up
			if body, err = broker.WithResponseFields(body, map[string]any{"previous_response_id": up}); err != nil {
				return badRequest(err)
			}
		}
		if req.Background {
			deferred = true // the job records its own usage
			return s.backgroundResponse(c, key, g, req, body, ev.Priority)
		}
	}
	if ev.Priority != "high" && !req.Stream && s.queue != nil {
		deferred = true
		return s.deferred(c, op, g, body, ev.Priority)
	}
	if body, err = broker.WithStreamUsage(body, req); err != nil {
		return badRequest(err)
	}

	ctx := c.Request().Context()
	call := &broker.Call{Group: g, Req: req, Body: body, Header: c.Request().Header}
	adm, err := s.admitQuota(c, call, key)
	if err != nil {
		return err
	}
	// The caller's own limits and budget learn what the call used: nothing
	// if it never got an answer, its estimate if the answer broke off.
	spent := quota.Usage{Tokens: -1}
	defer func() { adm.Finish(spent, spent.Tokens >= 0) }()
	res, err := s.broker.Do(ctx, call)
	if err != nil {
		if ctx.Err() != nil && call.Estimated > 0 {
			// Given up while the deployment had it: it charged on arrival,
			// and bills what it generates. The estimate is all that is
			// known; the ledger and the budget both take it.
			completion := estimateBudget(req, g)
			ev.PromptTokens, ev.CompletionTokens = call.Estimated-completion, completion
			ev.CostNanos = s.prices.Estimate(g, call.Estimated)
			s.prices.Record(key.TenantName, g.Name, ev.CostNanos)
			spent = quota.Usage{Tokens: int64(call.Estimated), Nanos: ev.CostNanos}
		}
		return routeError(ctx, err, g.Name)
	}
	spent = quota.Usage{Tokens: int64(res.Estimate), Nanos: s.prices.Estimate(g, res.Estimate)}
	ev.Deployment, ev.Attempts, ev.Status = res.Deployment.Name, res.Attempts, res.Resp.StatusCode
	defer res.Resp.Body.Close()
	// What usage the deployment reports is priced, and charged to the caller.
	settle := func(u *broker.Usage) {
		ev.PromptTokens, ev.CompletionTokens = u.PromptTokens, u.CompletionTokens
		ev.CostNanos = s.prices.Cost(res.Deployment, *u, false)
		spent = quota.Usage{Tokens: int64(u.PromptTokens + u.CompletionTokens), Nanos: ev.CostNanos}
		s.prices.Record(key.TenantName, g.Name, ev.CostNanos)
	}

	h := c.Response().Header()
	h.Set("x-levee-deployment", res.Deployment.Name)
	if ct := res.Resp.Header.Get("Content-Type"); ct != "" {
		h.Set("Content-Type", ct)
	}
	if id := res.Resp.Header.Get("x-request-id"); id != "" {
		h.Set("x-upstream-request-id", id)
	}
	if req.Stream && bytes.HasPrefix([]byte(res.Resp.Header.Get("Content-Type")), []byte("text/event-stream")) {
		var last []byte
		usageOf := chunkUsage
		if op == broker.OpResponses {
			usageOf = responseEventUsage
		}
		u, streamErr := relaySSE(c.Response(), res.Resp, res.Resp.StatusCode, !req.IncludeUsage && op != broker.OpResponses, usageOf, &last)
		if op == broker.OpResponses && u != nil {
			if id, stored := broker.ResponseEventID(last); stored {
				s.recordResponse(ctx, key, id, res.Deployment.Name, u)
			}
		}
		if u == nil {
			// The stream broke before the usage chunk: charge what was seen.
			est := &broker.Usage{PromptTokens: res.Estimate - estimateBudget(req, g), CompletionTokens: streamedTokens(streamErr)}
			est.TotalTokens = est.PromptTokens + est.CompletionTokens
			u = est
		}
		settle(u)
		res.Finish(u, cause(streamErr))
		if streamErr != nil && ctx.Err() != nil {
			ev.Status = 499 // the client went away
		}
		return nil
	}

	// raw is the buffered response's own memory: used only until the
	// body is closed, when this handler returns.
	raw, readErr := broker.ReadBody(res.Resp)
	if readErr != nil {
		res.Finish(nil, readErr)
		return &Error{Status: http.StatusBadGateway, Type: "server_error", Code: "upstream_error",
			Message: "The deployment's response broke off."}
	}
	var u *broker.Usage
	parseUsage := broker.ParseUsage
	if op == broker.OpResponses {
		parseUsage = broker.ResponseUsage
	}
	if uu, ok := parseUsage(raw); ok {
		u = &uu
		settle(u)
	} else if res.Resp.StatusCode >= 400 {
		// Refused with no usage (a content filter, a bad request): the
		// ledger records no cost, and neither does the budget. (Its
		// estimate stays in the rate windows, as in the deployment's.)
		spent = quota.Usage{}
	}
	res.Finish(u, nil)
	if op == broker.OpResponses && res.Resp.StatusCode == http.StatusOK {
		if id, stored := broker.ResponseID(raw); stored {
			s.recordResponse(ctx, key, id, res.Deployment.Name, u)
		}
		if upstreamPrev != "" {
			if named, err := broker.WithResponseFields(raw, map[string]any{"previous_response_id": req.PreviousResponseID}); err == nil {
				raw = named
			}
		}
	}
	h.Set("Content-Length", strconv.Itoa(len(raw)))
	c.Response().WriteHeader(res.Resp.StatusCode)
	_, _ = c.Response().Write(raw)
	// net/http would send the response only after the handler returns; the
	// bookkeeping that follows (ledger, metrics) need not delay the client.
	c.Response().Flush()
	return nil
}

// traceCall puts what the ledger learned of a call on its span.
func (s *Server) traceCall(c echo.Context, ev *store.UsageEvent) {
	traceAttrs(c, tracing.AttrTenant.String(ev.TenantID.String()), tracing.AttrKey.String(ev.KeyID.String()),
		tracing.AttrModel.String(ev.Model), tracing.AttrOperation.String(ev.Operation), tracing.AttrPriority.String(ev.Priority),
		tracing.AttrDeployment.String(ev.Deployment), tracing.AttrAttempts.Int(ev.Attempts),
		tracing.AttrInputTokens.Int(ev.PromptTokens), tracing.AttrOutputTokens.Int(ev.CompletionTokens))
}

// admitQuota charges a synchronous call to its caller's limits and budget;
// over them, the caller gets a 429 describing its own limit. The call's
// estimate, made here, is handed to the broker so it is counted once.
func (s *Server) admitQuota(c echo.Context, call *broker.Call, key *store.Key) (*quota.Admission, error) {
	if !s.quota.Configured(key.TenantID) {
		return nil, nil
	}
	est, enc := s.broker.Estimate(call.Group, call.Req)
	call.Estimated, call.EstimateEncoding = est, enc
	adm, ref, err := s.quota.Admit(c.Request().Context(), quota.Caller{Tenant: key.TenantID, Key: key.ID, Model: call.Group.Name},
		quota.Charge{Tokens: int64(est), Nanos: s.prices.Estimate(call.Group, est)})
	if err != nil {
		return nil, err
	}
	if ref != nil {
		rateHeaders(c.Response().Header(), ref.Headers)
		return nil, quotaRefused(ref, call.Group.Name)
	}
	rateHeaders(c.Response().Header(), adm.Headers)
	return adm, nil
}

// rateHeaders describe the caller's own limit, as OpenAI's headers do.
// (The keys are written canonical, so setting them costs no rewriting.)
func rateHeaders(h http.Header, q quota.Headers) {
	if q.LimitTokens >= 0 {
		h["X-Ratelimit-Limit-Tokens"] = []string{strconv.FormatInt(q.LimitTokens, 10)}
		h["X-Ratelimit-Remaining-Tokens"] = []string{strconv.FormatInt(q.RemainingTokens, 10)}
	}
	if q.LimitRequests >= 0 {
		h["X-Ratelimit-Limit-Requests"] = []string{strconv.FormatInt(q.LimitRequests, 10)}
		h["X-Ratelimit-Remaining-Requests"] = []string{strconv.FormatInt(q.RemainingRequests, 10)}
	}
}

// quotaRefused is the 429 of a call over its caller's limit or budget.
func quotaRefused(r *quota.Refusal, model string) *Error {
	e := &Error{Status: http.StatusTooManyRequests, Type: "requests", Code: r.Code}
	if !r.Never {
		e.RetryAfter = max(time.Until(r.RetryAt), time.Millisecond)
	}
	who := "This tenant"
	if r.Code == "key_rate_limit_exceeded" {
		who = "This API key"
	}
	switch {
	case r.Code == "budget_exceeded" && r.Never:
		e.Type = "insufficient_quota"
		e.Message = "This request's estimated cost is larger than the whole budget; no wait would help."
	case r.What == "budget_held":
		e.Type = "insufficient_quota"
		e.Message = "What is left of the budget would cover this request, but part of it is held by another Levee process for a moment; retry shortly."
	case r.What == "budget_left":
		e.Type = "insufficient_quota"
		e.Message = fmt.Sprintf("What is left of the budget for this period is less than this request's estimated cost; it resets at %s.", r.RetryAt.UTC().Format(time.RFC3339))
	case r.What == "budget":
		e.Type = "insufficient_quota"
		e.Message = fmt.Sprintf("The budget for this period is spent; it resets at %s.", r.RetryAt.UTC().Format(time.RFC3339))
	case r.Never:
		e.Type = "tokens"
		e.Message = fmt.Sprintf("%s's limit of tokens per minute for %s is smaller than this request's estimate; no wait would help.", who, model)
	case r.What == "tokens":
		e.Type = "tokens"
		e.Message = fmt.Sprintf("%s has used its tokens per minute for %s. Please retry after %.3f seconds.", who, model, e.RetryAfter.Seconds())
	case r.What == "requests":
		e.Message = fmt.Sprintf("%s has used its requests per minute for %s. Please retry after %.3f seconds.", who, model, e.RetryAfter.Seconds())
	default:
		e.Message = fmt.Sprintf("%s has as many calls in flight as it may. Please retry shortly.", who)
	}
	return e
}

// metricModel keeps unknown model names out of metric labels.
func metricModel(g *broker.Group) string {
	if g == nil {
		return "unknown"
	}
	return g.Name
}

// estimateBudget is the completion part of an estimate, so a broken stream
// charges only its prompt plus what was streamed.
func estimateBudget(r *broker.Request, g *broker.Group) int {
	return broker.Estimate(0, r, g.Policy.DefaultMaxTokens)
}

// unknownModel is what the ledger records for a call naming a model Levee
// does not serve.
const unknownModel = "(unknown)"

func badRequest(err error) error { return admitError(err, "") }

// admitError turns the broker's refusal of a call body into the API's
// error; prefix places the body's params (body. for a job's call).
func admitError(err error, prefix string) error {
	var be *broker.BadRequestError
	var um *broker.UnknownModelError
	switch {
	case errors.As(err, &be):
		code := be.Code
		if code == "" {
			code = "invalid_request"
		}
		return invalid(prefix+be.Param, code, "%s", be.Msg)
	case errors.As(err, &um):
		return modelNotFound(prefix+"model", um.Name)
	}
	return err
}

// modelNotFound is OpenAI's answer for a model the caller cannot use.
func modelNotFound(param, name string) *Error {
	return &Error{Status: http.StatusNotFound, Type: "invalid_request_error", Param: param, Code: "model_not_found",
		Message: fmt.Sprintf("The model `%s` does not exist or you do not have access to it.", strictjson.Clip(name))}
}

func routeError(ctx context.Context, err error, model string) *Error {
	var nc *broker.NoCapacityError
	var tl *broker.TooLargeError
	var ue *broker.UpstreamError
	switch {
	case errors.As(err, &nc):
		wait := max(time.Until(nc.RetryAt), time.Millisecond)
		return &Error{Status: http.StatusTooManyRequests, Type: "tokens", Code: "rate_limit_exceeded", RetryAfter: wait,
			Message: fmt.Sprintf("Every deployment serving %s is at its rate limit. Please retry after %.3f seconds.", model, wait.Seconds())}
	case errors.As(err, &tl):
		return &Error{Status: http.StatusBadRequest, Type: "invalid_request_error", Code: "request_too_large", Param: "max_tokens",
			Message: fmt.Sprintf("Request too large for %s: %s.", model, tl.Error())}
	case errors.As(err, &ue):
		return &Error{Status: http.StatusBadGateway, Type: "server_error", Code: "upstream_unavailable",
			Message: fmt.Sprintf("No deployment serving %s could complete the request; every one tried failed.", model)}
	case ctx.Err() != nil:
		return &Error{Status: 499, Type: "invalid_request_error", Code: "client_closed_request", Message: "The client closed the request."}
	}
	return &Error{Status: http.StatusBadGateway, Type: "server_error", Code: "upstream_error", Message: "The request could not be routed."}
}

// priorityOf reads X-Levee-Priority, defaulting to the key's priority.
func priorityOf(c echo.Context, k *store.Key) (string, error) {
	p := c.Request().Header.Get("X-Levee-Priority")
	if p == "" {
		return k.DefaultPriority, nil
	}
	switch p {
	case "high", "normal", "low":
		return p, allowPriority(k, p, "X-Levee-Priority")
	}
	return "", invalid("X-Levee-Priority", "invalid_priority", "X-Levee-Priority must be high, normal or low, not %q.", strictjson.Clip(p))
}

// streamError carries how many content events were relayed before a stream
// broke, for charging.
type streamError struct {
	err    error
	events int
}

func (e *streamError) Error() string { return e.err.Error() }
func (e *streamError) Unwrap() error { return e.err }

func cause(err error) error {
	var se *streamError
	if errors.As(err, &se) {
		return se.err
	}
	return err
}

func streamedTokens(err error) int {
	var se *streamError
	if errors.As(err, &se) {
		return se.events
	}
	return 0
}

var (
	dataPrefix = []byte("data:")
	emptyList  = []byte(`"choices":[]`)
)

// relaySSE passes a server-sent-event stream through event by event, flushing
// each, and captures the usage chunk. When Levee itself asked for usage
// (dropUsage), that chunk is not passed on: the client did not ask for it.
//
// last, if set, receives the data of the event that carried the usage (for
// the Responses API, the terminal event with the whole response).
func relaySSE(w *echo.Response, resp *http.Response, status int, dropUsage bool, usageOf func([]byte) (*broker.Usage, bool), last *[]byte) (*broker.Usage, error) {
	w.Header().Del("Content-Length")
	w.Header().Set("Cache-Control", "no-cache")
	w.WriteHeader(status)
	w.Flush()
	br := bufio.NewReaderSize(resp.Body, 32<<10)
	var (
		event  []byte
		usage  *broker.Usage
		events int
	)
	for {
		line, err := br.ReadSlice('\n')
		if errors.Is(err, bufio.ErrBufferFull) {
			// A very long line: keep reading it whole.
			event = append(event, line...)
			continue
		}
		event = append(event, line...)
		if err != nil {
			if len(bytes.TrimSpace(event)) > 0 {
				_, _ = w.Write(event)
				w.Flush()
			}
			if errors.Is(err, io.EOF) {
				if usage == nil {
					return nil, &streamError{err: io.ErrUnexpectedEOF, events: events}
				}
				return usage, nil
			}
			return usage, &streamError{err: err, events: events}
		}
		if len(bytes.TrimRight(line, "\r\n")) > 0 {
			continue // the event goes on
		}
		drop := false
		if data := eventData(event); data != nil {
			if u, ok := usageOf(data); ok {
				usage = u
				if last != nil {
					*last = append((*last)[:0], data...)
				}
				drop = dropUsage && bytes.Contains(compact(data), emptyList)
			} else if !bytes.Equal(data, []byte("[DONE]")) {
				events++
			}
		}
		if !drop {
			if _, werr := w.Write(event); werr != nil {
				return usage, &streamError{err: werr, events: events}
			}
			w.Flush()
		}
		event = event[:0]
	}
}

func eventData(event []byte) []byte {
	for len(event) > 0 {
		i := bytes.IndexByte(event, '\n')
		line := event
		if i >= 0 {
			line, event = event[:i], event[i+1:]
		} else {
			event = nil
		}
		line = bytes.TrimRight(line, "\r")
		if bytes.HasPrefix(line, dataPrefix) {
			return bytes.TrimSpace(line[len(dataPrefix):])
		}
	}
	return nil
}

// responseEventUsage is the usage of a Responses stream event's response.
func responseEventUsage(data []byte) (*broker.Usage, bool) {
	u, ok := broker.ResponseUsage(data)
	if !ok {
		return nil, false
	}
	return &u, true
}

// chunkUsage finds a non-null usage object in a chunk.
func chunkUsage(data []byte) (*broker.Usage, bool) {
	u, ok := broker.ParseUsage(data)
	if !ok {
		return nil, false
	}
	return &u, true
}

func compact(b []byte) []byte {
	if bytes.IndexByte(b, ' ') < 0 {
		return b
	}
	return bytes.ReplaceAll(b, []byte(" "), nil)
}
