package quota

import (
	"math"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/uuid"

	"github.com/levee-gw/levee/window"
)

// Scope is whom limits apply to: a tenant (Key nil) or one of its keys, for
// every model (Model "") or one.
type Scope struct {
	Tenant uuid.UUID `json:"t"`
	Key    uuid.UUID `json:"k"`
	Model  string    `json:"m,omitempty"`
}

// Limits are a scope's rate limits; zero is no limit.
type Limits struct {
	TPM, RPM, Concurrency int64
}

// limiter keeps one scope's sliding minute of tokens and of requests, and
// its calls in flight, here and (as last heard) in the other processes.
type limiter struct {
	mu       sync.Mutex
	scope    Scope
	shared   *atomic.Bool // whether a sharer runs (else nothing is kept for it)
	mark     func(Scope)  // tells the sharer this limiter has news
	limits   Limits
	tokens   window.Window
	reqs     window.Window
	inflight int64
	peers    map[string]peer

	// Charges not yet shared, and whether inflight changed since the last
	// share (or must be said again so peers keep counting it).
	outbox       []delta
	inflightSent time.Time
	inflightDirt bool

	// Charges the other processes may not have seen yet: made and not yet
	// published (pendTokens, pendReqs), or published in messages not every
	// other process has acknowledged applying (sent). A process keeps no more unseen than its
	// share of what is left (see mustWait), so several processes admitting
	// at once cannot together pass a limit by more than about a call each.
	pendTokens, pendReqs int64
	sent                 []sentCharges
	confirmed            *atomic.Uint64
	procs                func() int64
}

type sentCharges struct {
	seq          uint64
	tokens, reqs int64
}

type peer struct {
	inflight int64
	at       time.Time
}

// delta is a change to a scope's windows in one bucket.
type delta struct {
	Bucket   int64 `json:"b"`
	Tokens   int64 `json:"t,omitempty"`
	Requests int64 `json:"r,omitempty"`
}

// peerTTL is how long another process's calls in flight are counted
// without word from it (it repeats them every second).
const peerTTL = 3 * time.Second

func newLimiter(sc Scope, l Limits, shared *atomic.Bool, confirmed *atomic.Uint64, procs func() int64, mark func(Scope)) *limiter {
	return &limiter{scope: sc, shared: shared, confirmed: confirmed, procs: procs, mark: mark, limits: l, tokens: window.New(time.Minute), reqs: window.New(time.Minute), peers: map[string]peer{}}
}

// inFlight is every process's calls in flight; l.mu must be held.
func (l *limiter) inFlight(now time.Time) int64 {
	n := l.inflight
	for o, p := range l.peers {
		if now.Sub(p.at) > peerTTL {
			delete(l.peers, o)
			continue
		}
		n += p.inflight
	}
	return n
}

// check says whether a call of est tokens fits; if not, when it might
// (zero: never, the call is larger than the limit) and which limit binds.
// l.mu must be held and the windows advanced.
func (l *limiter) check(now time.Time, est int64) (ok bool, retryAt time.Time, what string) {
	if t := l.limits.TPM; t > 0 {
		if est > t {
			return false, time.Time{}, "tokens"
		}
		if l.tokens.Total()+est > t {
			return false, l.tokens.FreeAt(t - est), "tokens"
		}
	}
	if r := l.limits.RPM; r > 0 && l.reqs.Total()+1 > r {
		return false, l.reqs.FreeAt(r - 1), "requests"
	}
	if c := l.limits.Concurrency; c > 0 && l.inFlight(now)+1 > c {
		// Calls end at their own pace: look again shortly.
		return false, now.Add(100 * time.Millisecond), "concurrency"
	}
	return true, time.Time{}, ""
}

// unseen reports the tokens and requests this process has charged that the
// others may not have seen; l.mu must be held.
func (l *limiter) unseen() (tokens, reqs int64) {
	echoed := l.confirmed.Load()
	keep := l.sent[:0]
	tokens, reqs = l.pendTokens, l.pendReqs
	for _, s := range l.sent {
		if s.seq > echoed {
			keep = append(keep, s)
			tokens += s.tokens
			reqs += s.reqs
		}
	}
	l.sent = keep
	return tokens, reqs
}

// mustWait reports whether this process should let the others see its
// charges before taking a call of est tokens. It may keep unseen no more
// than 1/N² of what it knows is left (N processes sharing): 1/N for its
// share, and 1/N again because each of the others may, at the same moment,
// hold as much that this one has not seen. Each round of acknowledgements
// then takes at most half of what is left (with two processes), so the
// fleet closes in on a limit rather than jumping past it; and one call is
// always allowed, so the limit is passed by at most about a call per
// process. l.mu must be held.
func (l *limiter) mustWait(est int64) bool {
	if !l.shared.Load() {
		return false
	}
	n := l.procs()
	if n <= 1 {
		return false
	}
	n *= n
	ut, ur := l.unseen()
	if t := l.limits.TPM; t > 0 && ut > 0 && ut+est > (t-(l.tokens.Total()-ut))/n {
		return true
	}
	if r := l.limits.RPM; r > 0 && ur > 0 && ur+1 > (r-(l.reqs.Total()-ur))/n {
		return true
	}
	return false
}

// charge takes a call: est tokens and one request in the current bucket,
// and a call in flight. l.mu must be held.
func (l *limiter) charge(b, est int64) {
	l.tokens.Add(b, est)
	l.reqs.Add(b, 1)
	l.inflight++
	if l.shared.Load() {
		l.pendTokens += est
		l.pendReqs++
	}
	l.tell(delta{Bucket: b, Tokens: est, Requests: 1})
}

// tell keeps a change for the other processes, if any listen; l.mu must be
// held.
func (l *limiter) tell(d delta) {
	if !l.shared.Load() {
		return
	}
	l.inflightDirt = true
	if d != (delta{}) {
		l.outbox = append(l.outbox, d)
	}
	l.mark(l.scope)
}

// end finishes a call charged in bucket b: extra tokens beyond the
// estimate are charged now; a call that never reached a deployment gives
// its charge back.
func (l *limiter) end(now time.Time, b, est, extra int64, reached bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	nb := window.Bucket(now)
	l.tokens.Advance(nb)
	l.reqs.Advance(nb)
	l.inflight--
	switch {
	case !reached:
		l.tokens.Add(b, -est)
		l.reqs.Add(b, -1)
		l.tell(delta{Bucket: b, Tokens: -est, Requests: -1})
	case extra > 0:
		l.tokens.Add(nb, extra)
		l.tell(delta{Bucket: nb, Tokens: extra})
	default:
		l.tell(delta{})
	}
}

// remaining reports the room left now, for x-ratelimit-* headers; l.mu must
// be held.
func (l *limiter) remaining() (tokens, requests int64) {
	tokens, requests = -1, -1
	if l.limits.TPM > 0 {
		tokens = max(0, l.limits.TPM-l.tokens.Total())
	}
	if l.limits.RPM > 0 {
		requests = max(0, l.limits.RPM-l.reqs.Total())
	}
	return tokens, requests
}

// room is how many calls of est tokens fit now.
func (l *limiter) room(now time.Time, est int64) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	b := window.Bucket(now)
	l.tokens.Advance(b)
	l.reqs.Advance(b)
	n := int64(math.MaxInt)
	if t := l.limits.TPM; t > 0 {
		n = min(n, max(0, t-l.tokens.Total())/max(est, 1))
	}
	if r := l.limits.RPM; r > 0 {
		n = min(n, max(0, r-l.reqs.Total()))
	}
	if c := l.limits.Concurrency; c > 0 {
		n = min(n, max(0, c-l.inFlight(now)))
	}
	return int(n)
}

// drain hands over what this process must tell the others, in message seq:
// its charges, and its calls in flight when they changed or a second has
// passed.
func (l *limiter) drain(now time.Time, seq uint64) ([]delta, *int64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := l.outbox
	l.outbox = nil
	if l.pendTokens > 0 || l.pendReqs > 0 {
		l.sent = append(l.sent, sentCharges{seq: seq, tokens: l.pendTokens, reqs: l.pendReqs})
		l.pendTokens, l.pendReqs = 0, 0
	}
	var inflight *int64
	if l.inflightDirt || (l.inflight > 0 && now.Sub(l.inflightSent) >= time.Second) {
		n := l.inflight
		inflight = &n
		l.inflightDirt, l.inflightSent = false, now
	}
	return out, inflight
}

// apply folds another process's charges and calls in flight in.
func (l *limiter) apply(now time.Time, origin string, ds []delta, inflight *int64) {
	b := window.Bucket(now)
	l.mu.Lock()
	defer l.mu.Unlock()
	l.tokens.Advance(b)
	l.reqs.Advance(b)
	for _, d := range ds {
		bk := min(d.Bucket, b) // a charge stamped ahead of this clock counts from now
		l.tokens.Add(bk, d.Tokens)
		l.reqs.Add(bk, d.Requests)
	}
	if inflight != nil {
		l.peers[origin] = peer{inflight: *inflight, at: now}
	}
}
