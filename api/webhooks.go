package api

import (
	"errors"
	"fmt"
	"net/http"
	"strings"
	"time"

	"github.com/google/uuid"
	"github.com/labstack/echo/v4"

	"github.com/levee-gw/levee/store"
	"github.com/levee-gw/levee/strictjson"
	"github.com/levee-gw/levee/webhook"
)

// Event types a webhook endpoint can filter on.
var eventTypes = map[string]bool{"job.succeeded": true, "job.failed": true, "job.cancelled": true,
	"batch.completed": true, "batch.failed": true, "batch.expired": true, "batch.cancelled": true,
	"budget.threshold_reached": true, "budget.exceeded": true,
	"response.completed": true, "response.incomplete": true, "response.failed": true, "response.cancelled": true}

const (
	endpointPrefix = "we_"
	deliveryPrefix = "wd_"
)

type endpointObject struct {
	ID             string   `json:"id"`
	Object         string   `json:"object"`
	URL            string   `json:"url"`
	Events         []string `json:"events"`
	Enabled        bool     `json:"enabled"`
	DisabledReason *string  `json:"disabled_reason"`
	CreatedAt      int64    `json:"created_at"`
	// Secret is shown once: when the endpoint is created or its secret rotated.
	Secret string `json:"secret,omitempty"`
}

func renderEndpoint(e *store.WebhookEndpoint) *endpointObject {
	o := &endpointObject{ID: endpointPrefix + e.ID.String(), Object: "webhook_endpoint", URL: e.URL, Events: e.Events,
		Enabled: e.Enabled, CreatedAt: e.CreatedAt.Unix()}
	if e.DisabledReason != "" {
		o.DisabledReason = &e.DisabledReason
	}
	return o
}

func endpointNotFound(id string) *Error {
	return &Error{Status: http.StatusNotFound, Type: "invalid_request_error", Param: "id", Code: "webhook_endpoint_not_found",
		Message: fmt.Sprintf("No webhook endpoint found with id '%s'.", strictjson.Clip(id))}
}

// checkEvents validates an event filter; it may name each type once.
func checkEvents(events []string) error {
	seen := map[string]bool{}
	for _, e := range events {
		if !eventTypes[e] {
			return invalid("events", "invalid_event", "unknown event type %q.", strictjson.Clip(e))
		}
		if seen[e] {
			return invalid("events", "invalid_event", "event type %q is listed twice.", e)
		}
		seen[e] = true
	}
	return nil
}

func (s *Server) createEndpoint(c echo.Context) error {
	raw, err := s.readBody(c)
	if err != nil {
		return err
	}
	var req struct {
		URL    string   `json:"url"`
		Events []string `json:"events"`
	}
	if err := decodeJSON(raw, &req); err != nil {
		return err
	}
	if err := s.guard.Check(c.Request().Context(), req.URL); err != nil {
		return invalid("url", "invalid_url", "%v.", err)
	}
	if err := checkEvents(req.Events); err != nil {
		return err
	}
	e, err := s.batches.CreateWebhookEndpoint(c.Request().Context(), keyOf(c).TenantID, req.URL, webhook.NewSecret(), req.Events)
	if err != nil {
		return err
	}
	o := renderEndpoint(e)
	o.Secret = e.Secret
	return c.JSON(http.StatusOK, o)
}

func (s *Server) listEndpoints(c echo.Context) error {
	es, err := s.batches.WebhookEndpoints(c.Request().Context(), keyOf(c).TenantID)
	if err != nil {
		return err
	}
	data := make([]*endpointObject, len(es))
	for i, e := range es {
		data[i] = renderEndpoint(e)
	}
	return c.JSON(http.StatusOK, map[string]any{"object": "list", "data": data})
}

func (s *Server) endpointParam(c echo.Context) (uuid.UUID, error) {
	id, ok := parsePrefixed(c.Param("id"), endpointPrefix)
	if !ok {
		return uuid.Nil, endpointNotFound(c.Param("id"))
	}
	return id, nil
}

func (s *Server) endpointResult(c echo.Context, e *store.WebhookEndpoint, err error, showSecret bool) error {
	if errors.Is(err, store.ErrNotFound) {
		return endpointNotFound(c.Param("id"))
	}
	if err != nil {
		return err
	}
	o := renderEndpoint(e)
	if showSecret {
		o.Secret = e.Secret
	}
	return c.JSON(http.StatusOK, o)
}

func (s *Server) getEndpoint(c echo.Context) error {
	id, err := s.endpointParam(c)
	if err != nil {
		return err
	}
	e, err := s.batches.GetWebhookEndpoint(c.Request().Context(), keyOf(c).TenantID, id)
	return s.endpointResult(c, e, err, false)
}

// updateEndpoint enables or disables an endpoint and sets its event filter.
func (s *Server) updateEndpoint(c echo.Context) error {
	id, err := s.endpointParam(c)
	if err != nil {
		return err
	}
	raw, err := s.readBody(c)
	if err != nil {
		return err
	}
	var req struct {
		Enabled *bool    `json:"enabled"`
		Events  []string `json:"events"`
	}
	if err := decodeJSON(raw, &req); err != nil {
		return err
	}
	if err := checkEvents(req.Events); err != nil {
		return err
	}
	e, err := s.batches.UpdateWebhookEndpoint(c.Request().Context(), keyOf(c).TenantID, id, req.Enabled, req.Events)
	return s.endpointResult(c, e, err, false)
}

// rotateEndpoint sets a new secret; for 24 hours both are used to sign.
func (s *Server) rotateEndpoint(c echo.Context) error {
	id, err := s.endpointParam(c)
	if err != nil {
		return err
	}
	e, err := s.batches.RotateWebhookSecret(c.Request().Context(), keyOf(c).TenantID, id, webhook.NewSecret(), 24*time.Hour)
	return s.endpointResult(c, e, err, true)
}

func (s *Server) deleteEndpoint(c echo.Context) error {
	id, err := s.endpointParam(c)
	if err != nil {
		return err
	}
	if err := s.batches.DeleteWebhookEndpoint(c.Request().Context(), keyOf(c).TenantID, id); errors.Is(err, store.ErrNotFound) {
		return endpointNotFound(c.Param("id"))
	} else if err != nil {
		return err
	}
	return c.JSON(http.StatusOK, map[string]any{"id": c.Param("id"), "object": "webhook_endpoint", "deleted": true})
}

func (s *Server) endpointDeliveries(c echo.Context) error {
	id, err := s.endpointParam(c)
	if err != nil {
		return err
	}
	// An unknown endpoint, or another tenant's, is a 404 like every other
	// read of it, not an empty list.
	if _, err := s.batches.GetWebhookEndpoint(c.Request().Context(), keyOf(c).TenantID, id); errors.Is(err, store.ErrNotFound) {
		return endpointNotFound(c.Param("id"))
	} else if err != nil {
		return err
	}
	ds, err := s.batches.EndpointDeliveries(c.Request().Context(), keyOf(c).TenantID, id, 100)
	if err != nil {
		return err
	}
	data := make([]map[string]any, len(ds))
	for i, d := range ds {
		attempts := make([]map[string]any, len(d.Attempted))
		for k, a := range d.Attempted {
			attempts[k] = map[string]any{"attempt": a.Attempt, "at": a.At.Unix(), "status_code": a.StatusCode, "error": a.Error,
				"duration_ms": a.Duration.Milliseconds()}
		}
		data[i] = map[string]any{"id": deliveryPrefix + d.ID.String(), "object": "webhook_delivery",
			"event_id": "evt_" + strings.ReplaceAll(d.EventID.String(), "-", ""), "event_type": d.Type, "status": d.Status,
			"attempts": attempts, "next_attempt_at": d.NextAttempt.Unix(), "created_at": d.CreatedAt.Unix()}
	}
	return c.JSON(http.StatusOK, map[string]any{"object": "list", "data": data})
}

// resendDelivery sends a delivery again now, with the same webhook-id.
func (s *Server) resendDelivery(c echo.Context) error {
	id, ok := parsePrefixed(c.Param("id"), deliveryPrefix)
	if !ok {
		return &Error{Status: http.StatusNotFound, Type: "invalid_request_error", Param: "id", Code: "webhook_delivery_not_found", Message: "No such delivery."}
	}
	if err := s.batches.ResendDelivery(c.Request().Context(), keyOf(c).TenantID, id); errors.Is(err, store.ErrNotFound) {
		return &Error{Status: http.StatusNotFound, Type: "invalid_request_error", Param: "id", Code: "webhook_delivery_not_found", Message: "No such delivery."}
	} else if err != nil {
		return err
	}
	return c.JSON(http.StatusAccepted, map[string]any{"id": c.Param("id"), "status": "pending"})
}
