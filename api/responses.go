package api

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/labstack/echo/v4"

	"github.com/levee-gw/levee/broker"
	"github.com/levee-gw/levee/store"
	"github.com/levee-gw/levee/strictjson"
)

// The Responses API. A stored response (store, default true) lives on the
// deployment that made it and nowhere else: Levee records which deployment
// that is, for the tenant that made it, and sends every follow-up
// (previous_response_id), read, delete and input_items listing there. A
// follow-up whose deployment has no room waits (a deferred call) or gets a
// 429; it is never sent to another deployment, where it could only fail.
// Another tenant's response id is, to a caller, an id that does not exist.

func responseNotFound(param, id string) *Error {
	e := &Error{Status: http.StatusNotFound, Type: "invalid_request_error", Param: param, Code: "response_not_found",
		Message: fmt.Sprintf("Response with id '%s' not found.", strictjson.Clip(id))}
	if strings.HasSuffix(param, "previous_response_id") {
		e.Code = "previous_response_not_found"
		e.Message = fmt.Sprintf("Previous response with id '%s' not found.", strictjson.Clip(id))
	}
	return e
}

// responseRoute finds where the caller's response id is stored.
func (s *Server) responseRoute(ctx context.Context, key *store.Key, id, param string) (*store.ResponseRoute, *broker.Deployment, error) {
	if s.batches == nil || !broker.ValidResponseID(id) {
		return nil, nil, responseNotFound(param, id)
	}
	dctx, cancel := s.dbContext(ctx)
	rt, err := s.batches.ResponseRouteOf(dctx, key.TenantID, id)
	cancel()
	if errors.Is(err, store.ErrNotFound) {
		return nil, nil, responseNotFound(param, id)
	}
	if err != nil {
		return nil, nil, err
	}
	d, ok := s.broker.Deployment(rt.Deployment)
	if !ok {
		// The deployment that stores it is no longer configured: the
		// response is out of reach.
		return nil, nil, responseNotFound(param, id)
	}
	return rt, d, nil
}

// pinResponse sends a call that continues a stored response to the
// deployment that stores it, charged for the conversation it carries. It
// returns the pinned group and the id the deployment knows the response by
// (a background response's id is Levee's). The model the caller named must
// be served by that deployment: a conversation stays with its model, and a
// key allowed one model cannot continue another's.
func (s *Server) pinResponse(ctx context.Context, key *store.Key, req *broker.Request, g *broker.Group, param string) (*broker.Group, string, error) {
	if req.PreviousResponseID == "" {
		return g, "", nil
	}
	rt, d, err := s.responseRoute(ctx, key, req.PreviousResponseID, param)
	if err != nil {
		return nil, "", err
	}
	pg, ok := s.broker.Resolve(d.Name)
	if !ok {
		return nil, "", responseNotFound(param, req.PreviousResponseID)
	}
	// By name: a reload between the two lookups may have replaced the
	// deployment's record with an equal one of new settings.
	if !slices.ContainsFunc(g.Deployments(), func(x *broker.Deployment) bool { return x.Name == d.Name }) {
		return nil, "", invalid(strings.TrimSuffix(param, "previous_response_id")+"model", "model_mismatch",
			"Response '%s' was made by another model than %q: continue it with the model that made it.", strictjson.Clip(req.PreviousResponseID), strictjson.Clip(g.Name))
	}
	req.ContextTokens = rt.ContextTokens
	return pg, rt.Upstream(), nil
}

// recordResponse remembers where a response the caller made is stored,
// before the caller can learn its id.
func (s *Server) recordResponse(ctx context.Context, key *store.Key, id, deployment string, u *broker.Usage) {
	if s.batches == nil {
		return
	}
	rt := &store.ResponseRoute{ID: id, TenantID: key.TenantID, Deployment: deployment}
	if u != nil {
		rt.ContextTokens = u.PromptTokens + u.CompletionTokens
	}
	dctx, cancel := s.dbContext(context.WithoutCancel(ctx))
	defer cancel()
	if err := s.batches.RecordResponse(dctx, rt, s.cfg.Responses.Retention); err != nil {
		s.log.Warn("recording where a response is stored; follow-ups to it will be refused", "response", id, "err", err)
	}
}

// wantsStream reports whether a GET of a response asks for its stream:
// ?stream=true (openai-node, curl), or {"stream": true} in a JSON body,
// which openai-go sends even on a GET.
func wantsStream(r *http.Request) bool {
	if r.URL.Query().Get("stream") == "true" {
		return true
	}
	if r.Body == nil || r.ContentLength == 0 {
		return false
	}
	raw, err := io.ReadAll(io.LimitReader(r.Body, 4096))
	if err != nil {
		return false
	}
	var b struct {
		Stream bool `json:"stream"`
	}
	return strictjson.Unmarshal(raw, &b) == nil && b.Stream
}

// forwardedResponseQuery keeps the query parameters OpenAI defines for
// these routes, and drops the rest.
var forwardedResponseQuery = []string{"include[]", "include", "limit", "order", "after", "before"}

// storedResponse serves GET and DELETE /v1/responses/{id} and GET
// /v1/responses/{id}/input_items: a background response from Postgres,
// any other from the deployment that stores it.
func (s *Server) storedResponse(suffix string) echo.HandlerFunc {
	return func(c echo.Context) error {
		key, id, r := keyOf(c), c.Param("id"), c.Request()
		_, background := store.ParseBackgroundResponseID(id)
		if r.Method == http.MethodGet && suffix == "" && wantsStream(r) {
			if !background {
				return invalid("stream", "invalid_request", "Only a streamed background response can be streamed again.")
			}
			after := -1
			if v := r.URL.Query().Get("starting_after"); v != "" {
				n, err := strconv.Atoi(v)
				if err != nil || n < -1 {
					return invalid("starting_after", "invalid_request", "starting_after must be a sequence number.")
				}
				after = n
			}
			j, err := s.backgroundJob(r.Context(), key, id)
			if err != nil {
				return err
			}
			var made struct {
				Stream bool `json:"stream"`
			}
			if json.Unmarshal(j.Body, &made) != nil || !made.Stream {
				return invalid("stream", "invalid_request", "This background response was not created with stream: it has no events to stream; read it without stream.")
			}
			return s.followResponse(c, key, j, after)
		}
		if background {
			return s.storedBackground(c, key, id, suffix)
		}
		return s.forwardStored(c, key, id, suffix)
	}
}

// storedReply is a deployment's answer about a stored response.
type storedReply struct {
	status      int
	contentType string
	body        []byte
	deployment  string
}

// fetchStored sends a GET or DELETE of a stored response (or its input
// items) to the deployment that stores it, under the id it knows, and
// answers as the caller knows it (Levee's id).
func (s *Server) fetchStored(ctx context.Context, key *store.Key, method, id, suffix string, query url.Values, from http.Header) (*storedReply, error) {
	rt, d, err := s.responseRoute(ctx, key, id, "id")
	if err != nil {
		return nil, err
	}
	q := url.Values{}
	for _, k := range forwardedResponseQuery {
		if vs, ok := query[k]; ok {
			q[k] = vs
		}
	}
	resp, err := s.broker.Forward(ctx, d, method, "responses/"+rt.Upstream()+suffix, q.Encode(), from)
	if err != nil {
		if ctx.Err() != nil {
			return nil, &Error{Status: 499, Type: "invalid_request_error", Code: "client_closed_request", Message: "The client closed the request."}
		}
		s.log.Warn("reading a stored response", "deployment", d.Name, "err", err)
		return nil, &Error{Status: http.StatusBadGateway, Type: "server_error", Code: "upstream_unavailable",
			Message: "The deployment that stores this response could not be reached; retry shortly."}
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(io.LimitReader(resp.Body, broker.MaxResponseBody))
	if err != nil {
		return nil, &Error{Status: http.StatusBadGateway, Type: "server_error", Code: "upstream_error", Message: "The deployment's response broke off."}
	}
	if method == http.MethodDelete && resp.StatusCode == http.StatusOK {
		dctx, cancel := s.dbContext(context.WithoutCancel(ctx))
		if err := s.batches.ForgetResponse(dctx, key.TenantID, id); err != nil {
			s.log.Warn("forgetting a deleted response", "response", id, "err", err)
		}
		cancel()
	}
	if rt.UpstreamID != "" && resp.StatusCode == http.StatusOK && suffix == "" {
		if fixed, err := broker.WithResponseFields(raw, map[string]any{"id": id}); err == nil {
			raw = fixed
		}
	}
	return &storedReply{status: resp.StatusCode, contentType: resp.Header.Get("Content-Type"), body: raw, deployment: d.Name}, nil
}

// forwardStored relays fetchStored's answer to the caller.
func (s *Server) forwardStored(c echo.Context, key *store.Key, id, suffix string) error {
	r := c.Request()
	rep, err := s.fetchStored(r.Context(), key, r.Method, id, suffix, r.URL.Query(), r.Header)
	if err != nil {
		return err
	}
	h := c.Response().Header()
	h.Set("x-levee-deployment", rep.deployment)
	if rep.contentType != "" {
		h.Set("Content-Type", rep.contentType)
	}
	h.Set("Content-Length", strconv.Itoa(len(rep.body)))
	c.Response().WriteHeader(rep.status)
	_, _ = c.Response().Write(rep.body)
	return nil
}

// A background response is a Levee job: accepted at once as a queued
// Response (its id Levee's own), run by the workers in the headroom the
// synchronous traffic leaves, read back from Postgres, cancelled like a
// job, and announced with OpenAI's webhook events (response.completed,
// incomplete, failed, cancelled). Once it has run, the deployment stores
// it under its own id: follow-ups and input_items are sent there with
// that id.

func (s *Server) backgroundResponse(c echo.Context, key *store.Key, g *broker.Group, req *broker.Request, body []byte, prio string) error {
	if s.queue == nil || s.jobs == nil {
		return s.queueUnavailable()
	}
	if prio == "high" {
		prio = "normal" // background work is queued work: it never goes before the synchronous calls
	}
	// The deployment runs it in the foreground, for a worker.
	body, err := broker.WithResponseFields(body, map[string]any{"background": nil})
	if err != nil {
		return badRequest(err)
	}
	idem, err := idempotencyKey(c.Request())
	if err != nil {
		return err
	}
	j, _, err := s.enqueue(c.Request().Context(), &store.InsertJobParams{TenantID: key.TenantID, KeyID: key.ID, TokenCaller: key.Token,
		Endpoint: "/v1/responses", Model: g.Name, Body: body, Priority: prio, IdempotencyKey: idem, Background: true}, nil)
	if err != nil {
		return err
	}
	if !req.Stream {
		return s.writeBackground(c, j)
	}
	// Streamed: Levee's own first events (the response created, queued),
	// stored like the rest so a reconnecting client reads them too; then
	// the deployment's, as the worker relays them.
	obj, err := backgroundObject(j)
	if err != nil {
		return err
	}
	var first []store.ResponseEvent
	for seq, typ := range []string{"response.created", "response.queued"} {
		data, _ := json.Marshal(map[string]any{"type": typ, "sequence_number": seq, "response": json.RawMessage(obj)})
		first = append(first, store.ResponseEvent{Seq: seq, Type: typ, Data: data})
	}
	dctx, cancel := s.dbContext(c.Request().Context())
	err = s.jobs.AddResponseEvents(dctx, j.ID, first)
	cancel()
	if err != nil {
		return err
	}
	return s.followResponse(c, key, j, -1)
}

// followResponse streams a background response's events numbered after
// after, as they are stored, until its terminal event. A response that
// ended without one (it failed in Levee, or was cancelled) ends the stream
// with response.failed, or simply, once what was stored has been sent.
func (s *Server) followResponse(c echo.Context, key *store.Key, j *store.Job, after int) error {
	ctx := c.Request().Context()
	w := c.Response()
	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("Cache-Control", "no-cache")
	w.Header().Set("x-levee-job", jobPrefix+j.ID.String())
	w.WriteHeader(http.StatusOK)
	w.Flush()
	write := func(typ string, data []byte) error {
		if _, err := fmt.Fprintf(w, "event: %s\ndata: %s\n\n", typ, data); err != nil {
			return err
		}
		w.Flush()
		return nil
	}
	last := after
	checked := time.Now()
	for {
		dctx, cancel := s.dbContext(ctx)
		events, err := s.jobs.ResponseEventsAfter(dctx, j.ID, last, 500)
		cancel()
		if err != nil {
			s.log.Warn("reading a background response's events", "job", j.ID, "err", err)
			return nil // begun: the client reconnects with starting_after
		}
		for _, e := range events {
			if err := write(e.Type, e.Data); err != nil {
				return nil
			}
			last = e.Seq
			if broker.TerminalEvent(e.Type) {
				return nil
			}
		}
		if len(events) > 0 {
			continue
		}
		if j.Terminal() {
			// It was seen ended before the events were read: every event
			// stored before it ended has been sent. One that ended
			// without its terminal event stored (it failed in Levee)
			// ends the stream with one made of its state.
			typ := map[string]string{store.JobFailed: "response.failed", store.JobSucceeded: "response." + j.ResponseStatus}[j.Status]
			if typ == "response." {
				typ = "response.completed"
			}
			if typ != "" {
				obj, _ := backgroundObject(j)
				data, _ := json.Marshal(map[string]any{"type": typ, "sequence_number": last + 1, "response": json.RawMessage(obj)})
				_ = write(typ, data)
			}
			return nil
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(50 * time.Millisecond):
		}
		if time.Since(checked) > 500*time.Millisecond {
			checked = time.Now()
			dctx, cancel := s.dbContext(ctx)
			cur, err := s.jobs.GetJob(dctx, key.TenantID, j.ID)
			cancel()
			if errors.Is(err, store.ErrNotFound) {
				return nil // deleted: nothing more will come
			}
			if err == nil {
				j = cur
			}
		}
	}
}

// backgroundObject renders a background response from its job: queued,
// in progress, the deployment's Response under Levee's id once it ran,
// failed with the reason, or cancelled.
func backgroundObject(j *store.Job) ([]byte, error) {
	id := store.BackgroundResponseID(j.ID)
	if j.Status == store.JobSucceeded && len(j.ResultBody) > 0 {
		return broker.WithResponseFields(j.ResultBody, map[string]any{"id": id, "background": true})
	}
	var req struct {
		Model              string          `json:"model"`
		Instructions       *string         `json:"instructions"`
		PreviousResponseID *string         `json:"previous_response_id"`
		MaxOutputTokens    *int            `json:"max_output_tokens"`
		Metadata           json.RawMessage `json:"metadata"`
		Store              *bool           `json:"store"`
	}
	_ = json.Unmarshal(j.Body, &req)
	status := map[string]string{store.JobQueued: "queued", store.JobRunning: "in_progress", store.JobFailed: "failed",
		store.JobCancelled: "cancelled"}[j.Status]
	o := map[string]any{"id": id, "object": "response", "created_at": j.CreatedAt.Unix(), "status": status, "background": true,
		"model": req.Model, "output": []any{}, "usage": nil, "error": nil, "incomplete_details": nil, "instructions": req.Instructions,
		"previous_response_id": req.PreviousResponseID, "max_output_tokens": req.MaxOutputTokens, "store": req.Store == nil || *req.Store,
		"metadata": map[string]any{}}
	if len(req.Metadata) > 0 && string(req.Metadata) != "null" {
		o["metadata"] = req.Metadata
	}
	if j.Status == store.JobFailed {
		code := j.ErrorCode
		if code == "" {
			code = "server_error"
		}
		o["error"] = map[string]any{"code": code, "message": j.ErrorMessage}
	}
	return json.Marshal(o)
}

func (s *Server) writeBackground(c echo.Context, j *store.Job) error {
	raw, err := backgroundObject(j)
	if err != nil {
		return err
	}
	if j.Deployment != "" {
		c.Response().Header().Set("x-levee-deployment", j.Deployment)
	}
	return c.JSONBlob(http.StatusOK, raw)
}

// backgroundJob finds the caller's background response by its id.
func (s *Server) backgroundJob(ctx context.Context, key *store.Key, id string) (*store.Job, error) {
	jid, ok := store.ParseBackgroundResponseID(id)
	if !ok || s.jobs == nil {
		return nil, responseNotFound("id", id)
	}
	dctx, cancel := s.dbContext(ctx)
	defer cancel()
	j, err := s.jobs.GetJob(dctx, key.TenantID, jid)
	if errors.Is(err, store.ErrNotFound) || (err == nil && !j.Background) {
		return nil, responseNotFound("id", id)
	}
	return j, err
}

// storedBackground serves GET, DELETE and input_items of a background
// response.
func (s *Server) storedBackground(c echo.Context, key *store.Key, id, suffix string) error {
	r := c.Request()
	j, err := s.backgroundJob(r.Context(), key, id)
	if err != nil {
		return err
	}
	ran := j.Status == store.JobSucceeded
	switch {
	case r.Method == http.MethodGet && suffix == "":
		return s.writeBackground(c, j)
	case r.Method == http.MethodGet:
		if ran {
			if _, _, err := s.responseRoute(r.Context(), key, id, "id"); err == nil {
				return s.forwardStored(c, key, id, suffix)
			}
		}
		return c.JSON(http.StatusOK, inputItemsOf(j))
	}
	// DELETE: an ended response only (a running one is cancelled first).
	if !j.Terminal() {
		return &Error{Status: http.StatusConflict, Type: "invalid_request_error", Param: "id", Code: "response_in_progress",
			Message: "This background response has not ended; cancel it (POST /v1/responses/{id}/cancel) before deleting it."}
	}
	if ran {
		// The deployment's copy goes first: while it cannot be deleted,
		// neither is Levee's, so "deleted" is true of both.
		rep, err := s.fetchStored(r.Context(), key, http.MethodDelete, id, "", nil, r.Header)
		var e *Error
		switch {
		case errors.As(err, &e) && e.Status == http.StatusNotFound:
			// No route: never stored, or already gone.
		case err != nil:
			return err
		case rep.status != http.StatusOK && rep.status != http.StatusNotFound:
			return &Error{Status: http.StatusBadGateway, Type: "server_error", Code: "upstream_error",
				Message: fmt.Sprintf("The deployment that stores this response answered %d to its deletion; retry shortly.", rep.status)}
		}
	}
	dctx, cancel := s.dbContext(r.Context())
	defer cancel()
	if err := s.jobs.DeleteJob(dctx, key.TenantID, j.ID); err != nil && !errors.Is(err, store.ErrNotFound) {
		return err
	}
	if err := s.batches.ForgetResponse(dctx, key.TenantID, id); err != nil {
		return err
	}
	return c.JSON(http.StatusOK, map[string]any{"id": id, "object": "response.deleted", "deleted": true})
}

// inputItemsOf lists a background response's input from its body, before
// the deployment holds it.
func inputItemsOf(j *store.Job) map[string]any {
	var req struct {
		Input json.RawMessage `json:"input"`
	}
	_ = json.Unmarshal(j.Body, &req)
	var items []map[string]any
	var text string
	if json.Unmarshal(req.Input, &text) == nil {
		items = []map[string]any{{"type": "message", "role": "user", "content": []any{map[string]any{"type": "input_text", "text": text}}}}
	} else {
		_ = json.Unmarshal(req.Input, &items)
	}
	base := strings.TrimPrefix(store.BackgroundResponseID(j.ID), "resp_")
	for i, it := range items {
		if _, ok := it["id"]; !ok {
			it["id"] = fmt.Sprintf("msg_%s_%d", base, i)
		}
		if _, ok := it["type"]; !ok {
			it["type"] = "message"
		}
	}
	out := map[string]any{"object": "list", "data": items, "has_more": false, "first_id": nil, "last_id": nil}
	if len(items) > 0 {
		out["first_id"], out["last_id"] = items[0]["id"], items[len(items)-1]["id"]
	} else {
		out["data"] = []any{}
	}
	return out
}

// cancelResponse serves POST /v1/responses/{id}/cancel: background
// responses only, as OpenAI's. A queued one is never sent; a running one's
// call is aborted. An ended one is returned as it ended.
func (s *Server) cancelResponse(c echo.Context) error {
	key, id := keyOf(c), c.Param("id")
	if _, ok := store.ParseBackgroundResponseID(id); !ok {
		if _, _, err := s.responseRoute(c.Request().Context(), key, id, "id"); err != nil {
			return err
		}
		return invalid("id", "invalid_request", "Only background responses can be cancelled.")
	}
	j, err := s.backgroundJob(c.Request().Context(), key, id)
	if err != nil {
		return err
	}
	if !j.Terminal() {
		dctx, cancel := s.dbContext(c.Request().Context())
		j, err = s.jobs.CancelJob(dctx, key.TenantID, j.ID)
		cancel()
		if err != nil {
			return err
		}
		if s.queue != nil {
			s.queue.NotifyCancelled(j.ID)
		}
	}
	return s.writeBackground(c, j)
}
