package test

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"
	"time"

	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"

	"github.com/levee-gw/levee/dev"
	"github.com/levee-gw/levee/sim"
	"github.com/levee-gw/levee/test/harness"
	"github.com/levee-gw/levee/tracing"
)

// tracedStack runs a stack whose spans go to an in-memory recorder.
func tracedStack(t *testing.T, f *dev.File) (*harness.Env, *tracetest.SpanRecorder) {
	t.Helper()
	rec := tracetest.NewSpanRecorder()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(rec))
	t.Cleanup(func() { _ = tp.Shutdown(t.Context()) })
	return harness.StartWith(t, f, dev.StackOptions{Tracer: tracing.New(tp)}), rec
}

// spanWhere waits for an ended span matching cond.
func spanWhere(t *testing.T, rec *tracetest.SpanRecorder, what string, cond func(sdktrace.ReadOnlySpan) bool) sdktrace.ReadOnlySpan {
	t.Helper()
	var found sdktrace.ReadOnlySpan
	harness.Eventually(t, 10*time.Second, what, func() bool {
		for _, s := range rec.Ended() {
			if cond(s) {
				found = s
				return true
			}
		}
		return false
	})
	return found
}

func children(rec *tracetest.SpanRecorder, parent trace.SpanContext) []sdktrace.ReadOnlySpan {
	var out []sdktrace.ReadOnlySpan
	for _, s := range rec.Ended() {
		if s.Parent().SpanID() == parent.SpanID() && s.Parent().TraceID() == parent.TraceID() {
			out = append(out, s)
		}
	}
	return out
}

func attr(s sdktrace.ReadOnlySpan, key string) (string, bool) {
	for _, a := range s.Attributes() {
		if string(a.Key) == key {
			return a.Value.Emit(), true
		}
	}
	return "", false
}

const (
	clientTrace  = "4bf92f3577b34da6a3ce929d0e0e4736"
	clientParent = "00f067aa0ba902b7"
)

func clientTraceparent() string { return "00-" + clientTrace + "-" + clientParent + "-01" }

// A synchronous call continues the caller's trace: a server span with the
// call's tenant, model, deployment, attempts and tokens, and under it one
// span per attempt, whose context is what the deployment receives.
func TestTraceOfASynchronousCall(t *testing.T) {
	env, rec := tracedStack(t, pair(1_000_000, 1_000_000))
	resp, raw := call(t, env.BaseURL, "/v1/chat/completions", env.APIKey, chat(20), "traceparent", clientTraceparent())
	if resp.StatusCode != 200 {
		t.Fatalf("call: %d %s", resp.StatusCode, raw)
	}
	srv := spanWhere(t, rec, "the call's server span", func(s sdktrace.ReadOnlySpan) bool { return s.Name() == "POST /v1/chat/completions" })
	if got := srv.SpanContext().TraceID().String(); got != clientTrace {
		t.Fatalf("trace id %s, want the caller's %s", got, clientTrace)
	}
	if got := srv.Parent().SpanID().String(); got != clientParent || !srv.Parent().IsRemote() {
		t.Fatalf("parent %s (remote %v), want the caller's span %s", got, srv.Parent().IsRemote(), clientParent)
	}
	if srv.SpanKind() != trace.SpanKindServer {
		t.Fatalf("kind %v", srv.SpanKind())
	}
	want := map[string]string{"levee.deployment": "ptu", "levee.attempts": "1", "gen_ai.request.model": "gpt-4o",
		"levee.priority": "high", "http.response.status_code": "200"}
	for k, v := range want {
		if got, _ := attr(srv, k); got != v {
			t.Errorf("%s = %q, want %q", k, got, v)
		}
	}
	if v, _ := attr(srv, "levee.tenant"); v == "" || v == "00000000-0000-0000-0000-000000000000" {
		t.Errorf("levee.tenant = %q", v)
	}
	if v, _ := attr(srv, "gen_ai.usage.output_tokens"); v == "" || v == "0" {
		t.Errorf("output tokens = %q", v)
	}
	kids := children(rec, srv.SpanContext())
	if len(kids) != 1 || kids[0].Name() != "upstream chat/completions" || kids[0].SpanKind() != trace.SpanKindClient {
		t.Fatalf("want one upstream span under the call, got %d: %v", len(kids), names(kids))
	}
	up := kids[0]
	// What reached the deployment is the attempt's context, in the
	// caller's trace.
	seen := env.Sim.Seen("ptu")
	got := seen[len(seen)-1].Get("traceparent")
	if want := "00-" + clientTrace + "-" + up.SpanContext().SpanID().String() + "-01"; got != want {
		t.Fatalf("deployment got traceparent %q, want %q", got, want)
	}
}

func names(ss []sdktrace.ReadOnlySpan) []string {
	var out []string
	for _, s := range ss {
		out = append(out, s.Name())
	}
	return out
}

// A failover shows as an event on the call's span and as a failed attempt
// span beside the one that answered.
func TestTraceOfAFailover(t *testing.T) {
	env, rec := tracedStack(t, pair(1_000_000, 1_000_000))
	setFaults(t, env, "ptu", sim.Faults{Outage: true})
	resp, raw := call(t, env.BaseURL, "/v1/chat/completions", env.APIKey, chat(20))
	if resp.StatusCode != 200 || resp.Header.Get("x-levee-deployment") != "std" {
		t.Fatalf("call: %d via %q %s", resp.StatusCode, resp.Header.Get("x-levee-deployment"), raw)
	}
	srv := spanWhere(t, rec, "the call's server span", func(s sdktrace.ReadOnlySpan) bool { return s.Name() == "POST /v1/chat/completions" })
	if srv.Parent().IsValid() {
		t.Fatalf("a call without traceparent starts a trace; parent %v", srv.Parent())
	}
	if v, _ := attr(srv, "levee.attempts"); v != "2" {
		t.Fatalf("attempts = %q, want 2", v)
	}
	var failovers []string
	for _, e := range srv.Events() {
		if e.Name == "failover" {
			var dep, reason string
			for _, a := range e.Attributes {
				switch a.Key {
				case "levee.deployment":
					dep = a.Value.AsString()
				case "levee.reason":
					reason = a.Value.AsString()
				}
			}
			failovers = append(failovers, dep+":"+reason)
		}
	}
	if len(failovers) != 1 || failovers[0] != "ptu:5xx" {
		t.Fatalf("failover events %v, want [ptu:5xx]", failovers)
	}
	kids := children(rec, srv.SpanContext())
	if len(kids) != 2 {
		t.Fatalf("want 2 attempt spans, got %v", names(kids))
	}
	byDep := map[string]sdktrace.ReadOnlySpan{}
	for _, k := range kids {
		d, _ := attr(k, "levee.deployment")
		byDep[d] = k
	}
	if s := byDep["ptu"]; s == nil || s.Status().Code.String() != "Error" {
		t.Fatalf("the refused attempt's span should be an error: %v", byDep)
	}
	if s := byDep["std"]; s == nil || s.Status().Code.String() == "Error" {
		t.Fatalf("the answered attempt's span should not be an error: %v", byDep)
	}
	if a, b := byDep["ptu"].StartTime(), byDep["std"].StartTime(); !a.Before(b) {
		t.Fatal("the attempts are out of order")
	}
}

// A job's run is a trace of its own, linked to the call that submitted it
// (the link travels in the JetStream message's headers); a batch's lines
// link to the call that created the batch.
func TestTraceOfAJobAndABatch(t *testing.T) {
	env, rec := tracedStack(t, nil)
	resp, j := submit(t, env, env.APIKey, jobBody(20, "low"), "traceparent", clientTraceparent())
	if resp.StatusCode != 202 {
		t.Fatalf("submit: %d", resp.StatusCode)
	}
	if got := waitJob(t, env, env.APIKey, j.ID, 20*time.Second); got.Status != "succeeded" {
		t.Fatalf("job ended %s", got.Status)
	}
	sub := spanWhere(t, rec, "the submit's span", func(s sdktrace.ReadOnlySpan) bool { return s.Name() == "POST /v1/jobs" })
	if v, _ := attr(sub, "levee.job"); v != j.ID {
		t.Fatalf("submit span's levee.job = %q for job %s", v, j.ID)
	}
	run := spanWhere(t, rec, "the job's span", func(s sdktrace.ReadOnlySpan) bool { return strings.HasPrefix(s.Name(), "job ") })
	if run.SpanKind() != trace.SpanKindConsumer {
		t.Fatalf("kind %v", run.SpanKind())
	}
	if len(run.Links()) != 1 || run.Links()[0].SpanContext.SpanID() != sub.SpanContext().SpanID() ||
		run.Links()[0].SpanContext.TraceID() != sub.SpanContext().TraceID() {
		t.Fatalf("the job's span should link to the submit span %v, links %v", sub.SpanContext(), run.Links())
	}
	if v, _ := attr(run, "levee.job.status"); v != "succeeded" {
		t.Fatalf("levee.job.status = %q", v)
	}
	if v, _ := attr(run, "levee.job"); v != j.ID {
		t.Fatalf("the run's levee.job = %q, want %s", v, j.ID)
	}
	kids := children(rec, run.SpanContext())
	if len(kids) != 1 || kids[0].Name() != "upstream chat/completions" {
		t.Fatalf("want the job's upstream attempt under its span, got %v", names(kids))
	}

	// A batch of 3 lines: each line's run links to the batch's creation.
	var buf bytes.Buffer
	for i := 0; i < 3; i++ {
		line, _ := json.Marshal(map[string]any{"custom_id": "l" + string(rune('a'+i)), "method": "POST", "url": "/v1/chat/completions", "body": chat(10)})
		buf.Write(append(line, '\n'))
	}
	id := createBatch(t, env, buf.Bytes(), "/v1/chat/completions")
	harness.Eventually(t, 60*time.Second, "the batch to complete", func() bool { return getBatch(t, env, id).Status == "completed" })
	created := spanWhere(t, rec, "the batch's creation span", func(s sdktrace.ReadOnlySpan) bool { return s.Name() == "POST /v1/batches" })
	var lines int
	harness.Eventually(t, 10*time.Second, "3 line spans", func() bool {
		lines = 0
		for _, s := range rec.Ended() {
			if v, ok := attr(s, "levee.batch"); ok && v != "" && strings.HasPrefix(s.Name(), "job ") {
				if len(s.Links()) != 1 || s.Links()[0].SpanContext.SpanID() != created.SpanContext().SpanID() {
					t.Fatalf("a line's span should link to the batch's creation: %v", s.Links())
				}
				lines++
			}
		}
		return lines == 3
	})
}
