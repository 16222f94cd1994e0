package api

import (
	"errors"
	"fmt"
	"math"
	"net/http"
	"strconv"
	"time"

	"github.com/labstack/echo/v4"

	"github.com/levee-gw/levee/store"
)

// Error is an API error; the HTTP error handler turns it into OpenAI's
// envelope {"error":{"message","type","param","code"}} with Status.
type Error struct {
	Status  int
	Message string
	Type    string
	Param   string
	Code    string
	// RetryAfter, when set, becomes Retry-After and retry-after-ms.
	RetryAfter time.Duration
}

func (e *Error) Error() string { return fmt.Sprintf("%d %s: %s", e.Status, e.Code, e.Message) }

func invalid(param, code, format string, args ...any) *Error {
	return &Error{Status: http.StatusBadRequest, Type: "invalid_request_error", Param: param, Code: code, Message: fmt.Sprintf(format, args...)}
}

type envelope struct {
	Error envelopeBody `json:"error"`
}

type envelopeBody struct {
	Message string  `json:"message"`
	Type    string  `json:"type"`
	Param   *string `json:"param"`
	Code    *string `json:"code"`
}

func nullable(s string) *string {
	if s == "" {
		return nil
	}
	return &s
}

// errorHandler is the one place errors become responses.
func (s *Server) errorHandler(err error, c echo.Context) {
	if c.Response().Committed {
		return
	}
	var e *Error
	var he *echo.HTTPError
	switch {
	case errors.As(err, &e):
	case errors.As(err, &he):
		e = &Error{Status: he.Code, Type: "invalid_request_error", Message: fmt.Sprint(he.Message)}
		switch he.Code {
		case http.StatusNotFound:
			e.Code, e.Message = "unknown_url", fmt.Sprintf("Unrecognized request URL (%s: %s).", c.Request().Method, c.Request().URL.Path)
		case http.StatusMethodNotAllowed:
			e.Code, e.Message = "method_not_allowed", fmt.Sprintf("Method %s is not allowed for %s.", c.Request().Method, c.Request().URL.Path)
		case http.StatusRequestEntityTooLarge:
			e.Code = "request_too_large"
		}
	case store.Unavailable(err):
		// A Postgres restart or failover: nothing was wrong with the
		// request, and the client should simply retry.
		s.log.Warn("Postgres unavailable", "path", c.Request().URL.Path, "err", err)
		e = &Error{Status: http.StatusServiceUnavailable, Type: "server_error", Code: "database_unavailable",
			Message: "Levee cannot reach its database right now; retry shortly.", RetryAfter: time.Second}
	default:
		s.log.Error("unhandled error", "path", c.Request().URL.Path, "err", err)
		e = &Error{Status: http.StatusInternalServerError, Type: "server_error", Code: "internal_error", Message: "The server had an error while processing your request."}
	}
	if e.Type == "" {
		e.Type = "invalid_request_error"
	}
	if e.Status == http.StatusRequestTimeout {
		// The rest of the body may still trickle in: do not wait for it.
		c.Response().Header().Set("Connection", "close")
	}
	if e.RetryAfter > 0 {
		h := c.Response().Header()
		h.Set("Retry-After", strconv.Itoa(int(math.Ceil(e.RetryAfter.Seconds()))))
		h.Set("retry-after-ms", strconv.FormatInt(e.RetryAfter.Milliseconds(), 10))
	}
	if c.Request().Method == http.MethodHead {
		_ = c.NoContent(e.Status)
		return
	}
	_ = c.JSON(e.Status, envelope{Error: envelopeBody{Message: e.Message, Type: e.Type, Param: nullable(e.Param), Code: nullable(e.Code)}})
}
