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

	"github.com/google/uuid"
	"github.com/labstack/echo/v4"

	"github.com/levee-gw/levee/config"
	"github.com/levee-gw/levee/oidc"
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
	bad  map[[32]byte]badKey
	keys KeyStore
	// lookups bounds the database lookups in flight, so a flood of new
	// keys from many addresses takes part of the pool, never all of it.
	lookups chan struct{}
	// timeout bounds a lookup's wait on Postgres (0: the caller's context
	// alone). It is applied only when the cache does not answer: a
	// context with a deadline costs a timer and several allocations, on
	// every call if made up front.
	timeout time.Duration
}

type cachedKey struct {
	key     *store.Key
	expires time.Time
}

// badKey is a secret known not to work until until; expired (a key that
// exists and has expired) is said as such rather than as unknown.
type badKey struct {
	until   time.Time
	expired *store.Key
}

const (
	keyTTL = 30 * time.Second
	// Each side is bounded; a full side is emptied, which costs lookups,
	// never correctness.
	keyCacheLimit = 100_000
)

func newKeyCache(ks KeyStore, maxLookups int) *keyCache {
	return &keyCache{good: map[[32]byte]cachedKey{}, bad: map[[32]byte]badKey{}, keys: ks,
		lookups: make(chan struct{}, max(maxLookups, 1))}
}

// errUnknownKey is a presented key that is not (or no longer) valid.
var errUnknownKey = errors.New("unknown API key")

// expiredKeyError is a presented key that exists and has expired.
type expiredKeyError struct{ at time.Time }

func (e *expiredKeyError) Error() string {
	return "API key expired at " + e.at.UTC().Format(time.RFC3339)
}

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
	b, bad := kc.bad[h]
	kc.mu.RUnlock()
	if known && now.Before(e.expires) {
		return e.key, nil
	}
	if bad && now.Before(b.until) && b.expired != nil {
		// Known, expired: said without a lookup, and not a guess.
		return nil, &expiredKeyError{b.expired.ExpiresAt}
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
	if bad && now.Before(b.until) {
		return nil, errUnknownKey
	}
	if kc.timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, kc.timeout)
		defer cancel()
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
	case errors.Is(err, store.ErrNotFound), errors.Is(err, store.ErrKeyExpired):
		kc.mu.Lock()
		delete(kc.good, h)
		if len(kc.bad) >= keyCacheLimit {
			clear(kc.bad)
		}
		entry := badKey{until: now.Add(keyTTL)}
		if errors.Is(err, store.ErrKeyExpired) {
			entry.expired = k
		}
		kc.bad[h] = entry
		kc.mu.Unlock()
		if entry.expired != nil {
			refund() // a real key, not a guess
			return nil, &expiredKeyError{k.ExpiresAt}
		}
		return nil, errUnknownKey
	case err != nil:
		refund()
		return nil, err
	}
	refund()
	// Cached no longer than the secret is valid (an expiry, the end of a
	// rotation's grace); changes made meanwhile reach it through forget.
	until := now.Add(keyTTL)
	if !k.ValidUntil.IsZero() && k.ValidUntil.Before(until) {
		until = k.ValidUntil
	}
	kc.mu.Lock()
	if len(kc.good) >= keyCacheLimit {
		clear(kc.good)
	}
	kc.good[h] = cachedKey{key: k, expires: until}
	kc.mu.Unlock()
	return k, nil
}

// forget drops what is cached of a key (uuid.Nil: any) of a tenant
// (uuid.Nil: any), good or expired, so its next use is looked up again.
func (kc *keyCache) forget(key, tenant uuid.UUID) {
	match := func(k *store.Key) bool {
		return k != nil && (key == uuid.Nil || k.ID == key) && (tenant == uuid.Nil || k.TenantID == tenant)
	}
	kc.mu.Lock()
	defer kc.mu.Unlock()
	for h, e := range kc.good {
		if match(e.key) {
			delete(kc.good, h)
		}
	}
	for h, e := range kc.bad {
		if match(e.expired) {
			delete(kc.bad, h)
		}
	}
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
		if s.oidc != nil && oidc.LooksLikeJWT(secret) {
			k, err := s.tokenCaller(c, secret, ip)
			if err != nil {
				return err
			}
			return s.admitCaller(c, k, ip, next)
		}
		k, err := s.keys.lookup(c.Request().Context(), secret, func() (func(), bool) { return s.failures.take(ip) })
		var expired *expiredKeyError
		switch {
		case errors.As(err, &expired):
			s.metrics.authFailures.WithLabelValues("expired_key").Inc()
			return &Error{Status: http.StatusUnauthorized, Type: "invalid_request_error", Code: "api_key_expired",
				Message: "This API key expired at " + expired.at.UTC().Format(time.RFC3339) + "."}
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
		s.used.note(k.ID)
		return s.admitCaller(c, k, ip, next)
	}
}

// admitCaller checks what applies to every route of an authenticated
// caller (its address), then serves it.
func (s *Server) admitCaller(c echo.Context, k *store.Key, ip string, next echo.HandlerFunc) error {
	if k.Scopes.CIDRs != nil && !allowedAddress(k.Scopes.CIDRs, ip) {
		return &Error{Status: http.StatusForbidden, Type: "invalid_request_error", Code: "address_not_allowed",
			Message: "This API key may not be used from this address."}
	}
	c.Set(keyContextKey, k)
	return next(c)
}

// jwtNamespace derives a stable caller id from a token's issuer and
// subject: its usage, jobs and per-key views group under it.
var jwtNamespace = uuid.MustParse("6f1d4b8e-3c2a-5e7f-9a0b-1c2d3e4f5a6b")

// tokenCaller verifies a JWT and makes of it the caller a key would be: its
// tenant (by name, from the token's claims) and its scopes (from the
// grants it matches). A failed verification costs the address as a
// wrong key does.
func (s *Server) tokenCaller(c echo.Context, token, ip string) (*store.Key, error) {
	// A token verified a moment ago is not a guess: it costs the address
	// nothing, so one client's failures cannot lock out the others'
	// tokens behind the same address.
	refund, ok := func() {}, true
	if !s.oidc.Cached(token) {
		refund, ok = s.failures.take(ip)
	}
	if !ok {
		s.metrics.authFailures.WithLabelValues("throttled").Inc()
		return nil, &Error{Status: http.StatusTooManyRequests, Type: "invalid_request_error", Code: "too_many_failed_authentications",
			Message: "Too many failed authentications from this address; retry later.", RetryAfter: time.Second}
	}
	p, err := s.oidc.Verify(c.Request().Context(), token)
	var oe *oidc.Error
	switch {
	case errors.As(err, &oe) && oe.Code == oidc.CodeKeysUnavailable:
		refund()
		s.log.Warn("identity provider keys unavailable", "err", err)
		return nil, &Error{Status: http.StatusServiceUnavailable, Type: "server_error", Code: "unavailable",
			Message: "Levee cannot check tokens right now: " + oe.Message + ".", RetryAfter: time.Second}
	case errors.As(err, &oe) && oe.Forbidden:
		refund() // a real token: not a guess
		return nil, &Error{Status: http.StatusForbidden, Type: "invalid_request_error", Code: oe.Code, Message: capitalize(oe.Message) + "."}
	case errors.As(err, &oe):
		s.metrics.authFailures.WithLabelValues("invalid_token").Inc()
		return nil, &Error{Status: http.StatusUnauthorized, Type: "invalid_request_error", Code: oe.Code, Message: capitalize(oe.Message) + "."}
	case err != nil:
		refund()
		return nil, err
	}
	refund()
	ctx, cancel := s.dbContext(c.Request().Context())
	t, err := s.tenantNamed(ctx, p.Tenant)
	cancel()
	if errors.Is(err, store.ErrNotFound) {
		return nil, &Error{Status: http.StatusForbidden, Type: "invalid_request_error", Code: oidc.CodeUnknownTenant,
			Message: "The token's tenant is not one of this gateway's."}
	}
	if err != nil {
		return nil, err
	}
	k := &store.Key{ID: uuid.NewSHA1(jwtNamespace, []byte(p.Issuer+"\x00"+p.Subject)), TenantID: t.ID, TenantName: t.Name, Prefix: "jwt",
		Name: "jwt:" + p.Subject, DefaultPriority: t.DefaultPriority, ExpiresAt: p.Expires, Token: true,
		Scopes: store.Scopes{Models: p.Models, Endpoints: p.Endpoints, MaxPriority: p.MaxPriority}}
	for _, g := range p.Grants {
		k.Grants = append(k.Grants, store.Scopes{Models: g.Models, Endpoints: g.Endpoints, MaxPriority: g.MaxPriority})
	}
	if m := p.MaxPriority; m != "" && priorityRank(k.DefaultPriority) < priorityRank(m) {
		k.DefaultPriority = m
	}
	return k, nil
}

func capitalize(s string) string {
	if s == "" {
		return s
	}
	return strings.ToUpper(s[:1]) + s[1:]
}

// tenantCache keeps tenants by name for token callers, briefly; a tenant's
// key events (its deletion, a change of its default priority) empty it.
type tenantCache struct {
	mu sync.Mutex
	m  map[string]tenantEntry
}

type tenantEntry struct {
	t       *store.Tenant
	expires time.Time
}

func (s *Server) tenantNamed(ctx context.Context, name string) (*store.Tenant, error) {
	now := time.Now()
	s.tenants.mu.Lock()
	e, ok := s.tenants.m[name]
	s.tenants.mu.Unlock()
	if ok && now.Before(e.expires) {
		return e.t, nil
	}
	t, err := s.admin.TenantByName(ctx, name)
	if err != nil {
		return nil, err
	}
	s.tenants.mu.Lock()
	if len(s.tenants.m) >= 10_000 {
		clear(s.tenants.m)
	}
	s.tenants.m[name] = tenantEntry{t: t, expires: now.Add(keyTTL)}
	s.tenants.mu.Unlock()
	return t, nil
}

func allowedAddress(ranges []netip.Prefix, ip string) bool {
	a, err := netip.ParseAddr(ip)
	if err != nil {
		return false
	}
	a = a.Unmap()
	for _, r := range ranges {
		if r.Contains(a) {
			return true
		}
	}
	return false
}

// lastUse notes when keys were used, in memory, for a writer that records
// them every so often: the request path never writes to Postgres for it.
type lastUse struct {
	mu   sync.Mutex
	keys map[uuid.UUID]time.Time
}

func newLastUse() *lastUse { return &lastUse{keys: map[uuid.UUID]time.Time{}} }

func (u *lastUse) note(id uuid.UUID) {
	now := time.Now()
	u.mu.Lock()
	u.keys[id] = now
	u.mu.Unlock()
}

func (u *lastUse) take() map[uuid.UUID]time.Time {
	u.mu.Lock()
	defer u.mu.Unlock()
	m := u.keys
	u.keys = map[uuid.UUID]time.Time{}
	return m
}

// KeyEvents reads what changed about keys, records their use and prunes
// the events no process needs any more.
type KeyEvents interface {
	RecentKeyEvents(ctx context.Context, window time.Duration) ([]store.KeyEvent, error)
	TouchKeys(ctx context.Context, keys, adminKeys map[uuid.UUID]time.Time) error
	PruneKeyEvents(ctx context.Context, older time.Duration) error
}

// RunKeys keeps the key cache true until ctx ends: every second it reads
// the last seconds of key events (a revocation, rotation or rescoping made
// by any process or the CLI) and forgets those keys, so the change is in
// force everywhere within a couple of seconds rather than the cache's 30;
// every 30 seconds it records when keys were last used.
func (s *Server) RunKeys(ctx context.Context, ev KeyEvents) {
	poll := time.NewTicker(time.Second)
	defer poll.Stop()
	touch := time.NewTicker(30 * time.Second)
	defer touch.Stop()
	prune := time.NewTicker(time.Hour)
	defer prune.Stop()
	write := func(ctx context.Context) {
		keys, admin := s.used.take(), s.adminUsed.take()
		if err := ev.TouchKeys(ctx, keys, admin); err != nil && ctx.Err() == nil {
			s.log.Warn("recording when keys were last used", "err", err)
		}
	}
	for {
		select {
		case <-ctx.Done():
			wctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
			write(wctx)
			cancel()
			return
		case <-touch.C:
			write(ctx)
		case <-prune.C:
			if err := ev.PruneKeyEvents(ctx, time.Hour); err != nil && ctx.Err() == nil {
				s.log.Warn("pruning key events", "err", err)
			}
		case <-poll.C:
			// A window of several seconds: an event whose transaction
			// committed late is still seen; seeing one twice is harmless.
			events, err := ev.RecentKeyEvents(ctx, 10*time.Second)
			if err != nil {
				if ctx.Err() == nil {
					s.log.Warn("reading key events", "err", err)
				}
				continue
			}
			for _, e := range events {
				s.forgetKeys(e)
			}
		}
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
