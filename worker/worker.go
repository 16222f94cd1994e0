// Package worker owns the queue workers: they drain jobs from JetStream only
// into the headroom synchronous traffic leaves (each deployment keeps its
// sync_reserve free), serve the highest priority first and tenants in turn,
// call deployments through the same broker as the synchronous path, and
// record each job's outcome exactly once before acknowledging its message.
package worker

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/uuid"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"

	"github.com/levee-gw/levee/broker"
	"github.com/levee-gw/levee/config"
	"github.com/levee-gw/levee/queue"
	"github.com/levee-gw/levee/quota"
	"github.com/levee-gw/levee/store"
	"github.com/levee-gw/levee/tracing"
)

// Config tunes a worker pool.
type Config struct {
	Concurrency int
	MaxAttempts int
	Backoff     []time.Duration
	AckWait     time.Duration
	// ShutdownGrace is how long in-flight jobs may run on after Run's
	// context ends before they are returned to the queue.
	ShutdownGrace time.Duration
	// ResponseRetention is how long a stored response's deployment is
	// remembered.
	ResponseRetention time.Duration
	// Tracer traces each job's run, linked to its submission (nil: off).
	Tracer *tracing.Tracer
}

// ConfigFrom takes a worker Config from Levee's.
func ConfigFrom(c *config.Config) Config {
	return Config{Concurrency: c.Worker.Concurrency, MaxAttempts: c.Queue.MaxAttempts, Backoff: c.Queue.Backoff,
		AckWait: c.Queue.AckWait, ShutdownGrace: c.ShutdownTimeout, ResponseRetention: c.Responses.Retention}
}

// Worker drains the job queue.
type Worker struct {
	q      *queue.Queue
	st     *store.Store
	b      *broker.Broker
	quota  *quota.Quota
	prices *quota.Prices
	cfg    Config
	log    *slog.Logger
	m      *metrics

	groups map[string]*broker.Group // by model token
	gen    uint64                   // the broker's generation groups were taken from
	sem    chan struct{}
	cursor map[string]int // round-robin position per priority and model

	names sync.Map // tenant id → name, for metrics

	mu         sync.Mutex
	running    map[uuid.UUID]context.CancelCauseFunc // jobs whose call is in flight here
	typical    map[string]int                        // running estimate of a job per model token
	unreserved map[string]*atomic.Int64              // tokens dispatched but not yet reserved
	wake       chan struct{}
	saturated  map[string]time.Time // consumers to skip until then (see fetch)
	// held counts, per consumer, the messages this process has fetched and
	// not yet answered (guarded by mu; a consumer's entry goes at zero): a
	// consumer's MaxAckPending counts them, so fetching past it would only
	// stall the pull (and set the tenant aside).
	held map[string]int
}

// New builds a worker pool; reg may be nil.
func New(q *queue.Queue, st *store.Store, b *broker.Broker, qt *quota.Quota, prices *quota.Prices, cfg Config, reg prometheus.Registerer, log *slog.Logger) *Worker {
	w := &Worker{q: q, st: st, b: b, quota: qt, prices: prices, cfg: cfg, log: log, groups: map[string]*broker.Group{},
		sem: make(chan struct{}, cfg.Concurrency), cursor: map[string]int{}, typical: map[string]int{},
		unreserved: map[string]*atomic.Int64{}, wake: make(chan struct{}, 1), saturated: map[string]time.Time{}, running: map[uuid.UUID]context.CancelCauseFunc{}, held: map[string]int{}}
	w.refreshGroups()
	w.m = newMetrics(reg, st)
	if reg != nil {
		reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "levee_worker_inflight",
			Help: "Jobs this process's workers hold (reserved or calling)."}, func() float64 { return float64(len(w.sem)) }))
		reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "levee_worker_unreserved_tokens",
			Help: "Estimated tokens of jobs fetched but not yet charged to a deployment."}, func() float64 {
			var n int64
			w.mu.Lock()
			for _, u := range w.unreserved {
				n += u.Load()
			}
			w.mu.Unlock()
			return float64(n)
		}))
	}
	return w
}

// refreshGroups takes the models and deployments jobs may name from the
// broker: at start, and after a reload (in the dispatcher's goroutine, the
// only one that reads groups).
func (w *Worker) refreshGroups() {
	w.gen = w.b.Generation()
	names := w.b.Models()
	for _, d := range w.b.Deployments() {
		if !slices.Contains(names, d.Name) {
			names = append(names, d.Name)
		}
	}
	groups := make(map[string]*broker.Group, len(names))
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, name := range names {
		g, _ := w.b.Resolve(name)
		tok := queue.Token(name)
		groups[tok] = g
		if w.unreserved[tok] == nil {
			w.unreserved[tok] = &atomic.Int64{}
		}
		if _, ok := w.typical[tok]; !ok {
			w.typical[tok] = g.Policy.DefaultMaxTokens / 2
		}
	}
	w.groups = groups
}

// Run drains the queue until ctx ends, then lets in-flight jobs finish
// (bounded by ShutdownGrace) and returns the rest to the queue.
func (w *Worker) Run(ctx context.Context) error {
	work, cancelWork := context.WithCancel(context.WithoutCancel(ctx))
	defer cancelWork()
	var wg sync.WaitGroup
	go w.sweep(ctx)
	if stop, err := w.q.OnCancelled(w.abort); err != nil {
		w.log.Warn("cancelled jobs will stop at their next lease extension instead", "err", err)
	} else {
		defer stop()
	}
	var (
		pending   map[string]uint64
		refreshed time.Time
	)
	for ctx.Err() == nil {
		if w.b.Generation() != w.gen {
			w.refreshGroups()
		}
		if !w.anyRoom() {
			// No model's deployments can take a background call: reading
			// the queue (milliseconds with many tenants) would be wasted.
			select {
			case <-ctx.Done():
			case <-time.After(15 * time.Millisecond):
			}
			continue
		}
		if time.Since(refreshed) > 20*time.Millisecond {
			p, err := w.q.Pending(ctx)
			if err != nil {
				if ctx.Err() == nil {
					w.log.Warn("reading queue depth", "err", err)
					sleep(ctx, 500*time.Millisecond)
				}
				continue
			}
			pending, refreshed = p, time.Now()
		}
		n := w.dispatch(ctx, work, pending, &wg)
		if n == 0 {
			select {
			case <-ctx.Done():
			case <-w.wake:
			case <-time.After(15 * time.Millisecond):
			}
			refreshed = time.Time{}
		}
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(w.cfg.ShutdownGrace):
		cancelWork() // the jobs still running are returned to the queue
		<-done
	}
	return nil
}

// anyRoom reports whether some model's deployments could take a background
// call now, beyond the calls dispatched but not yet charged.
func (w *Worker) anyRoom() bool {
	now := time.Now()
	for model, g := range w.groups {
		if slots, _, _ := w.slots(now, model, g); slots > 0 {
			return true
		}
	}
	return false
}

// slots is how many background calls of a model its deployments could take
// now, less the calls dispatched but not yet charged (which still take
// their share), with the estimate of one and that count.
func (w *Worker) slots(now time.Time, model string, g *broker.Group) (int, int, *atomic.Int64) {
	est := w.estimate(model)
	w.mu.Lock()
	unreserved := w.unreserved[model]
	w.mu.Unlock()
	if unreserved == nil {
		return 0, est, nil
	}
	return g.BackgroundSlots(now, est) - int(unreserved.Load())/est, est, unreserved
}

// dispatch takes at most one message per model with room, from the highest
// priority that has work, from the next tenant in turn.
func (w *Worker) dispatch(ctx, work context.Context, pending map[string]uint64, wg *sync.WaitGroup) int {
	// model token → priority → tenants with messages
	byModel := map[string]map[string][]uuid.UUID{}
	for subj, n := range pending {
		if n == 0 {
			continue
		}
		prio, model, tenant, ok := w.q.ParseSubject(subj)
		if !ok {
			continue
		}
		if byModel[model] == nil {
			byModel[model] = map[string][]uuid.UUID{}
		}
		byModel[model][prio] = append(byModel[model][prio], tenant)
	}
	now := time.Now()
	dispatched := 0
	for model, prios := range byModel {
		g := w.groups[model]
		if g == nil {
			continue // a model no longer configured: its jobs wait for it
		}
		slots, est, unreserved := w.slots(now, model, g)
		if slots <= 0 {
			continue
		}
		for _, prio := range queue.Priorities {
			tenants := prios[prio]
			if len(tenants) == 0 {
				continue
			}
			// The same order as their text, without making it.
			slices.SortFunc(tenants, func(a, b uuid.UUID) int { return bytes.Compare(a[:], b[:]) })
			key := prio + "/" + model
			start := w.cursor[key]
			// A tenant at its own limit keeps its jobs queued: the others
			// are served past it, and if all of this priority's are at
			// theirs, the next priority's are.
			eligible := false
			for k := 0; k < len(tenants) && slots > 0; k++ {
				i := (start + k) % len(tenants)
				if w.isSaturated(prio, model, tenants[i], now) {
					continue
				}
				room := w.quota.Room(tenants[i], g.Name, int64(est))
				if room == 0 {
					continue
				}
				eligible = true
				if cap(w.sem) == len(w.sem) {
					return dispatched
				}
				ck := saturationKey(prio, model, tenants[i])
				// Up to maxBatch messages a turn: few enough that tenants
				// still alternate, many enough to save round trips.
				want := min(slots, maxBatch, cap(w.sem)-len(w.sem), room, w.q.MaxAckPending()-w.hold(ck, 0))
				if want <= 0 {
					continue // its messages in flight here end soon
				}
				msgs := w.fetch(ctx, prio, model, tenants[i], want)
				if len(msgs) == 0 {
					continue
				}
				w.cursor[key] = i + 1
				w.hold(ck, len(msgs))
				for _, msg := range msgs {
					select {
					case w.sem <- struct{}{}:
					case <-ctx.Done():
						_ = msg.Nak()
						w.hold(ck, -1)
						continue
					}
					unreserved.Add(int64(est))
					wg.Add(1)
					go func() {
						defer wg.Done()
						defer func() { <-w.sem }()
						defer w.hold(ck, -1)
						w.process(work, msg, model, est, unreserved)
					}()
					dispatched++
					slots--
				}
			}
			if eligible {
				break // lower priorities wait while this one has work
			}
		}
	}
	return dispatched
}

// maxBatch bounds the messages taken from one tenant in one turn.
const maxBatch = 16

// A consumer at its MaxAckPending (a tenant whose messages all wait out
// delays: over its key's limit, or backing off) does not answer a no-wait
// pull at all, and the client gives up only after a second. Waiting for it
// would stall every tenant's dispatch, so a pull unanswered for fetchStall
// is checked: a consumer at its MaxAckPending is marked saturated and
// skipped for saturatedFor; one that is merely slow (a busy server, or a
// replicated consumer, whose answers here took 50–120 ms) is waited for, up
// to fetchGiveUp.
const (
	fetchStall   = 50 * time.Millisecond
	fetchGiveUp  = time.Second
	saturatedFor = 2 * time.Second
)

func (w *Worker) fetch(ctx context.Context, prio, model string, tenant uuid.UUID, n int) []jetstream.Msg {
	c, err := w.q.Consumer(ctx, prio, model, tenant)
	if err != nil {
		w.log.Warn("consumer", "err", err)
		return nil
	}
	batch, err := c.FetchNoWait(n)
	if err != nil {
		w.q.Forget(prio, model, tenant)
		return nil
	}
	var out []jetstream.Msg
	stall := time.NewTimer(fetchStall)
	defer stall.Stop()
	checked := false
	msgs := batch.Messages()
	for {
		select {
		case m, ok := <-msgs:
			if !ok {
				if err := batch.Error(); err != nil {
					// Most often the consumer was removed for being idle
					// (queue.consumer_idle): the pull is answered with an
					// error, not by FetchNoWait. Make it again next turn.
					w.log.Debug("fetch", "priority", prio, "model", model, "tenant", tenant, "err", err)
					w.q.Forget(prio, model, tenant)
				}
				return out
			}
			out = append(out, m)
		case <-stall.C:
			if !checked && !w.atMaxAckPending(ctx, c) {
				checked = true
				stall.Reset(fetchGiveUp - fetchStall)
				continue
			}
			w.saturated[saturationKey(prio, model, tenant)] = time.Now().Add(saturatedFor)
			w.m.saturated.Inc()
			// Anything the pull still brings goes straight back.
			go func() {
				for m := range msgs {
					_ = m.Nak()
				}
			}()
			return out
		}
	}
}

// atMaxAckPending asks the server whether a consumer holds as many
// unacknowledged messages as it may (true when it cannot tell).
func (w *Worker) atMaxAckPending(ctx context.Context, c jetstream.Consumer) bool {
	ctx, cancel := context.WithTimeout(ctx, fetchGiveUp-fetchStall)
	defer cancel()
	info, err := c.Info(ctx)
	if err != nil {
		return true
	}
	return info.Config.MaxAckPending > 0 && info.NumAckPending >= info.Config.MaxAckPending
}

// hold adds n to the messages this process holds of a consumer and returns
// how many it holds now.
func (w *Worker) hold(consumer string, n int) int {
	w.mu.Lock()
	defer w.mu.Unlock()
	h := w.held[consumer] + n
	if h == 0 {
		delete(w.held, consumer)
	} else {
		w.held[consumer] = h
	}
	return h
}

func saturationKey(prio, model string, tenant uuid.UUID) string {
	return prio + "/" + model + "/" + tenant.String()
}

// isSaturated reports whether a consumer was found saturated a moment ago.
// Only the dispatch loop uses w.saturated.
func (w *Worker) isSaturated(prio, model string, tenant uuid.UUID, now time.Time) bool {
	k := saturationKey(prio, model, tenant)
	until, ok := w.saturated[k]
	if ok && !now.Before(until) {
		delete(w.saturated, k)
		return false
	}
	return ok
}

func (w *Worker) estimate(model string) int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return max(w.typical[model], 1)
}

func (w *Worker) learn(model string, est int) {
	w.mu.Lock()
	w.typical[model] = (w.typical[model]*7 + est) / 8
	w.mu.Unlock()
}

// Wake makes the dispatcher look at the queue now (a job was submitted).
func (w *Worker) Wake() {
	select {
	case w.wake <- struct{}{}:
	default:
	}
}

func (w *Worker) backoff(attempt int) time.Duration {
	if len(w.cfg.Backoff) == 0 {
		return time.Second
	}
	d := w.cfg.Backoff[min(max(attempt-1, 0), len(w.cfg.Backoff)-1)]
	return time.Duration(float64(d) * (0.8 + 0.4*rand.Float64()))
}

// process runs one delivery of a job.
func (w *Worker) process(ctx context.Context, msg jetstream.Msg, model string, dispatchEst int, dispatched *atomic.Int64) {
	unreserved := int64(dispatchEst)
	defer func() { dispatched.Add(-unreserved) }()
	id, err := uuid.Parse(string(msg.Data()))
	if err != nil {
		_ = msg.Term()
		return
	}
	job, err := w.st.StartJob(ctx, id, w.cfg.AckWait)
	switch {
	case errors.Is(err, store.ErrNotFound):
		_ = msg.Term() // no such job (its tenant's data was deleted)
		return
	case errors.Is(err, store.ErrJobTerminal):
		_ = msg.Ack() // done already (a redelivery, or cancelled): nothing to run
		return
	case errors.Is(err, store.ErrJobLeased):
		wait := time.Second
		if job.LeaseUntil != nil {
			wait = max(time.Until(*job.LeaseUntil), 100*time.Millisecond)
		}
		_ = msg.NakWithDelay(wait)
		return
	case err != nil:
		w.log.Warn("starting job", "job", id, "err", err)
		_ = msg.NakWithDelay(time.Second)
		return
	}
	w.m.started.Inc()
	start := time.Now()
	if w.cfg.Tracer.Enabled() {
		var span trace.Span
		ctx, span = w.traceJob(ctx, msg, job)
		defer span.End()
	}

	// call ends when the job is cancelled, so a cancelled job stops spending
	// tokens; ctx (shutdown) still governs everything else.
	call, abort := context.WithCancelCause(ctx)
	defer abort(nil)
	w.mu.Lock()
	w.running[id] = abort
	w.mu.Unlock()
	defer func() {
		w.mu.Lock()
		delete(w.running, id)
		w.mu.Unlock()
	}()

	// Keep the message and the lease alive through a long call; a lease that
	// cannot be extended because the job is no longer running means it was
	// cancelled (the notice may have been missed).
	keep, stopKeep := context.WithCancel(ctx)
	defer stopKeep()
	go func() {
		t := time.NewTicker(w.cfg.AckWait / 3)
		defer t.Stop()
		for {
			select {
			case <-keep.Done():
				return
			case <-t.C:
				_ = msg.InProgress()
				if held, err := w.st.ExtendLease(keep, id, w.cfg.AckWait); err == nil && !held {
					abort(errNotRunning)
				}
			}
		}
	}()

	fail := func(code, message string, status int, body []byte) {
		w.finish(ctx, msg, job, &store.FinishJobParams{ID: id, Status: store.JobFailed, ErrorCode: code, ErrorMessage: message,
			ResultStatus: status, ResultBody: body, Latency: time.Since(start), Attempts: job.Attempts})
	}
	op, ok := broker.OpFromPath(strings.TrimPrefix(job.Endpoint, "/v1/"))
	g, gok := w.b.Resolve(job.Model)
	if !ok || !gok {
		fail("model_not_found", fmt.Sprintf("model %q is not served by this gateway", job.Model), 0, nil)
		return
	}
	// Checked again as it is sent: the policy may have changed since the
	// job was accepted, and what goes upstream is what was checked.
	g, req, err := w.b.Admit(op, job.Body, g)
	if err != nil {
		fail("invalid_request", err.Error(), 0, nil)
		return
	}
	bc := &broker.Call{Group: g, Req: req, Body: job.Body, Header: http.Header{}, Background: true}
	// Once charged, the capacity view holds the call: counting it as
	// dispatched until its answer too would keep its tokens from the
	// workers twice over for the length of the call.
	bc.Charged = func() { dispatched.Add(-unreserved); unreserved = 0 }
	// A response continuing a stored one: charged for the conversation it
	// carries, and naming it as its deployment knows it (a background
	// response's id is Levee's). Looked up now, not at submit: it may have
	// been deleted since.
	var named map[string]any // fields of its answer to name back as the caller knows them
	if op == broker.OpResponses {
		named = map[string]any{}
		if job.Background {
			named["id"], named["background"] = store.BackgroundResponseID(job.ID), true
		}
		if prev := req.PreviousResponseID; prev != "" {
			rt, err := w.st.ResponseRouteOf(ctx, job.TenantID, prev)
			if errors.Is(err, store.ErrNotFound) {
				fail("previous_response_not_found", fmt.Sprintf("previous response %s no longer exists", prev), 0, nil)
				return
			}
			if err != nil {
				_ = w.st.RequeueJob(context.WithoutCancel(ctx), id, false)
				_ = msg.NakWithDelay(time.Second)
				return
			}
			req.ContextTokens = rt.ContextTokens
			if up := rt.Upstream(); up != prev {
				if bc.Body, err = broker.WithResponseFields(job.Body, map[string]any{"previous_response_id": up}); err != nil {
					fail("invalid_request", err.Error(), 0, nil)
					return
				}
				named["previous_response_id"] = prev
			}
		}
	}
	// The job's tenant and key limits and budget: over them it waits in the
	// queue (not an attempt), unless its tenant chose failing for a spent
	// budget, or it can never fit.
	var adm *quota.Admission
	if w.quota.Configured(job.TenantID) {
		est, enc := w.b.Estimate(g, req)
		bc.Estimated, bc.EstimateEncoding = est, enc
		a, ref, err := w.quota.Admit(ctx, quota.Caller{Tenant: job.TenantID, Key: job.KeyID, Model: g.Name},
			quota.Charge{Tokens: int64(est), Nanos: w.prices.Estimate(g, est)})
		switch {
		case err != nil:
			w.m.retries.WithLabelValues("quota_unavailable").Inc()
			_ = w.st.RequeueJob(context.WithoutCancel(ctx), id, false)
			_ = msg.NakWithDelay(time.Second)
			return
		case ref != nil && ref.Never && ref.Code == "budget_exceeded":
			fail("request_too_large", "the call's estimated cost is larger than its tenant's or key's whole budget", 0, nil)
			return
		case ref != nil && ref.Never:
			fail("request_too_large", "the call is larger than its tenant's or key's tokens per minute", 0, nil)
			return
		case ref != nil && ref.Code == "budget_exceeded" && ref.Fail:
			msg := "the tenant's budget for this period is spent"
			if ref.What == "budget_left" {
				msg = "what is left of the tenant's budget for this period is less than the call's estimated cost"
			}
			fail("budget_exceeded", msg, 0, nil)
			return
		case ref != nil:
			w.m.retries.WithLabelValues("tenant_limit").Inc()
			_ = w.st.RequeueJob(context.WithoutCancel(ctx), id, false)
			_ = msg.NakWithDelay(min(max(time.Until(ref.RetryAt), 50*time.Millisecond), 30*time.Second))
			return
		}
		adm = a
	}
	spent := quota.Usage{Tokens: -1}
	defer func() { adm.Finish(spent, spent.Tokens >= 0) }()
	res, err := w.b.Do(call, bc)
	dispatched.Add(-unreserved)
	unreserved = 0
	var nc *broker.NoCapacityError
	var tl *broker.TooLargeError
	switch {
	case err == nil:
	case errors.As(err, &nc):
		// Not the job's fault: back to the queue until room is expected.
		w.m.retries.WithLabelValues("no_capacity").Inc()
		_ = w.st.RequeueJob(context.WithoutCancel(ctx), id, false)
		_ = msg.NakWithDelay(max(time.Until(nc.RetryAt), 50*time.Millisecond))
		return
	case errors.As(err, &tl):
		fail("request_too_large", tl.Error(), 0, nil)
		return
	case errors.Is(context.Cause(call), errNotRunning):
		// Cancelled while calling: Postgres has its outcome already. The
		// deployment had the call and charged it.
		w.m.abortedCalls.Inc()
		spent = quota.Usage{Tokens: int64(bc.Estimated), Nanos: w.prices.Estimate(g, bc.Estimated)}
		_ = msg.Ack()
		return
	case ctx.Err() != nil:
		// Shutting down: return the job untouched.
		_ = w.st.RequeueJob(context.WithoutCancel(ctx), id, false)
		_ = msg.Nak()
		return
	default:
		if job.Attempts >= w.cfg.MaxAttempts {
			w.m.deadLettered.Inc()
			fail("upstream_unavailable", fmt.Sprintf("failed after %d attempts; last error: %v", job.Attempts, err), 0, nil)
			return
		}
		w.m.retries.WithLabelValues("upstream_error").Inc()
		_ = w.st.RequeueJob(context.WithoutCancel(ctx), id, true)
		_ = msg.NakWithDelay(w.backoff(job.Attempts))
		return
	}
	w.learn(model, res.Estimate)
	spent = quota.Usage{Tokens: int64(res.Estimate), Nanos: w.prices.Estimate(g, res.Estimate)}
	var body []byte
	var readErr error
	if job.Background && req.Stream && res.Resp.StatusCode < 400 {
		// A streamed background response: its events are kept as they
		// come, for the clients following it; its result is the
		// response its last event carries. (A refusal is a JSON error,
		// read as any job's.)
		body, readErr = w.streamEvents(call, job, res.Resp.Body, named)
	} else {
		body, readErr = io.ReadAll(io.LimitReader(res.Resp.Body, broker.MaxResponseBody))
	}
	res.Resp.Body.Close()
	if readErr != nil && errors.Is(context.Cause(call), errNotRunning) {
		res.Finish(nil, context.Canceled)
		w.m.abortedCalls.Inc()
		_ = msg.Ack()
		return
	}
	if readErr != nil {
		res.Finish(nil, readErr)
		if job.Attempts >= w.cfg.MaxAttempts {
			w.m.deadLettered.Inc()
			fail("upstream_error", fmt.Sprintf("the deployment's answer broke off %d times; last: %v", job.Attempts, readErr), 0, nil)
			return
		}
		_ = w.st.RequeueJob(context.WithoutCancel(ctx), id, true)
		_ = msg.NakWithDelay(w.backoff(job.Attempts))
		return
	}
	parseUsage := broker.ParseUsage
	// The response's id as its deployment knows it (before renaming).
	upstreamID, stored := broker.ResponseID(body)
	if op == broker.OpResponses {
		parseUsage = broker.ResponseUsage
		if len(named) > 0 && res.Resp.StatusCode == http.StatusOK {
			// The caller's names, in its result.
			if b, err := broker.WithResponseFields(body, named); err == nil {
				body = b
			}
		}
	}
	u, hasUsage := parseUsage(body)
	var cost int64
	if hasUsage {
		res.Finish(&u, nil)
		cost = w.prices.Cost(res.Deployment, u, job.Priority == "batch")
		spent = quota.Usage{Tokens: int64(u.PromptTokens + u.CompletionTokens), Nanos: cost}
	} else {
		res.Finish(nil, nil)
		if res.Resp.StatusCode >= 400 {
			spent = quota.Usage{} // as the ledger: no usage, no cost
		}
	}
	w.m.tokens.WithLabelValues(res.Deployment.Name).Add(float64(u.TotalTokens))
	p := &store.FinishJobParams{ID: id, Status: store.JobSucceeded, Deployment: res.Deployment.Name, ResultStatus: res.Resp.StatusCode,
		ResultBody: body, PromptTokens: u.PromptTokens, CompletionTokens: u.CompletionTokens, CostNanos: cost, Latency: time.Since(start), Attempts: job.Attempts}
	if res.Resp.StatusCode >= 400 {
		p.Status, p.ErrorCode, p.ErrorMessage = store.JobFailed, "upstream_rejected", fmt.Sprintf("the deployment answered %d", res.Resp.StatusCode)
	}
	if op == broker.OpResponses && res.Resp.StatusCode == http.StatusOK {
		if job.Background {
			p.ResponseStatus = broker.ResponseStatus(body)
			if p.ResponseStatus == "failed" {
				p.Status, p.ErrorCode, p.ErrorMessage = store.JobFailed, "response_failed", "the deployment's response failed"
			}
		}
		// Its follow-ups must find the deployment that stores it, under
		// the id the caller knows (a background response's is Levee's).
		if stored {
			rt := &store.ResponseRoute{ID: upstreamID, TenantID: job.TenantID, Deployment: res.Deployment.Name, ContextTokens: u.TotalTokens}
			if job.Background {
				rt.ID, rt.UpstreamID = store.BackgroundResponseID(job.ID), upstreamID
			}
			// Recorded before the job ends, so no caller can see it ended
			// and find no way to its follow-ups.
			if err := w.st.RecordResponse(context.WithoutCancel(ctx), rt, w.cfg.ResponseRetention); err != nil {
				w.log.Warn("recording where a response is stored", "job", id, "err", err)
			}
		}
	}
	w.finish(ctx, msg, job, p)
}

// streamEvents stores a streamed background response's events as they
// arrive, renumbered after Levee's own first two (see store.StreamOffset)
// and naming the response by Levee's id, and returns the response the
// terminal event carries.
func (w *Worker) streamEvents(ctx context.Context, job *store.Job, r io.Reader, named map[string]any) ([]byte, error) {
	// A rerun (after a worker died) finds events stored already: those
	// numbers keep what clients may have read, and its terminal event
	// goes after the last of them, so the stream still ends.
	last := -1
	if job.Attempts > 1 {
		if ev, err := w.st.LastResponseEvent(ctx, job.ID); err == nil {
			last = ev
		}
	}
	var final []byte
	err := broker.ReadEvents(io.LimitReader(r, broker.MaxResponseBody), func(data []byte) error {
		typ, seq, out, resp, err := broker.RewriteEvent(data, store.StreamOffset, named)
		if err != nil || typ == "response.created" {
			// Not an event of a Responses stream; or the deployment's
			// response.created, when Levee's came first.
			return nil
		}
		if broker.TerminalEvent(typ) {
			final = append([]byte(nil), resp...)
			if seq <= last {
				seq = last + 1
				if out, err = broker.WithResponseFields(out, map[string]any{"sequence_number": seq}); err != nil {
					return err
				}
			}
		}
		last = max(last, seq)
		// One at a time, as it comes: a client follows at the pace of
		// the deployment.
		return w.st.AddResponseEvents(context.WithoutCancel(ctx), job.ID, []store.ResponseEvent{{Seq: seq, Type: typ, Data: out}})
	})
	if err == nil && final == nil {
		err = io.ErrUnexpectedEOF
	}
	return final, err
}

// errNotRunning is the cause a job's call context ends with when the job
// stops being this worker's while it runs: cancelled, or (after a lost
// lease) taken back by the sweeper to run elsewhere.
var errNotRunning = errors.New("job cancelled")

// abort stops the call of a job cancelled while running in this process.
func (w *Worker) abort(id uuid.UUID) {
	w.mu.Lock()
	cancel := w.running[id]
	w.mu.Unlock()
	if cancel != nil {
		cancel(errNotRunning)
	}
}

// traceJob starts the span of a job's run, linked to the span that
// submitted it (whose context the message carries).
func (w *Worker) traceJob(ctx context.Context, msg jetstream.Msg, job *store.Job) (context.Context, trace.Span) {
	attrs := []attribute.KeyValue{tracing.AttrJob.String("job_" + job.ID.String()), tracing.AttrTenant.String(job.TenantID.String()),
		tracing.AttrModel.String(job.Model), tracing.AttrPriority.String(job.Priority), tracing.AttrAttempt.Int(job.Attempts)}
	if job.BatchID != nil {
		attrs = append(attrs, tracing.AttrBatch.String(job.BatchID.String()))
	}
	opts := []trace.SpanStartOption{trace.WithSpanKind(trace.SpanKindConsumer), trace.WithAttributes(attrs...)}
	if l, ok := w.cfg.Tracer.Link(queue.TraceHeader(msg)); ok {
		opts = append(opts, trace.WithLinks(l))
	}
	return w.cfg.Tracer.Start(ctx, "job "+job.Endpoint, opts...)
}

// finish records the outcome (exactly once, in Postgres), then acks. If
// Postgres cannot be reached the message is not acked: it will come back,
// and the outcome is recorded then.
func (w *Worker) finish(ctx context.Context, msg jetstream.Msg, job *store.Job, p *store.FinishJobParams) {
	ctx = context.WithoutCancel(ctx)
	var applied bool
	var err error
	for try := 0; try < 5; try++ {
		if applied, err = w.st.FinishJob(ctx, p); err == nil {
			break
		}
		time.Sleep(time.Duration(try+1) * 200 * time.Millisecond)
	}
	if err != nil {
		w.log.Error("recording job outcome", "job", p.ID, "err", err)
		_ = msg.NakWithDelay(w.cfg.AckWait)
		return
	}
	_ = msg.Ack()
	if span := trace.SpanFromContext(ctx); span.IsRecording() {
		span.SetAttributes(attribute.String("levee.job.status", p.Status), tracing.AttrDeployment.String(p.Deployment),
			tracing.AttrInputTokens.Int(p.PromptTokens), tracing.AttrOutputTokens.Int(p.CompletionTokens))
		if p.Status == store.JobFailed {
			span.SetStatus(codes.Error, p.ErrorCode)
		}
	}
	if applied {
		w.prices.Record(w.tenantName(ctx, job.TenantID), job.Model, p.CostNanos)
		w.m.finished.WithLabelValues(job.Priority, p.Status).Inc()
		w.m.latency.WithLabelValues(job.Priority).Observe(time.Since(job.CreatedAt).Seconds())
		w.q.NotifyDone(p.ID)
	}
}

// tenantName names a tenant for metrics (its id if it cannot be read).
func (w *Worker) tenantName(ctx context.Context, id uuid.UUID) string {
	if v, ok := w.names.Load(id); ok {
		return v.(string)
	}
	name, err := w.st.TenantName(ctx, id)
	if err != nil {
		return id.String()
	}
	w.names.Store(id, name)
	return name
}

// sweep republishes jobs whose message may be missing: accepted but the
// publish never confirmed, or held by a worker whose lease ran out long ago.
// The job id is the message id, so a message that does exist is not doubled.
func (w *Worker) sweep(ctx context.Context) {
	t := time.NewTicker(5 * time.Second)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		jobs, err := w.st.SweepJobs(ctx, max(2*w.cfg.AckWait, 10*time.Second), 1000)
		if err != nil {
			continue
		}
		for _, j := range jobs {
			if err := w.q.Publish(ctx, j.ID, j.Priority, j.Model, j.TenantID); err != nil {
				w.log.Warn("republishing job", "job", j.ID, "err", err)
			}
		}
		if len(jobs) > 0 {
			w.log.Info("republished jobs", "count", len(jobs))
		}
	}
}

func sleep(ctx context.Context, d time.Duration) {
	select {
	case <-ctx.Done():
	case <-time.After(d):
	}
}

type metrics struct {
	started      prometheus.Counter
	finished     *prometheus.CounterVec
	retries      *prometheus.CounterVec
	deadLettered prometheus.Counter
	abortedCalls prometheus.Counter
	latency      *prometheus.HistogramVec
	tokens       *prometheus.CounterVec
	saturated    prometheus.Counter
}

func newMetrics(reg prometheus.Registerer, st *store.Store) *metrics {
	m := &metrics{
		started:      prometheus.NewCounter(prometheus.CounterOpts{Name: "levee_jobs_started_total", Help: "Job attempts started by workers."}),
		finished:     prometheus.NewCounterVec(prometheus.CounterOpts{Name: "levee_jobs_finished_total", Help: "Jobs ended by workers, by priority and status."}, []string{"priority", "status"}),
		retries:      prometheus.NewCounterVec(prometheus.CounterOpts{Name: "levee_job_retries_total", Help: "Jobs returned to the queue, by reason."}, []string{"reason"}),
		deadLettered: prometheus.NewCounter(prometheus.CounterOpts{Name: "levee_jobs_dead_lettered_total", Help: "Jobs failed after their last attempt."}),
		abortedCalls: prometheus.NewCounter(prometheus.CounterOpts{Name: "levee_jobs_aborted_calls_total", Help: "Upstream calls stopped because their job was cancelled while running."}),
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "levee_job_duration_seconds", Help: "Time from a job's acceptance to its end.",
			Buckets: prometheus.ExponentialBuckets(0.01, 3, 12)}, []string{"priority"}),
		tokens: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "levee_worker_tokens_total", Help: "Tokens drained by workers, per deployment."}, []string{"deployment"}),
		saturated: prometheus.NewCounter(prometheus.CounterOpts{Name: "levee_worker_saturated_consumers_total",
			Help: "Times a tenant's queue was skipped for a while: all its messages in flight or waiting out delays (MaxAckPending)."}),
	}
	if reg == nil {
		return m
	}
	reg.MustRegister(m.started, m.finished, m.retries, m.deadLettered, m.abortedCalls, m.latency, m.tokens, m.saturated, &queueCollector{st: st})
	return m
}

// queueCollector reports queue depth and the oldest queued job per priority,
// read from Postgres at scrape time (cached briefly).
type queueCollector struct {
	st    *store.Store
	mu    sync.Mutex
	at    time.Time
	stats []store.QueueStat
}

var (
	depthDesc       = prometheus.NewDesc("levee_queue_depth", "Jobs waiting, by priority and state.", []string{"priority", "state"}, nil)
	oldestDesc      = prometheus.NewDesc("levee_queue_oldest_age_seconds", "Age of the oldest queued job, by priority.", []string{"priority"}, nil)
	modelDepthDesc  = prometheus.NewDesc("levee_queue_model_depth", "Jobs queued (not yet running), by priority and the model they name.", []string{"priority", "model"}, nil)
	tenantDepthDesc = prometheus.NewDesc("levee_queue_tenant_depth",
		"Jobs queued (not yet running) by tenant: the tenants with the most, the rest summed as tenant=\"(other)\".", []string{"tenant"}, nil)
	priorityAll = queue.Priorities
)

// maxTenantSeries bounds levee_queue_tenant_depth: a series per tenant
// would grow with every tenant that ever queued.
const maxTenantSeries = 20

func (c *queueCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- depthDesc
	ch <- oldestDesc
	ch <- modelDepthDesc
	ch <- tenantDepthDesc
}

func (c *queueCollector) Collect(ch chan<- prometheus.Metric) {
	c.mu.Lock()
	if time.Since(c.at) > 2*time.Second {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		if s, err := c.st.QueueStats(ctx); err == nil {
			c.stats, c.at = s, time.Now()
		}
		cancel()
	}
	stats := c.stats
	c.mu.Unlock()
	type prio struct {
		queued, running int64
		oldest          *time.Time
	}
	byPrio := map[string]*prio{}
	for _, p := range priorityAll {
		byPrio[p] = &prio{}
	}
	byModel := map[[2]string]int64{}
	byTenant := map[string]int64{}
	for _, s := range stats {
		p := byPrio[s.Priority]
		if p == nil {
			p = &prio{}
			byPrio[s.Priority] = p
		}
		p.queued += s.Queued
		p.running += s.Running
		if s.Oldest != nil && (p.oldest == nil || s.Oldest.Before(*p.oldest)) {
			p.oldest = s.Oldest
		}
		if s.Queued > 0 {
			byModel[[2]string{s.Priority, s.Model}] += s.Queued
			byTenant[s.Tenant] += s.Queued
		}
	}
	for name, p := range byPrio {
		ch <- prometheus.MustNewConstMetric(depthDesc, prometheus.GaugeValue, float64(p.queued), name, "queued")
		ch <- prometheus.MustNewConstMetric(depthDesc, prometheus.GaugeValue, float64(p.running), name, "running")
		age := 0.0
		if p.oldest != nil {
			age = time.Since(*p.oldest).Seconds()
		}
		ch <- prometheus.MustNewConstMetric(oldestDesc, prometheus.GaugeValue, age, name)
	}
	for k, n := range byModel {
		ch <- prometheus.MustNewConstMetric(modelDepthDesc, prometheus.GaugeValue, float64(n), k[0], k[1])
	}
	tenants := make([]string, 0, len(byTenant))
	for t := range byTenant {
		tenants = append(tenants, t)
	}
	sort.Slice(tenants, func(i, j int) bool {
		if byTenant[tenants[i]] != byTenant[tenants[j]] {
			return byTenant[tenants[i]] > byTenant[tenants[j]]
		}
		return tenants[i] < tenants[j]
	})
	var other int64
	for i, t := range tenants {
		if i < maxTenantSeries {
			ch <- prometheus.MustNewConstMetric(tenantDepthDesc, prometheus.GaugeValue, float64(byTenant[t]), t)
		} else {
			other += byTenant[t]
		}
	}
	if len(tenants) > maxTenantSeries {
		ch <- prometheus.MustNewConstMetric(tenantDepthDesc, prometheus.GaugeValue, float64(other), "(other)")
	}
}
