package test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/hmac"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
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
	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/option"

	"github.com/levee-gw/levee/config"
	"github.com/levee-gw/levee/dev"
	"github.com/levee-gw/levee/test/harness"
)

// testIdP is an identity provider on loopback: an OpenID configuration and
// a JWKS with RSA and EC keys, and a signer of tokens with them.
type testIdP struct {
	URL     string
	rsa1    *rsa.PrivateKey
	rsa2    *rsa.PrivateKey // published only when Publish says so
	ec1     *ecdsa.PrivateKey
	fetches atomic.Int64

	mu        sync.Mutex
	published []jose.JSONWebKey
}

func newIdP(t testing.TB) *testIdP {
	t.Helper()
	p := &testIdP{}
	var err error
	if p.rsa1, err = rsa.GenerateKey(rand.Reader, 2048); err != nil {
		t.Fatal(err)
	}
	if p.rsa2, err = rsa.GenerateKey(rand.Reader, 2048); err != nil {
		t.Fatal(err)
	}
	if p.ec1, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader); err != nil {
		t.Fatal(err)
	}
	p.published = []jose.JSONWebKey{
		{Key: &p.rsa1.PublicKey, KeyID: "rsa1", Algorithm: "RS256", Use: "sig"},
		{Key: &p.ec1.PublicKey, KeyID: "ec1", Algorithm: "ES256", Use: "sig"},
	}
	mux := http.NewServeMux()
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)
	p.URL = srv.URL
	mux.HandleFunc("/.well-known/openid-configuration", func(w http.ResponseWriter, _ *http.Request) {
		_ = json.NewEncoder(w).Encode(map[string]string{"issuer": p.URL, "jwks_uri": p.URL + "/keys"})
	})
	mux.HandleFunc("/keys", func(w http.ResponseWriter, _ *http.Request) {
		p.fetches.Add(1)
		p.mu.Lock()
		set := jose.JSONWebKeySet{Keys: slices.Clone(p.published)}
		p.mu.Unlock()
		_ = json.NewEncoder(w).Encode(set)
	})
	return p
}

// publishRSA2 adds the second RSA key to the JWKS, as a key rotation does.
func (p *testIdP) publishRSA2() {
	p.mu.Lock()
	p.published = append(p.published, jose.JSONWebKey{Key: &p.rsa2.PublicKey, KeyID: "rsa2", Algorithm: "RS256", Use: "sig"})
	p.mu.Unlock()
}

func (p *testIdP) sign(t testing.TB, alg jose.SignatureAlgorithm, key any, kid string, claims map[string]any) string {
	t.Helper()
	s, err := jose.NewSigner(jose.SigningKey{Algorithm: alg, Key: key}, (&jose.SignerOptions{}).WithType("JWT").WithHeader("kid", kid))
	if err != nil {
		t.Fatal(err)
	}
	payload, _ := json.Marshal(claims)
	jws, err := s.Sign(payload)
	if err != nil {
		t.Fatal(err)
	}
	tok, err := jws.CompactSerialize()
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

// claims are a valid token's for this IdP, changed by the overrides (a
// nil value removes the claim).
func (p *testIdP) claims(over map[string]any) map[string]any {
	now := time.Now()
	c := map[string]any{"iss": p.URL, "aud": "api://levee", "sub": "app-1", "tid": "tid-acme", "roles": []string{"Levee.All"},
		"iat": now.Unix(), "nbf": now.Unix(), "exp": now.Add(time.Hour).Unix()}
	for k, v := range over {
		if v == nil {
			delete(c, k)
		} else {
			c[k] = v
		}
	}
	return c
}

func (p *testIdP) token(t testing.TB, over map[string]any) string {
	return p.sign(t, jose.RS256, p.rsa1, "rsa1", p.claims(over))
}

// issuer is how Levee is told to trust p: tokens for api://levee, the
// tenant from tid, and two grants by app role.
func (p *testIdP) issuer(tenant string) config.Issuer {
	return config.Issuer{Issuer: p.URL, Audiences: []string{"api://levee"}, TenantClaim: "tid", Tenants: map[string]string{"tid-acme": tenant},
		Grants: []config.Grant{
			{Claim: "roles", Value: "Levee.All"},
			{Claim: "roles", Value: "Levee.Chat", Models: []string{"gpt-4o"}, Endpoints: []string{"chat"}, MaxPriority: "normal"},
		}}
}

func unsigned(t testing.TB, header, claims map[string]any) string {
	t.Helper()
	h, _ := json.Marshal(header)
	c, _ := json.Marshal(claims)
	return base64.RawURLEncoding.EncodeToString(h) + "." + base64.RawURLEncoding.EncodeToString(c)
}

// Entra ID's two token shapes, each with its own issuer, sharing the
// tenant's key set.
const entraTenant = "72f988bf-86f1-41af-91ab-2d7cd011db47"

func entraIssuers(p *testIdP, tenant string) []config.Issuer {
	return []config.Issuer{
		{Issuer: "https://sts.windows.net/" + entraTenant + "/", JWKSURL: p.URL + "/keys", Audiences: []string{"api://levee"},
			TenantClaim: "tid", Tenants: map[string]string{entraTenant: tenant}},
		{Issuer: "https://login.microsoftonline.com/" + entraTenant + "/v2.0", JWKSURL: p.URL + "/keys",
			Audiences: []string{"6e74172b-be56-4843-9ff4-e66a39bb12e3"}, TenantClaim: "tid", Tenants: map[string]string{entraTenant: tenant}},
	}
}

// JWTs from a trusted identity provider are accepted where API keys are,
// mapped to their tenant and scopes; every kind of bad token gets its
// status and a message that says what is wrong.
func TestJWTsFromAnIdentityProvider(t *testing.T) {
	idp := newIdP(t)
	f := harness.Fast(dev.DefaultFile())
	f.Auth.OIDC = config.OIDC{Issuers: append([]config.Issuer{idp.issuer("acme")}, entraIssuers(idp, "acme")...), RefetchInterval: 2 * time.Second}
	env := harness.Start(t, f)
	newTenant(t, env, "acme")
	other := newIdP(t) // trusted by nobody

	pub, _ := x509.MarshalPKIXPublicKey(&idp.rsa1.PublicKey)
	pubPEM := pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pub})
	hs256 := func(secret []byte) string {
		s := unsigned(t, map[string]any{"alg": "HS256", "typ": "JWT", "kid": "rsa1"}, idp.claims(nil))
		m := hmac.New(sha256.New, secret)
		m.Write([]byte(s))
		return s + "." + base64.RawURLEncoding.EncodeToString(m.Sum(nil))
	}
	now := time.Now()
	cases := []struct {
		name    string
		token   string
		path    string
		status  int
		code    string
		message string
	}{
		{"valid, RS256", idp.token(t, nil), "", 200, "", ""},
		{"valid, ES256", idp.sign(t, jose.ES256, idp.ec1, "ec1", idp.claims(map[string]any{"sub": "app-2"})), "", 200, "", ""},
		{"expired within the leeway", idp.token(t, map[string]any{"exp": now.Add(-20 * time.Second).Unix()}), "", 200, "", ""},
		{"expired", idp.token(t, map[string]any{"exp": now.Add(-5 * time.Minute).Unix()}), "", 401, "token_expired", "expired"},
		{"not yet valid", idp.token(t, map[string]any{"nbf": now.Add(5 * time.Minute).Unix()}), "", 401, "invalid_token", "not valid yet"},
		{"without exp", idp.token(t, map[string]any{"exp": nil}), "", 401, "invalid_token", "no exp"},
		{"wrong audience", idp.token(t, map[string]any{"aud": "api://someone-else"}), "", 401, "invalid_token", "audience"},
		{"wrong issuer", other.sign(t, jose.RS256, other.rsa1, "rsa1", other.claims(nil)), "", 401, "invalid_token", "not trusted"},
		{"a trusted iss signed by another key", other.sign(t, jose.RS256, other.rsa1, "rsa1", idp.claims(nil)), "", 401, "invalid_token", "signature"},
		{"alg none", unsigned(t, map[string]any{"alg": "none", "typ": "JWT"}, idp.claims(nil)) + ".", "", 401, "invalid_token", "none"},
		{"HS256 keyed with the public key (PEM)", hs256(pubPEM), "", 401, "invalid_token", "HS256"},
		{"HS256 keyed with the public key (DER)", hs256(pub), "", 401, "invalid_token", "HS256"},
		{"a tampered payload", func() string {
			parts := strings.Split(idp.token(t, nil), ".")
			c := idp.claims(map[string]any{"tid": "tid-other"})
			b, _ := json.Marshal(c)
			return parts[0] + "." + base64.RawURLEncoding.EncodeToString(b) + "." + parts[2]
		}(), "", 401, "invalid_token", "signature"},
		{"an unknown tenant", idp.token(t, map[string]any{"tid": "tid-nobody"}), "", 403, "unknown_tenant", "tenant"},
		{"no grant", idp.token(t, map[string]any{"roles": []string{"Reader"}}), "", 403, "insufficient_scope", ""},
		{"scoped: its endpoint", idp.token(t, map[string]any{"roles": []string{"Levee.Chat"}}), "", 200, "", ""},
		{"scoped: another endpoint", idp.token(t, map[string]any{"roles": []string{"Levee.Chat"}}), "/v1/embeddings", 403, "endpoint_not_allowed", ""},
		{"scoped: jobs", idp.token(t, map[string]any{"roles": []string{"Levee.Chat"}}), "/v1/jobs", 403, "endpoint_not_allowed", ""},
		{"Entra v1 token", idp.token(t, map[string]any{"iss": "https://sts.windows.net/" + entraTenant + "/", "tid": entraTenant, "ver": "1.0",
			"appid": "6e74172b-be56-4843-9ff4-e66a39bb12e3", "aud": "api://levee"}), "", 200, "", ""},
		{"Entra v2 token", idp.token(t, map[string]any{"iss": "https://login.microsoftonline.com/" + entraTenant + "/v2.0", "tid": entraTenant,
			"ver": "2.0", "azp": "6e74172b-be56-4843-9ff4-e66a39bb12e3", "aud": "6e74172b-be56-4843-9ff4-e66a39bb12e3"}), "", 200, "", ""},
		{"Entra v2 token with the v1 audience", idp.token(t, map[string]any{"iss": "https://login.microsoftonline.com/" + entraTenant + "/v2.0",
			"tid": entraTenant, "ver": "2.0", "aud": "api://levee"}), "", 401, "invalid_token", "audience"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			path, body := "/v1/chat/completions", any(chat(5))
			switch c.path {
			case "/v1/embeddings":
				path, body = c.path, embedding()
			case "/v1/jobs":
				path, body = c.path, jobBody(5, "low")
			}
			resp, raw := call(t, env.BaseURL, path, c.token, body)
			wantCode(t, c.name, resp, raw, c.status, c.code)
			if c.message != "" && !strings.Contains(mustEnvelope(t, raw).Error.Message, c.message) {
				t.Fatalf("message %s, want it to say %q", raw, c.message)
			}
		})
	}

	t.Run("a scoped token sees its models and priority", func(t *testing.T) {
		tok := idp.token(t, map[string]any{"roles": []string{"Levee.Chat"}, "sub": "app-3"})
		_, raw := call(t, env.BaseURL, "/v1/models", tok, nil)
		if ids := modelIDs(t, raw); !slices.Equal(ids, []string{"gpt-4o"}) {
			t.Fatalf("models %v", ids)
		}
		resp, raw := call(t, env.BaseURL, "/v1/chat/completions", tok, chat(5), "X-Levee-Priority", "high")
		wantCode(t, "priority high", resp, raw, 403, "priority_not_allowed")
		resp, raw = call(t, env.BaseURL, "/v1/chat/completions", tok, chat(5), "X-Levee-Priority", "normal")
		wantCode(t, "priority normal", resp, raw, 200, "")
	})

	t.Run("a token's usage is its tenant's", func(t *testing.T) {
		env.FlushUsage()
		var n int
		if err := env.Store.Pool().QueryRow(context.Background(), `SELECT count(*) FROM usage_events e JOIN tenants t ON t.id = e.tenant_id
			WHERE t.name = 'acme' AND e.status = 200`).Scan(&n); err != nil {
			t.Fatal(err)
		}
		// valid RS256, ES256, within the leeway, scoped, Entra v1 and v2,
		// priority normal.
		if n != 7 {
			t.Fatalf("acme has %d successful calls recorded, want 7", n)
		}
		var keys int
		_ = env.Store.Pool().QueryRow(context.Background(), `SELECT count(DISTINCT key_id) FROM usage_events e JOIN tenants t ON t.id = e.tenant_id
			WHERE t.name = 'acme'`).Scan(&keys)
		if keys < 4 {
			t.Fatalf("the calls of 4+ subjects are recorded under %d caller ids", keys)
		}
	})

	t.Run("an unknown kid fetches the key set again, at most once per interval", func(t *testing.T) {
		time.Sleep(2100 * time.Millisecond) // past the last fetch's interval
		before := idp.fetches.Load()
		resp, raw := call(t, env.BaseURL, "/v1/chat/completions", idp.sign(t, jose.RS256, idp.rsa2, "rsa2", idp.claims(nil)), chat(5))
		wantCode(t, "a kid the IdP has not published", resp, raw, 401, "invalid_token")
		if got := idp.fetches.Load() - before; got != 1 {
			t.Fatalf("an unknown kid fetched the key set %d times, want 1", got)
		}
		refetched := time.Now()
		idp.publishRSA2()
		// Within the interval a flood of unknown kids fetches nothing.
		for i := 0; i < 20; i++ {
			tok := idp.sign(t, jose.RS256, idp.rsa2, "rsa2", idp.claims(map[string]any{"jti": i}))
			resp, raw := call(t, env.BaseURL, "/v1/chat/completions", tok, chat(5))
			if time.Since(refetched) > 1500*time.Millisecond {
				t.Skip("the machine is too slow to stay within the interval")
			}
			wantCode(t, "within the interval", resp, raw, 401, "invalid_token")
		}
		if got := idp.fetches.Load() - before; got != 1 {
			t.Fatalf("20 tokens with an unknown kid within the interval fetched %d times", got-1)
		}
		time.Sleep(time.Until(refetched.Add(2100 * time.Millisecond)))
		resp, raw = call(t, env.BaseURL, "/v1/chat/completions", idp.sign(t, jose.RS256, idp.rsa2, "rsa2", idp.claims(map[string]any{"jti": "after"})), chat(5))
		wantCode(t, "the new key, after the interval", resp, raw, 200, "")
		if got := idp.fetches.Load() - before; got != 2 {
			t.Fatalf("fetched %d times, want 2", got)
		}
	})

	t.Run("a deleted tenant's tokens are refused", func(t *testing.T) {
		tok := idp.token(t, map[string]any{"sub": "app-9"})
		resp, raw := call(t, env.BaseURL, "/v1/chat/completions", tok, chat(5))
		wantCode(t, "before", resp, raw, 200, "")
		resp, raw = adminCall(t, env, "DELETE", "/admin/v1/tenants/acme", nil)
		wantCode(t, "delete acme", resp, raw, 200, "")
		resp, raw = call(t, env.BaseURL, "/v1/chat/completions", tok, chat(5))
		wantCode(t, "after", resp, raw, 403, "unknown_tenant")
	})
}

// The official openai-go SDK, unmodified, with a JWT as its API key: chat,
// streamed chat and embeddings, and a refusal as a typed error.
func TestOpenAIGoSDKWithAJWT(t *testing.T) {
	idp := newIdP(t)
	f := harness.Fast(dev.DefaultFile())
	f.Auth.OIDC = config.OIDC{Issuers: []config.Issuer{idp.issuer(dev.DevTenant)}}
	env := harness.Start(t, f)
	ctx := context.Background()
	c := openai.NewClient(option.WithBaseURL(env.BaseURL+"/v1/"), option.WithAPIKey(idp.token(t, nil)), option.WithMaxRetries(0))
	params := openai.ChatCompletionNewParams{Model: "gpt-4o", MaxTokens: openai.Int(20),
		Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage("Say hello to the levee.")}}
	cc, err := c.Chat.Completions.New(ctx, params)
	if err != nil || len(cc.Choices) != 1 || cc.Choices[0].Message.Content == "" {
		t.Fatalf("chat with a JWT: %v %+v", err, cc)
	}
	st := c.Chat.Completions.NewStreaming(ctx, params)
	var acc openai.ChatCompletionAccumulator
	for st.Next() {
		acc.AddChunk(st.Current())
	}
	if err := st.Err(); err != nil || acc.Choices[0].Message.Content != cc.Choices[0].Message.Content {
		t.Fatalf("streamed with a JWT: %v", err)
	}
	emb, err := c.Embeddings.New(ctx, openai.EmbeddingNewParams{Model: "text-embedding-3-small",
		Input: openai.EmbeddingNewParamsInputUnion{OfArrayOfStrings: []string{"a"}}})
	if err != nil || len(emb.Data) != 1 {
		t.Fatalf("embeddings with a JWT: %v", err)
	}
	scoped := openai.NewClient(option.WithBaseURL(env.BaseURL+"/v1/"), option.WithMaxRetries(0),
		option.WithAPIKey(idp.token(t, map[string]any{"roles": []string{"Levee.Chat"}})))
	_, err = scoped.Embeddings.New(ctx, openai.EmbeddingNewParams{Model: "text-embedding-3-small",
		Input: openai.EmbeddingNewParamsInputUnion{OfArrayOfStrings: []string{"a"}}})
	var apiErr *openai.Error
	if !errors.As(err, &apiErr) || apiErr.StatusCode != 403 || apiErr.Code != "endpoint_not_allowed" {
		t.Fatalf("a scoped token's refusal through the SDK: %v", err)
	}
	expired := openai.NewClient(option.WithBaseURL(env.BaseURL+"/v1/"), option.WithMaxRetries(0),
		option.WithAPIKey(idp.token(t, map[string]any{"exp": time.Now().Add(-time.Hour).Unix()})))
	_, err = expired.Chat.Completions.New(ctx, params)
	if !errors.As(err, &apiErr) || apiErr.StatusCode != 401 || apiErr.Code != "token_expired" {
		t.Fatalf("an expired token through the SDK: %v", err)
	}
}
