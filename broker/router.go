// Package broker owns everything between an accepted call and a deployment:
// the deployments themselves, their capacity view (Capacity), their health
// (a circuit breaker), the HTTP client that speaks to them (Client), and the
// routing decision with its failover (Broker.Do). The synchronous proxy and the
// queue workers both call deployments only through it.
package broker

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"slices"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"

	"github.com/levee-gw/levee/config"
	"github.com/levee-gw/levee/tracing"
)

// Deployment is a configured deployment with its live state.
type Deployment struct {
	config.Deployment
	Capacity *Capacity
	circuit  *circuit
}

// Group is what a client names: an alias served by one or more deployments in
// priority tiers, and the policy its calls must meet.
type Group struct {
	Name   string
	Policy config.Model
	tiers  [][]*Deployment
	// routedAt is the bucket in which route last forecast the demand of
	// the group's deployments.
	routedAt atomic.Int64
}

// Deployments lists the group's deployments in priority order.
func (g *Group) Deployments() []*Deployment {
	var out []*Deployment
	for _, t := range g.tiers {
		out = append(out, t...)
	}
	return out
}

// Check applies the group's policy to a parsed request.
func (g *Group) Check(r *Request) error {
	p := g.Policy
	if p.MaxTokens > 0 && r.MaxTokens > p.MaxTokens {
		return &BadRequestError{Param: r.MaxTokensParam, Msg: fmt.Sprintf("%s is %d, above the limit of %d for model %s", r.MaxTokensParam, r.MaxTokens, p.MaxTokens, g.Name)}
	}
	if r.N > p.MaxN {
		return &BadRequestError{Param: "n", Msg: fmt.Sprintf("n is %d, above the limit of %d for model %s", r.N, p.MaxN, g.Name)}
	}
	if r.BestOf > p.MaxBestOf {
		return &BadRequestError{Param: "best_of", Msg: fmt.Sprintf("best_of is %d, above the limit of %d for model %s", r.BestOf, p.MaxBestOf, g.Name)}
	}
	return nil
}

// Broker routes calls over deployments.
type Broker struct {
	// r is what is being served: swapped whole by Reload, so a call sees
	// one configuration from start to end.
	r       atomic.Pointer[routes]
	tok     *Tokenizers
	client  *Client
	log     *slog.Logger
	now     func() time.Time
	metrics *metrics
	tracer  *tracing.Tracer

	// mu serializes reloads and sharing being turned on.
	mu          sync.Mutex
	circuitConf config.Circuit
	// shareUrgent is the Sharer's wake-up channel once sharing is on: a
	// deployment added by a reload shares its charges too.
	shareUrgent chan struct{}
}

// routes are the deployments and aliases of one configuration.
type routes struct {
	gen     uint64 // 1 at start, one more at each reload
	deps    map[string]*Deployment
	order   []*Deployment
	groups  map[string]*Group
	aliases []string
}

// SetTracer traces each attempt of a call whose context holds a recording
// span, and passes the attempt's trace context to the deployment. Call it
// before serving.
func (b *Broker) SetTracer(t *tracing.Tracer) { b.tracer = t }

// New builds a Broker from validated config. reg may be nil.
func New(cfg *config.Config, tok *Tokenizers, client *Client, reg prometheus.Registerer, log *slog.Logger) *Broker {
	b := &Broker{tok: tok, client: client, log: log, now: time.Now, circuitConf: cfg.Circuit}
	b.r.Store(b.build(cfg, nil))
	b.metrics = newMetrics(reg, b)
	return b
}

// build makes the routes of cfg. A deployment of old whose settings are
// unchanged is kept as it is, with its capacity windows and circuit; one
// whose limits changed keeps its windows under the new limits.
func (b *Broker) build(cfg *config.Config, old *routes) *routes {
	r := &routes{gen: 1, deps: map[string]*Deployment{}, groups: map[string]*Group{}}
	if old != nil {
		r.gen = old.gen + 1
	}
	for _, dc := range cfg.Deployments {
		var d *Deployment
		if old != nil {
			if prev := old.deps[dc.Name]; prev != nil {
				if prev.Deployment == dc {
					d = prev
				} else {
					prev.Capacity.SetLimits(dc.TPM, dc.RPM)
					d = &Deployment{Deployment: dc, Capacity: prev.Capacity, circuit: prev.circuit}
				}
			}
		}
		if d == nil {
			d = &Deployment{
				Deployment: dc,
				Capacity:   NewCapacity(dc.TPM, dc.RPM),
				circuit:    newCircuit(b.circuitConf.Failures, b.circuitConf.OpenFor, b.circuitConf.MaxOpenFor),
			}
			if b.shareUrgent != nil {
				d.Capacity.share(b.shareUrgent)
			}
		}
		d.Capacity.SetReserve(dc.SyncReserve, cfg.Worker.SyncReserveFloor, cfg.Worker.SyncReserveCap)
		r.deps[d.Name] = d
		r.order = append(r.order, d)
	}
	for _, m := range cfg.Models {
		var ds []*Deployment
		for _, n := range m.Deployments {
			ds = append(ds, r.deps[n])
		}
		r.groups[m.Name] = newGroup(m.Name, m, ds)
		r.aliases = append(r.aliases, m.Name)
	}
	sort.Strings(r.aliases)
	return r
}

// Reload serves cfg's deployments and aliases from now on. Calls in flight
// finish where they are; a deployment that is gone takes no new call; one
// that stays keeps its capacity windows and circuit. cfg must be
// validated.
func (b *Broker) Reload(cfg *config.Config) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.circuitConf = cfg.Circuit
	old := b.r.Load()
	next := b.build(cfg, old)
	b.r.Store(next)
	// A removed deployment's series go, as its gauges do (its calls in
	// flight may still add a point, which the next reload clears).
	for name := range old.deps {
		if next.deps[name] == nil {
			b.metrics.failovers.DeletePartialMatch(prometheus.Labels{"deployment": name})
			b.metrics.latency.DeletePartialMatch(prometheus.Labels{"deployment": name})
		}
	}
}

func newGroup(name string, p config.Model, ds []*Deployment) *Group {
	ds = append([]*Deployment(nil), ds...)
	// Provisioned capacity is paid for whether used or not, so at equal
	// priority it is tried before standard.
	sort.SliceStable(ds, func(i, j int) bool {
		if ds[i].Priority != ds[j].Priority {
			return ds[i].Priority < ds[j].Priority
		}
		return ds[i].Kind == config.Provisioned && ds[j].Kind != config.Provisioned
	})
	g := &Group{Name: name, Policy: p}
	for i, d := range ds {
		if i == 0 || d.Priority != ds[i-1].Priority || d.Kind != ds[i-1].Kind {
			g.tiers = append(g.tiers, nil)
		}
		g.tiers[len(g.tiers)-1] = append(g.tiers[len(g.tiers)-1], d)
	}
	return g
}

// Resolve finds what a client named: a model alias routes over its group; a
// deployment name pins the call to that one deployment, under the policy of
// the first alias that includes it.
func (b *Broker) Resolve(name string) (*Group, bool) {
	r := b.r.Load()
	if g, ok := r.groups[name]; ok {
		return g, true
	}
	d, ok := r.deps[name]
	if !ok {
		return nil, false
	}
	p := config.Model{Name: name, DefaultMaxTokens: config.DefaultDefaultMaxTokens, MaxN: 1, MaxBestOf: 1}
	for _, a := range r.aliases {
		for _, gd := range r.groups[a].Deployments() {
			if gd == d {
				p = r.groups[a].Policy
				p.Name = name
				return newGroup(name, p, []*Deployment{d}), true
			}
		}
	}
	return newGroup(name, p, []*Deployment{d}), true
}

// UnknownModelError is a model name (or Azure deployment in the path) that
// no alias or deployment answers to.
type UnknownModelError struct {
	Name string
}

func (e *UnknownModelError) Error() string {
	return fmt.Sprintf("the model %q does not exist", e.Name)
}

// Admit is the one check every way into Levee runs a call's body through —
// synchronous calls, jobs, deferred calls, batch lines, and workers again
// before they send it: parse it strictly, resolve the model it names (g,
// when not nil, is what the path named and the body's model is not used)
// and apply that group's policy. The group is returned whenever it was
// resolved, even when the policy refused the call.
func (b *Broker) Admit(op Op, body []byte, g *Group) (*Group, *Request, error) {
	req, err := ParseRequest(op, body)
	if err != nil {
		return g, nil, err
	}
	if g == nil {
		if req.Model == "" {
			return nil, req, &BadRequestError{Param: "model", Code: "missing_model", Msg: "You must provide a model parameter."}
		}
		var ok bool
		if g, ok = b.Resolve(req.Model); !ok {
			return nil, req, &UnknownModelError{Name: req.Model}
		}
	}
	if err := g.Check(req); err != nil {
		return g, req, err
	}
	return g, req, nil
}

// BackgroundSlots counts how many background calls of est tokens the group's
// deployments could take now, above their synchronous reserves.
func (g *Group) BackgroundSlots(now time.Time, est int) int {
	g.route(now)
	n := 0
	for _, t := range g.tiers {
		for _, d := range t {
			if d.circuit.ready(now) {
				n += d.Capacity.Slots(now, max(est, 1))
			}
		}
	}
	return n
}

// ModelGroup returns the alias group a deployment belongs to (the first
// alias listing it), so work that names one deployment can use all of them.
func (b *Broker) ModelGroup(deployment string) (*Group, bool) {
	r := b.r.Load()
	d, ok := r.deps[deployment]
	if !ok {
		return nil, false
	}
	for _, a := range r.aliases {
		for _, gd := range r.groups[a].Deployments() {
			if gd == d {
				return r.groups[a], true
			}
		}
	}
	return nil, false
}

// AliasesOf is every alias a call naming name counts under: the alias
// itself, or for a deployment named directly, each alias it serves (so a
// limit on an alias cannot be passed by naming its deployments).
func (b *Broker) AliasesOf(name string) []string {
	r := b.r.Load()
	if _, ok := r.groups[name]; ok {
		return []string{name}
	}
	d, ok := r.deps[name]
	if !ok {
		return nil
	}
	var out []string
	for _, a := range r.aliases {
		if slices.Contains(r.groups[a].Deployments(), d) {
			out = append(out, a)
		}
	}
	return out
}

// Generation counts the configurations served: it changes at each reload.
func (b *Broker) Generation() uint64 { return b.r.Load().gen }

// Models lists the aliases clients may use.
func (b *Broker) Models() []string { return b.r.Load().aliases }

// Deployment returns a deployment by name.
func (b *Broker) Deployment(name string) (*Deployment, bool) {
	d, ok := b.r.Load().deps[name]
	return d, ok
}

// Deployments lists every deployment in config order.
func (b *Broker) Deployments() []*Deployment { return b.r.Load().order }

// Forward sends a bodiless request to deployment d (see Client.Forward).
func (b *Broker) Forward(ctx context.Context, d *Deployment, method, path, rawQuery string, from http.Header) (*http.Response, error) {
	return b.client.Forward(ctx, &d.Deployment, method, path, rawQuery, from)
}

// Tokenizers returns the shared tokenizers.
func (b *Broker) Tokenizers() *Tokenizers { return b.tok }

// NoCapacityError means no deployment could take the call now; RetryAt is the
// soonest one is expected to.
type NoCapacityError struct {
	RetryAt time.Time
}

func (e *NoCapacityError) Error() string {
	return "no deployment has capacity for this request now"
}

// TooLargeError means the call's estimate exceeds every deployment's TPM, so
// no amount of waiting helps.
type TooLargeError struct {
	Tokens int
	Limit  int
}

func (e *TooLargeError) Error() string {
	return fmt.Sprintf("this request is estimated at %d tokens, more than any deployment serving the model allows per minute (%d)", e.Tokens, e.Limit)
}

// UpstreamError means every deployment tried failed (5xx, connect, timeout).
type UpstreamError struct {
	Last error
}

func (e *UpstreamError) Error() string {
	return "every deployment able to serve this model failed; last error: " + e.Last.Error()
}

func (e *UpstreamError) Unwrap() error { return e.Last }

// Call is one call to route.
type Call struct {
	Group  *Group
	Req    *Request
	Body   []byte
	Header http.Header
	// Background calls (queue workers) use only capacity above each
	// deployment's synchronous reserve.
	Background bool
	// Estimated, when set, is the call's estimate already made with
	// EstimateEncoding (for the caller's own limits): not counted again.
	Estimated        int
	EstimateEncoding string
	// Charged, when set, is called once the call is charged to a
	// deployment, before it is sent (a worker counts dispatched calls
	// until the capacity view holds them).
	Charged func()
}

// Estimate is what the call will be charged on the group's first
// deployment (the one it is tried on first), and the encoding it was
// counted with, for Call.Estimated.
func (b *Broker) Estimate(g *Group, r *Request) (tokens int, encoding string) {
	ds := g.Deployments()
	if len(ds) == 0 {
		return 0, ""
	}
	enc := ds[0].Encoding
	return Estimate(b.tok.PromptTokens(enc, r), r, g.Policy.DefaultMaxTokens), enc
}

// Result is an admitted call: the response is the deployment's, its body
// unread. Finish must be called once the body has been consumed.
type Result struct {
	Resp        *http.Response
	Deployment  *Deployment
	Reservation *Reservation
	Attempts    int
	Estimate    int
	Started     time.Time
	probe       bool
	b           *Broker
	span        trace.Span // the attempt's, ended by Finish
}

// Finish reconciles the call: usage (if known) commits the charge, and a body
// that broke off counts against the deployment's health.
func (r *Result) Finish(u *Usage, bodyErr error) {
	if u != nil {
		r.Reservation.Commit(u.TotalTokens)
	} else {
		r.Reservation.Commit(0)
	}
	switch {
	case bodyErr == nil:
		if r.Resp.StatusCode < 500 {
			r.Deployment.circuit.success()
		}
	case errors.Is(bodyErr, context.Canceled):
		r.Deployment.circuit.abandon(r.probe)
	default:
		r.Deployment.circuit.failure(r.b.now())
	}
	r.b.metrics.latency.WithLabelValues(r.Deployment.Name).Observe(time.Since(r.Started).Seconds())
	if r.span != nil {
		if u != nil {
			r.span.SetAttributes(tracing.AttrInputTokens.Int(u.PromptTokens), tracing.AttrOutputTokens.Int(u.CompletionTokens))
		}
		if bodyErr != nil {
			r.span.SetStatus(codes.Error, "the answer broke off")
		}
		r.span.End()
	}
}

// Do routes a call: lowest priority tier first, by weight within a tier, only
// to deployments with room and a closed circuit. A 429 penalizes the
// deployment for its retry-after and moves on at once; 5xx, connect errors and
// timeouts count against the circuit and move on. Any other answer (2xx, or a
// 4xx about the request itself) is returned to the caller.
func (b *Broker) Do(ctx context.Context, c *Call) (*Result, error) {
	var (
		tried    []*Deployment
		soonest  time.Time
		lastErr  error
		tooLarge = true
		maxTPM   int
		est      int
		estEnc   string
		attempts int
	)
	if c.Estimated > 0 {
		est, estEnc = c.Estimated, c.EstimateEncoding
	}
	// What is charged is a ceiling on what the deployment may generate.
	c.Body = WithDefaultMaxTokens(c.Body, c.Req, c.Group.Policy)
	estimate := func(d *Deployment) int {
		if d.Encoding != estEnc {
			estEnc = d.Encoding
			est = Estimate(b.tok.PromptTokens(d.Encoding, c.Req), c.Req, c.Group.Policy.DefaultMaxTokens)
		}
		return est
	}
	for {
		d, res, probe, retryAt := b.pick(c.Group, tried, estimate, c.Background)
		if !retryAt.IsZero() && (soonest.IsZero() || retryAt.Before(soonest)) {
			soonest = retryAt
		}
		for _, t := range c.Group.Deployments() {
			maxTPM = max(maxTPM, t.TPM)
			if estimate(t) <= t.TPM {
				tooLarge = false
			}
		}
		if d == nil {
			break
		}
		tried = append(tried, d)
		attempts++
		if c.Charged != nil {
			c.Charged()
			c.Charged = nil
		}
		start := b.now()
		send := b.client.Buffered
		if c.Req.Stream || c.Background {
			send = b.client.Do
		}
		header, span := c.Header, trace.Span(nil)
		if call := trace.SpanFromContext(ctx); b.tracer != nil && call.IsRecording() {
			header, span = b.traceAttempt(ctx, d, c, attempts)
		}
		resp, err := send(ctx, &d.Deployment, c.Req.Op, c.Body, header)
		if span != nil && (err != nil || resp.StatusCode == http.StatusTooManyRequests || resp.StatusCode >= 500) {
			endAttempt(span, resp, err)
		}
		if err != nil {
			// The client's error can tell of the context's end a moment
			// before ctx.Err() does.
			if ctx.Err() != nil || errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
				// Given up while calling: the deployment most likely has
				// the call and charged it on arrival, so the charge stays.
				res.Commit(0)
				d.circuit.abandon(probe)
				if cerr := ctx.Err(); cerr != nil {
					return nil, cerr
				}
				return nil, err
			}
			res.Release()
			d.circuit.failure(b.now())
			b.failover(ctx, d, "error")
			b.log.Warn("deployment call failed", "deployment", d.Name, "err", err)
			lastErr = err
			continue
		}
		switch {
		case resp.StatusCode == http.StatusTooManyRequests:
			now := b.now()
			ra := RetryAfter(resp.Header, now)
			if ra <= 0 {
				ra = time.Second
			}
			d.Capacity.Penalize(now, ra)
			res.Release()
			drain(resp)
			d.circuit.success() // a 429 is a healthy deployment saying "full"
			b.failover(ctx, d, "429")
			if at := now.Add(ra); soonest.IsZero() || at.Before(soonest) {
				soonest = at
			}
			continue
		case resp.StatusCode >= 500:
			res.Release()
			drain(resp)
			d.circuit.failure(b.now())
			b.failover(ctx, d, "5xx")
			lastErr = fmt.Errorf("deployment %s answered %d", d.Name, resp.StatusCode)
			continue
		}
		rt, rr := Remaining(resp.Header)
		if d.API == config.OpenAI {
			rr = -1 // OpenAI's request count is per minute, not per 10 s
		}
		res.Observe(b.now(), rt, rr)
		if span != nil {
			span.SetAttributes(tracing.AttrStatus.Int(resp.StatusCode))
			trace.SpanFromContext(ctx).SetAttributes(tracing.AttrDeployment.String(d.Name), tracing.AttrAttempts.Int(attempts))
		}
		return &Result{Resp: resp, Deployment: d, Reservation: res, Attempts: attempts, Estimate: estimate(d), Started: start, probe: probe, b: b, span: span}, nil
	}
	if lastErr != nil && soonest.IsZero() {
		return nil, &UpstreamError{Last: lastErr}
	}
	if tooLarge && attempts == 0 {
		return nil, &TooLargeError{Tokens: est, Limit: maxTPM}
	}
	if soonest.IsZero() {
		soonest = b.now().Add(time.Second)
	}
	return nil, &NoCapacityError{RetryAt: soonest}
}

// traceAttempt starts the span of one attempt at deployment d and returns the headers to send: the
// caller's, with the attempt's trace context in place of the caller's.
func (b *Broker) traceAttempt(ctx context.Context, d *Deployment, c *Call, n int) (http.Header, trace.Span) {
	actx, span := b.tracer.Start(ctx, "upstream "+c.Req.Op.String(), trace.WithSpanKind(trace.SpanKindClient),
		trace.WithAttributes(tracing.AttrDeployment.String(d.Name), tracing.AttrAttempt.Int(n), tracing.AttrOperation.String(c.Req.Op.String())))
	h := make(http.Header, len(c.Header)+2)
	for k, v := range c.Header {
		h[k] = v
	}
	h.Del("Traceparent")
	h.Del("Tracestate")
	b.tracer.Inject(actx, h)
	return h, span
}

// failover counts a call moved off d, and notes it on the call's span.
func (b *Broker) failover(ctx context.Context, d *Deployment, reason string) {
	b.metrics.failovers.WithLabelValues(d.Name, reason).Inc()
	if span := trace.SpanFromContext(ctx); span.IsRecording() {
		span.AddEvent("failover", trace.WithAttributes(tracing.AttrDeployment.String(d.Name), tracing.AttrReason.String(reason)))
	}
}

// endAttempt ends the span of an attempt the deployment refused or failed.
func endAttempt(span trace.Span, resp *http.Response, err error) {
	switch {
	case err != nil:
		span.RecordError(err)
		span.SetStatus(codes.Error, "call failed")
	default:
		span.SetAttributes(tracing.AttrStatus.Int(resp.StatusCode))
		span.SetStatus(codes.Error, http.StatusText(resp.StatusCode))
	}
	span.End()
}

// pick chooses the next deployment: the first tier that has one with room,
// weighted-randomly within the tier. It returns the reservation made, or the
// soonest time any candidate expects room.
func (b *Broker) pick(g *Group, tried []*Deployment, estimate func(*Deployment) int, background bool) (*Deployment, *Reservation, bool, time.Time) {
	now := b.now()
	var soonest time.Time
	var cands [8]*Deployment
	if background {
		g.route(now)
	}
	for _, tier := range g.tiers {
		cs := cands[:0]
		total := 0
		for _, d := range tier {
			if contains(tried, d) {
				continue
			}
			if !d.circuit.ready(now) {
				continue
			}
			cs = append(cs, d)
			total += d.Weight
		}
		for len(cs) > 0 {
			i := 0
			if len(cs) > 1 {
				r := rand.IntN(total)
				for ; r >= cs[i].Weight; i++ {
					r -= cs[i].Weight
				}
			}
			d := cs[i]
			cs = append(cs[:i], cs[i+1:]...)
			total -= d.Weight
			var res *Reservation
			var ok bool
			var at time.Time
			if background {
				res, ok, at = d.Capacity.ReserveBackground(now, estimate(d))
			} else {
				res, ok, at = d.Capacity.Reserve(now, estimate(d))
			}
			if !ok {
				if !at.IsZero() && (soonest.IsZero() || at.Before(soonest)) {
					soonest = at
				}
				continue
			}
			ok, probe := d.circuit.acquire(now)
			if !ok {
				res.Release()
				continue
			}
			return d, res, probe, time.Time{}
		}
	}
	return nil, nil, false, soonest
}

func contains(ds []*Deployment, d *Deployment) bool {
	for _, x := range ds {
		if x == d {
			return true
		}
	}
	return false
}

// drain reads a little of a discarded body so the connection can be reused.
func drain(resp *http.Response) {
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	resp.Body.Close()
}
