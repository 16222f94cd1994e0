package api

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"

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
	if param == "previous_response_id" {
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
// deployment that stores it, charged for the conversation it carries.
func (s *Server) pinResponse(ctx context.Context, key *store.Key, req *broker.Request, g *broker.Group) (*broker.Group, error) {
	if req.PreviousResponseID == "" {
		return g, nil
	}
	rt, d, err := s.responseRoute(ctx, key, req.PreviousResponseID, "previous_response_id")
	if err != nil {
		return nil, err
	}
	pg, ok := s.broker.Resolve(d.Name)
	if !ok {
		return nil, responseNotFound("previous_response_id", req.PreviousResponseID)
	}
	req.ContextTokens = rt.ContextTokens
	return pg, nil
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

// forwardedResponseQuery keeps the query parameters OpenAI defines for
// these routes, and drops the rest.
var forwardedResponseQuery = []string{"include[]", "include", "limit", "order", "after", "before"}

// storedResponse serves GET and DELETE /v1/responses/{id} and GET
// /v1/responses/{id}/input_items from the deployment that stores it.
func (s *Server) storedResponse(suffix string) echo.HandlerFunc {
	return func(c echo.Context) error {
		key := keyOf(c)
		id := c.Param("id")
		r := c.Request()
		if r.Method == http.MethodGet && r.URL.Query().Get("stream") == "true" {
			return invalid("stream", "unsupported_parameter", "Streaming a stored response is only for background responses, which this gateway does not serve yet.")
		}
		_, d, err := s.responseRoute(r.Context(), key, id, "id")
		if err != nil {
			return err
		}
		q := url.Values{}
		for _, k := range forwardedResponseQuery {
			if vs, ok := r.URL.Query()[k]; ok {
				q[k] = vs
			}
		}
		resp, err := s.broker.Forward(r.Context(), d, r.Method, "responses/"+id+suffix, q.Encode(), r.Header)
		if err != nil {
			if r.Context().Err() != nil {
				return &Error{Status: 499, Type: "invalid_request_error", Code: "client_closed_request", Message: "The client closed the request."}
			}
			s.log.Warn("reading a stored response", "deployment", d.Name, "err", err)
			return &Error{Status: http.StatusBadGateway, Type: "server_error", Code: "upstream_unavailable",
				Message: "The deployment that stores this response could not be reached; retry shortly."}
		}
		defer resp.Body.Close()
		raw, err := io.ReadAll(io.LimitReader(resp.Body, broker.MaxResponseBody))
		if err != nil {
			return &Error{Status: http.StatusBadGateway, Type: "server_error", Code: "upstream_error", Message: "The deployment's response broke off."}
		}
		if r.Method == http.MethodDelete && resp.StatusCode == http.StatusOK {
			dctx, cancel := s.dbContext(context.WithoutCancel(r.Context()))
			if err := s.batches.ForgetResponse(dctx, key.TenantID, id); err != nil {
				s.log.Warn("forgetting a deleted response", "response", id, "err", err)
			}
			cancel()
		}
		h := c.Response().Header()
		h.Set("x-levee-deployment", d.Name)
		if ct := resp.Header.Get("Content-Type"); ct != "" {
			h.Set("Content-Type", ct)
		}
		h.Set("Content-Length", strconv.Itoa(len(raw)))
		c.Response().WriteHeader(resp.StatusCode)
		_, _ = c.Response().Write(raw)
		return nil
	}
}
