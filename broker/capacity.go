package broker

import (
	"math"
	"sync"
	"sync/atomic"
	"time"

	"github.com/levee-gw/levee/window"
)

// Capacity is the one place that knows how full a deployment is. It charges
// each call on arrival, as Azure does, over a sliding minute of tokens and a
// 10-second window of requests (Azure enforces RPM/6 per 10 s), and it folds
// in what the deployment itself reports.
type Capacity struct {
	mu           sync.Mutex
	tokenLimit   int64
	reqLimit     int64
	tokens       window.Window
	reqs         window.Window
	blockedUntil time.Time

	// With sharing on, local charges are also kept here until a Sharer
	// sends them to the other processes.
	shared  bool
	outbox  []Delta
	penalty time.Time
	// pacing is set when this process charged a background call since its
	// last share; peers holds when each other process last said so. The
	// background pace is split between the processes pacing at once, or N
	// worker processes would drain at N times the rate.
	pacing bool
	peers  map[string]time.Time
	// urgent wakes the Sharer when a charge leaves the deployment near its
	// limit: then a few milliseconds of delay matter.
	urgent chan struct{}

	// Synchronous (foreground) charges of the last 10 s give the current
	// synchronous rate, which background calls are paced around.
	syncTokens, syncReqs window.Window
	pace                 pacer

	// The synchronous reserve (reserve.go): its policy, the forecast of
	// synchronous demand, the rate the routing order sends here (as of
	// bucket routedAt), and the reserve computed for bucket keepAt.
	policy               reservePolicy
	demTok, demReq       demand
	routedAt             int64
	routedTok, routedReq float64
	routedSpills         bool
	keepAt               int64
	keepTok, keepReq     int64
	paceTok, paceReq     float64

	// added and addedReq count every token and request ever added to the
	// windows, by this process or another: what a reservation may have
	// been joined by before its deployment counted (Reservation.Observe).
	added, addedReq int64

	// chargedSync and chargedBackground count the tokens of committed
	// calls, for metrics (a released call was never charged).
	chargedSync, chargedBackground atomic.Int64
}

// pacer is a token bucket for background calls: it refills at the rate the
// deployment can take beyond its reserve and the current synchronous rate,
// so workers spread their charges over the window instead of filling it in
// one pulse that synchronous calls would then have to wait a minute behind.
type pacer struct {
	tokens, reqs float64
	at           time.Time
}

// paceBurst is how many seconds of background rate may be taken at once.
const paceBurst = 2.0

// paceSlack is how far above the steady rate an automatic reserve's pacer
// lets background calls go.
const paceSlack = 1.25

// refill brings the pacer up to now and returns its rates per second: what
// the deployment can take beyond its reserve, less the current synchronous
// rate. c.mu must be held and the windows advanced.
func (c *Capacity) refill(now time.Time) (tokRate, reqRate float64) {
	share := c.pacers(now)
	b := window.Bucket(now)
	keepTok, keepReq := c.keep(b)
	syncTok, syncReq := float64(c.syncTokens.Total())/10, float64(c.syncReqs.Total())/10
	tokRate = max(0, float64(c.tokenLimit-keepTok)/60-syncTok) / share
	reqRate = max(0, float64(c.reqLimit-keepReq)/10-syncReq) / share
	if c.policy.auto {
		// The sustainable rate (keep) instead of the steady one, less the
		// synchronous rate forecast: what came lately, or what the
		// routing order is about to send (the first tier of a group whose
		// demand rises).
		if rt, rr, ok := c.routed(b); ok {
			syncTok, syncReq = rt, rr
		}
		tokRate = max(0, c.paceTok-syncTok) / share
		reqRate = max(0, c.paceReq-syncReq) / share
	}
	if c.pace.at.IsZero() {
		c.pace = pacer{tokens: tokRate * paceBurst, reqs: reqRate * paceBurst, at: now}
		return
	}
	dt := now.Sub(c.pace.at).Seconds()
	if dt > 0 {
		c.pace.tokens = min(c.pace.tokens+tokRate*dt, max(tokRate*paceBurst, c.pace.tokens))
		c.pace.reqs = min(c.pace.reqs+reqRate*dt, max(reqRate*paceBurst, c.pace.reqs))
		c.pace.at = now
	}
	return
}

// Delta is a change to a deployment's windows in one bucket: what other
// processes must add to stay in step with this one. SyncTokens and
// SyncRequests are the synchronous part of it, which every process's pacer
// leaves room for.
type Delta struct {
	Bucket       int64 `json:"b"`
	Tokens       int64 `json:"t"`
	Requests     int64 `json:"r"`
	SyncTokens   int64 `json:"st,omitempty"`
	SyncRequests int64 `json:"sr,omitempty"`
}

// peerTTL is how long another process counts as pacing background calls
// after it last said so.
const peerTTL = 2 * time.Second

func (c *Capacity) record(d Delta) {
	if !c.shared {
		return
	}
	c.outbox = append(c.outbox, d)
	if c.tokens.Total()*10 > c.tokenLimit*9 || c.reqs.Total()*10 > c.reqLimit*9 {
		select {
		case c.urgent <- struct{}{}:
		default:
		}
	}
}

// drain hands over the local charges not yet shared, a penalty end if one
// was set since, and whether background calls were charged since.
func (c *Capacity) drain() ([]Delta, time.Time, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	out, p, pacing := c.outbox, c.penalty, c.pacing
	c.outbox, c.penalty, c.pacing = nil, time.Time{}, false
	return out, p, pacing
}

// advance brings every window up to bucket b; c.mu must be held.
func (c *Capacity) advance(b int64) {
	c.tokens.Advance(b)
	c.reqs.Advance(b)
	c.syncTokens.Advance(b)
	c.syncReqs.Advance(b)
	c.demTok.advance(b)
	c.demReq.advance(b)
}

// apply folds another process's charges into this view; pacing says that
// process is draining background calls into this deployment too.
func (c *Capacity) apply(now time.Time, origin string, ds []Delta, blockedUntil time.Time, pacing bool) {
	b := window.Bucket(now)
	c.mu.Lock()
	defer c.mu.Unlock()
	c.advance(b)
	for _, d := range ds {
		// A charge stamped ahead of this clock counts from now.
		bk := min(d.Bucket, b)
		c.tokens.Add(bk, d.Tokens)
		c.reqs.Add(bk, d.Requests)
		c.added += max(d.Tokens, 0)
		c.addedReq += max(d.Requests, 0)
		c.syncTokens.Add(bk, d.SyncTokens)
		c.syncReqs.Add(bk, d.SyncRequests)
		if d.SyncRequests > 0 && d.SyncTokens > 0 {
			// Merged charges: their mean size stands for each call's.
			c.demTok.add(b, float64(d.SyncTokens), float64(d.SyncTokens)/float64(d.SyncRequests))
			c.demReq.add(b, float64(d.SyncRequests), 1)
		}
	}
	if blockedUntil.After(c.blockedUntil) {
		c.blockedUntil = blockedUntil
	}
	if pacing {
		if c.peers == nil {
			c.peers = map[string]time.Time{}
		}
		c.peers[origin] = now
	}
}

// pacers is how many processes share the background pace now: this one and
// the others seen pacing within peerTTL.
func (c *Capacity) pacers(now time.Time) float64 {
	n := 1
	for o, at := range c.peers {
		if now.Sub(at) > peerTTL {
			delete(c.peers, o)
			continue
		}
		n++
	}
	return float64(n)
}

// NewCapacity builds the view for a deployment with the given limits.
func NewCapacity(tpm, rpm int) *Capacity {
	return &Capacity{
		tokenLimit: int64(tpm),
		reqLimit:   int64(max((rpm+5)/6, 1)),
		tokens:     window.New(time.Minute),
		reqs:       window.New(10 * time.Second),
		syncTokens: window.New(10 * time.Second),
		syncReqs:   window.New(10 * time.Second),
	}
}

// Reservation is one call's charge against a deployment.
type Reservation struct {
	c          *Capacity
	bucket     int64
	tokens     int64
	done       bool
	foreground bool
	// heldTok and heldReq are what the windows held right after the
	// charge, and addedAt and addedReqAt the counts of what was added up
	// to it: the deployment's own counts in its answer are as of then.
	heldTok, heldReq    int64
	addedAt, addedReqAt int64
}

// Tokens is the charged estimate.
func (r *Reservation) Tokens() int64 { return r.tokens }

// Reserve charges est tokens and one request if both fit. When they do not, it
// returns when they will (zero when est can never fit).
func (c *Capacity) Reserve(now time.Time, est int) (*Reservation, bool, time.Time) {
	return c.reserve(now, est, false)
}

// ReserveBackground is Reserve for queue workers: it leaves the synchronous
// reserve (SetReserve) untouched, and it is paced so that background calls
// take, per second, only what the deployment can serve beyond that reserve
// and the current synchronous rate.
func (c *Capacity) ReserveBackground(now time.Time, est int) (*Reservation, bool, time.Time) {
	return c.reserve(now, est, true)
}

func (c *Capacity) reserve(now time.Time, est int, background bool) (*Reservation, bool, time.Time) {
	b := window.Bucket(now)
	e := int64(est)
	c.mu.Lock()
	defer c.mu.Unlock()
	c.advance(b)
	tokLimit, reqLimit := c.tokenLimit, c.reqLimit
	if background {
		keepTok, keepReq := c.keep(b)
		tokLimit, reqLimit = tokLimit-keepTok, reqLimit-keepReq
	}
	if now.Before(c.blockedUntil) {
		return nil, false, c.blockedUntil
	}
	if e > c.tokenLimit {
		return nil, false, time.Time{}
	}
	if background {
		// A call is let through while the balance is positive and pays its
		// whole estimate, so the balance may go into debt: calls larger than
		// the burst still pass, and the average rate stays bounded.
		tokRate, reqRate := c.refill(now)
		if c.pace.tokens <= 0 || c.pace.reqs <= 0 {
			wait := time.Second
			if tokRate > 0 && reqRate > 0 {
				wait = time.Duration(max(-c.pace.tokens/tokRate, -c.pace.reqs/reqRate) * float64(time.Second))
			}
			return nil, false, now.Add(max(wait, 10*time.Millisecond))
		}
	}
	if c.tokens.Total()+e > tokLimit || c.reqs.Total()+1 > reqLimit {
		at := c.tokens.FreeAt(tokLimit - e)
		if rt := c.reqs.FreeAt(reqLimit - 1); rt.After(at) {
			at = rt
		}
		return nil, false, at
	}
	c.tokens.Add(b, e)
	c.reqs.Add(b, 1)
	c.added, c.addedReq = c.added+e, c.addedReq+1
	d := Delta{Bucket: b, Tokens: e, Requests: 1}
	if background {
		c.pacing = c.shared
		c.pace.tokens -= float64(e)
		c.pace.reqs--
	} else {
		d.SyncTokens, d.SyncRequests = e, 1
		c.syncTokens.Add(b, e)
		c.syncReqs.Add(b, 1)
		c.demTok.add(b, float64(e), float64(e))
		c.demReq.add(b, 1, 1)
	}
	c.record(d)
	return &Reservation{c: c, bucket: b, tokens: e, foreground: !background,
		heldTok: c.tokens.Total(), heldReq: c.reqs.Total(), addedAt: c.added, addedReqAt: c.addedReq}, true, time.Time{}
}

// Commit reconciles the charge with the tokens the call really used. A
// deployment keeps what it charged on arrival, so the view never lowers a
// charge; it raises it when the estimate fell short.
func (r *Reservation) Commit(actual int) {
	if r == nil || r.done {
		return
	}
	r.done = true
	charged := max(r.tokens, int64(actual))
	if r.foreground {
		r.c.chargedSync.Add(charged)
	} else {
		r.c.chargedBackground.Add(charged)
	}
	if extra := int64(actual) - r.tokens; extra > 0 {
		r.c.mu.Lock()
		r.c.tokens.Add(r.c.tokens.Last(), extra)
		r.c.added += extra
		r.c.record(Delta{Bucket: r.c.tokens.Last(), Tokens: extra})
		r.c.mu.Unlock()
	}
}

// Release returns the charge of a call the deployment refused or never saw.
func (r *Reservation) Release() {
	if r == nil || r.done {
		return
	}
	r.done = true
	r.c.mu.Lock()
	r.c.tokens.Add(r.bucket, -r.tokens)
	r.c.reqs.Add(r.bucket, -1)
	d := Delta{Bucket: r.bucket, Tokens: -r.tokens, Requests: -1}
	if r.foreground {
		d.SyncTokens, d.SyncRequests = -r.tokens, -1
		r.c.syncTokens.Add(r.bucket, -r.tokens)
		r.c.syncReqs.Add(r.bucket, -1)
	}
	r.c.record(d)
	r.c.mu.Unlock()
}

// Observe folds in the deployment's own remaining counts (negative = absent).
// The deployment's word is the truth: when it has less left than this view
// believes (another gateway, a skewed estimate), the difference is charged now.
// A larger remaining count is not trusted, since this view may hold charges
// the deployment has not seen yet.
func (c *Capacity) Observe(now time.Time, remainingTokens, remainingRequests int64) {
	b := window.Bucket(now)
	c.mu.Lock()
	defer c.mu.Unlock()
	c.advance(b)
	if remainingTokens >= 0 {
		if d := (c.tokenLimit - remainingTokens) - c.tokens.Total(); d > 0 {
			c.tokens.Add(b, d)
		}
	}
	if remainingRequests >= 0 {
		if d := (c.reqLimit - remainingRequests) - c.reqs.Total(); d > 0 {
			c.reqs.Add(b, d)
		}
	}
}

// Observe is Capacity.Observe for the remaining counts in the answer to r's
// call. The deployment counted them when it admitted the call, and the
// answer comes seconds later, when this view has let go of what left the
// window meanwhile: compared with the view now, every stale count would
// look like a charge this view missed, and the view would creep above the
// deployment's. So they are compared with what the view held when the call
// was charged, plus all it was charged since (calls sent after this one
// may reach the deployment before it).
func (r *Reservation) Observe(now time.Time, remainingTokens, remainingRequests int64) {
	if r == nil {
		return
	}
	c := r.c
	b := window.Bucket(now)
	c.mu.Lock()
	defer c.mu.Unlock()
	c.advance(b)
	if remainingTokens >= 0 {
		if d := (c.tokenLimit - remainingTokens) - r.heldTok - (c.added - r.addedAt); d > 0 {
			c.tokens.Add(b, d)
			c.added += d
		}
	}
	if remainingRequests >= 0 {
		if d := (c.reqLimit - remainingRequests) - r.heldReq - (c.addedReq - r.addedReqAt); d > 0 {
			c.reqs.Add(b, d)
			c.addedReq += d
		}
	}
}

// Penalize marks the deployment full until now+d (a 429's retry-after).
func (c *Capacity) Penalize(now time.Time, d time.Duration) {
	until := now.Add(d)
	c.mu.Lock()
	if until.After(c.blockedUntil) {
		c.blockedUntil = until
		if c.shared {
			c.penalty = until
		}
	}
	c.mu.Unlock()
}

// Headroom is what is left now: tokens in the minute and requests in the
// 10-second window. A penalized deployment has none.
func (c *Capacity) Headroom(now time.Time) (tokens, requests int64) {
	b := window.Bucket(now)
	c.mu.Lock()
	defer c.mu.Unlock()
	c.advance(b)
	if now.Before(c.blockedUntil) {
		return 0, 0
	}
	return c.tokenLimit - c.tokens.Total(), c.reqLimit - c.reqs.Total()
}

// Slots is how many background calls of est tokens fit now: above the
// synchronous reserve, and within the background pace.
func (c *Capacity) Slots(now time.Time, est int) int {
	b := window.Bucket(now)
	c.mu.Lock()
	c.advance(b)
	if now.Before(c.blockedUntil) {
		c.mu.Unlock()
		return 0
	}
	keepTok, keepReq := c.keep(b)
	tok := c.tokenLimit - c.tokens.Total() - keepTok
	req := c.reqLimit - c.reqs.Total() - keepReq
	if tok < int64(est) || req < 1 {
		c.mu.Unlock()
		return 0
	}
	c.refill(now)
	pt, pr := c.pace.tokens, c.pace.reqs
	c.mu.Unlock()
	if pt <= 0 || pr <= 0 {
		return 0
	}
	return int(max(1, min(float64(tok/int64(est)), float64(req), math.Ceil(pt/float64(est)), math.Ceil(pr), 1<<20)))
}

// Charged returns the tokens in the sliding minute now, and the tokens
// committed calls of each class were charged since the start.
func (c *Capacity) Charged(now time.Time) (minute, sync, background int64) {
	b := window.Bucket(now)
	c.mu.Lock()
	defer c.mu.Unlock()
	c.advance(b)
	return c.tokens.Total(), c.chargedSync.Load(), c.chargedBackground.Load()
}

// Limits returns the token limit per minute and the request limit per 10 s.
func (c *Capacity) Limits() (tokens, requestsPer10s int64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.tokenLimit, c.reqLimit
}

// SetLimits changes the limits (a reload); what the windows hold stays
// charged.
func (c *Capacity) SetLimits(tpm, rpm int) {
	c.mu.Lock()
	c.tokenLimit, c.reqLimit = int64(tpm), int64(max((rpm+5)/6, 1))
	c.keepAt = 0
	c.mu.Unlock()
}

// share turns on keeping charges for a Sharer, which urgent wakes.
func (c *Capacity) share(urgent chan struct{}) {
	c.mu.Lock()
	c.shared, c.urgent = true, urgent
	c.mu.Unlock()
}
