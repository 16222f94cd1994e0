package oidc

import (
	"context"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"

	"github.com/levee-gw/levee/config"
)

// idp is an identity provider for tests: it serves an OpenID configuration
// for any issuer path under its URL and one key set at any path ending in
// /keys, and counts what is fetched.
type idp struct {
	srv *httptest.Server
	rsa *rsa.PrivateKey
	ec  *ecdsa.PrivateKey
	ed  ed25519.PrivateKey

	mu    sync.Mutex
	keys  []jose.JSONWebKey
	body  []byte // served instead of keys when set
	fail  int    // status to answer key set requests with; 0: serve them
	delay time.Duration

	jwksHits, discoveryHits atomic.Int64
}

func newIDP(t testing.TB) *idp {
	t.Helper()
	p := &idp{rsa: rsaKey(t, 2048)}
	var err error
	if p.ec, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader); err != nil {
		t.Fatal(err)
	}
	if _, p.ed, err = ed25519.GenerateKey(rand.Reader); err != nil {
		t.Fatal(err)
	}
	p.keys = []jose.JSONWebKey{
		{Key: p.rsa.Public(), KeyID: "rsa1", Use: "sig", Algorithm: "RS256"},
		{Key: p.ec.Public(), KeyID: "ec1", Use: "sig"},
		{Key: p.ed.Public(), KeyID: "ed1"},
	}
	p.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch {
		case strings.HasSuffix(r.URL.Path, "/.well-known/openid-configuration"):
			p.discoveryHits.Add(1)
			iss := p.srv.URL + strings.TrimSuffix(r.URL.Path, "/.well-known/openid-configuration")
			_ = json.NewEncoder(w).Encode(map[string]string{"issuer": iss, "jwks_uri": p.srv.URL + "/keys"})
		case strings.HasSuffix(r.URL.Path, "/keys"):
			p.jwksHits.Add(1)
			p.mu.Lock()
			keys, body, fail, delay := slices.Clone(p.keys), p.body, p.fail, p.delay
			p.mu.Unlock()
			time.Sleep(delay)
			switch {
			case fail != 0:
				w.WriteHeader(fail)
			case body != nil:
				_, _ = w.Write(body)
			default:
				_ = json.NewEncoder(w).Encode(jose.JSONWebKeySet{Keys: keys})
			}
		default:
			http.NotFound(w, r)
		}
	}))
	t.Cleanup(p.srv.Close)
	return p
}

func (p *idp) set(f func(p *idp)) {
	p.mu.Lock()
	defer p.mu.Unlock()
	f(p)
}

func rsaKey(t testing.TB, bits int) *rsa.PrivateKey {
	t.Helper()
	k, err := rsa.GenerateKey(rand.Reader, bits)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// claims are a valid token's claims for iss at now, changed by mods.
func claims(iss string, now time.Time, mods ...func(map[string]any)) map[string]any {
	c := map[string]any{
		"iss": iss, "sub": "user-1", "aud": "levee", "tid": "acme",
		"iat": now.Unix(), "exp": now.Add(time.Hour).Unix(),
	}
	for _, m := range mods {
		m(c)
	}
	return c
}

func set(k string, v any) func(map[string]any) { return func(c map[string]any) { c[k] = v } }
func del(k string) func(map[string]any)        { return func(c map[string]any) { delete(c, k) } }

// sign signs c with key as alg; kid "" leaves the header without one.
func sign(t testing.TB, alg jose.SignatureAlgorithm, key any, kid string, c any, hdr map[jose.HeaderKey]any) string {
	t.Helper()
	opts := (&jose.SignerOptions{}).WithType("JWT")
	for k, v := range hdr {
		opts.WithHeader(k, v)
	}
	if kid != "" {
		key = jose.JSONWebKey{Key: key, KeyID: kid}
	}
	s, err := jose.NewSigner(jose.SigningKey{Algorithm: alg, Key: key}, opts)
	if err != nil {
		t.Fatal(err)
	}
	var tok string
	if raw, ok := c.([]byte); ok {
		obj, err := s.Sign(raw)
		if err != nil {
			t.Fatal(err)
		}
		tok, err = obj.CompactSerialize()
		if err != nil {
			t.Fatal(err)
		}
		return tok
	}
	tok, err = jwt.Signed(s).Claims(c).Serialize()
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

func b64(s string) string { return base64.RawURLEncoding.EncodeToString([]byte(s)) }

// unsigned is an alg none token: header.payload. and no signature.
func unsigned(t testing.TB, alg string, c map[string]any) string {
	t.Helper()
	payload, err := json.Marshal(c)
	if err != nil {
		t.Fatal(err)
	}
	return b64(`{"alg":"`+alg+`","typ":"JWT"}`) + "." + b64(string(payload)) + "."
}

type clock struct{ ns atomic.Int64 }

func newClock() *clock {
	c := &clock{}
	c.ns.Store(time.Now().UnixNano())
	return c
}
func (c *clock) Now() time.Time          { return time.Unix(0, c.ns.Load()) }
func (c *clock) Advance(d time.Duration) { c.ns.Add(int64(d)) }

func newVerifier(t testing.TB, issuers ...config.Issuer) *Verifier {
	t.Helper()
	v, err := New(config.OIDC{Issuers: issuers, Leeway: time.Minute}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// outcome is what a case expects: code "" is success.
type outcome struct {
	code      string
	forbidden bool
	msg       string // part of the Message
}

func checkOutcome(t *testing.T, p *Principal, err error, want outcome) {
	t.Helper()
	if want.code == "" {
		if err != nil {
			t.Fatalf("refused: %v", err)
		}
		if p == nil {
			t.Fatal("no principal and no error")
		}
		return
	}
	var e *Error
	if !errors.As(err, &e) {
		t.Fatalf("got %v (principal %+v), want an *Error with code %s", err, p, want.code)
	}
	if e.Code != want.code || e.Forbidden != want.forbidden || !strings.Contains(e.Message, want.msg) {
		t.Fatalf("got code %q forbidden %v message %q, want %q %v containing %q (err %v)", e.Code, e.Forbidden, e.Message, want.code, want.forbidden, want.msg, err)
	}
	if p != nil {
		t.Fatalf("a refusal came with a principal: %+v", p)
	}
}

var (
	ok         = outcome{}
	forbidden  = func(code, msg string) outcome { return outcome{code, true, msg} }
	invalid    = func(msg string) outcome { return outcome{CodeInvalidToken, false, msg} }
	expiredErr = outcome{CodeExpired, false, "the token has expired"}
)

func TestVerify(t *testing.T) {
	p, other := newIDP(t), newIDP(t)
	other.set(func(o *idp) {
		o.keys = append(o.keys, jose.JSONWebKey{Key: o.rsa.Public(), KeyID: "other-only", Use: "sig"})
	})
	base, mapped, granted := p.srv.URL, p.srv.URL+"/mapped", p.srv.URL+"/granted"
	v := newVerifier(t,
		config.Issuer{Issuer: base, Audiences: []string{"levee", "api://levee"}, TenantClaim: "tid"},
		config.Issuer{Issuer: other.srv.URL, JWKSURL: other.srv.URL + "/keys", Audiences: []string{"levee"}, TenantClaim: "tid",
			Algorithms: []string{"RS256", "RS384"}},
		config.Issuer{Issuer: mapped, JWKSURL: p.srv.URL + "/keys", Audiences: []string{"levee"}, TenantClaim: "groups",
			Tenants: map[string]string{"g-acme": "acme", "g-beta": "beta"}},
		config.Issuer{Issuer: granted, Audiences: []string{"levee"}, TenantClaim: "tid", Grants: []config.Grant{
			{Claim: "roles", Value: "Levee.Chat", Models: []string{"gpt-4o"}, Endpoints: []string{"chat"}, MaxPriority: "normal"},
			{Claim: "roles", Value: "Levee.Embed", Models: []string{"embed", "gpt-4o"}, Endpoints: []string{"embeddings"}, MaxPriority: "low"},
			{Claim: "scp", Value: "levee.all", Endpoints: []string{"chat", "completions"}, MaxPriority: "high"},
			{Claim: "roles", Value: "Levee.Anything"},
		}},
	)
	now := time.Now()
	c := func(mods ...func(map[string]any)) map[string]any { return claims(base, now, mods...) }
	rs := func(c map[string]any) string { return sign(t, jose.RS256, p.rsa, "rsa1", c, nil) }
	pemKey := pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: must(x509.MarshalPKIXPublicKey(p.rsa.Public()))})

	tcs := []struct {
		name  string
		token string
		want  outcome
		check func(t *testing.T, pr *Principal)
	}{
		{name: "RS256", token: rs(c()), want: ok, check: func(t *testing.T, pr *Principal) {
			want := Principal{Issuer: base, Subject: "user-1", Tenant: "acme", Expires: time.Unix(now.Add(time.Hour).Unix(), 0)}
			if !pr.Expires.Equal(want.Expires) || pr.Issuer != want.Issuer || pr.Subject != want.Subject || pr.Tenant != want.Tenant ||
				pr.Models != nil || pr.Endpoints != nil || pr.MaxPriority != "" {
				t.Fatalf("got %+v, want %+v", *pr, want)
			}
		}},
		{name: "ES256", token: sign(t, jose.ES256, p.ec, "ec1", c(), nil), want: ok},
		{name: "EdDSA", token: sign(t, jose.EdDSA, p.ed, "ed1", c(), nil), want: ok},
		{name: "RS256 without kid, one RSA key", token: sign(t, jose.RS256, p.rsa, "", c(), nil), want: ok},
		{name: "RS384, accepted from another issuer only", token: sign(t, jose.RS384, p.rsa, "", c(), nil),
			want: invalid("alg RS384, which is not accepted from its issuer")},
		{name: "RS512, accepted from no issuer", token: sign(t, jose.RS512, p.rsa, "rsa1", c(), nil), want: invalid("alg RS512, which is not accepted")},
		{name: "RS384 from the issuer that accepts it", token: sign(t, jose.RS384, other.rsa, "other-only", claims(other.srv.URL, now), nil), want: ok},
		{name: "RS384 naming a key published for RS256 only", token: sign(t, jose.RS384, other.rsa, "rsa1", claims(other.srv.URL, now), nil),
			want: invalid(`the signing key (kid "rsa1") is not a key for alg RS384`)},

		{name: "expired", token: rs(c(set("exp", now.Add(-2*time.Minute).Unix()))), want: expiredErr},
		{name: "expired within leeway", token: rs(c(set("exp", now.Add(-30*time.Second).Unix()))), want: ok},
		{name: "nbf beyond leeway", token: rs(c(set("nbf", now.Add(2*time.Minute).Unix()))), want: invalid("not valid yet")},
		{name: "nbf within leeway", token: rs(c(set("nbf", now.Add(30*time.Second).Unix()))), want: ok},
		{name: "iat in the future", token: rs(c(set("iat", now.Add(2*time.Minute).Unix()))), want: invalid("issued in the future")},
		{name: "no exp", token: rs(c(del("exp"))), want: invalid("the token has no exp claim")},
		{name: "exp null", token: rs(c(set("exp", nil))), want: invalid("")},
		{name: "exp as a float", token: rs(c(set("exp", float64(now.Add(time.Hour).Unix())+0.75))), want: ok},
		{name: "exp as a string", token: rs(c(set("exp", "2099-01-01"))), want: invalid("malformed")},

		{name: "wrong aud", token: rs(c(set("aud", "someone-else"))), want: invalid("the token's audience is not accepted")},
		{name: "no aud", token: rs(c(del("aud"))), want: invalid("the token's audience is not accepted")},
		{name: "aud array with an accepted one", token: rs(c(set("aud", []string{"someone-else", "api://levee"}))), want: ok},
		{name: "aud array without", token: rs(c(set("aud", []string{"a", "b"}))), want: invalid("audience")},

		{name: "untrusted iss", token: rs(c(set("iss", "https://evil.example"))), want: invalid("the token's issuer \"https://evil.example\" is not trusted")},
		{name: "iss differing by a trailing slash", token: rs(c(set("iss", base+"/"))), want: invalid("is not trusted")},
		{name: "no iss", token: rs(c(del("iss"))), want: invalid("the token has no iss claim")},
		{name: "iss in another case is not iss", token: rs(c(del("iss"), set("ISS", base))), want: invalid("the token has no iss claim")},
		{name: "trusted iss, signed by another issuer's key with a kid the issuer also has",
			token: sign(t, jose.RS256, other.rsa, "rsa1", c(), nil), want: invalid("the token's signature is invalid")},
		{name: "trusted iss, signed by another issuer's key with its kid",
			token: sign(t, jose.RS256, other.rsa, "other-only", c(), nil), want: invalid("unknown signing key")},
		{name: "the other issuer's own token", token: sign(t, jose.RS256, other.rsa, "other-only", claims(other.srv.URL, now), nil), want: ok},

		{name: "alg none", token: unsigned(t, "none", c()), want: invalid("alg none, which is never accepted")},
		{name: "alg nOnE", token: unsigned(t, "nOnE", c()), want: invalid("alg none, which is never accepted")},
		{name: "HS256 with the RSA public key as secret", token: sign(t, jose.HS256, pemKey, "rsa1", c(), nil),
			want: invalid("alg HS256 (a shared secret), which is never accepted")},
		{name: "RS256 naming the EC key", token: sign(t, jose.RS256, p.rsa, "ec1", c(), nil), want: invalid(`the signing key (kid "ec1") is not a key for alg RS256`)},
		{name: "ES256 naming the RSA key", token: sign(t, jose.ES256, p.ec, "rsa1", c(), nil), want: invalid("is not a key for alg ES256")},
		{name: "crit header", token: sign(t, jose.RS256, p.rsa, "rsa1", c(), map[jose.HeaderKey]any{"crit": []string{"exp"}, "exp": 1}), want: invalid(`"crit"`)},
		{name: "b64 header", token: sign(t, jose.RS256, p.rsa, "rsa1", c(), map[jose.HeaderKey]any{"b64": true}), want: invalid(`"b64"`)},
		{name: "tampered payload", token: func() string {
			parts := strings.Split(rs(c()), ".")
			forged, _ := json.Marshal(c(set("tid", "someone-else")))
			return parts[0] + "." + b64(string(forged)) + "." + parts[2]
		}(), want: invalid("the token's signature is invalid")},

		{name: "empty", token: "", want: invalid("not a well-formed JWT")},
		{name: "one part", token: "abc", want: invalid("not a well-formed JWT")},
		{name: "four parts", token: rs(c()) + ".x", want: invalid("not a well-formed JWT")},
		{name: "three dots of garbage", token: "!!.##.$$", want: invalid("not a well-formed JWT")},
		{name: "header not JSON", token: b64("hello") + "." + b64("{}") + ".c2ln", want: invalid("not a well-formed JWT")},
		{name: "header without alg", token: b64(`{"typ":"JWT"}`) + "." + b64("{}") + ".c2ln", want: invalid("the token's header has no alg")},
		{name: "payload not JSON", token: sign(t, jose.RS256, p.rsa, "rsa1", []byte("hello"), nil), want: invalid("the token's claims are not a JSON object")},
		{name: "payload a JSON array", token: sign(t, jose.RS256, p.rsa, "rsa1", []byte(`["iss"]`), nil), want: invalid("the token's claims are not a JSON object")},
		{name: "a claim named twice", token: sign(t, jose.RS256, p.rsa, "rsa1",
			[]byte(`{"iss":"`+base+`","aud":"nobody","aud":"levee","tid":"acme","exp":`+jsonNum(now.Add(time.Hour).Unix())+`}`), nil),
			want: invalid("the token's claims are not a JSON object")},
		{name: "oversized", token: rs(c(set("pad", strings.Repeat("a", 16<<10)))), want: invalid("longer than 16384 bytes")},
		{name: "large but under the limit", token: rs(c(set("pad", strings.Repeat("a", 10<<10)))), want: ok},

		{name: "tenant claim missing", token: rs(c(del("tid"))), want: forbidden(CodeUnknownTenant, "the token has no tid claim")},
		{name: "tenant claim empty", token: rs(c(set("tid", ""))), want: forbidden(CodeUnknownTenant, "names no tenant")},
		{name: "tenant claim a number", token: rs(c(set("tid", 7))), want: forbidden(CodeUnknownTenant, "the token has no tid claim")},
		{name: "tenant claim array, unmapped: first non-empty", token: rs(c(set("tid", []any{"", 3, "t2", "t3"}))), want: ok,
			check: tenantIs("t2")},
		{name: "mapped tenant, string claim", token: rs(claims(mapped, now, set("groups", "g-acme"))), want: ok, check: tenantIs("acme")},
		{name: "mapped tenant, array claim: first that maps", token: rs(claims(mapped, now, set("groups", []string{"x", "g-beta", "g-acme"}))), want: ok,
			check: tenantIs("beta")},
		{name: "mapped tenant, nothing maps", token: rs(claims(mapped, now, set("groups", []string{"x", "acme"}))),
			want: forbidden(CodeUnknownTenant, "the token's groups claim names no tenant of this gateway")},
		{name: "mapped tenant, no claim", token: rs(claims(mapped, now)), want: forbidden(CodeUnknownTenant, "the token has no groups claim")},

		{name: "grants: two matched, union", token: rs(claims(granted, now, set("roles", []string{"Levee.Chat", "Other", "Levee.Embed"}))), want: ok,
			check: scopes([]string{"gpt-4o", "embed"}, []string{"chat", "embeddings"}, "normal")},
		{name: "grants: one with all models", token: rs(claims(granted, now, set("roles", []string{"Levee.Chat"}), set("scp", "openid levee.all profile"))), want: ok,
			check: scopes(nil, []string{"chat", "completions"}, "high")},
		{name: "grants: one unrestricted", token: rs(claims(granted, now, set("roles", []string{"Levee.Embed", "Levee.Anything"}))), want: ok,
			check: scopes(nil, nil, "")},
		{name: "grants: a string claim equal to the value", token: rs(claims(granted, now, set("roles", "Levee.Embed"))), want: ok,
			check: scopes([]string{"embed", "gpt-4o"}, []string{"embeddings"}, "low")},
		{name: "grants: scp words only match whole", token: rs(claims(granted, now, set("scp", "levee.allx levee"))),
			want: forbidden(CodeNoGrant, "matches none of its issuer's grants")},
		{name: "grants: roles split on spaces only for scp", token: rs(claims(granted, now, set("roles", "Levee.Chat Levee.Embed"))),
			want: forbidden(CodeNoGrant, "")},
		{name: "grants: none matched", token: rs(claims(granted, now, set("roles", []string{"Other"}))), want: forbidden(CodeNoGrant, "")},
		{name: "grants: no claim", token: rs(claims(granted, now)), want: forbidden(CodeNoGrant, "")},
		{name: "an expired token with grants is expired, not forbidden",
			token: rs(claims(granted, now, set("exp", now.Add(-time.Hour).Unix()))), want: expiredErr},
	}
	for _, tc := range tcs {
		t.Run(tc.name, func(t *testing.T) {
			pr, err := v.Verify(t.Context(), tc.token)
			checkOutcome(t, pr, err, tc.want)
			if tc.check != nil {
				tc.check(t, pr)
			}
		})
	}
}

func must[T any](v T, err error) T {
	if err != nil {
		panic(err)
	}
	return v
}

func jsonNum(n int64) string { return string(must(json.Marshal(n))) }

func tenantIs(want string) func(*testing.T, *Principal) {
	return func(t *testing.T, pr *Principal) {
		t.Helper()
		if pr.Tenant != want {
			t.Fatalf("tenant %q, want %q", pr.Tenant, want)
		}
	}
}

func scopes(models, endpoints []string, prio string) func(*testing.T, *Principal) {
	return func(t *testing.T, pr *Principal) {
		t.Helper()
		// nil (unrestricted) and empty would mean opposite things.
		if (pr.Models == nil) != (models == nil) || !slices.Equal(pr.Models, models) ||
			(pr.Endpoints == nil) != (endpoints == nil) || !slices.Equal(pr.Endpoints, endpoints) || pr.MaxPriority != prio {
			t.Fatalf("got models %q endpoints %q priority %q, want %q %q %q", pr.Models, pr.Endpoints, pr.MaxPriority, models, endpoints, prio)
		}
	}
}

// A token's key-locating header parameters point at the attacker; none of
// them may be followed or used.
func TestVerifyIgnoresKeysInTheToken(t *testing.T) {
	p := newIDP(t)
	v := newVerifier(t, config.Issuer{Issuer: p.srv.URL, Audiences: []string{"levee"}, TenantClaim: "tid"})
	var hits atomic.Int64
	attacker := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { hits.Add(1) }))
	defer attacker.Close()
	evil := rsaKey(t, 2048)
	hdr := map[jose.HeaderKey]any{
		"jku": attacker.URL + "/keys",
		"x5u": attacker.URL + "/cert.pem",
		"jwk": jose.JSONWebKey{Key: evil.Public(), KeyID: "evil"},
	}
	now := time.Now()
	for _, kid := range []string{"evil", "rsa1", ""} {
		t.Run("kid "+kid, func(t *testing.T) {
			_, err := v.Verify(t.Context(), sign(t, jose.RS256, evil, kid, claims(p.srv.URL, now), hdr))
			var e *Error
			if !errors.As(err, &e) || e.Code != CodeInvalidToken {
				t.Fatalf("got %v, want an invalid_token refusal", err)
			}
		})
	}
	// The same header parameters on a token the issuer did sign change
	// nothing either.
	if _, err := v.Verify(t.Context(), sign(t, jose.RS256, p.rsa, "rsa1", claims(p.srv.URL, now), hdr)); err != nil {
		t.Fatalf("the issuer's token with jku/x5u/jwk headers: %v", err)
	}
	if n := hits.Load(); n != 0 {
		t.Fatalf("the attacker's server was contacted %d times", n)
	}
}

func TestKeyRotation(t *testing.T) {
	p := newIDP(t)
	clk := newClock()
	v := newVerifier(t, config.Issuer{Issuer: p.srv.URL, Audiences: []string{"levee"}, TenantClaim: "tid"})
	v.now = clk.Now
	verify := func(alg jose.SignatureAlgorithm, key any, kid string) error {
		t.Helper()
		_, err := v.Verify(t.Context(), sign(t, alg, key, kid, claims(p.srv.URL, clk.Now()), nil))
		return err
	}
	fetches := func(want int64) {
		t.Helper()
		if got := p.jwksHits.Load(); got != want {
			t.Fatalf("key set fetched %d times, want %d", got, want)
		}
		if got := p.discoveryHits.Load(); got != want {
			t.Fatalf("discovery fetched %d times, want %d", got, want)
		}
	}
	wantErr := func(err error, msg string) {
		t.Helper()
		var e *Error
		if !errors.As(err, &e) || !strings.Contains(e.Message, msg) {
			t.Fatalf("got %v, want a refusal saying %q", err, msg)
		}
	}

	if err := verify(jose.RS256, p.rsa, "rsa1"); err != nil {
		t.Fatal(err)
	}
	fetches(1)
	if err := verify(jose.ES256, p.ec, "ec1"); err != nil {
		t.Fatal(err)
	}
	fetches(1)

	// The provider rotates in a new key: its first token refetches (the
	// first fetch, too, counts against the once a minute).
	clk.Advance(refetchEvery)
	rotated := rsaKey(t, 2048)
	p.set(func(p *idp) {
		p.keys = append(p.keys, jose.JSONWebKey{Key: rotated.Public(), KeyID: "rsa2", Use: "sig"})
	})
	if err := verify(jose.RS256, rotated, "rsa2"); err != nil {
		t.Fatalf("the rotated key: %v", err)
	}
	fetches(2)

	// Unknown kids within the minute are refused without a fetch.
	for _, kid := range []string{"random-1", "random-2", "random-3"} {
		wantErr(verify(jose.RS256, rotated, kid), `unknown signing key (kid "`+kid+`")`)
	}
	fetches(2)
	// Two RSA keys now: a token without kid cannot say which.
	wantErr(verify(jose.RS256, rotated, ""), "has several keys for alg RS256")
	fetches(2)

	// A minute on, an unknown kid may refetch again (once).
	clk.Advance(refetchEvery)
	wantErr(verify(jose.RS256, rotated, "random-4"), "unknown signing key")
	wantErr(verify(jose.RS256, rotated, "random-5"), "unknown signing key")
	fetches(3)

	// The provider withdraws rsa1; a set older than maxKeyAge is fetched
	// again on next use, so rsa1 stops being accepted without any unknown kid.
	p.set(func(p *idp) {
		p.keys = slices.DeleteFunc(p.keys, func(k jose.JSONWebKey) bool { return k.KeyID == "rsa1" })
	})
	clk.Advance(time.Hour)
	if err := verify(jose.RS256, p.rsa, "rsa1"); err != nil {
		t.Fatalf("rsa1 before the set is stale: %v", err)
	}
	fetches(3)
	clk.Advance(maxKeyAge)
	wantErr(verify(jose.RS256, p.rsa, "rsa1"), `unknown signing key (kid "rsa1")`)
	fetches(4)
	if err := verify(jose.RS256, rotated, ""); err != nil {
		t.Fatalf("one RSA key again, no kid: %v", err)
	}
	fetches(4)
}

func TestKeyFetchFailures(t *testing.T) {
	small := rsaKey(t, 1024)
	tcs := []struct {
		name  string
		setup func(p *idp)
	}{
		{"status 500", func(p *idp) { p.fail = http.StatusInternalServerError }},
		{"body over 1 MB", func(p *idp) {
			// Usable keys, but past the limit.
			set := must(json.Marshal(jose.JSONWebKeySet{Keys: p.keys}))
			p.body = append(set[:len(set)-1], `,"pad":"`+strings.Repeat("a", maxBody)+`"}`...)
		}},
		{"not JSON", func(p *idp) { p.body = []byte("<html>") }},
		{"only unusable keys", func(p *idp) {
			p.keys = []jose.JSONWebKey{
				{Key: []byte("a shared secret of thirty-two bytes!"), KeyID: "rsa1"},
				{Key: small.Public(), KeyID: "rsa1"},
				{Key: p.rsa.Public(), KeyID: "rsa1", Use: "enc"},
			}
		}},
	}
	for _, tc := range tcs {
		t.Run(tc.name, func(t *testing.T) {
			p := newIDP(t)
			clk := newClock()
			v := newVerifier(t, config.Issuer{Issuer: p.srv.URL, Audiences: []string{"levee"}, TenantClaim: "tid"})
			v.now = clk.Now
			p.set(tc.setup)
			verify := func() error {
				_, err := v.Verify(t.Context(), sign(t, jose.RS256, p.rsa, "rsa1", claims(p.srv.URL, clk.Now()), nil))
				return err
			}
			for range 3 {
				var e *Error
				if err := verify(); !errors.As(err, &e) || e.Code != CodeKeysUnavailable || e.Forbidden {
					t.Fatalf("got %v, want keys_unavailable", err)
				}
			}
			if n := p.jwksHits.Load(); n != 1 {
				t.Fatalf("a failing key set was fetched %d times in a row, want 1", n)
			}
			// It heals; the next fetch is allowed soon after, not a minute on.
			p.set(func(p *idp) {
				p.fail, p.body = 0, nil
				p.keys = []jose.JSONWebKey{{Key: p.rsa.Public(), KeyID: "rsa1"}}
			})
			clk.Advance(retryEvery)
			if err := verify(); err != nil {
				t.Fatalf("after the provider healed: %v", err)
			}
		})
	}
}

func TestDiscoveryMustBeTheIssuers(t *testing.T) {
	p := newIDP(t)
	// The document at srv/.well-known/openid-configuration names srv as
	// its issuer; configured as srv/x, it does not discover srv/x's keys.
	wrong := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_ = json.NewEncoder(w).Encode(map[string]string{"issuer": "https://elsewhere.example", "jwks_uri": p.srv.URL + "/keys"})
	}))
	defer wrong.Close()
	v := newVerifier(t, config.Issuer{Issuer: wrong.URL, Audiences: []string{"levee"}, TenantClaim: "tid"})
	_, err := v.Verify(t.Context(), sign(t, jose.RS256, p.rsa, "rsa1", claims(wrong.URL, time.Now()), nil))
	var e *Error
	if !errors.As(err, &e) || e.Code != CodeKeysUnavailable || !strings.Contains(err.Error(), "elsewhere") {
		t.Fatalf("got %v, want keys_unavailable naming the document's issuer", err)
	}
	if n := p.jwksHits.Load(); n != 0 {
		t.Fatalf("the key set of a mismatched discovery document was fetched %d times", n)
	}
}

// Verifications that all need the first fetch share it.
func TestConcurrentFetchIsShared(t *testing.T) {
	p := newIDP(t)
	p.set(func(p *idp) { p.delay = 200 * time.Millisecond })
	v := newVerifier(t, config.Issuer{Issuer: p.srv.URL, Audiences: []string{"levee"}, TenantClaim: "tid"})
	tok := sign(t, jose.ES256, p.ec, "ec1", claims(p.srv.URL, time.Now()), nil)
	var wg sync.WaitGroup
	errs := make(chan error, 20)
	for range 20 {
		wg.Go(func() {
			_, err := v.Verify(t.Context(), tok)
			errs <- err
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	if n := p.jwksHits.Load(); n != 1 {
		t.Fatalf("20 concurrent verifications fetched the key set %d times, want 1", n)
	}
}

// A caller that gives up while a fetch is under way gets its context's
// error; the fetch goes on for the others.
func TestFetchOutlivesItsCaller(t *testing.T) {
	p := newIDP(t)
	p.set(func(p *idp) { p.delay = 200 * time.Millisecond })
	v := newVerifier(t, config.Issuer{Issuer: p.srv.URL, Audiences: []string{"levee"}, TenantClaim: "tid"})
	tok := sign(t, jose.RS256, p.rsa, "rsa1", claims(p.srv.URL, time.Now()), nil)
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Millisecond)
	defer cancel()
	if _, err := v.Verify(ctx, tok); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("got %v, want the caller's deadline", err)
	}
	if _, err := v.Verify(t.Context(), tok); err != nil {
		t.Fatal(err)
	}
	if n := p.jwksHits.Load(); n != 1 {
		t.Fatalf("key set fetched %d times, want 1", n)
	}
}

// Entra ID: v1 and v2 tokens of one tenant have different iss and aud
// shapes and share one key set, which is also every other tenant's.
func TestEntraTokens(t *testing.T) {
	const (
		tid      = "72f988bf-86f1-41af-91ab-2d7cd011db47"
		clientID = "9a3d6a8e-5b1f-4c0e-a7b2-3f2e1d0c9b8a"
		spOID    = "5c1e7f2a-0b3d-4e6f-8a9b-1c2d3e4f5a6b"
	)
	p := newIDP(t)
	// Entra's keys carry x5t and no alg.
	p.set(func(p *idp) {
		p.keys = []jose.JSONWebKey{{Key: p.rsa.Public(), KeyID: "nOo3ZDrODXEK1jKWhXslHR_KXEg", Use: "sig"}}
	})
	jwks := p.srv.URL + "/" + tid + "/discovery/v2.0/keys"
	v1, v2 := "https://sts.windows.net/"+tid+"/", "https://login.microsoftonline.com/"+tid+"/v2.0"
	grants := []config.Grant{{Claim: "roles", Value: "Levee.Invoke", Models: []string{"gpt-4o"}}}
	v := newVerifier(t,
		config.Issuer{Issuer: v1, JWKSURL: jwks, Audiences: []string{"api://levee"}, Algorithms: []string{"RS256"},
			TenantClaim: "tid", Tenants: map[string]string{tid: "contoso"}, Grants: grants},
		config.Issuer{Issuer: v2, JWKSURL: jwks, Audiences: []string{clientID}, Algorithms: []string{"RS256"},
			TenantClaim: "tid", Tenants: map[string]string{tid: "contoso"}, Grants: grants},
	)
	now := time.Now()
	v1Claims := func(mods ...func(map[string]any)) map[string]any {
		c := map[string]any{
			"aud": "api://levee", "iss": v1, "iat": now.Unix(), "nbf": now.Unix(), "exp": now.Add(time.Hour).Unix(),
			"aio": "E2ZgYJjX", "appid": "0f4c3a2b-1d2e-4f5a-8b9c-0d1e2f3a4b5c", "appidacr": "1",
			"idp": v1, "oid": spOID, "rh": "0.AAAA", "roles": []string{"Levee.Invoke"}, "sub": spOID,
			"tid": tid, "uti": "abc", "ver": "1.0",
		}
		for _, m := range mods {
			m(c)
		}
		return c
	}
	v2Claims := func(mods ...func(map[string]any)) map[string]any {
		c := map[string]any{
			"aud": clientID, "iss": v2, "iat": now.Unix(), "nbf": now.Unix(), "exp": now.Add(time.Hour).Unix(),
			"aio": "E2ZgYJjX", "azp": "0f4c3a2b-1d2e-4f5a-8b9c-0d1e2f3a4b5c", "azpacr": "1",
			"oid": spOID, "rh": "0.AAAA", "roles": []string{"Levee.Invoke"}, "sub": spOID,
			"tid": tid, "uti": "abc", "ver": "2.0",
		}
		for _, m := range mods {
			m(c)
		}
		return c
	}
	entra := func(c map[string]any) string {
		return sign(t, jose.RS256, p.rsa, "nOo3ZDrODXEK1jKWhXslHR_KXEg", c, map[jose.HeaderKey]any{"x5t": "nOo3ZDrODXEK1jKWhXslHR_KXEg"})
	}
	const otherTenant = "00000000-1111-2222-3333-444444444444"
	tcs := []struct {
		name   string
		token  string
		want   outcome
		wantIs string
	}{
		{"v1 app token", entra(v1Claims()), ok, v1},
		{"v2 app token", entra(v2Claims()), ok, v2},
		{"v1 token with the v2 audience", entra(v1Claims(set("aud", clientID))), invalid("audience"), ""},
		{"v2 token with the v1 audience", entra(v2Claims(set("aud", "api://levee"))), invalid("audience"), ""},
		{"v2 token of another tenant, same keys", entra(v2Claims(set("iss", "https://login.microsoftonline.com/"+otherTenant+"/v2.0"), set("tid", otherTenant))),
			invalid("is not trusted"), ""},
		{"v2 token claiming another tenant's tid", entra(v2Claims(set("tid", otherTenant))), forbidden(CodeUnknownTenant, "tid"), ""},
		{"v1 token without the role", entra(v1Claims(del("roles"), set("scp", "user_impersonation"))), forbidden(CodeNoGrant, ""), ""},
	}
	for _, tc := range tcs {
		t.Run(tc.name, func(t *testing.T) {
			pr, err := v.Verify(t.Context(), tc.token)
			checkOutcome(t, pr, err, tc.want)
			if pr != nil && (pr.Issuer != tc.wantIs || pr.Tenant != "contoso" || pr.Subject != spOID || !slices.Equal(pr.Models, []string{"gpt-4o"})) {
				t.Fatalf("principal %+v", *pr)
			}
		})
	}
	if n := p.jwksHits.Load(); n != 1 {
		t.Fatalf("the shared key set was fetched %d times, want 1", n)
	}
}

func TestNewRefusesUnsafeConfig(t *testing.T) {
	good := config.Issuer{Issuer: "https://idp.example", Audiences: []string{"levee"}, TenantClaim: "tid"}
	tcs := []struct {
		name string
		mod  func(*config.Issuer)
	}{
		{"no audiences", func(is *config.Issuer) { is.Audiences = nil }},
		{"an empty audience", func(is *config.Issuer) { is.Audiences = []string{""} }},
		{"HS256", func(is *config.Issuer) { is.Algorithms = []string{"RS256", "HS256"} }},
		{"none", func(is *config.Issuer) { is.Algorithms = []string{"none"} }},
		{"no tenant claim", func(is *config.Issuer) { is.TenantClaim = "" }},
		{"no issuer", func(is *config.Issuer) { is.Issuer = "" }},
	}
	if _, err := New(config.OIDC{Issuers: []config.Issuer{good}}, nil, nil); err != nil {
		t.Fatalf("the good issuer: %v", err)
	}
	for _, tc := range tcs {
		t.Run(tc.name, func(t *testing.T) {
			is := good
			tc.mod(&is)
			if _, err := New(config.OIDC{Issuers: []config.Issuer{is}}, nil, nil); err == nil {
				t.Fatal("accepted")
			}
		})
	}
	if _, err := New(config.OIDC{Issuers: []config.Issuer{good, good}}, nil, nil); err == nil {
		t.Fatal("accepted an issuer listed twice")
	}
}

func TestNoIssuers(t *testing.T) {
	p := newIDP(t)
	v := newVerifier(t)
	_, err := v.Verify(t.Context(), sign(t, jose.RS256, p.rsa, "rsa1", claims(p.srv.URL, time.Now()), nil))
	checkOutcome(t, nil, err, invalid("trusts no token issuer"))
}

func TestLooksLikeJWT(t *testing.T) {
	p := newIDP(t)
	tok := sign(t, jose.RS256, p.rsa, "rsa1", claims(p.srv.URL, time.Now()), nil)
	tcs := []struct {
		name string
		s    string
		want bool
	}{
		{"a JWT", tok, true},
		{"an unsigned JWT", unsigned(t, "none", map[string]any{"iss": "x"}), true},
		{"an API key", "lv-" + b64(strings.Repeat("k", 32)), false},
		{"an admin key", "lva-" + b64(strings.Repeat("k", 32)), false},
		{"empty", "", false},
		{"three dots of garbage", "...", false},
		{"garbage parts", "abc.def.ghi", false},
		{"four parts", tok + ".x", false},
		{"two parts", b64(`{"alg":"RS256"}`) + "." + b64("{}"), false},
		{"empty payload", b64(`{"alg":"RS256"}`) + "..sig", false},
		{"padded header", base64.URLEncoding.EncodeToString([]byte(`{"alg": "RS256"}`)) + "." + b64("{}") + ".sig", false},
		{"header without alg", b64(`{"typ":"JWT"}`) + "." + b64("{}") + ".sig", false},
		{"alg not a string", b64(`{"alg":256}`) + "." + b64("{}") + ".sig", false},
		{"header an array", b64(`["alg"]`) + "." + b64("{}") + ".sig", false},
		{"standard base64 characters", b64(`{"alg":"RS256"}`) + ".a+b/." + "sig", false},
	}
	for _, tc := range tcs {
		t.Run(tc.name, func(t *testing.T) {
			if got := LooksLikeJWT(tc.s); got != tc.want {
				t.Fatalf("LooksLikeJWT(%q) = %v, want %v", tc.s, got, tc.want)
			}
		})
	}
}

// A token that verified is served from the cache for at most a minute and
// never past its exp, and a caller changing what it got changes nothing.
func TestVerifyCache(t *testing.T) {
	p := newIDP(t)
	clk := newClock()
	v, err := New(config.OIDC{Leeway: time.Second, Issuers: []config.Issuer{{Issuer: p.srv.URL, Audiences: []string{"levee"}, TenantClaim: "tid",
		Grants: []config.Grant{{Claim: "roles", Value: "Levee.Chat", Models: []string{"gpt-4o"}}}}}}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	v.now = clk.Now
	token := func(kid string, exp time.Duration) string {
		return sign(t, jose.RS256, p.rsa, kid, claims(p.srv.URL, clk.Now(), set("roles", "Levee.Chat"), set("exp", clk.Now().Add(exp).Unix())), nil)
	}
	verify := func(tok string, want outcome) *Principal {
		t.Helper()
		pr, err := v.Verify(t.Context(), tok)
		checkOutcome(t, pr, err, want)
		return pr
	}

	short := token("rsa1", 10*time.Second)
	for range 3 { // the first verifies, the others come from the cache
		pr := verify(short, ok)
		if !slices.Equal(pr.Models, []string{"gpt-4o"}) {
			t.Fatalf("the cached principal was changed through a copy: %q", pr.Models)
		}
		pr.Models[0] = "changed by the caller"
	}
	clk.Advance(20 * time.Second)
	verify(short, expiredErr)

	// A refetch drops the key the provider withdrew; its token, cached a
	// moment before, is still served until its minute is up.
	clk.Advance(refetchEvery)
	long := token("rsa1", time.Hour)
	verify(long, ok)
	p.set(func(p *idp) {
		p.keys = slices.DeleteFunc(p.keys, func(k jose.JSONWebKey) bool { return k.KeyID == "rsa1" })
	})
	verify(token("unknown", time.Hour), invalid("unknown signing key"))
	verify(token("rsa1", 2*time.Hour), invalid("unknown signing key")) // not cached: checked afresh
	clk.Advance(cacheFor - time.Second)
	verify(long, ok)
	clk.Advance(time.Second)
	verify(long, invalid(`unknown signing key (kid "rsa1")`))

	// The cache stays within its bound.
	v.cache = newCache(2)
	p.set(func(p *idp) { p.keys = []jose.JSONWebKey{{Key: p.rsa.Public(), KeyID: "rsa1"}} })
	clk.Advance(refetchEvery)
	for i := range 5 {
		verify(token("rsa1", time.Hour+time.Duration(i)*time.Second), ok)
		if n := len(v.cache.m); n > 2 {
			t.Fatalf("%d cached tokens, bound 2", n)
		}
	}
}

func BenchmarkVerify(b *testing.B) {
	p := newIDP(b)
	cfg := config.Issuer{Issuer: p.srv.URL, Audiences: []string{"levee"}, TenantClaim: "tid",
		Grants: []config.Grant{{Claim: "roles", Value: "Levee.Chat", Models: []string{"gpt-4o"}}}}
	uncached, cached := newVerifier(b, cfg), newVerifier(b, cfg)
	uncached.cache = newCache(0)
	c := claims(p.srv.URL, time.Now(), set("roles", []string{"Levee.Chat"}))
	for _, bc := range []struct {
		name string
		v    *Verifier
		alg  jose.SignatureAlgorithm
		key  any
		kid  string
	}{
		{"RS256", uncached, jose.RS256, p.rsa, "rsa1"},
		{"ES256", uncached, jose.ES256, p.ec, "ec1"},
		{"EdDSA", uncached, jose.EdDSA, p.ed, "ed1"},
		{"RS256-cached", cached, jose.RS256, p.rsa, "rsa1"},
	} {
		tok := sign(b, bc.alg, bc.key, bc.kid, c, nil)
		if _, err := bc.v.Verify(context.Background(), tok); err != nil {
			b.Fatal(err)
		}
		b.Run(bc.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if _, err := bc.v.Verify(context.Background(), tok); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
