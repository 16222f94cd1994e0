package oidc

import (
	"crypto/sha256"
	"slices"
	"sync"
	"time"
)

const (
	// cacheFor bounds how long a verified token is taken on trust: once a
	// refetch has dropped a key the provider withdrew, the tokens it
	// signed stop working within a minute, as with no cache at all.
	cacheFor = time.Minute
	// cacheSize bounds the cache's memory (an entry is a few hundred bytes).
	cacheSize = 10_000
)

// cache remembers tokens that verified, by their SHA-256, until their exp
// but at most cacheFor, so that a client presenting the same token on
// every call pays for one signature check a minute rather than one a call.
// Only successes are kept; the configuration a result depends on is fixed
// for the Verifier's life.
type cache struct {
	max int
	mu  sync.Mutex
	m   map[[sha256.Size]byte]cached
}

type cached struct {
	p     *Principal // never handed out: callers get clones
	until time.Time
}

func newCache(max int) *cache {
	return &cache{max: max, m: make(map[[sha256.Size]byte]cached)}
}

func (c *cache) get(sum [sha256.Size]byte, now time.Time) (*Principal, bool) {
	c.mu.Lock()
	e, ok := c.m[sum]
	if ok && !now.Before(e.until) {
		delete(c.m, sum)
		ok = false
	}
	c.mu.Unlock()
	if !ok {
		return nil, false
	}
	return e.p.clone(), true
}

func (c *cache) put(sum [sha256.Size]byte, p *Principal, now time.Time) {
	until := now.Add(cacheFor)
	if p.Expires.Before(until) {
		until = p.Expires
	}
	if !now.Before(until) || c.max <= 0 {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.m) >= c.max {
		// Dropping everything is crude but O(1) amortised, and costs no
		// more than one re-verification per live token.
		clear(c.m)
	}
	c.m[sum] = cached{p: p, until: until}
}

func (p *Principal) clone() *Principal {
	q := *p
	q.Models, q.Endpoints, q.Grants = slices.Clone(p.Models), slices.Clone(p.Endpoints), slices.Clone(p.Grants)
	return &q
}
