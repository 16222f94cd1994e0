package broker

import (
	"net/http"
	"testing"
	"time"

	"github.com/levee-gw/levee/config"
	"github.com/levee-gw/levee/window"
)

var t0 = time.Date(2026, 11, 28, 12, 0, 0, 0, time.UTC)

func TestCapacityChargesOnArrivalAndExpiresAfterAMinute(t *testing.T) {
	c := NewCapacity(1000, 6000) // 1000 requests per 10 s: tokens bind
	for i := 0; i < 4; i++ {
		if _, ok, _ := c.Reserve(t0.Add(time.Duration(i)*time.Second), 250); !ok {
			t.Fatalf("reservation %d refused", i)
		}
	}
	_, ok, at := c.Reserve(t0.Add(5*time.Second), 1)
	if ok {
		t.Fatal("a full minute admitted more")
	}
	// The first charge (t0) frees at t0+60s, at the latest one bucket later.
	if at.Before(t0.Add(time.Minute)) || at.After(t0.Add(time.Minute+window.Width)) {
		t.Fatalf("retry at %v, want about t0+60s", at.Sub(t0))
	}
	if _, ok, _ := c.Reserve(t0.Add(59*time.Second), 1); ok {
		t.Fatal("a charge expired before its minute was up")
	}
	if _, ok, _ := c.Reserve(at, 250); !ok {
		t.Fatal("room not back at the promised time")
	}
}

func TestCapacityRequestsPerTenSeconds(t *testing.T) {
	c := NewCapacity(1_000_000, 60) // 60 RPM = 10 per 10 s
	for i := 0; i < 10; i++ {
		if _, ok, _ := c.Reserve(t0, 1); !ok {
			t.Fatalf("request %d refused", i)
		}
	}
	_, ok, at := c.Reserve(t0.Add(time.Second), 1)
	if ok || at.Sub(t0) < 10*time.Second || at.Sub(t0) > 10*time.Second+window.Width {
		t.Fatalf("ok=%v at=%v", ok, at.Sub(t0))
	}
}

func TestCapacityReleaseCommitObservePenalize(t *testing.T) {
	c := NewCapacity(1000, 60_000)
	r, ok, _ := c.Reserve(t0, 600)
	if !ok {
		t.Fatal("refused")
	}
	r.Release()
	r.Release() // idempotent
	if tok, _ := c.Headroom(t0); tok != 1000 {
		t.Fatalf("headroom after release %d", tok)
	}
	r, _, _ = c.Reserve(t0, 100)
	r.Commit(300) // the estimate fell short: charge the difference
	if tok, _ := c.Headroom(t0); tok != 700 {
		t.Fatalf("headroom after commit above estimate %d", tok)
	}
	r, _, _ = c.Reserve(t0, 100)
	r.Commit(10) // a deployment keeps what it charged on arrival
	if tok, _ := c.Headroom(t0); tok != 600 {
		t.Fatalf("headroom after commit below estimate %d", tok)
	}
	c.Observe(t0, 100, -1) // the deployment says only 100 left: believe it
	if tok, _ := c.Headroom(t0); tok != 100 {
		t.Fatalf("headroom after observing 100 left: %d", tok)
	}
	c.Observe(t0, 900, -1) // more left than we think: not trusted
	if tok, _ := c.Headroom(t0); tok != 100 {
		t.Fatalf("headroom after observing 900 left: %d", tok)
	}
	c2 := NewCapacity(1000, 60_000)
	c2.Penalize(t0, 3*time.Second)
	if _, ok, at := c2.Reserve(t0.Add(time.Second), 1); ok || !at.Equal(t0.Add(3*time.Second)) {
		t.Fatalf("penalized deployment: ok=%v at=%v", ok, at)
	}
	if _, ok, _ := c2.Reserve(t0.Add(3*time.Second), 1); !ok {
		t.Fatal("still blocked after the penalty")
	}
	if _, ok, at := c2.Reserve(t0.Add(4*time.Second), 1001); ok || !at.IsZero() {
		t.Fatal("an estimate above TPM must never fit")
	}
}

func TestRetryAfterAndRemainingHeaders(t *testing.T) {
	now := t0
	for _, tc := range []struct {
		h    map[string]string
		want time.Duration
	}{
		{map[string]string{"retry-after-ms": "1500", "retry-after": "9"}, 1500 * time.Millisecond},
		{map[string]string{"retry-after": "6"}, 6 * time.Second},
		{map[string]string{"retry-after": "0.5"}, 500 * time.Millisecond},
		{map[string]string{"retry-after": now.Add(4 * time.Second).Format(http.TimeFormat)}, 4 * time.Second},
		{map[string]string{"x-ratelimit-reset-tokens": "6m0s", "x-ratelimit-reset-requests": "12ms"}, 6 * time.Minute},
		{map[string]string{"retry-after": "soon"}, 0},
		{map[string]string{}, 0},
	} {
		h := http.Header{}
		for k, v := range tc.h {
			h.Set(k, v)
		}
		if got := RetryAfter(h, now); got != tc.want {
			t.Errorf("%v: %v, want %v", tc.h, got, tc.want)
		}
	}
	h := http.Header{}
	h.Set("x-ratelimit-remaining-tokens", "1234")
	h.Set("x-ratelimit-remaining-requests", "junk")
	if tok, req := Remaining(h); tok != 1234 || req != -1 {
		t.Fatalf("remaining %d %d", tok, req)
	}
}

func TestCircuit(t *testing.T) {
	c := newCircuit(3, time.Second, 4*time.Second)
	for i := 0; i < 2; i++ {
		c.failure(t0)
	}
	if ok, _ := c.acquire(t0); !ok {
		t.Fatal("opened before the threshold")
	}
	c.failure(t0)
	if c.ready(t0) || c.ready(t0.Add(999*time.Millisecond)) {
		t.Fatal("not open after three failures")
	}
	ok, probe := c.acquire(t0.Add(time.Second))
	if !ok || !probe {
		t.Fatal("no probe after the cool-down")
	}
	if ok, _ := c.acquire(t0.Add(time.Second)); ok {
		t.Fatal("a second call got through during the probe")
	}
	c.failure(t0.Add(time.Second)) // failed probe: cool-down doubles
	if c.ready(t0.Add(2900 * time.Millisecond)) {
		t.Fatal("cool-down did not double")
	}
	if _, probe := c.acquire(t0.Add(3 * time.Second)); !probe {
		t.Fatal("no probe after the doubled cool-down")
	}
	c.success()
	if ok, probe := c.acquire(t0.Add(3 * time.Second)); !ok || probe {
		t.Fatal("not closed after a good probe")
	}
}

func BenchmarkCapacityReserve(b *testing.B) {
	c := NewCapacity(1<<40, 1<<40)
	now := time.Now()
	b.ReportAllocs()
	for b.Loop() {
		r, _, _ := c.Reserve(now, 100)
		r.Commit(100)
	}
}

func TestBackgroundIsPacedAroundSyncTraffic(t *testing.T) {
	c := NewCapacity(60_000, 60_000) // 1,000 tokens per second at full rate
	c.SetReserve(0.05, 0, 0)
	// Idle: background may take the reserve-less rate, 950 tokens/s, plus a
	// two-second burst, but not the whole minute at once.
	taken := 0
	for {
		if _, ok, _ := c.ReserveBackground(t0, 100); !ok {
			break
		}
		taken += 100
	}
	if taken < 1800 || taken > 2000 {
		t.Fatalf("a cold start took %d tokens at once, want about 2 s of 950/s", taken)
	}
	// Synchronous traffic of 400 tokens/s (over the last 10 s) leaves
	// background 550/s.
	for i := 0; i < 10; i++ {
		if _, ok, _ := c.Reserve(t0.Add(time.Duration(i)*time.Second), 400); !ok {
			t.Fatal("sync refused")
		}
	}
	now := t0.Add(10 * time.Second)
	c.ReserveBackground(now, 1) // refill up to now (bucket capped at its burst)
	got := 0
	for s := 1; s <= 5; s++ {
		at := now.Add(time.Duration(s) * time.Second)
		for {
			if _, ok, _ := c.ReserveBackground(at, 50); !ok {
				break
			}
			got += 50
		}
	}
	if got < 2500 || got > 3000+1100 {
		t.Fatalf("background took %d tokens in 5 s beside 400/s of sync; want about 5 × 550", got)
	}
	// Synchronous calls are never paced.
	if _, ok, _ := c.Reserve(now.Add(5*time.Second), 5000); !ok {
		t.Fatal("a synchronous call was held back by the background pace")
	}
}

// linked is two processes' views of one deployment, kept in step the way a
// Sharer does: each one's drained charges are applied to the other.
type linked struct{ a, b *Capacity }

func newLinked(tpm, rpm int) *linked {
	l := &linked{a: NewCapacity(tpm, rpm), b: NewCapacity(tpm, rpm)}
	l.a.shared, l.b.shared = true, true
	l.a.SetReserve(0.05, 0, 0)
	l.b.SetReserve(0.05, 0, 0)
	return l
}

func (l *linked) share(now time.Time) {
	ds, until, pacing := l.a.drain()
	l.b.apply(now, "a", ds, until, pacing)
	ds, until, pacing = l.b.drain()
	l.a.apply(now, "b", ds, until, pacing)
}

// TestProcessesSplitTheBackgroundPace: two worker processes pacing into one
// deployment together take what one would, not twice that.
func TestProcessesSplitTheBackgroundPace(t *testing.T) {
	const keep, est = config.SyncReserve(0.05), 50
	single := NewCapacity(60_000, 60_000) // 950 tokens/s beyond the reserve
	single.SetReserve(keep, 0, 0)
	l := newLinked(60_000, 60_000)
	var alone, a, b int
	for ms := 0; ms < 30_000; ms += 50 {
		now := t0.Add(time.Duration(ms) * time.Millisecond)
		for {
			if _, ok, _ := single.ReserveBackground(now, est); !ok {
				break
			}
			alone += est
		}
		for _, p := range []struct {
			c *Capacity
			n *int
		}{{l.a, &a}, {l.b, &b}} {
			for {
				if _, ok, _ := p.c.ReserveBackground(now, est); !ok {
					break
				}
				*p.n += est
			}
		}
		if ms%5 == 0 {
			l.share(now)
		}
	}
	t.Logf("alone %d, together %d + %d = %d", alone, a, b, a+b)
	// 30 s at 950/s plus the cold-start burst.
	if alone < 28_000 || alone > 31_000 {
		t.Fatalf("one process took %d tokens in 30 s, want about 30 × 950 + a burst", alone)
	}
	if together := a + b; float64(together) > 1.1*float64(alone) || float64(together) < 0.8*float64(alone) {
		t.Fatalf("two processes took %d + %d = %d tokens, want about what one takes (%d)", a, b, together, alone)
	}
	if a < b/2 || b < a/2 {
		t.Fatalf("the pace is split %d / %d, want roughly even", a, b)
	}
}

// TestAnotherProcessSyncTrafficSlowsThisPacer: synchronous calls served by
// one process leave room in every process's background pace.
func TestAnotherProcessSyncTrafficSlowsThisPacer(t *testing.T) {
	l := newLinked(60_000, 60_000)
	for i := 0; i < 10; i++ {
		now := t0.Add(time.Duration(i) * time.Second)
		if _, ok, _ := l.a.Reserve(now, 400); !ok {
			t.Fatal("sync refused")
		}
		l.share(now)
	}
	now := t0.Add(10 * time.Second)
	l.b.ReserveBackground(now, 1) // start b's pacer
	got := 0
	for s := 1; s <= 5; s++ {
		at := now.Add(time.Duration(s) * time.Second)
		for {
			if _, ok, _ := l.b.ReserveBackground(at, 50); !ok {
				break
			}
			got += 50
		}
	}
	// 550/s once a's 400/s of sync is counted; 950/s if it were not.
	if got > 3000+1100 {
		t.Fatalf("b's background took %d tokens in 5 s beside a's 400/s of sync; want about 5 × 550", got)
	}
}

// TestObserveComparesWithTheViewWhenCharged: a deployment's remaining
// count is as of when it admitted the call. Read seconds later, after this
// view let old charges go, it must not be taken for charges the view
// missed; a count that shows what the view really missed still is.
func TestObserveComparesWithTheViewWhenCharged(t *testing.T) {
	c := NewCapacity(10_000, 60_000)
	if _, ok, _ := c.Reserve(t0, 4_000); !ok {
		t.Fatal("refused")
	}
	later := t0.Add(59 * time.Second)
	r, ok, _ := c.Reserve(later, 1_000)
	if !ok {
		t.Fatal("refused")
	}
	// The deployment admitted the call holding both charges: 5,000 left.
	// The answer comes 2 s later, when the first charge has left the view.
	answered := later.Add(2 * time.Second)
	r.Observe(answered, 5_000, -1)
	if tok, _ := c.Headroom(answered); tok != 9_000 {
		t.Fatalf("headroom %d after a stale count, want 9,000 (only the second call held)", tok)
	}
	// Another client's 2,000 tokens the view never saw are charged.
	r2, _, _ := c.Reserve(answered, 1_000)
	r2.Observe(answered.Add(time.Second), 6_000, -1)
	if tok, _ := c.Headroom(answered.Add(time.Second)); tok != 6_000 {
		t.Fatalf("headroom %d, want 6,000 after a count showing 2,000 more", tok)
	}
	// A call charged after r3 but reaching the deployment before it is in
	// the deployment's count for r3: not a charge the view missed.
	at := answered.Add(time.Second)
	r3, _, _ := c.Reserve(at, 500)
	if _, ok, _ := c.Reserve(at, 700); !ok {
		t.Fatal("refused")
	}
	r3.Observe(at.Add(time.Second), 10_000-5_200, -1)
	if tok, _ := c.Headroom(at.Add(time.Second)); tok != 4_800 {
		t.Fatalf("headroom %d, want 4,800: a call overtaking another is no missed charge", tok)
	}
}
