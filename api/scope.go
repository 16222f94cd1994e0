package api

import (
	"fmt"
	"net/http"
	"slices"

	"github.com/labstack/echo/v4"

	"github.com/levee-gw/levee/broker"
	"github.com/levee-gw/levee/store"
	"github.com/levee-gw/levee/strictjson"
)

// A key (or token) outside its scopes gets 403 with a code naming the
// scope: endpoint_not_allowed, model_not_allowed, priority_not_allowed,
// address_not_allowed. An expired key is 401 api_key_expired.

// scope refuses callers whose key may not use this endpoint group.
func (s *Server) scope(group string) echo.MiddlewareFunc {
	return func(next echo.HandlerFunc) echo.HandlerFunc {
		return func(c echo.Context) error {
			if err := allowGroup(keyOf(c), group); err != nil {
				return err
			}
			return next(c)
		}
	}
}

func allowGroup(k *store.Key, group string) error {
	if k.Scopes.Endpoints != nil && !slices.Contains(k.Scopes.Endpoints, group) {
		return &Error{Status: http.StatusForbidden, Type: "invalid_request_error", Code: "endpoint_not_allowed",
			Message: fmt.Sprintf("This API key may not use the %s endpoints.", group)}
	}
	return nil
}

// allowModel refuses a call to a model the key may not use. A call naming a
// deployment is a call to the aliases it serves: one of them must be
// allowed.
func (s *Server) allowModel(k *store.Key, g *broker.Group, param string) error {
	if k.Scopes.Models == nil || g == nil {
		return nil
	}
	for _, a := range s.broker.AliasesOf(g.Name) {
		if slices.Contains(k.Scopes.Models, a) {
			return nil
		}
	}
	return modelNotAllowed(param, g.Name)
}

func modelNotAllowed(param, model string) *Error {
	return &Error{Status: http.StatusForbidden, Type: "invalid_request_error", Code: "model_not_allowed", Param: param,
		Message: fmt.Sprintf("This API key may not use the model %q.", strictjson.Clip(model))}
}

// priorityRank orders priorities, highest first.
func priorityRank(p string) int { return slices.Index([]string{"high", "normal", "low", "batch"}, p) }

// allowPriority refuses a priority above the key's highest.
func allowPriority(k *store.Key, p, param string) error {
	if m := k.Scopes.MaxPriority; m != "" && priorityRank(p) < priorityRank(m) {
		return &Error{Status: http.StatusForbidden, Type: "invalid_request_error", Code: "priority_not_allowed", Param: param,
			Message: fmt.Sprintf("This API key may ask for priority %s at most, not %s.", m, p)}
	}
	return nil
}
