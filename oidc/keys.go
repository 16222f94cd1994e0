package oidc

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/rsa"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"

	"github.com/go-jose/go-jose/v4"
	json "github.com/go-json-experiment/json"
	"github.com/go-json-experiment/json/jsontext"
)

const (
	fetchTimeout = 10 * time.Second
	maxBody      = 1 << 20
	// refetchEvery bounds fetches of one key set (unless configured), so
	// that a flood of tokens naming random kids cannot make Levee hammer
	// the identity provider.
	refetchEvery = time.Minute
	// retryEvery is the bound while the set holds no keys at all (the
	// first fetch failed): every token of the issuer is refused meanwhile,
	// so waiting a whole minute would be an outage of Levee's own making.
	retryEvery = 10 * time.Second
	// maxKeyAge is how long a fetched set is used before the next token
	// that needs it fetches it again, so keys the provider withdrew stop
	// being accepted even if no token ever names an unknown kid.
	maxKeyAge = 24 * time.Hour
	// minRSABits refuses keys too short to trust; providers use 2048+.
	minRSABits = 2048
)

// publicKey is one usable key of a set.
type publicKey struct {
	kid string
	alg string // the JWK's own alg; "" if it names none
	key crypto.PublicKey
}

// keySet is one issuer's signing keys (shared by issuers configured with
// the same JWKS URL). It fetches them on first use, when a token names a key
// it lacks (at most every refetchEvery) and when they are older than
// maxKeyAge. Concurrent callers that need a fetch share one.
type keySet struct {
	issuer string // for discovery and logs
	url    string // the configured JWKS URL; "": discovered at each fetch
	client *http.Client
	log    *slog.Logger
	now    func() time.Time
	// refetch is the least time between fetches while keys are held.
	refetch time.Duration

	mu        sync.Mutex
	keys      []publicKey // replaced whole, never modified: callers keep reading theirs
	fetched   time.Time   // when keys were fetched
	attempted time.Time   // when the last fetch started, whatever its outcome
	lastErr   error       // of the last fetch
	pending   *fetchCall
}

type fetchCall struct {
	done chan struct{}
	err  error // set before done is closed
}

// get returns the keys, fetching them first if there are none yet, if they
// are older than maxKeyAge, or if refresh asks for it, unless a fetch
// started too recently: then the keys held are returned as they are.
func (ks *keySet) get(ctx context.Context, refresh bool) ([]publicKey, error) {
	ks.mu.Lock()
	now := ks.now()
	if ks.keys != nil && !refresh && now.Sub(ks.fetched) < maxKeyAge {
		keys := ks.keys
		ks.mu.Unlock()
		return keys, nil
	}
	call := ks.pending
	if call == nil {
		gap := ks.refetch
		if gap <= 0 {
			gap = refetchEvery
		}
		if ks.keys == nil {
			gap = min(gap, retryEvery)
		}
		if !ks.attempted.IsZero() && now.Sub(ks.attempted) < gap {
			keys, err := ks.keys, ks.lastErr
			ks.mu.Unlock()
			if keys == nil {
				return nil, fmt.Errorf("not fetching again until %s after the last attempt: %w", gap, err)
			}
			return keys, nil
		}
		call = &fetchCall{done: make(chan struct{})}
		ks.pending, ks.attempted = call, now
		// The fetch outlives the request that started it: others wait on
		// it, and one client hanging up must not fail them all.
		go ks.fetch(context.WithoutCancel(ctx), call)
	}
	ks.mu.Unlock()

	select {
	case <-call.done:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	ks.mu.Lock()
	keys := ks.keys
	ks.mu.Unlock()
	if keys == nil {
		return nil, call.err
	}
	// A failed refetch leaves the keys held in use (the failure is logged).
	return keys, nil
}

func (ks *keySet) fetch(ctx context.Context, call *fetchCall) {
	ctx, cancel := context.WithTimeout(ctx, fetchTimeout)
	defer cancel()
	keys, from, err := ks.load(ctx)
	ks.mu.Lock()
	if err == nil {
		ks.keys, ks.fetched = keys, ks.now()
	}
	ks.lastErr, ks.pending = err, nil
	ks.mu.Unlock()
	call.err = err
	close(call.done)
	if err != nil {
		ks.log.Warn("fetching signing keys", "issuer", ks.issuer, "url", from, "err", err)
		return
	}
	ks.log.Info("fetched signing keys", "issuer", ks.issuer, "url", from, "keys", len(keys))
}

// load fetches and parses the key set, returning it and where it was.
func (ks *keySet) load(ctx context.Context) ([]publicKey, string, error) {
	from := ks.url
	if from == "" {
		var err error
		if from, err = ks.discover(ctx); err != nil {
			return nil, "", err
		}
	}
	var set struct {
		Keys []jsontext.Value `json:"keys"`
	}
	if err := getJSON(ctx, ks.client, from, &set); err != nil {
		return nil, from, err
	}
	keys := make([]publicKey, 0, len(set.Keys))
	for i, raw := range set.Keys {
		k, err := parseKey(raw)
		if err != nil {
			// One key Levee cannot use (an encryption key, a type it does
			// not know) must not cost it the others.
			ks.log.Debug("skipping a signing key", "issuer", ks.issuer, "url", from, "index", i, "err", err)
			continue
		}
		keys = append(keys, k)
	}
	if len(keys) == 0 {
		return nil, from, fmt.Errorf("%s holds no usable signing key (of %d)", from, len(set.Keys))
	}
	return keys, from, nil
}

// discover reads jwks_uri from the issuer's OpenID configuration.
func (ks *keySet) discover(ctx context.Context) (string, error) {
	base := strings.TrimSuffix(ks.issuer, "/")
	var doc struct {
		Issuer  string `json:"issuer"`
		JWKSURI string `json:"jwks_uri"`
	}
	if err := getJSON(ctx, ks.client, base+"/.well-known/openid-configuration", &doc); err != nil {
		return "", fmt.Errorf("discovery: %w", err)
	}
	// OpenID Connect Discovery 1.0 §4.3: the document must be the issuer's
	// own. A trailing slash is all that may differ.
	if strings.TrimSuffix(doc.Issuer, "/") != base {
		return "", fmt.Errorf("discovery: the document is for issuer %q", doc.Issuer)
	}
	u, err := url.Parse(doc.JWKSURI)
	if err != nil || u.Host == "" || (u.Scheme != "https" && !(u.Scheme == "http" && strings.HasPrefix(ks.issuer, "http:"))) {
		return "", fmt.Errorf("discovery: jwks_uri %q is not an https URL", doc.JWKSURI)
	}
	return doc.JWKSURI, nil
}

func getJSON(ctx context.Context, client *http.Client, u string, out any) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return err
	}
	req.Header.Set("Accept", "application/json")
	resp, err := client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %s", u, resp.Status)
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxBody+1))
	if err != nil {
		return fmt.Errorf("GET %s: %w", u, err)
	}
	if len(body) > maxBody {
		return fmt.Errorf("GET %s: the body is larger than %d bytes", u, maxBody)
	}
	if err := json.Unmarshal(body, out); err != nil {
		return fmt.Errorf("GET %s: %w", u, err)
	}
	return nil
}

// parseKey turns one JWK into a key that may check signatures: a public
// RSA (2048 bits or more), EC or Ed25519 key, not marked for encryption.
// Symmetric keys are refused whatever they say, so no shared secret ever
// enters a set.
func parseKey(raw jsontext.Value) (publicKey, error) {
	var jwk jose.JSONWebKey
	if err := jwk.UnmarshalJSON(raw); err != nil {
		return publicKey{}, err
	}
	if jwk.Use != "" && jwk.Use != "sig" {
		return publicKey{}, fmt.Errorf("key %q is for %q", jwk.KeyID, jwk.Use)
	}
	k := publicKey{kid: jwk.KeyID, alg: jwk.Algorithm}
	switch key := jwk.Key.(type) {
	case *rsa.PublicKey:
		if key.N.BitLen() < minRSABits {
			return publicKey{}, fmt.Errorf("RSA key %q has %d bits, fewer than %d", jwk.KeyID, key.N.BitLen(), minRSABits)
		}
		k.key = key
	case *ecdsa.PublicKey, ed25519.PublicKey:
		k.key = key
	default:
		return publicKey{}, errors.New("not a public RSA, EC or Ed25519 key")
	}
	return k, nil
}
