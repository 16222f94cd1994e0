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
	"golang.org/x/time/rate"

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

func newKeyCache(ks KeyStore) *keyCache {
	return &keyCache{good: map[[32]byte]cachedKey{}, bad: map[[32]byte]time.Time{}, keys: ks}
}

// errUnknownKey is a presented key that is not (or no longer) valid.
var errUnknownKey = errors.New("unknown API key")

// errThrottled: the address failed too often and the key is not known to
// be good, so it is not looked up.
var errThrottled = errors.New("too many failed authentications")

// lookup authenticates secret. allowLookup is asked before a database
// lookup of a key not known to be valid.
func (kc *keyCache) lookup(ctx context.Context, secret string, allowLookup func() bool) (*store.Key, error) {
	h := sha256.Sum256([]byte(secret))
	now := time.Now()
	kc.mu.RLock()
	e, known := kc.good[h]
	badUntil, bad := kc.bad[h]
	kc.mu.RUnlock()
	switch {
	case known && now.Before(e.expires):
		return e.key, nil
	case bad && now.Before(badUntil):
		return nil, errUnknownKey
	case !known && !allowLookup():
		// A key that was valid a moment ago is always checked again, so
		// an address that failed too often cannot lock its tenant out.
		return nil, errThrottled
	}
	k, err := kc.keys.KeyBySecret(ctx, secret)
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
		return nil, err
	}
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
// whole /64). The table is bounded; when it fills, idle addresses go first.
type failureLimiter struct {
	mu    sync.Mutex
	rate  rate.Limit
	burst int
	addrs map[netip.Prefix]*addrLimit
}

type addrLimit struct {
	lim  *rate.Limiter
	seen time.Time
}

const failureTableLimit = 65_536

func newFailureLimiter(c config.Auth) *failureLimiter {
	return &failureLimiter{rate: rate.Limit(c.FailureRate), burst: c.FailureBurst, addrs: map[netip.Prefix]*addrLimit{}}
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

// allowed reports whether the address has failures left in its budget.
func (f *failureLimiter) allowed(ip string) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	a := f.addrs[clientPrefix(ip)]
	return a == nil || a.lim.Tokens() >= 1
}

// failed charges one failure to the address.
func (f *failureLimiter) failed(ip string) {
	p := clientPrefix(ip)
	now := time.Now()
	f.mu.Lock()
	defer f.mu.Unlock()
	a := f.addrs[p]
	if a == nil {
		if len(f.addrs) >= failureTableLimit {
			for k, v := range f.addrs {
				if now.Sub(v.seen) > time.Minute {
					delete(f.addrs, k)
				}
			}
			if len(f.addrs) >= failureTableLimit {
				clear(f.addrs)
			}
		}
		a = &addrLimit{lim: rate.NewLimiter(f.rate, f.burst)}
		f.addrs[p] = a
	}
	a.seen = now
	a.lim.AllowN(now, 1)
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
		k, err := s.keys.lookup(c.Request().Context(), secret, func() bool { return s.failures.allowed(ip) })
		switch {
		case errors.Is(err, errUnknownKey):
			s.failures.failed(ip)
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
