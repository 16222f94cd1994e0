// Package oidc owns federated authentication: it verifies the JWTs that
// trusted identity providers (Entra ID, Okta, Keycloak, …) issue, keeps
// their signing keys, and turns a verified token into the caller Levee
// charges: a tenant, read from a claim, and scopes, from the grants the
// token's claims match.
//
// The JOSE mechanics (compact JWS parsing, signature checks, JWK parsing
// with x5c consistency, NumericDate) are github.com/go-jose/go-jose/v4: it is
// maintained, publishes a threat model, takes the accepted algorithms as an
// argument at parse time instead of trusting the token's header, and never
// fetches a key on its own. What a library leaves to its caller is decided
// here: which issuer a token belongs to (by exact iss, so that a token of
// another Entra tenant, signed by the very same Microsoft keys, is not
// accepted), which of that issuer's keys may check it, which claims are
// required, and when keys are fetched.
package oidc

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rsa"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"slices"
	"strings"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
	json "github.com/go-json-experiment/json"
	"github.com/go-json-experiment/json/jsontext"

	"github.com/levee-gw/levee/config"
)

// maxTokenLen bounds what is parsed at all: real access tokens are a few
// KB, and anything larger is refused before a byte of it is decoded.
const maxTokenLen = 16 << 10

// Codes of Error, for callers that branch on more than Forbidden.
const (
	CodeInvalidToken = "invalid_token"
	CodeExpired      = "token_expired"
	// CodeKeysUnavailable: the issuer's keys could not be fetched. Not the
	// caller's fault; a 503 fits better than a 401.
	CodeKeysUnavailable = "keys_unavailable"
	// CodeUnknownTenant (Forbidden): a valid token whose tenant claim
	// names no tenant of this gateway.
	CodeUnknownTenant = "unknown_tenant"
	// CodeNoGrant (Forbidden): a valid token that matches none of its
	// issuer's grants.
	CodeNoGrant = "insufficient_scope"
)

// Error is a token Verify refuses. Message is safe to show the client; Err,
// if set, is the underlying cause, for logs.
type Error struct {
	Code    string
	Message string
	// Forbidden: the token is valid but may do nothing here (403), rather
	// than not being a valid token (401).
	Forbidden bool
	Err       error
}

func (e *Error) Error() string {
	if e.Err != nil {
		return e.Message + ": " + e.Err.Error()
	}
	return e.Message
}

func (e *Error) Unwrap() error { return e.Err }

func refuse(msg string, err error) *Error {
	return &Error{Code: CodeInvalidToken, Message: msg, Err: err}
}

// Principal is the caller a verified token stands for.
type Principal struct {
	Issuer string
	// Subject is sub (for an Entra app-only token, the service
	// principal's object id).
	Subject string
	// Tenant is the name of the tenant Levee charges.
	Tenant string
	// Models and Endpoints are the union of the matched grants; nil is
	// unrestricted.
	Models, Endpoints []string
	// MaxPriority is the highest cap of the matched grants; "" is
	// unrestricted.
	MaxPriority string
	// Grants are the matched grants themselves (nil: the issuer has none,
	// and the token may do all its tenant may). A call is allowed only if
	// one grant allows its endpoint, model and priority together: the
	// union above is what the token can see, never what one call may do.
	Grants  []Grant
	Expires time.Time
}

// Grant is what one matched grant allows; empty fields restrict nothing.
type Grant struct {
	Models, Endpoints []string
	MaxPriority       string
}

// Verifier checks tokens from the configured issuers. It is safe for
// concurrent use.
type Verifier struct {
	issuers map[string]*issuer
	// algs is every algorithm some issuer accepts: what the parser lets
	// through before the token's issuer is known.
	algs   []jose.SignatureAlgorithm
	leeway time.Duration
	now    func() time.Time
	cache  *cache
}

type issuer struct {
	cfg  config.Issuer
	algs []string
	keys *keySet
}

// signingAlgs are the algorithms an issuer may be configured with (as in
// config): asymmetric only, so a public key can never double as an HMAC
// secret, and never none.
var signingAlgs = []string{"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}

// New builds a verifier for cfg. client fetches discovery documents and
// key sets (nil: a client with a 10 s timeout). Keys are fetched on first
// use, not here, so an identity provider that is down does not stop Levee
// from starting.
func New(cfg config.OIDC, client *http.Client, log *slog.Logger) (*Verifier, error) {
	if client == nil {
		client = &http.Client{Timeout: fetchTimeout}
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	v := &Verifier{issuers: map[string]*issuer{}, leeway: max(cfg.Leeway, 0), now: time.Now, cache: newCache(cacheSize)}
	sets := map[string]*keySet{}
	for _, c := range cfg.Issuers {
		// config validates all of this; it is checked again because a
		// mistake here would accept tokens meant for someone else.
		switch {
		case c.Issuer == "":
			return nil, errors.New("oidc: an issuer without issuer URL")
		case v.issuers[c.Issuer] != nil:
			return nil, fmt.Errorf("oidc: issuer %q listed twice", c.Issuer)
		case len(c.Audiences) == 0 || slices.Contains(c.Audiences, ""):
			return nil, fmt.Errorf("oidc: issuer %q: audiences must be set and non-empty", c.Issuer)
		case c.TenantClaim == "":
			return nil, fmt.Errorf("oidc: issuer %q: tenant_claim is required", c.Issuer)
		}
		is := &issuer{cfg: c, algs: c.Algorithms}
		if len(is.algs) == 0 {
			is.algs = []string{"RS256", "ES256", "EdDSA"}
		}
		for _, a := range is.algs {
			if !slices.Contains(signingAlgs, a) {
				return nil, fmt.Errorf("oidc: issuer %q: algorithm %q is not accepted", c.Issuer, a)
			}
			if !slices.Contains(v.algs, jose.SignatureAlgorithm(a)) {
				v.algs = append(v.algs, jose.SignatureAlgorithm(a))
			}
		}
		// Issuers with the same key set URL (Entra's v1 and v2 issuers of
		// one tenant) share one cache: one fetch, one refetch budget.
		id := "jwks " + c.JWKSURL
		if c.JWKSURL == "" {
			id = "discover " + c.Issuer
		}
		if sets[id] == nil {
			sets[id] = &keySet{issuer: c.Issuer, url: c.JWKSURL, client: client, log: log, now: v.clock, refetch: cfg.RefetchInterval}
		}
		is.keys = sets[id]
		v.issuers[c.Issuer] = is
	}
	return v, nil
}

// clock lets tests move time; it reads v.now on every call.
func (v *Verifier) clock() time.Time { return v.now() }

// LooksLikeJWT reports whether a presented credential has a JWT's shape:
// three base64url parts separated by dots (the last may be empty, so that
// an unsigned token is recognised and refused as one), the first decoding
// to a JSON object with a string "alg". API keys and tokens share the
// Authorization: Bearer header and are told apart by this. Nothing is
// verified.
func LooksLikeJWT(s string) bool {
	h, rest, ok := strings.Cut(s, ".")
	if !ok {
		return false
	}
	p, sig, ok := strings.Cut(rest, ".")
	if !ok || h == "" || p == "" || !base64URL(h) || !base64URL(p) || !base64URL(sig) {
		return false
	}
	raw, err := base64.RawURLEncoding.DecodeString(h)
	if err != nil {
		return false
	}
	var hdr struct {
		Alg *string `json:"alg"`
	}
	return json.Unmarshal(raw, &hdr) == nil && hdr.Alg != nil
}

// base64URL reports whether s uses only the unpadded base64url alphabet
// (so a third dot, or padding, is refused here too).
func base64URL(s string) bool {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '-' || c == '_') {
			return false
		}
	}
	return true
}

// Verify checks token and returns its caller. Every refusal is an *Error.
//
// The issuer is chosen by the token's iss, read before the signature is
// checked; everything else is then checked against that issuer alone: its
// algorithms, its keys, its audiences. Header parameters that point at keys
// (jku, x5u, jwk, x5c) are never used: keys come only from the issuer's
// configured or discovered key set.
//
// A token that verified is remembered, by its SHA-256, for at most a minute
// and never past its exp: clients present the same token on every call.
func (v *Verifier) Verify(ctx context.Context, token string) (*Principal, error) {
	if len(token) > maxTokenLen {
		return nil, refuse(fmt.Sprintf("the token is longer than %d bytes", maxTokenLen), nil)
	}
	now := v.now()
	sum := sha256.Sum256([]byte(token))
	if p, ok := v.cache.get(sum, now); ok {
		return p, nil
	}
	p, err := v.verify(ctx, token, now)
	if err != nil {
		return nil, err
	}
	v.cache.put(sum, p, now)
	return p.clone(), nil
}

// Cached reports whether token verified a moment ago and is still valid,
// without verifying it: a caller whose token is known good is not charged
// for a failed authentication before it is checked, as a key in use is not.
func (v *Verifier) Cached(token string) bool {
	if len(token) > maxTokenLen {
		return false
	}
	_, ok := v.cache.get(sha256.Sum256([]byte(token)), v.now())
	return ok
}

func (v *Verifier) verify(ctx context.Context, token string, now time.Time) (*Principal, error) {
	if len(v.issuers) == 0 {
		return nil, refuse("this gateway trusts no token issuer", nil)
	}
	jws, err := jose.ParseSignedCompact(token, v.algs)
	if err != nil {
		var alg *jose.ErrUnexpectedSignatureAlgorithm
		if errors.As(err, &alg) {
			return nil, refuse(algRefusal(string(alg.Got)), err)
		}
		return nil, refuse("the token is not a well-formed JWT", err)
	}
	hdr := jws.Signatures[0].Header
	// crit names extensions the signer requires us to understand; Levee
	// understands none. b64 (RFC 7797) changes what was signed and has no
	// place in a JWT.
	for _, name := range []jose.HeaderKey{"crit", "b64"} {
		if _, ok := hdr.ExtraHeaders[name]; ok {
			return nil, refuse(fmt.Sprintf("the token's header has %q, which is not accepted", name), nil)
		}
	}

	// The payload is decoded once, before the signature is checked, to find
	// the issuer; it is trusted only once Verify below has checked exactly
	// these bytes.
	payload := jws.UnsafePayloadWithoutVerification()
	var claims map[string]jsontext.Value
	if err := json.Unmarshal(payload, &claims); err != nil {
		return nil, refuse("the token's claims are not a JSON object", err)
	}
	reg, err := registered(claims)
	if err != nil {
		return nil, refuse("the token's registered claims (iss, sub, aud, exp, nbf, iat) are malformed", err)
	}
	if reg.Issuer == "" {
		return nil, refuse("the token has no iss claim", nil)
	}
	is := v.issuers[reg.Issuer]
	if is == nil {
		return nil, refuse(fmt.Sprintf("the token's issuer %q is not trusted", clip(reg.Issuer)), nil)
	}
	if !slices.Contains(is.algs, hdr.Algorithm) {
		return nil, refuse(fmt.Sprintf("the token is signed with alg %s, which is not accepted from its issuer", hdr.Algorithm), nil)
	}

	key, err := v.key(ctx, is, hdr.KeyID, hdr.Algorithm)
	if err != nil {
		return nil, err
	}
	if _, err := jws.Verify(key); err != nil {
		return nil, refuse("the token's signature is invalid", err)
	}

	if reg.Expiry == nil {
		return nil, refuse("the token has no exp claim", nil)
	}
	exp := jwt.Expected{Issuer: is.cfg.Issuer, AnyAudience: is.cfg.Audiences, Time: now}
	if err := reg.ValidateWithLeeway(exp, v.leeway); err != nil {
		return nil, claimRefusal(err)
	}

	p := &Principal{Issuer: reg.Issuer, Subject: reg.Subject, Expires: reg.Expiry.Time()}
	if p.Tenant, err = tenant(is.cfg, claims); err != nil {
		return nil, err
	}
	if err := grant(is.cfg, claims, p); err != nil {
		return nil, err
	}
	return p, nil
}

func algRefusal(alg string) string {
	switch {
	case strings.EqualFold(alg, "none"):
		return "the token is signed with alg none, which is never accepted"
	case strings.HasPrefix(strings.ToUpper(alg), "HS"):
		return fmt.Sprintf("the token is signed with alg %s (a shared secret), which is never accepted", clip(alg))
	case alg == "":
		return "the token's header has no alg"
	}
	return fmt.Sprintf("the token is signed with alg %s, which is not accepted", clip(alg))
}

func claimRefusal(err error) *Error {
	switch {
	case errors.Is(err, jwt.ErrExpired):
		return &Error{Code: CodeExpired, Message: "the token has expired", Err: err}
	case errors.Is(err, jwt.ErrNotValidYet):
		return refuse("the token is not valid yet (nbf is in the future)", err)
	case errors.Is(err, jwt.ErrIssuedInTheFuture):
		return refuse("the token is issued in the future (iat)", err)
	case errors.Is(err, jwt.ErrInvalidAudience):
		return refuse("the token's audience is not accepted", err)
	case errors.Is(err, jwt.ErrInvalidIssuer):
		return refuse("the token's issuer is not trusted", err)
	}
	return refuse("the token's claims are not accepted", err)
}

// clip keeps a value echoed from the token short in a message.
func clip(s string) string {
	if len(s) > 100 {
		return s[:100] + "…"
	}
	return s
}

// registered decodes the claims RFC 7519 registers, with go-jose's types:
// aud as a string or an array, dates as (possibly fractional) numbers.
func registered(claims map[string]jsontext.Value) (jwt.Claims, error) {
	var c jwt.Claims
	fields := []struct {
		name string
		out  any
	}{
		{"iss", &c.Issuer}, {"sub", &c.Subject}, {"aud", &c.Audience},
		{"exp", &c.Expiry}, {"nbf", &c.NotBefore}, {"iat", &c.IssuedAt},
	}
	for _, f := range fields {
		if raw, ok := claims[f.name]; ok {
			if err := json.Unmarshal(raw, f.out); err != nil {
				return c, fmt.Errorf("%s: %w", f.name, err)
			}
		}
	}
	return c, nil
}

// key returns the issuer's key that may check a token signed with alg and
// naming kid. A key the cached set lacks makes it refetch the set, which
// keySet limits to once a minute.
func (v *Verifier) key(ctx context.Context, is *issuer, kid, alg string) (crypto.PublicKey, error) {
	keys, err := is.keys.get(ctx, false)
	if err != nil {
		return nil, unavailable(err)
	}
	key, err := pick(keys, kid, alg)
	if errors.Is(err, errUnknownKey) {
		if keys, err = is.keys.get(ctx, true); err != nil {
			return nil, unavailable(err)
		}
		key, err = pick(keys, kid, alg)
	}
	switch {
	case errors.Is(err, errUnknownKey) && kid != "":
		return nil, refuse(fmt.Sprintf("unknown signing key (kid %q)", clip(kid)), err)
	case errors.Is(err, errUnknownKey):
		return nil, refuse(fmt.Sprintf("the token has no kid and its issuer has no key for alg %s", alg), err)
	case errors.Is(err, errKeyMismatch):
		return nil, refuse(fmt.Sprintf("the signing key (kid %q) is not a key for alg %s", clip(kid), alg), err)
	case errors.Is(err, errAmbiguousKey):
		return nil, refuse(fmt.Sprintf("the token has no kid and its issuer has several keys for alg %s", alg), err)
	}
	return key, nil
}

func unavailable(err error) *Error {
	return &Error{Code: CodeKeysUnavailable, Message: "the issuer's signing keys could not be fetched; try again later", Err: err}
}

var (
	errUnknownKey   = errors.New("no such key")
	errKeyMismatch  = errors.New("key type does not fit alg")
	errAmbiguousKey = errors.New("several keys fit and no kid says which")
)

// pick chooses among keys the one for kid ("": the token names none, and
// exactly one key may fit alg) whose type fits alg.
func pick(keys []publicKey, kid, alg string) (crypto.PublicKey, error) {
	var found crypto.PublicKey
	n, named := 0, false
	for _, k := range keys {
		if kid != "" && k.kid != kid {
			continue
		}
		named = true
		if !fits(k, alg) {
			continue
		}
		if kid != "" {
			return k.key, nil
		}
		found = k.key
		n++
	}
	switch {
	case n == 1:
		return found, nil
	case n > 1:
		return nil, errAmbiguousKey
	case kid != "" && named:
		return nil, errKeyMismatch
	}
	return nil, errUnknownKey
}

// fits reports whether k may check a signature made with alg: the key's
// type and curve must be alg's, and a key that names its own alg must name
// this one. go-jose would refuse a mismatch too; checking here lets a
// token without kid find its key, and gives a precise message.
func fits(k publicKey, alg string) bool {
	if k.alg != "" && k.alg != alg {
		return false
	}
	switch key := k.key.(type) {
	case *rsa.PublicKey:
		return strings.HasPrefix(alg, "RS") || strings.HasPrefix(alg, "PS")
	case *ecdsa.PublicKey:
		return alg == "ES256" && key.Curve == elliptic.P256() ||
			alg == "ES384" && key.Curve == elliptic.P384() ||
			alg == "ES512" && key.Curve == elliptic.P521()
	case ed25519.PublicKey:
		return alg == "EdDSA"
	}
	return false
}

// claimStrings returns a claim's values: a string, or an array's strings (other
// elements are skipped). Anything else has none.
func claimStrings(raw jsontext.Value) []string {
	switch raw.Kind() {
	case '"':
		var s string
		if json.Unmarshal(raw, &s) == nil {
			return []string{s}
		}
	case '[':
		var arr []jsontext.Value
		if json.Unmarshal(raw, &arr) != nil {
			return nil
		}
		out := make([]string, 0, len(arr))
		for _, e := range arr {
			var s string
			if e.Kind() == '"' && json.Unmarshal(e, &s) == nil {
				out = append(out, s)
			}
		}
		return out
	}
	return nil
}

// tenant maps the issuer's tenant claim to a tenant name: the first value
// that maps (with no mapping configured, the first non-empty value is the
// name itself).
func tenant(cfg config.Issuer, claims map[string]jsontext.Value) (string, error) {
	vals := claimStrings(claims[cfg.TenantClaim])
	for _, val := range vals {
		if len(cfg.Tenants) == 0 {
			if val != "" {
				return val, nil
			}
			continue
		}
		if name, ok := cfg.Tenants[val]; ok && name != "" {
			return name, nil
		}
	}
	msg := fmt.Sprintf("the token's %s claim names no tenant of this gateway", cfg.TenantClaim)
	if len(vals) == 0 {
		msg = fmt.Sprintf("the token has no %s claim (a string or an array of strings) to name its tenant", cfg.TenantClaim)
	}
	return "", &Error{Code: CodeUnknownTenant, Message: msg, Forbidden: true}
}

// grant records the grants the token matches, and their union as p's
// scopes. No grants configured: unrestricted.
func grant(cfg config.Issuer, claims map[string]jsontext.Value, p *Principal) error {
	if len(cfg.Grants) == 0 {
		return nil
	}
	matched := 0
	allModels, allEndpoints, anyPriority := false, false, false
	prio := len(config.Priorities) // index of the highest cap so far
	for _, g := range cfg.Grants {
		if !matches(g, claims) {
			continue
		}
		matched++
		p.Grants = append(p.Grants, Grant{Models: g.Models, Endpoints: g.Endpoints, MaxPriority: g.MaxPriority})
		allModels = allModels || len(g.Models) == 0
		allEndpoints = allEndpoints || len(g.Endpoints) == 0
		anyPriority = anyPriority || g.MaxPriority == ""
		if !allModels {
			p.Models = union(p.Models, g.Models)
		}
		if !allEndpoints {
			p.Endpoints = union(p.Endpoints, g.Endpoints)
		}
		if i := slices.Index(config.Priorities, g.MaxPriority); i >= 0 && i < prio {
			prio = i
		}
	}
	if matched == 0 {
		return &Error{Code: CodeNoGrant, Message: "the token matches none of its issuer's grants, so it may do nothing here", Forbidden: true}
	}
	if allModels {
		p.Models = nil
	}
	if allEndpoints {
		p.Endpoints = nil
	}
	if !anyPriority && prio < len(config.Priorities) {
		p.MaxPriority = config.Priorities[prio]
	}
	return nil
}

func union(into, add []string) []string {
	for _, s := range add {
		if !slices.Contains(into, s) {
			into = append(into, s)
		}
	}
	return into
}

// matches reports whether the token holds g.Value in g.Claim: a string
// equal to it, or an array containing it. scp is Entra's (and OAuth's)
// space-separated scope string, so there each word counts.
func matches(g config.Grant, claims map[string]jsontext.Value) bool {
	if g.Claim == "" {
		return true
	}
	raw := claims[g.Claim]
	vals := claimStrings(raw)
	if g.Claim == "scp" && raw.Kind() == '"' && len(vals) == 1 {
		vals = strings.Fields(vals[0])
	}
	return slices.Contains(vals, g.Value)
}
