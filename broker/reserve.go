package broker

import (
	"math"
	"time"

	"github.com/levee-gw/levee/config"
	"github.com/levee-gw/levee/window"
)

// The synchronous reserve is what queue workers leave free on a deployment
// for synchronous calls. A fixed share is wrong both ways: on a quiet night
// it is paid capacity left idle, in a spike it may be too small. An
// automatic reserve follows the synchronous demand the deployment is
// expected to see instead.
//
// Capacity is a sliding minute charged on arrival: a background charge made
// now holds its tokens for 60 s, and what frees room for synchronous calls
// in the meantime is only what leaves the window. Two mechanisms share the
// work. The reserve K, which background calls never take, covers the next
// seconds: the largest shortfall, over horizons h up to reserveHorizon,
// between the synchronous demand forecast for the next h seconds and what
// the window releases in them:
//
//	K = clamp( max_h [ μ·h + z·σ·√(h·Δ) + c − E(h) ], floor·L, cap·L )
//
// μ is the forecast synchronous rate (tokens per second), σ the standard
// deviation of the rate measured per bucket of Δ = 250 ms (so z·σ·√(h·Δ) is
// z standard deviations of what h seconds of arrivals add up to), c the
// largest recent synchronous call, E(h) what the window releases within h,
// and L the limit. The same is done for requests over their 10-second
// window. While background charges are spread over the minute (the pacer),
// E(h) ≈ h·L/60 exceeds the demand and K sits at its floor; when the window
// holds little that will expire (a cold start) or the demand outgrows what
// expires (a spike), K grows to what synchronous calls will need. The
// background pace covers the minute (sustainable, Capacity.refill): what
// the window can take on at an even rate less the synchronous forecast.
//
// μ follows the demand up within a couple of seconds and down over half a
// minute: of a deployment's own synchronous charges (this process's and,
// with sharing on, every other process's) and of its place in the routing
// order. A group's demand is routed as calls are: its first tier is
// forecast all of it, up to what its limits let it absorb, and the next
// tier only what spills past (Group.route).

// reserveZ is how many standard deviations of synchronous arrivals the
// reserve covers.
const reserveZ = 3

// Time constants of the demand forecast, in seconds.
const (
	tauShort   = 1     // the rate's quick EWMA, for a rise beyond its noise
	tauFast    = 4     // the rate's EWMA
	tauDown    = 30.0  // how slowly the forecast comes down after one
	tauVar     = 10.0  // the EWMA of the rate's variance
	tauLargest = 300.0 // how long a large call keeps the reserve up
)

// routedFor is how long a routed forecast counts after it was last set.
const routedFor = 4 // buckets

// reserveHorizon is the longest horizon the reserve covers, in buckets
// (doubling from one): beyond a few seconds the pace answers for the
// demand, and a reserve sized for a whole minute of it kept a provisioned
// deployment at its cap.
const reserveHorizon = 32

// reservePolicy is a deployment's reserve: fixed, or automatic within its
// floor and cap.
type reservePolicy struct {
	auto       bool
	fixed      float64
	floor, cap float64
}

func newReservePolicy(r config.SyncReserve, floor, cap float64) reservePolicy {
	if r.Auto() {
		return reservePolicy{auto: true, floor: floor, cap: cap}
	}
	return reservePolicy{fixed: float64(r)}
}

// demand forecasts a deployment's synchronous arrivals (tokens, or
// requests) from those seen, bucket by bucket.
type demand struct {
	bucket  int64   // the bucket being counted
	cur     float64 // what arrived in it so far
	short   float64 // quick EWMA of the rate per second
	fast    float64 // EWMA of the rate per second
	peak    float64 // the forecast rate: up at once (rate), down slowly
	vari    float64 // EWMA of the squared deviation of the rate from fast
	largest float64 // the largest single charge, decaying
	started bool
}

// add counts v arriving in bucket b, as calls of size each.
func (d *demand) add(b int64, v, each float64) {
	d.advance(b)
	d.cur += v
	d.largest = max(d.largest, each)
}

// advance closes the buckets before b into the averages.
func (d *demand) advance(b int64) {
	if !d.started {
		d.bucket, d.started = b, true
		return
	}
	if b <= d.bucket {
		return
	}
	dt := window.Width.Seconds()
	// Buckets after the first closed one saw nothing; after a few minutes
	// of nothing every average is zero anyway.
	n := min(b-d.bucket, int64(tauLargest/dt))
	x := d.cur / dt
	for i := int64(0); i < n; i++ {
		d.short += (x - d.short) * (1 - math.Exp(-dt/tauShort))
		d.fast += (x - d.fast) * (1 - math.Exp(-dt/tauFast))
		d.vari += ((x-d.fast)*(x-d.fast) - d.vari) * (1 - math.Exp(-dt/tauVar))
		r := d.rate()
		d.peak = max(r, d.peak-(d.peak-r)*(1-math.Exp(-dt/tauDown)))
		x = 0
	}
	if b-d.bucket > n {
		d.short, d.fast, d.peak, d.vari = 0, 0, 0, 0
	}
	d.largest *= math.Exp(-float64(b-d.bucket) * dt / tauLargest)
	d.cur, d.bucket = 0, b
}

// rate is the current rate: the EWMA, or the quick one when it is above
// by more than twice its noise (a rise seen within a second or two, not a
// burst of a steady rate).
func (d *demand) rate() float64 {
	noise := math.Sqrt(d.vari * window.Width.Seconds() / (2 * tauShort))
	return max(d.fast, d.short-2*noise)
}

// need is the reserve the forecast asks of a window: the largest shortfall
// over the horizons between forecast arrivals (at rate mu) and what win
// releases.
// A deployment whose calls spill to another (spills) needs room only for
// the mean: its bursts, and a call too large for what it has left, go on
// to the next deployment, whose own forecast sees them.
func (d *demand) need(win *window.Window, mu float64, spills bool) float64 {
	dt := window.Width.Seconds()
	// Calls arriving independently vary at least as a Poisson process of
	// calls of the largest size at rate mu: that bound follows a rise at
	// once, while the measured variance takes a while.
	sd, largest := math.Sqrt(max(d.vari, mu*d.largest/dt)), d.largest
	if spills {
		sd, largest = 0, 0
	}
	var k float64
	for n := 1; n <= reserveHorizon; n *= 2 {
		h := float64(n) * dt
		k = max(k, mu*h+reserveZ*sd*math.Sqrt(h*dt)+largest-float64(win.Expiring(n)))
	}
	return k
}

// sustainable is the rate per second calls can be charged at from now on
// without filling win above target sooner than it releases room: the
// least, over the horizons h, of (target − what it holds + E(h)) / h. An
// empty window is filled at target/span, so its charges leave as evenly as
// they came; a gap in what will be released (the end of a fill, a pause) is
// filled ahead by spreading the calls before it; a pulse about to leave is
// replaced over the horizons after it, not at once. Synchronous calls take
// their share of it (refill).
//
// horizons are in buckets, from a second to the window's span.
func sustainable(win *window.Window, target int64, horizons []int) float64 {
	room := float64(target - win.Total())
	r := math.Inf(1)
	for _, n := range horizons {
		r = min(r, (room+float64(win.Expiring(n)))/(float64(n)*window.Width.Seconds()))
	}
	// Over the whole span every charge leaves, so room left unused (calls
	// came slower than forecast) would never be taken back: a little of it
	// is, over refillIn. Only near the target: a window filling from
	// empty fills at target/span, or its end would leave a gap in what the
	// window releases a span later.
	if room > 0 && room <= refillNear*float64(target) {
		r += min(room, refillShare*float64(target)) / refillIn.Seconds()
	}
	return max(r, 0)
}

// refillShare and refillIn bound how fast a sustainable pace takes back
// room left unused: at most this share of the target, over this time.
const (
	refillShare = 0.02
	refillIn    = 10 * time.Second
	refillNear  = 0.1 // of the target: closer than that, the window is not filling from empty
)

// SetReserve sets what the deployment keeps free for synchronous calls: a
// fixed share, or auto within floor and cap (shares of its limits).
func (c *Capacity) SetReserve(r config.SyncReserve, floor, cap float64) {
	c.mu.Lock()
	c.policy = newReservePolicy(r, floor, cap)
	c.keepAt = 0
	c.mu.Unlock()
}

// keep is the reserve now, in tokens of the minute and requests of the
// 10-second window, computed once a bucket; c.mu must be held and the
// windows advanced to b.
func (c *Capacity) keep(b int64) (tokens, requests int64) {
	if c.keepAt == b {
		return c.keepTok, c.keepReq
	}
	p := c.policy
	if !p.auto {
		c.keepTok = int64(p.fixed * float64(c.tokenLimit))
		c.keepReq = int64(p.fixed * float64(c.reqLimit))
	} else {
		muTok, muReq := c.demTok.peak, c.demReq.peak
		spills := false
		if rt, rr, ok := c.routed(b); ok {
			muTok, muReq, spills = max(muTok, rt), max(muReq, rr), c.routedSpills
			if spills {
				// Only the mean matters here, and the local forecast's
				// quick rise follows bursts that spill anyway.
				muTok, muReq = rt, rr
			}
		}
		// The floor is kept where synchronous calls end up: a deployment
		// whose calls spill to another needs none.
		floor := p.floor
		if spills {
			floor = 0
		}
		clamp := func(k float64, limit int64) int64 {
			return int64(math.Ceil(min(max(k, floor*float64(limit)), p.cap*float64(limit))))
		}
		c.keepTok = clamp(c.demTok.need(&c.tokens, muTok, spills), c.tokenLimit)
		c.keepReq = clamp(c.demReq.need(&c.reqs, muReq, spills), c.reqLimit)
		c.paceTok = sustainable(&c.tokens, c.tokenLimit-c.keepTok, []int{4, 8, 16, 32, 60, 120, 240})
		c.paceReq = sustainable(&c.reqs, c.reqLimit-c.keepReq, []int{4, 8, 16, 40})
	}
	c.keepAt = b
	return c.keepTok, c.keepReq
}

// SyncReserve is the share of the deployment's tokens per minute kept for
// synchronous calls now.
func (c *Capacity) SyncReserve(now time.Time) float64 {
	b := window.Bucket(now)
	c.mu.Lock()
	defer c.mu.Unlock()
	c.advance(b)
	k, _ := c.keep(b)
	return float64(k) / float64(max(c.tokenLimit, 1))
}

// routed is the rate the routing order sends here, if set lately.
func (c *Capacity) routed(b int64) (tokens, requests float64, ok bool) {
	if b-c.routedAt > routedFor {
		return 0, 0, false
	}
	return c.routedTok, c.routedReq, true
}

// demandRate is the current synchronous rate of the deployment's own
// arrivals: tokens and requests per second.
func (c *Capacity) demandRate(now time.Time) (tokens, requests float64) {
	b := window.Bucket(now)
	c.mu.Lock()
	defer c.mu.Unlock()
	c.advance(b)
	return c.demTok.rate(), c.demReq.rate()
}

// route sets the synchronous rate the routing order sends this deployment,
// as forecast in bucket b, and whether its calls spill to another
// deployment when it is full; several groups routing to it within one
// bucket count by the largest rate, and it spills only if it does in all.
func (c *Capacity) route(b int64, tokens, requests float64, spills bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if b > c.routedAt {
		c.routedAt, c.routedTok, c.routedReq, c.routedSpills = b, tokens, requests, spills
		return
	}
	c.routedTok, c.routedReq = max(c.routedTok, tokens), max(c.routedReq, requests)
	c.routedSpills = c.routedSpills && spills
}

// route forecasts the synchronous demand each of the group's deployments
// will see: the group's demand (the sum of its deployments' forecasts)
// goes to its tiers in routing order, split by weight within a tier, each
// deployment absorbing up to its limits; what is left spills to the next
// tier. So the first tier is forecast all of the group's demand it can
// take, and a standard deployment behind a provisioned one only the spill.
// Done once a bucket.
func (g *Group) route(now time.Time) {
	b := window.Bucket(now)
	if g.routedAt.Swap(b) == b {
		return
	}
	var tok, req float64
	for _, t := range g.tiers {
		for _, d := range t {
			dt, dr := d.Capacity.demandRate(now)
			tok, req = tok+dt, req+dr
		}
	}
	for i, t := range g.tiers {
		// A tier's calls spill to a later tier that can take them.
		spills := false
		for _, later := range g.tiers[i+1:] {
			for _, d := range later {
				spills = spills || d.circuit.ready(now)
			}
		}
		weight := 0
		for _, d := range t {
			if d.circuit.ready(now) {
				weight += d.Weight
			}
		}
		if weight == 0 {
			continue // calls pass a tier that cannot take them
		}
		var takenTok, takenReq float64
		for _, d := range t {
			if !d.circuit.ready(now) {
				continue
			}
			share := float64(d.Weight) / float64(weight)
			lt, lr := d.Capacity.Limits()
			at, ar := min(tok*share, float64(lt)/60), min(req*share, float64(lr)/10)
			d.Capacity.route(b, at, ar, spills)
			takenTok, takenReq = takenTok+at, takenReq+ar
		}
		tok, req = max(tok-takenTok, 0), max(req-takenReq, 0)
	}
}
