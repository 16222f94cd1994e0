// Package quota owns what each tenant, and each of its keys, may use of the
// deployments they share: rate limits — tokens and requests per sliding
// minute, calls in flight; for every model or for one — and budgets per
// period, in money and/or tokens. A call is charged on admission with the
// same estimate the deployments charge, and reconciled once its usage is
// known; one that never reached a deployment gives its charge back. Rate
// limits are shared across processes the way deployment capacity is
// (charges broadcast on NATS, folded into every process's windows); budgets
// are leased from Postgres, so they hold exactly. It also prices usage.
package quota

import (
	"context"
	"errors"
	"log/slog"
	"math"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/uuid"

	"github.com/levee-gw/levee/store"
	"github.com/levee-gw/levee/window"
)

// Store is what quota needs of Postgres.
type Store interface {
	SettingsVersion(ctx context.Context) (int64, error)
	LoadQuotas(ctx context.Context) (*store.Quotas, error)
	LeaseBudget(ctx context.Context, p *store.LeaseParams) (store.Lease, error)
	SettleBudget(ctx context.Context, p *store.SettleParams) error
	MarkBudgetExceeded(ctx context.Context, budget, tenant uuid.UUID, period time.Time) error
}

// Quota is one process's view of every limit and budget.
type Quota struct {
	st       Store
	log      *slog.Logger
	currency string
	now      func() time.Time // the clock (tests set their own)
	// dbTimeout bounds each wait on Postgres of an admission (a lease).
	dbTimeout time.Duration

	mu       sync.RWMutex
	version  int64
	limiters map[Scope]*limiter
	budgets  map[Scope]*budget // Model is always ""
	tenants  map[uuid.UUID]string
	// configured holds the tenants with any limit or budget: every other
	// tenant's call is admitted with one map lookup.
	configured map[uuid.UUID]bool
	// resolved remembers which limiters and budgets apply to a caller
	// (emptied by every Load).
	resolved map[Caller]*applies
	// aliases maps a model name a caller used to the aliases whose
	// per-model limits it counts under (see SetAliases).
	aliases func(model string) []string

	urgent chan struct{}
	// shared is set while Share runs: only then are charges kept for it.
	shared atomic.Bool
	// seq numbers this process's messages; confirmed is the newest one
	// every other process has applied (acknowledged), and echoed is closed
	// (and replaced) when confirmed moves.
	seq       atomic.Uint64
	confirmed atomic.Uint64
	echoMu    sync.Mutex
	echoed    chan struct{}
	// peers are the other processes sharing: when last heard from, the
	// newest of their messages this one applied (sent back to them as
	// acknowledgements), and the newest of this one's each acknowledged.
	peersMu sync.Mutex
	peers   map[string]*peerState
	ackDue  bool
	// dirty are the scopes with news for the other processes.
	dirtyMu sync.Mutex
	dirty   map[Scope]struct{}
}

// New returns an empty Quota; Load (or Run) fills it. currency is the price
// table's: money budgets in another currency are not enforced (and said so).
// dbTimeout bounds an admission's wait on Postgres.
func New(st Store, currency string, dbTimeout time.Duration, log *slog.Logger) *Quota {
	return &Quota{st: st, log: log, currency: currency, now: time.Now, dbTimeout: dbTimeout, limiters: map[Scope]*limiter{}, budgets: map[Scope]*budget{},
		tenants: map[uuid.UUID]string{}, configured: map[uuid.UUID]bool{}, resolved: map[Caller]*applies{},
		urgent: make(chan struct{}, 1), dirty: map[Scope]struct{}{}, echoed: make(chan struct{}), peers: map[string]*peerState{}}
}

// Load replaces the limits and budgets with a snapshot, keeping the windows
// and leases of scopes that stay.
func (q *Quota) Load(s *store.Quotas) {
	limiters := map[Scope]*limiter{}
	budgets := map[Scope]*budget{}
	configured := map[uuid.UUID]bool{}
	q.mu.Lock()
	defer q.mu.Unlock()
	for _, l := range s.Limits {
		sc := Scope{Tenant: l.TenantID, Key: l.KeyID, Model: l.Model}
		lim := Limits{TPM: l.TPM, RPM: l.RPM, Concurrency: l.Concurrency}
		if old := q.limiters[sc]; old != nil {
			old.mu.Lock()
			old.limits = lim
			old.mu.Unlock()
			limiters[sc] = old
		} else {
			limiters[sc] = newLimiter(sc, lim, &q.shared, &q.confirmed, q.processes, q.markDirty)
		}
		configured[l.TenantID] = true
	}
	for _, b := range s.Budgets {
		if b.AmountNanos > 0 && b.Currency != q.currency {
			q.log.Error("a budget is in another currency than the price table; its money limit is not enforced",
				"tenant", b.TenantID, "budget", b.Currency, "prices", q.currency)
			b.AmountNanos = 0
			if b.Tokens == 0 {
				continue
			}
		}
		sc := Scope{Tenant: b.TenantID, Key: b.KeyID}
		if old := q.budgets[sc]; old != nil && old.b.ID == b.ID {
			old.mu.Lock()
			if old.b != b {
				// Changed (raised, perhaps): what was refused may fit now.
				old.refusedUntil, old.closedUntil = time.Time{}, time.Time{}
			}
			old.b = b
			old.mu.Unlock()
			budgets[sc] = old
		} else {
			budgets[sc] = newBudget(b)
		}
		configured[b.TenantID] = true
	}
	q.limiters, q.budgets, q.configured, q.tenants, q.version = limiters, budgets, configured, s.Tenants, s.Version
	q.resolved = map[Caller]*applies{}
}

// SetAliases says which model aliases a call naming a model counts under
// (broker.AliasesOf): a call naming a deployment directly counts against
// the per-model limits of every alias it serves. Without it, a model is
// only itself. Call it before serving.
func (q *Quota) SetAliases(f func(model string) []string) {
	q.mu.Lock()
	q.aliases = f
	q.resolved = map[Caller]*applies{}
	q.mu.Unlock()
}

// models is what a caller's model counts under; q.mu must be held.
func (q *Quota) models(model string) []string {
	if q.aliases == nil {
		return []string{model}
	}
	if ms := q.aliases(model); len(ms) > 0 {
		return ms
	}
	return []string{model}
}

// TenantName is a configured tenant's name ("" if unknown here).
func (q *Quota) TenantName(id uuid.UUID) string {
	q.mu.RLock()
	defer q.mu.RUnlock()
	return q.tenants[id]
}

// Caller is who makes a call, for which model (alias).
type Caller struct {
	Tenant uuid.UUID
	Key    uuid.UUID
	Model  string
}

// Charge is what a call is reserved for on admission: its estimate in
// tokens and what that can cost at most.
type Charge struct {
	Tokens int64
	Nanos  int64
}

// Refusal says why a call was not admitted.
type Refusal struct {
	// Code is tenant_rate_limit_exceeded, key_rate_limit_exceeded or
	// budget_exceeded.
	Code string
	// What bound: tokens, requests, concurrency, budget (spent) or
	// budget_left (what is left of it is less than this call).
	What string
	// RetryAt is when the limit may have room again (for a budget, its
	// next period); zero when Never.
	RetryAt time.Time
	// Never: the call is larger than the limit (or the whole budget), so no
	// wait would help.
	Never bool
	// Fail is set for a budget whose queued work fails rather than waits.
	Fail bool
	// Headers describe the caller's tightest limit.
	Headers Headers
}

// Headers describe a caller's limit for x-ratelimit-* headers; -1 where the
// caller has no such limit.
type Headers struct {
	LimitTokens, RemainingTokens     int64
	LimitRequests, RemainingRequests int64
}

// Admission is one call's claim; Finish must be called once.
type Admission struct {
	q       *Quota
	now     time.Time
	bucket  int64
	charge  Charge
	limits  []*limiter
	budgets []*budget
	periods []time.Time
	Headers Headers
	done    bool
}

// None is the admission of a caller with no limits or budgets.
var none = &Admission{done: true, Headers: Headers{-1, -1, -1, -1}}

// Configured reports whether a tenant has any limit or budget (when not,
// Admit needs no estimate).
func (q *Quota) Configured(tenant uuid.UUID) bool {
	q.mu.RLock()
	defer q.mu.RUnlock()
	return q.configured[tenant]
}

// applies are the limiters and budgets of one caller, tenant's before
// key's (the order their locks are taken in), and the scope of each limiter.
type applies struct {
	limiters []*limiter
	scopes   []Scope
	budgets  []*budget
}

// scopes returns what applies to a caller; ok is false for a tenant with
// nothing configured.
func (q *Quota) scopes(c Caller) (*applies, bool) {
	q.mu.RLock()
	a, ok := q.resolved[c]
	configured := q.configured[c.Tenant]
	q.mu.RUnlock()
	if ok || !configured {
		return a, configured
	}
	q.mu.Lock()
	defer q.mu.Unlock()
	a = &applies{}
	scopes := []Scope{{c.Tenant, uuid.Nil, ""}}
	for _, m := range q.models(c.Model) {
		scopes = append(scopes, Scope{c.Tenant, uuid.Nil, m})
	}
	scopes = append(scopes, Scope{c.Tenant, c.Key, ""})
	for _, m := range q.models(c.Model) {
		scopes = append(scopes, Scope{c.Tenant, c.Key, m})
	}
	// Always in this order (tenant before key, aliases sorted), which is
	// the order charge locks them in: no two callers can deadlock.
	for _, sc := range scopes {
		if l := q.limiters[sc]; l != nil && !slices.Contains(a.limiters, l) {
			a.limiters, a.scopes = append(a.limiters, l), append(a.scopes, sc)
		}
	}
	for _, sc := range []Scope{{c.Tenant, uuid.Nil, ""}, {c.Tenant, c.Key, ""}} {
		if b := q.budgets[sc]; b != nil && !slices.Contains(a.budgets, b) {
			a.budgets = append(a.budgets, b)
		}
	}
	if len(q.resolved) >= 100_000 {
		clear(q.resolved)
	}
	q.resolved[c] = a
	return a, true
}

// Admit charges a call to its caller's limits and budgets, or says why not.
func (q *Quota) Admit(ctx context.Context, c Caller, ch Charge) (*Admission, *Refusal, error) {
	ap, ok := q.scopes(c)
	if !ok {
		return none, nil, nil
	}
	ls, names, bs := ap.limiters, ap.scopes, ap.budgets
	var a *Admission
	// Near a limit, wait for this process's last charges there to reach the
	// others (a millisecond or two per round). Only when no acknowledgement
	// at all has come for echoStall (NATS or the others away) does a call go
	// on without; a caller that merely lost the race to the next round
	// waits for the one after.
	gate := true
	var stall *time.Timer
	for {
		var ref *Refusal
		var wait <-chan struct{}
		a, ref, wait = q.charge(ls, names, ch, gate)
		if ref != nil {
			return nil, ref, nil
		}
		if a != nil {
			break
		}
		if stall == nil {
			stall = time.NewTimer(echoStall)
			defer stall.Stop()
		}
		select {
		case <-wait:
			stall.Reset(echoStall) // Go 1.23 timers: no stale tick to drain
		case <-stall.C:
			gate = false
		case <-ctx.Done():
			return nil, nil, ctx.Err()
		}
	}
	a.budgets = bs
	now, b := a.now, a.bucket
	est := amount{ch.Nanos, ch.Tokens}
	for i, bg := range bs {
		p, v, err := bg.reserve(ctx, q.st, q.dbTimeout, now, est)
		if err == nil && v == fits {
			a.periods = append(a.periods, p)
			continue
		}
		// Give back what was taken: limits, and the budgets reserved.
		for k := 0; k < i; k++ {
			bs[k].release(a.periods[k], est)
		}
		a.budgets = nil
		for _, l := range ls {
			l.end(now, b, ch.Tokens, 0, false)
		}
		if err != nil {
			return nil, nil, err
		}
		r := &Refusal{Code: "budget_exceeded", What: "budget", Fail: bg.b.OnExhausted == "fail",
			RetryAt: nextPeriod(bg.b, now), Headers: a.Headers}
		switch v {
		case noRoom:
			r.What = "budget_left"
		case heldElsewhere:
			r.What, r.Fail, r.RetryAt = "budget_held", false, now.Add(idleReturn+250*time.Millisecond)
		case tooLarge:
			r.RetryAt, r.Never = time.Time{}, true
		}
		return nil, r, nil
	}
	return a, nil, nil
}

// echoStall is how long an admission near a limit waits with no
// acknowledgement from the other processes before going on without.
const echoStall = 50 * time.Millisecond

// charge takes a call on every limiter of a caller, or refuses it; with
// gate, near a limit it returns neither but a channel to wait on, until
// this process's last charge there has reached the others.
func (q *Quota) charge(ls []*limiter, names []Scope, ch Charge, gate bool) (*Admission, *Refusal, <-chan struct{}) {
	now := q.now()
	b := window.Bucket(now)
	q.echoMu.Lock()
	wait := q.echoed
	q.echoMu.Unlock()
	for _, l := range ls {
		l.mu.Lock()
		l.tokens.Advance(b)
		l.reqs.Advance(b)
	}
	unlock := func() {
		for _, l := range ls {
			l.mu.Unlock()
		}
	}
	for i, l := range ls {
		if ok, at, what := l.check(now, ch.Tokens); !ok {
			h := headersOf(ls)
			unlock()
			code := "tenant_rate_limit_exceeded"
			if names[i].Key != uuid.Nil {
				code = "key_rate_limit_exceeded"
			}
			return nil, &Refusal{Code: code, What: what, RetryAt: at, Never: at.IsZero(), Headers: h}, nil
		}
		if gate && l.mustWait(ch.Tokens) {
			unlock()
			q.nudge()
			return nil, nil, wait
		}
	}
	near := false
	for _, l := range ls {
		l.charge(b, ch.Tokens)
		if t := l.limits.TPM; t > 0 && l.tokens.Total()*10 > t*9 {
			near = true
		}
		if r := l.limits.RPM; r > 0 && l.reqs.Total()*10 > r*9 {
			near = true
		}
	}
	a := &Admission{q: q, now: now, bucket: b, charge: ch, limits: ls, Headers: headersOf(ls)}
	unlock()
	if near {
		q.nudge()
	}
	return a, nil, nil
}

type peerState struct {
	at      time.Time
	applied uint64 // the newest of its messages this process applied
	acked   uint64 // the newest of this process's messages it applied
}

// processes is how many processes share the limits: this one and those
// heard from within peerTTL.
func (q *Quota) processes() int64 {
	q.peersMu.Lock()
	defer q.peersMu.Unlock()
	q.expirePeers()
	return int64(len(q.peers)) + 1
}

// expirePeers forgets processes not heard from within peerTTL, and moves
// confirmed to what every remaining one has applied; q.peersMu must be held.
func (q *Quota) expirePeers() {
	now := q.now()
	least := q.seq.Load()
	for o, p := range q.peers {
		if now.Sub(p.at) > peerTTL {
			delete(q.peers, o)
			continue
		}
		least = min(least, p.acked)
	}
	if least != q.confirmed.Load() {
		q.confirmed.Store(least)
		q.echoMu.Lock()
		close(q.echoed)
		q.echoed = make(chan struct{})
		q.echoMu.Unlock()
	}
}

// received records a message of another process: that it is alive, what
// of this process's it has applied, and that it needs acknowledging (at
// once: replyNow) if it carried charges or comes from a process new here.
func (q *Quota) received(origin string, seq, ack uint64, charges bool) (replyNow bool) {
	q.peersMu.Lock()
	defer q.peersMu.Unlock()
	p := q.peers[origin]
	if p == nil {
		// A process new to this one may not know of this one either: say
		// so at once rather than at the next heartbeat.
		p = &peerState{}
		q.peers[origin] = p
		charges = true
	}
	p.at = q.now()
	p.applied = max(p.applied, seq)
	p.acked = max(p.acked, ack)
	if charges {
		q.ackDue = true
	}
	q.expirePeers()
	return charges
}

// acks is what this process has applied of each other's, to send them;
// due says whether an acknowledgement is owed.
func (q *Quota) acks() (acks map[string]uint64, due bool) {
	q.peersMu.Lock()
	defer q.peersMu.Unlock()
	acks = make(map[string]uint64, len(q.peers))
	for o, p := range q.peers {
		acks[o] = p.applied
	}
	due, q.ackDue = q.ackDue, false
	return acks, due
}

// nextPeriod is when a budget's next period starts.
func nextPeriod(b store.Budget, now time.Time) time.Time {
	p := periodStart(b, now)
	switch b.Period {
	case "day":
		return p.AddDate(0, 0, 1)
	case "month":
		return p.AddDate(0, 1, 0)
	}
	return p.Add(b.ResetAt.Sub(b.StartsAt))
}

// headersOf picks the tightest of the limiters (by what remains); their
// mutexes must be held.
func headersOf(ls []*limiter) Headers {
	h := Headers{-1, -1, -1, -1}
	for _, l := range ls {
		t, r := l.remaining()
		if t >= 0 && (h.RemainingTokens < 0 || t < h.RemainingTokens) {
			h.LimitTokens, h.RemainingTokens = l.limits.TPM, t
		}
		if r >= 0 && (h.RemainingRequests < 0 || r < h.RemainingRequests) {
			h.LimitRequests, h.RemainingRequests = l.limits.RPM, r
		}
	}
	return h
}

// Usage is what a call turned out to cost.
type Usage struct {
	Tokens int64
	Nanos  int64
}

// Finish reconciles the call: with reached false (it never got to a
// deployment) everything is given back; otherwise tokens beyond the
// estimate are charged to the rate windows (an estimate is never lowered,
// as a deployment never lowers its charge) and the budget is charged what
// the call cost.
func (a *Admission) Finish(u Usage, reached bool) {
	if a == nil || a.done {
		return
	}
	a.done = true
	now := a.q.now()
	for _, l := range a.limits {
		l.end(now, a.bucket, a.charge.Tokens, u.Tokens-a.charge.Tokens, reached)
	}
	est := amount{a.charge.Nanos, a.charge.Tokens}
	for i, bg := range a.budgets {
		if reached {
			bg.settle(now, a.periods[i], est, amount{u.Nanos, u.Tokens})
		} else {
			bg.release(a.periods[i], est)
		}
	}
}

// Room is how many queued calls of est tokens a tenant can start now for a
// model (math.MaxInt when nothing limits it): 0 when a rate limit is full
// or its budget is spent and its queued work waits. Workers take no more of
// its jobs than that, so they stay queued while other tenants' drain; a
// key's limits are met when its job is run.
func (q *Quota) Room(tenant uuid.UUID, model string, est int64) int {
	if !q.Configured(tenant) {
		return math.MaxInt
	}
	now := q.now()
	q.mu.RLock()
	ls := []*limiter{q.limiters[Scope{tenant, uuid.Nil, ""}]}
	for _, m := range q.models(model) {
		ls = append(ls, q.limiters[Scope{tenant, uuid.Nil, m}])
	}
	bg := q.budgets[Scope{tenant, uuid.Nil, ""}]
	q.mu.RUnlock()
	room := math.MaxInt
	for _, l := range ls {
		if l != nil {
			room = min(room, l.room(now, est))
		}
	}
	if bg != nil && bg.b.OnExhausted == "wait" && bg.closed(now) {
		room = 0
	}
	return room
}

func (q *Quota) markDirty(sc Scope) {
	q.dirtyMu.Lock()
	q.dirty[sc] = struct{}{}
	q.dirtyMu.Unlock()
}

func (q *Quota) nudge() {
	select {
	case q.urgent <- struct{}{}:
	default:
	}
}

// Run keeps the view current until ctx ends: it reloads limits and budgets
// when their version moves (checked every second, so a change reaches every
// process within a few), and writes budget spend every half second (and a
// last time when ctx ends).
func (q *Quota) Run(ctx context.Context) {
	reload := time.NewTicker(time.Second)
	flush := time.NewTicker(500 * time.Millisecond)
	defer reload.Stop()
	defer flush.Stop()
	for {
		select {
		case <-ctx.Done():
			// The last flush also gives every lease back: leases outlive
			// their process in Postgres until the period ends.
			fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
			q.flush(fctx, true)
			cancel()
			return
		case <-reload.C:
			if err := q.Refresh(ctx); err != nil && ctx.Err() == nil {
				q.log.Warn("quota: reloading limits and budgets", "err", err)
			}
		case <-flush.C:
			q.Flush(ctx)
		}
	}
}

// Refresh reloads limits and budgets if they changed.
func (q *Quota) Refresh(ctx context.Context) error {
	v, err := q.st.SettingsVersion(ctx)
	if err != nil {
		return err
	}
	q.mu.RLock()
	same := v == q.version
	q.mu.RUnlock()
	if same {
		return nil
	}
	s, err := q.st.LoadQuotas(ctx)
	if err != nil {
		return err
	}
	q.Load(s)
	return nil
}

// Flush writes every budget's settled spend now.
func (q *Quota) Flush(ctx context.Context) { q.flush(ctx, false) }

func (q *Quota) flush(ctx context.Context, final bool) {
	q.mu.RLock()
	bs := make([]*budget, 0, len(q.budgets))
	for _, b := range q.budgets {
		bs = append(bs, b)
	}
	q.mu.RUnlock()
	now := q.now()
	for _, b := range bs {
		if err := b.flush(ctx, q.st, now, final); err != nil && !errors.Is(err, context.Canceled) {
			q.log.Warn("quota: writing budget spend; will retry", "budget", b.b.ID, "err", err)
		}
	}
}
