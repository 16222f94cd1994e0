package api

import (
	"context"
	"crypto/sha256"
	"errors"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"time"

	"github.com/labstack/echo/v4"

	"github.com/levee-gw/levee/config"
	"github.com/levee-gw/levee/store"
)

// KeyStore authenticates API keys.
type KeyStore interface {
	KeyBySecret(ctx context.Context, secret string) (*store.Key, error)
}

// keyCache keeps recent answers about keys for a short while, so a busy key
// costs one SHA-256 and a map lookup instead of a database round trip, and
// so does a key that does not exist: without the negative side every
// unknown key cost a lookup (about 1,700 a second from one client). It is
// keyed by the secret's hash, never the secret. A revoked key stops working
// within keyTTL. Keys are random 256-bit secrets, so a key created after
// its hash was cached as unknown cannot have been guessed beforehand.
type keyCache struct {
	mu   sync.RWMutex
	good map[[32]byte]cachedKey
	bad  map[[32]byte]time.Time
	keys KeyStore
	// lookups bounds the database lookups in flight, so a flood of new
	// keys from many addresses takes part of the pool, never all of it.
	lookups chan struct{}
}

type cachedKey struct {
	key     *store.Key
	expires time.Time
}

const (
	keyTTL = 30 * time.Second
	// Each side is bounded; a full side is emptied, which costs lookups,
	// never correctness.
	keyCacheLimit = 100_000
)

func newKeyCache(ks KeyStore, maxLookups int) *keyCache {
	return &keyCache{good: map[[32]byte]cachedKey{}, bad: map[[32]byte]time.Time{}, keys: ks,
		lookups: make(chan struct{}, max(maxLookups, 1))}
}

// errUnknownKey is a presented key that is not (or no longer) valid.
var errUnknownKey = errors.New("unknown API key")

// errThrottled: the address failed too often and the key is not known to
// be good, so it is not looked up.
var errThrottled = errors.New("too many failed authentications")

// lookup authenticates secret. A key that is not known to be valid costs a
// failure from the caller's budget first (take), given back if it turns out
// valid: so concurrent guesses cannot all slip past one check of the budget.
func (kc *keyCache) lookup(ctx context.Context, secret string, take func() (refund func(), ok bool)) (*store.Key, error) {
	h := sha256.Sum256([]byte(secret))
	now := time.Now()
	kc.mu.RLock()
	e, known := kc.good[h]
	badUntil, bad := kc.bad[h]
	kc.mu.RUnlock()
	if known && now.Before(e.expires) {
		return e.key, nil
	}
	// A key that was valid a moment ago is always checked again, without
	// charging the address: one that failed too often cannot lock its
	// tenant out.
	refund := func() {}
	if !known {
		var ok bool
		if refund, ok = take(); !ok {
			return nil, errThrottled
		}
	}
	if bad && now.Before(badUntil) {
		return nil, errUnknownKey
	}
	select {
	case kc.lookups <- struct{}{}:
	case <-ctx.Done():
		refund()
		return nil, ctx.Err()
	}
	k, err := kc.keys.KeyBySecret(ctx, secret)
	<-kc.lookups
	switch {
	case errors.Is(err, store.ErrNotFound):
		kc.mu.Lock()
		delete(kc.good, h)
		if len(kc.bad) >= keyCacheLimit {
			clear(kc.bad)
		}
		kc.bad[h] = now.Add(keyTTL)
		kc.mu.Unlock()
		return nil, errUnknownKey
	case err != nil:
		refund()
		return nil, err
	}
	refund()
	kc.mu.Lock()
	if len(kc.good) >= keyCacheLimit {
		clear(kc.good)
	}
	kc.good[h] = cachedKey{key: k, expires: now.Add(keyTTL)}
	kc.mu.Unlock()
	return k, nil
}

// failureLimiter is a token bucket of failed authentications per client
// address: an IPv4 address, or an IPv6 client's /64 (one host is given a
// whole /64). A failure is taken before the check that may fail and given
// back when the key was valid; golang.org/x/time/rate cannot give back a
// token once its reservation is due, hence a bucket of its own. The table is
// bounded: when it is full even of recent addresses (a flood from a whole
// IPv6 range), new ones share one bucket rather than wiping everyone's.
type failureLimiter struct {
	mu       sync.Mutex
	rate     float64 // tokens per second
	burst    float64
	addrs    map[netip.Prefix]*bucket
	overflow *bucket
}

type bucket struct {
	tokens float64
	at     time.Time
}

const failureTableLimit = 65_536

func newFailureLimiter(c config.Auth) *failureLimiter {
	return &failureLimiter{rate: c.FailureRate, burst: float64(c.FailureBurst), addrs: map[netip.Prefix]*bucket{},
		overflow: &bucket{tokens: float64(c.FailureBurst)}}
}

func clientPrefix(ip string) netip.Prefix {
	a, err := netip.ParseAddr(ip)
	if err != nil {
		return netip.Prefix{}
	}
	a = a.Unmap()
	if a.Is4() {
		return netip.PrefixFrom(a, 32)
	}
	p, _ := a.WithZone("").Prefix(64)
	return p
}

// take charges one failure to the address now, ahead of a check that may
// fail; refund gives it back. ok is false when the budget is spent.
func (f *failureLimiter) take(ip string) (refund func(), ok bool) {
	now := time.Now()
	f.mu.Lock()
	defer f.mu.Unlock()
	b := f.bucket(clientPrefix(ip), now)
	b.tokens = min(f.burst, b.tokens+now.Sub(b.at).Seconds()*f.rate)
	b.at = now
	if b.tokens < 1 {
		return nil, false
	}
	b.tokens--
	return func() {
		f.mu.Lock()
		b.tokens = min(f.burst, b.tokens+1)
		f.mu.Unlock()
	}, true
}

func (f *failureLimiter) bucket(p netip.Prefix, now time.Time) *bucket {
	if b := f.addrs[p]; b != nil {
		return b
	}
	if len(f.addrs) >= failureTableLimit {
		for k, b := range f.addrs {
			// An idle bucket has refilled: forgetting it loses nothing.
			if b.tokens+now.Sub(b.at).Seconds()*f.rate >= f.burst {
				delete(f.addrs, k)
			}
		}
		if len(f.addrs) >= failureTableLimit {
			return f.overflow
		}
	}
	b := &bucket{tokens: f.burst, at: now}
	f.addrs[p] = b
	return b
}

// presentedKey takes the key from api-key (Azure) or Authorization: Bearer
// (OpenAI); some SDK releases send both, with the same value.
func presentedKey(r *http.Request) string {
	if k := r.Header.Get("api-key"); k != "" {
		return k
	}
	if a := r.Header.Get("Authorization"); len(a) > 7 && strings.EqualFold(a[:7], "bearer ") {
		return strings.TrimSpace(a[7:])
	}
	return ""
}

const keyContextKey = "levee.key"

// authenticate requires a valid key and puts it on the context.
func (s *Server) authenticate(next echo.HandlerFunc) echo.HandlerFunc {
	return func(c echo.Context) error {
		secret := presentedKey(c.Request())
		if secret == "" {
			return &Error{Status: http.StatusUnauthorized, Type: "invalid_request_error", Code: "invalid_api_key",
				Message: "You didn't provide an API key. Provide it in the api-key header or as Authorization: Bearer."}
		}
		ip := c.RealIP()
		ctx, cancel := s.dbContext(c.Request().Context())
		k, err := s.keys.lookup(ctx, secret, func() (func(), bool) { return s.failures.take(ip) })
		cancel()
		switch {
		case errors.Is(err, errUnknownKey):
			s.metrics.authFailures.WithLabelValues("unknown_key").Inc()
			return &Error{Status: http.StatusUnauthorized, Type: "invalid_request_error", Code: "invalid_api_key",
				Message: "Incorrect API key provided."}
		case errors.Is(err, errThrottled):
			s.metrics.authFailures.WithLabelValues("throttled").Inc()
			return &Error{Status: http.StatusTooManyRequests, Type: "invalid_request_error", Code: "too_many_failed_authentications",
				Message: "Too many failed authentications from this address; retry later.", RetryAfter: time.Second}
		case err != nil:
			s.log.Error("key lookup failed", "err", err)
			return &Error{Status: http.StatusServiceUnavailable, Type: "server_error", Code: "unavailable",
				Message: "Levee cannot check API keys right now; retry shortly.", RetryAfter: time.Second}
		}
		c.Set(keyContextKey, k)
		return next(c)
	}
}

func keyOf(c echo.Context) *store.Key {
	k, _ := c.Get(keyContextKey).(*store.Key)
	return k
}

// ipExtractor says who the client is: the connection's peer, or — behind
// proxies listed in http.trusted_proxies — the address they forwarded.
func ipExtractor(c config.HTTP) echo.IPExtractor {
	if len(c.TrustedProxies) == 0 {
		return echo.ExtractIPDirect()
	}
	opts := []echo.TrustOption{echo.TrustLoopback(false), echo.TrustLinkLocal(false), echo.TrustPrivateNet(false)}
	for _, p := range c.TrustedProxies {
		pr := netip.MustParsePrefix(p) // validated with the config
		opts = append(opts, echo.TrustIPRange(&net.IPNet{IP: pr.Addr().AsSlice(), Mask: net.CIDRMask(pr.Bits(), pr.Addr().BitLen())}))
	}
	return echo.ExtractIPFromXFFHeader(opts...)
}
