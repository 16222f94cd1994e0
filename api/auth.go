package api

import (
	"context"
	"crypto/sha256"
	"errors"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/labstack/echo/v4"

	"github.com/levee-gw/levee/store"
)

// KeyStore authenticates API keys.
type KeyStore interface {
	KeyBySecret(ctx context.Context, secret string) (*store.Key, error)
}

// keyCache keeps recently authenticated keys for a short while, so a busy
// key costs one SHA-256 and a map lookup instead of a database round trip.
// It is keyed by the secret's hash, never the secret. A revoked key stops
// working within keyTTL.
type keyCache struct {
	mu      sync.RWMutex
	entries map[[32]byte]cachedKey
	keys    KeyStore
}

type cachedKey struct {
	key     *store.Key
	expires time.Time
}

const (
	keyTTL        = 30 * time.Second
	keyCacheLimit = 100_000
)

func newKeyCache(ks KeyStore) *keyCache {
	return &keyCache{entries: map[[32]byte]cachedKey{}, keys: ks}
}

func (kc *keyCache) lookup(ctx context.Context, secret string) (*store.Key, error) {
	h := sha256.Sum256([]byte(secret))
	now := time.Now()
	kc.mu.RLock()
	e, ok := kc.entries[h]
	kc.mu.RUnlock()
	if ok && now.Before(e.expires) {
		return e.key, nil
	}
	k, err := kc.keys.KeyBySecret(ctx, secret)
	if err != nil {
		return nil, err
	}
	kc.mu.Lock()
	if len(kc.entries) >= keyCacheLimit {
		clear(kc.entries)
	}
	kc.entries[h] = cachedKey{key: k, expires: now.Add(keyTTL)}
	kc.mu.Unlock()
	return k, nil
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
		k, err := s.keys.lookup(c.Request().Context(), secret)
		if errors.Is(err, store.ErrNotFound) {
			return &Error{Status: http.StatusUnauthorized, Type: "invalid_request_error", Code: "invalid_api_key",
				Message: "Incorrect API key provided."}
		}
		if err != nil {
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
