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

// narrow keeps the caller's grants that pass keep, and reports whether any
// did; with no grants (an API key) its scopes are the one grant. The
// checks of a call (endpoint group, model, priority) narrow in turn, so
// what passes all of them is one grant that allows the whole call, not a
// union of several that each allow a part. A token caller's key is made
// for its request alone, so narrowing it changes no one else's.
func narrow(k *store.Key, keep func(*store.Scopes) bool) bool {
	if k.Grants == nil {
		return keep(&k.Scopes)
	}
	var left []store.Scopes
	for i := range k.Grants {
		if keep(&k.Grants[i]) {
			left = append(left, k.Grants[i])
		}
	}
	if len(left) == 0 {
		return false
	}
	k.Grants = left
	// What the caller may still do: the union of what is left, and a
	// default priority no higher than the highest cap left.
	u := store.Scopes{CIDRs: k.Scopes.CIDRs}
	allModels, allEndpoints, anyPriority := false, false, false
	for _, g := range left {
		allModels = allModels || g.Models == nil
		allEndpoints = allEndpoints || g.Endpoints == nil
		anyPriority = anyPriority || g.MaxPriority == ""
		for _, m := range g.Models {
			if !slices.Contains(u.Models, m) {
				u.Models = append(u.Models, m)
			}
		}
		for _, e := range g.Endpoints {
			if !slices.Contains(u.Endpoints, e) {
				u.Endpoints = append(u.Endpoints, e)
			}
		}
		if u.MaxPriority == "" || priorityRank(g.MaxPriority) < priorityRank(u.MaxPriority) {
			u.MaxPriority = g.MaxPriority
		}
	}
	if allModels {
		u.Models = nil
	}
	if allEndpoints {
		u.Endpoints = nil
	}
	if anyPriority {
		u.MaxPriority = ""
	}
	k.Scopes = u
	if m := u.MaxPriority; m != "" && priorityRank(k.DefaultPriority) < priorityRank(m) {
		k.DefaultPriority = m
	}
	return true
}

func allowGroup(k *store.Key, group string) error {
	if !narrow(k, func(sc *store.Scopes) bool { return sc.Endpoints == nil || slices.Contains(sc.Endpoints, group) }) {
		return &Error{Status: http.StatusForbidden, Type: "invalid_request_error", Code: "endpoint_not_allowed",
			Message: fmt.Sprintf("This API key may not use the %s endpoints.", group)}
	}
	return nil
}

// allowModel refuses a call to a model the key may not use. A call naming a
// deployment is a call to the alias whose policy it is served under.
func (s *Server) allowModel(k *store.Key, g *broker.Group, param string) error {
	if g == nil {
		return nil
	}
	aliases := s.broker.AliasesOf(g.Name)
	if len(aliases) > 1 {
		// A deployment serving several aliases is called under the policy
		// of the first (broker.Resolve): that alias is the one that must
		// be allowed, or a key scoped to a strict alias could escape its
		// policy by naming a deployment it shares with a laxer one.
		aliases = aliases[:1]
	}
	if !narrow(k, func(sc *store.Scopes) bool {
		if sc.Models == nil {
			return true
		}
		for _, a := range aliases {
			if slices.Contains(sc.Models, a) {
				return true
			}
		}
		return false
	}) {
		return modelNotAllowed(param, g.Name)
	}
	return nil
}

func modelNotAllowed(param, model string) *Error {
	return &Error{Status: http.StatusForbidden, Type: "invalid_request_error", Code: "model_not_allowed", Param: param,
		Message: fmt.Sprintf("This API key may not use the model %q.", strictjson.Clip(model))}
}

// priorityRank orders priorities, highest first.
func priorityRank(p string) int { return slices.Index([]string{"high", "normal", "low", "batch"}, p) }

// allowPriority refuses a priority above the key's highest.
func allowPriority(k *store.Key, p, param string) error {
	if m := k.Scopes.MaxPriority; !narrow(k, func(sc *store.Scopes) bool {
		return sc.MaxPriority == "" || priorityRank(p) >= priorityRank(sc.MaxPriority)
	}) {
		return &Error{Status: http.StatusForbidden, Type: "invalid_request_error", Code: "priority_not_allowed", Param: param,
			Message: fmt.Sprintf("This API key may ask for priority %s at most, not %s.", m, p)}
	}
	return nil
}
