// Package tracing owns Levee's OpenTelemetry traces: setting up the tracer
// provider from the standard OTEL_* environment variables, the W3C trace
// context that is continued from a caller, passed to a deployment and
// carried in a job's JetStream message, and the names of the attributes
// Levee's spans carry. Tracing is off unless configured, and a nil *Tracer
// is a valid tracer that does nothing: the request path then pays one nil
// check, not a span.
package tracing

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"strings"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracegrpc"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracehttp"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/trace"
	"go.opentelemetry.io/otel/trace/noop"
)

// Attribute keys. The gen_ai.* ones follow OpenTelemetry's semantic
// conventions for generative AI; levee.* are Levee's own.
const (
	AttrModel        = attribute.Key("gen_ai.request.model")
	AttrOperation    = attribute.Key("levee.operation")
	AttrInputTokens  = attribute.Key("gen_ai.usage.input_tokens")
	AttrOutputTokens = attribute.Key("gen_ai.usage.output_tokens")
	AttrTenant       = attribute.Key("levee.tenant")
	AttrKey          = attribute.Key("levee.key")
	AttrDeployment   = attribute.Key("levee.deployment")
	AttrAttempts     = attribute.Key("levee.attempts")
	AttrAttempt      = attribute.Key("levee.attempt")
	AttrPriority     = attribute.Key("levee.priority")
	AttrJob          = attribute.Key("levee.job")
	AttrBatch        = attribute.Key("levee.batch")
	AttrReason       = attribute.Key("levee.reason")
	AttrStatus       = attribute.Key("http.response.status_code")
)

// Tracer starts Levee's spans. The zero of *Tracer (nil) traces nothing.
type Tracer struct {
	tr       trace.Tracer
	prop     propagation.TextMapPropagator
	shutdown func(context.Context) error
}

// New traces with tp (tests pass an SDK provider with an in-memory
// exporter).
func New(tp trace.TracerProvider) *Tracer {
	return &Tracer{tr: tp.Tracer("github.com/levee-gw/levee"),
		prop: propagation.NewCompositeTextMapPropagator(propagation.TraceContext{}, propagation.Baggage{})}
}

// FromEnv sets tracing up as the OTEL_* environment variables say: on when
// an OTLP endpoint is set (OTEL_EXPORTER_OTLP_ENDPOINT or
// OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) and OTEL_TRACES_EXPORTER is not
// "none", or when OTEL_TRACES_EXPORTER is "otlp". The exporter, sampler,
// batching and resource read the rest of the standard variables
// themselves. Off, it returns nil.
func FromEnv(ctx context.Context, version string, log *slog.Logger) (*Tracer, error) {
	exp := strings.TrimSpace(os.Getenv("OTEL_TRACES_EXPORTER"))
	endpoint := os.Getenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") != "" || os.Getenv("OTEL_EXPORTER_OTLP_ENDPOINT") != ""
	switch {
	case exp == "none" || os.Getenv("OTEL_SDK_DISABLED") == "true":
		return nil, nil
	case exp == "" && !endpoint:
		return nil, nil
	case exp != "" && exp != "otlp":
		return nil, fmt.Errorf("tracing: OTEL_TRACES_EXPORTER=%q: only otlp (or none) is supported", exp)
	}
	protocol := os.Getenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
	if protocol == "" {
		protocol = os.Getenv("OTEL_EXPORTER_OTLP_PROTOCOL")
	}
	var (
		exporter *otlptrace.Exporter
		err      error
	)
	switch protocol {
	case "", "http/protobuf":
		exporter, err = otlptracehttp.New(ctx)
	case "grpc":
		exporter, err = otlptracegrpc.New(ctx)
	default:
		return nil, fmt.Errorf("tracing: OTEL_EXPORTER_OTLP_PROTOCOL=%q: use grpc or http/protobuf", protocol)
	}
	if err != nil {
		return nil, fmt.Errorf("tracing: exporter: %w", err)
	}
	res, err := resource.New(ctx, resource.WithAttributes(attribute.String("service.name", "levee"), attribute.String("service.version", version)),
		resource.WithFromEnv(), resource.WithHost(), resource.WithProcessPID())
	if err != nil && !errors.Is(err, resource.ErrPartialResource) {
		return nil, fmt.Errorf("tracing: resource: %w", err)
	}
	// The SDK reads OTEL_TRACES_SAMPLER(_ARG) and OTEL_BSP_* itself.
	tp := sdktrace.NewTracerProvider(sdktrace.WithBatcher(exporter), sdktrace.WithResource(res))
	t := New(tp)
	t.shutdown = tp.Shutdown
	log.Info("tracing on", "protocol", cmpOr(protocol, "http/protobuf"))
	return t, nil
}

func cmpOr(a, b string) string {
	if a != "" {
		return a
	}
	return b
}

// Enabled reports whether spans are recorded at all.
func (t *Tracer) Enabled() bool { return t != nil }

// Start starts a span; with t nil it returns ctx and a span that does
// nothing.
func (t *Tracer) Start(ctx context.Context, name string, opts ...trace.SpanStartOption) (context.Context, trace.Span) {
	if t == nil {
		return ctx, noop.Span{}
	}
	return t.tr.Start(ctx, name, opts...)
}

// Extract continues the trace context a carrier (a caller's headers, a
// message's) holds.
func (t *Tracer) Extract(ctx context.Context, h http.Header) context.Context {
	if t == nil {
		return ctx
	}
	return t.prop.Extract(ctx, propagation.HeaderCarrier(h))
}

// Inject writes ctx's trace context into h.
func (t *Tracer) Inject(ctx context.Context, h http.Header) {
	if t == nil {
		return
	}
	t.prop.Inject(ctx, propagation.HeaderCarrier(h))
}

// Link is a link to the span whose context h carries (none if it carries
// none): a job's run links to its submission this way.
func (t *Tracer) Link(h http.Header) (trace.Link, bool) {
	if t == nil {
		return trace.Link{}, false
	}
	sc := trace.SpanContextFromContext(t.prop.Extract(context.Background(), propagation.HeaderCarrier(h)))
	if !sc.IsValid() {
		return trace.Link{}, false
	}
	return trace.Link{SpanContext: sc}, true
}

// Shutdown flushes the spans not yet exported.
func (t *Tracer) Shutdown(ctx context.Context) error {
	if t == nil || t.shutdown == nil {
		return nil
	}
	return t.shutdown(ctx)
}
