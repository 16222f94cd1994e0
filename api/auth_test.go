package api

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/levee-gw/levee/config"
	"github.com/levee-gw/levee/store"
)

// countingKeys is a KeyStore that knows one key and counts lookups.
type countingKeys struct {
	good    string
	lookups atomic.Int64
}

func (k *countingKeys) KeyBySecret(_ context.Context, secret string) (*store.Key, error) {
	k.lookups.Add(1)
	if secret == k.good {
		return &store.Key{ID: uuid.New()}, nil
	}
	return nil, store.ErrNotFound
}

func TestUnknownKeysAreCachedToo(t *testing.T) {
	ks := &countingKeys{good: "lv-good"}
	kc := newKeyCache(ks, 4)
	always := func() (func(), bool) { return func() {}, true }
	for i := 0; i < 100; i++ {
		if _, err := kc.lookup(context.Background(), "lv-nope", always); !errors.Is(err, errUnknownKey) {
			t.Fatalf("unknown key: %v", err)
		}
	}
	if n := ks.lookups.Load(); n != 1 {
		t.Fatalf("100 tries of one unknown key cost %d lookups, want 1", n)
	}
	// An expired answer is asked again.
	h := kc.bad
	for k := range h {
		h[k] = badKey{until: time.Now().Add(-time.Second)}
	}
	if _, err := kc.lookup(context.Background(), "lv-nope", always); !errors.Is(err, errUnknownKey) || ks.lookups.Load() != 2 {
		t.Fatalf("expired negative entry: %v after %d lookups", err, ks.lookups.Load())
	}
}

func TestFailedAuthenticationsAreLimitedPerAddress(t *testing.T) {
	ks := &countingKeys{good: "lv-good"}
	kc := newKeyCache(ks, 4)
	f := newFailureLimiter(config.Auth{FailureRate: 0.001, FailureBurst: 5})
	try := func(ip, secret string) error {
		_, err := kc.lookup(context.Background(), secret, func() (func(), bool) { return f.take(ip) })
		return err
	}
	// The good key is used (and so known) before the flood.
	if err := try("203.0.113.7", "lv-good"); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 5; i++ {
		if err := try("203.0.113.7", "lv-guess-"+uuid.NewString()); !errors.Is(err, errUnknownKey) {
			t.Fatalf("failure %d: %v", i, err)
		}
	}
	before := ks.lookups.Load()
	for i := 0; i < 50; i++ {
		if err := try("203.0.113.7", "lv-guess-"+uuid.NewString()); !errors.Is(err, errThrottled) {
			t.Fatalf("past the budget: %v", err)
		}
	}
	if n := ks.lookups.Load() - before; n != 0 {
		t.Fatalf("a throttled address still cost %d lookups", n)
	}
	// The known key keeps working from that address, even once its cache
	// entry has expired: an attacker cannot lock the tenant out.
	for k, e := range kc.good {
		e.expires = time.Now().Add(-time.Second)
		kc.good[k] = e
	}
	if err := try("203.0.113.7", "lv-good"); err != nil {
		t.Fatalf("known key from a throttled address: %v", err)
	}
	// Other addresses are not affected; an IPv6 client's /64 is one address.
	if err := try("203.0.113.8", "lv-guess-x"); !errors.Is(err, errUnknownKey) {
		t.Fatalf("another address: %v", err)
	}
	for i := 0; i < 5; i++ {
		_ = try("2001:db8:1:2::"+string(rune('a'+i)), "lv-guess-"+uuid.NewString())
	}
	if err := try("2001:db8:1:2:ffff::1", "lv-guess-y"); !errors.Is(err, errThrottled) {
		t.Fatalf("the same /64: %v", err)
	}
	if err := try("2001:db8:1:3::1", "lv-guess-z"); !errors.Is(err, errUnknownKey) {
		t.Fatalf("another /64: %v", err)
	}
}

// Concurrent guesses cannot all pass one check of the budget: each takes its
// failure before its lookup, and only a valid key gives it back.
func TestConcurrentGuessesStayWithinTheBudget(t *testing.T) {
	ks := &countingKeys{good: "lv-good"}
	kc := newKeyCache(ks, 8)
	f := newFailureLimiter(config.Auth{FailureRate: 0.001, FailureBurst: 10})
	var wg sync.WaitGroup
	for i := 0; i < 200; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, _ = kc.lookup(context.Background(), "lv-guess-"+uuid.NewString(), func() (func(), bool) { return f.take("198.51.100.9") })
		}()
	}
	wg.Wait()
	if n := ks.lookups.Load(); n > 10 {
		t.Fatalf("200 concurrent guesses cost %d lookups with a budget of 10", n)
	}
	// Valid keys refund what they took: a tenant's keys never use it up.
	for i := 0; i < 50; i++ {
		kc.good = map[[32]byte]cachedKey{} // forget it, so each use is a lookup
		if _, err := kc.lookup(context.Background(), "lv-good", func() (func(), bool) { return f.take("198.51.100.10") }); err != nil {
			t.Fatalf("valid key, use %d: %v", i, err)
		}
	}
}
