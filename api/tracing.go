package api

import (
	"errors"
	"net/http"

	"github.com/labstack/echo/v4"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"

	"github.com/levee-gw/levee/tracing"
)

// traceRequests gives every API call a server span, continuing the
// caller's W3C trace context. It is installed only when tracing is on, so
// with tracing off the request path has nothing of it.
func (s *Server) traceRequests(next echo.HandlerFunc) echo.HandlerFunc {
	return func(c echo.Context) error {
		route := c.Path()
		switch route {
		case "/healthz", "/readyz", "/metrics", "":
			return next(c)
		}
		r := c.Request()
		ctx := s.tracer.Extract(r.Context(), r.Header)
		ctx, span := s.tracer.Start(ctx, r.Method+" "+route, trace.WithSpanKind(trace.SpanKindServer),
			trace.WithAttributes(attribute.String("http.request.method", r.Method), attribute.String("http.route", route)))
		defer span.End()
		c.SetRequest(r.WithContext(ctx))
		err := next(c)
		status := c.Response().Status
		if err != nil {
			var ae *Error
			var he *echo.HTTPError
			switch {
			case errors.As(err, &ae):
				status = ae.Status
			case errors.As(err, &he):
				status = he.Code
			default:
				status = http.StatusInternalServerError
			}
		}
		span.SetAttributes(tracing.AttrStatus.Int(status))
		if status >= 500 {
			span.SetStatus(codes.Error, http.StatusText(status))
		}
		return err
	}
}

// traceAttrs adds attributes to the call's span, if it is being traced.
func traceAttrs(c echo.Context, attrs ...attribute.KeyValue) {
	if span := trace.SpanFromContext(c.Request().Context()); span.IsRecording() {
		span.SetAttributes(attrs...)
	}
}
