package quota

import (
	"context"
	"math"
	"sync"
	"time"

	"github.com/levee-gw/levee/store"
)

// budget is this process's part of one budget. Postgres holds each period's
// spend and what every process has leased; spent plus leased never passes
// the budget, because a lease that would is refused. This process admits
// calls out of its lease (grant) without a round trip each, and leases
// more when it runs out: a chunk of 1/64 of the budget while plenty
// remains, then just what each call needs, so near the end no process sits
// on budget another one needs. A call that turns out dearer than its
// estimate overshoots by the difference; that is the most it can.
type budget struct {
	mu sync.Mutex
	b  store.Budget

	period time.Time
	// grant is leased and free; held is reserved by calls in flight;
	// consumed is lease used by calls that ended, and spent what they cost:
	// both go to Postgres at the next flush, which frees the difference.
	grant, held, consumed, spent amount
	lastUse                      time.Time
	// A call refused a moment ago spares Postgres a lease attempt for
	// every call at least as large (refused, until refusedUntil); only a
	// budget actually spent closes to all (closedUntil), and tells workers
	// to leave its queued work alone for a while.
	refused                   amount
	refusedVerdict            verdict
	refusedUntil, closedUntil time.Time
	marked                    time.Time // the period budget.exceeded was recorded for
	// pending are settlements of earlier periods not yet written.
	pending []settlement
}

// amount is money (nanos) and tokens together.
type amount struct{ nanos, tokens int64 }

func (a amount) add(b amount) amount  { return amount{a.nanos + b.nanos, a.tokens + b.tokens} }
func (a amount) sub(b amount) amount  { return amount{a.nanos - b.nanos, a.tokens - b.tokens} }
func (a amount) covers(b amount) bool { return a.nanos >= b.nanos && a.tokens >= b.tokens }
func (a amount) zero() bool           { return a.nanos == 0 && a.tokens == 0 }
func (a amount) positive() amount     { return amount{max(a.nanos, 0), max(a.tokens, 0)} }
func (a amount) only(lim amount) amount {
	return amount{pick(lim.nanos, a.nanos), pick(lim.tokens, a.tokens)}
}

// pick keeps v only in a dimension the budget limits.
func pick(limit, v int64) int64 {
	if limit == 0 {
		return 0
	}
	return v
}

type settlement struct {
	period          time.Time
	spent, released amount
}

// leaseChunks: a process leases 1/leaseChunks of the budget at a time.
const leaseChunks = 64

// idleReturn: a grant unused this long goes back, for other processes.
const idleReturn = time.Second

func newBudget(b store.Budget) *budget { return &budget{b: b} }

func (bg *budget) limit() amount { return amount{bg.b.AmountNanos, bg.b.Tokens} }

// periodStart is the start of the budget's period holding now (UTC).
func periodStart(b store.Budget, now time.Time) time.Time {
	now = now.UTC()
	switch b.Period {
	case "day":
		return time.Date(now.Year(), now.Month(), now.Day(), 0, 0, 0, 0, time.UTC)
	case "month":
		return time.Date(now.Year(), now.Month(), 1, 0, 0, 0, 0, time.UTC)
	}
	// fixed: periods of ResetAt-StartsAt, the first ending at ResetAt.
	span := b.ResetAt.Sub(b.StartsAt)
	if span <= 0 {
		return b.StartsAt.UTC()
	}
	k := math.Floor(float64(now.Sub(b.StartsAt)) / float64(span))
	return b.StartsAt.Add(time.Duration(k) * span).UTC()
}

// roll moves the budget into now's period; what the old one owes Postgres
// is kept to be written. bg.mu must be held.
func (bg *budget) roll(now time.Time) {
	p := periodStart(bg.b, now)
	if p.Equal(bg.period) {
		return
	}
	if !bg.period.IsZero() && (!bg.spent.zero() || !bg.consumed.add(bg.grant).zero()) {
		bg.pending = append(bg.pending, settlement{period: bg.period, spent: bg.spent, released: bg.consumed.add(bg.grant).positive()})
	}
	// Calls in flight were leased in the old period: they settle there.
	bg.period, bg.grant, bg.consumed, bg.spent = p, amount{}, amount{}, amount{}
	bg.refusedUntil, bg.closedUntil = time.Time{}, time.Time{}
}

// verdict is a budget's answer to a call.
type verdict int

const (
	fits     verdict = iota
	noRoom           // what is left of the period is less than the call
	spentOut         // the period's budget is spent: calls of any size wait
	tooLarge         // the call is larger than the whole budget
	// heldElsewhere: what is left would take the call, but part of it is
	// leased to other processes; their idle leases come back within
	// idleReturn, so the call is refused only for a moment.
	heldElsewhere
)

// spentFraction: a call refused counts the budget as spent when it is at
// most this share of the budget, or less than this share is left (a call
// that is a large part of the budget being refused says nothing about the
// calls after it).
const spentFraction = 10

// isSpent reports whether est being refused with left remaining means the
// budget is spent, in a dimension it limits.
func isSpent(lim, left, est amount) bool {
	spent := func(lim, left, est int64) bool {
		return lim > 0 && left < est && (est <= lim/spentFraction || left <= lim/spentFraction)
	}
	return spent(lim.nanos, left.nanos, est.nanos) || spent(lim.tokens, left.tokens, est.tokens)
}

// closedFor is how long a spent budget is left alone by the workers before
// they try its queued work again (a raised budget reopens it at once).
const closedFor = 5 * time.Second

// reserve takes est for a call, leasing from Postgres if the grant does not
// cover it. It returns the period the call is charged in, or why it does
// not fit.
func (bg *budget) reserve(ctx context.Context, st Store, timeout time.Duration, now time.Time, est amount) (period time.Time, v verdict, err error) {
	// Most reservations come out of the grant; only the calls to Postgres
	// wait, and each wait is bounded.
	db := func() (context.Context, context.CancelFunc) {
		if timeout <= 0 {
			return ctx, func() {}
		}
		return context.WithTimeout(ctx, timeout)
	}
	lim := bg.limit()
	est = est.only(lim)
	if !lim.covers(est) {
		return time.Time{}, tooLarge, nil
	}
	bg.mu.Lock()
	bg.roll(now)
	if now.Before(bg.closedUntil) || (now.Before(bg.refusedUntil) && est.covers(bg.refused)) {
		v := bg.refusedVerdict
		if now.Before(bg.closedUntil) {
			v = spentOut
		}
		bg.mu.Unlock()
		return time.Time{}, v, nil
	}
	gaveBack, failed := false, false
	var used, elsewhere amount
	for {
		if bg.grant.covers(est) {
			bg.grant = bg.grant.sub(est)
			bg.held = bg.held.add(est)
			bg.lastUse = now
			p := bg.period
			bg.mu.Unlock()
			return p, fits, nil
		}
		if failed && !gaveBack && !bg.grant.add(bg.consumed).zero() {
			// What this process holds may be just what another one needs
			// to make up a call, and calls that ended may have cost less
			// than they reserved: settle them and give the grant back,
			// then ask for the whole call once more, so budget left in
			// pieces (or not yet settled) is never refused.
			gaveBack = true
			s := settlement{period: bg.period, spent: bg.spent, released: bg.consumed.add(bg.grant)}
			bg.grant, bg.consumed, bg.spent = amount{}, amount{}, amount{}
			bg.mu.Unlock()
			dctx, cancel := db()
			err := st.SettleBudget(dctx, bg.settleParams(s))
			cancel()
			bg.mu.Lock()
			if err != nil {
				bg.pending = append(bg.pending, s)
				bg.mu.Unlock()
				return time.Time{}, noRoom, err
			}
		} else if failed {
			// Refused with nothing held here: the budget has less left than
			// this call. It is spent if the call is a small part of it.
			// Unless other processes hold leases that would make it up:
			// then it waits for them to come back, briefly.
			left := lim.sub(used).sub(bg.grant)
			bg.refused, bg.refusedUntil = est, now.Add(250*time.Millisecond)
			if left.add(elsewhere).only(lim).covers(est) {
				bg.refusedVerdict = heldElsewhere
				bg.mu.Unlock()
				return time.Time{}, heldElsewhere, nil
			}
			bg.refusedVerdict = noRoom
			if !isSpent(lim, left.add(elsewhere), est) {
				bg.mu.Unlock()
				return time.Time{}, noRoom, nil
			}
			bg.closedUntil = now.Add(closedFor)
			mark := !bg.marked.Equal(bg.period)
			p := bg.period
			bg.marked = p
			bg.mu.Unlock()
			if mark {
				dctx, cancel := db()
				err = st.MarkBudgetExceeded(dctx, bg.b.ID, bg.b.TenantID, p)
				cancel()
			}
			return time.Time{}, spentOut, err
		}
		want := est.sub(bg.grant).positive()
		p := bg.period
		bg.mu.Unlock()
		dctx, cancel := db()
		l, err := st.LeaseBudget(dctx, &store.LeaseParams{BudgetID: bg.b.ID, PeriodStart: p,
			Nanos: want.nanos, Tokens: want.tokens, ChunkNanos: lim.nanos / leaseChunks, ChunkTokens: lim.tokens / leaseChunks,
			LimitNanos: lim.nanos, LimitTokens: lim.tokens})
		cancel()
		bg.mu.Lock()
		if err != nil {
			bg.mu.Unlock()
			return time.Time{}, noRoom, err
		}
		switch {
		case !p.Equal(bg.period):
			// The period turned while leasing: that lease is the old one's.
			bg.pending = append(bg.pending, settlement{period: p, released: amount{l.Nanos, l.Tokens}})
		case l.OK:
			bg.grant = bg.grant.add(amount{l.Nanos, l.Tokens})
		default:
			failed, used, elsewhere = true, amount{l.UsedNanos, l.UsedTokens}, amount{l.LeasedNanos, l.LeasedTokens}
		}
	}
}

// release gives back what a call reserved, when it never reached a
// deployment.
func (bg *budget) release(period time.Time, est amount) {
	est = est.only(bg.limit())
	bg.mu.Lock()
	defer bg.mu.Unlock()
	bg.held = bg.held.sub(est)
	if period.Equal(bg.period) {
		bg.grant = bg.grant.add(est)
		return
	}
	bg.pending = append(bg.pending, settlement{period: period, released: est})
}

// settle records what a call cost against what it reserved.
func (bg *budget) settle(now, period time.Time, est, actual amount) {
	est, actual = est.only(bg.limit()), actual.only(bg.limit())
	bg.mu.Lock()
	defer bg.mu.Unlock()
	bg.held = bg.held.sub(est)
	bg.lastUse = now
	if period.Equal(bg.period) {
		bg.consumed = bg.consumed.add(est)
		bg.spent = bg.spent.add(actual)
		return
	}
	bg.pending = append(bg.pending, settlement{period: period, spent: actual, released: est})
}

// closed reports whether the budget was found spent a moment ago (for
// workers deciding whether to take a tenant's next job at all).
func (bg *budget) closed(now time.Time) bool {
	bg.mu.Lock()
	defer bg.mu.Unlock()
	return now.Before(bg.closedUntil)
}

// settleParams writes s, with the thresholds whose crossing sends the
// budget's events.
func (bg *budget) settleParams(s settlement) *store.SettleParams {
	bg.mu.Lock()
	b := bg.b
	bg.mu.Unlock()
	return &store.SettleParams{BudgetID: b.ID, TenantID: b.TenantID, PeriodStart: s.period,
		SpentNanos: s.spent.nanos, SpentTokens: s.spent.tokens, ReleaseNanos: s.released.nanos, ReleaseTokens: s.released.tokens,
		ThresholdNanos: int64(math.Ceil(float64(b.AmountNanos) * b.Soft)), ThresholdTokens: int64(math.Ceil(float64(b.Tokens) * b.Soft)),
		LimitNanos: b.AmountNanos, LimitTokens: b.Tokens}
}

// flush writes settled spend and released leases to Postgres, and gives an
// idle grant back (any grant, when final: the process is stopping). What
// cannot be written now stays to be tried again.
func (bg *budget) flush(ctx context.Context, st Store, now time.Time, final bool) error {
	bg.mu.Lock()
	bg.roll(now)
	todo := bg.pending
	bg.pending = nil
	cur := settlement{period: bg.period, spent: bg.spent, released: bg.consumed}
	bg.spent, bg.consumed = amount{}, amount{}
	if (final || bg.held.zero() && now.Sub(bg.lastUse) >= idleReturn) && !bg.grant.zero() {
		cur.released = cur.released.add(bg.grant)
		bg.grant = amount{}
	}
	if !cur.spent.zero() || !cur.released.zero() {
		todo = append(todo, cur)
	}
	bg.mu.Unlock()
	for i, s := range todo {
		if err := st.SettleBudget(ctx, bg.settleParams(s)); err != nil {
			bg.mu.Lock()
			bg.pending = append(bg.pending, todo[i:]...)
			bg.mu.Unlock()
			return err
		}
	}
	return nil
}
