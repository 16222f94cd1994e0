package test

import (
	"bytes"
	"context"
	"encoding/csv"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/levee-gw/levee/dev"
	"github.com/levee-gw/levee/test/harness"
)

// adminCall is call with the admin key and any method.
func adminCall(t *testing.T, env *harness.Env, method, path string, body any, hdr ...string) (*http.Response, []byte) {
	t.Helper()
	return callAs(t, method, env.BaseURL+path, env.Config.Auth.AdminKey, body, hdr...)
}

// callAs sends body (a string or bytes as they are, else as JSON; nil:
// none) with method and key, and returns the response and its body.
func callAs(t testing.TB, method, url, key string, body any, hdr ...string) (*http.Response, []byte) {
	t.Helper()
	var rd io.Reader
	switch b := body.(type) {
	case nil:
	case string:
		rd = strings.NewReader(b)
	case []byte:
		rd = bytes.NewReader(b)
	default:
		raw, _ := json.Marshal(b)
		rd = bytes.NewReader(raw)
	}
	req, err := http.NewRequest(method, url, rd)
	if err != nil {
		t.Fatal(err)
	}
	if rd != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if key != "" {
		req.Header.Set("Authorization", "Bearer "+key)
	}
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp, raw
}

type keyCreated struct {
	ID     string `json:"id"`
	Secret string `json:"secret"`
	Prefix string `json:"prefix"`
}

// newTenant makes a tenant through the admin API and returns its id.
func newTenant(t *testing.T, env *harness.Env, name string) string {
	t.Helper()
	resp, raw := adminCall(t, env, "POST", "/admin/v1/tenants", map[string]any{"name": name})
	if resp.StatusCode != 201 {
		t.Fatalf("create tenant %s: %d %s", name, resp.StatusCode, raw)
	}
	var o struct{ ID string }
	_ = json.Unmarshal(raw, &o)
	return o.ID
}

// newAPIKey makes a key of tenant through the admin API.
func newAPIKey(t *testing.T, env *harness.Env, tenant string, fields map[string]any) keyCreated {
	t.Helper()
	resp, raw := adminCall(t, env, "POST", "/admin/v1/tenants/"+tenant+"/keys", fields)
	if resp.StatusCode != 201 {
		t.Fatalf("create key: %d %s", resp.StatusCode, raw)
	}
	var k keyCreated
	if err := json.Unmarshal(raw, &k); err != nil || k.Secret == "" || k.ID == "" {
		t.Fatalf("create key: %s", raw)
	}
	return k
}

// wantCode checks a response's status and envelope code.
func wantCode(t *testing.T, what string, resp *http.Response, raw []byte, status int, code string) {
	t.Helper()
	if resp.StatusCode != status {
		t.Fatalf("%s: status %d, want %d: %s", what, resp.StatusCode, status, raw)
	}
	if code == "" {
		return
	}
	e := mustEnvelope(t, raw)
	if e.Error.Code == nil || *e.Error.Code != code {
		t.Fatalf("%s: code %v, want %s: %s", what, deref(e.Error.Code), code, raw)
	}
}

func embedding() map[string]any {
	return map[string]any{"model": "text-embedding-3-small", "input": "a"}
}

func modelIDs(t *testing.T, raw []byte) []string {
	t.Helper()
	var l struct{ Data []struct{ ID string } }
	if err := json.Unmarshal(raw, &l); err != nil {
		t.Fatalf("models: %s", raw)
	}
	var ids []string
	for _, m := range l.Data {
		ids = append(ids, m.ID)
	}
	slices.Sort(ids)
	return ids
}

// A key outside its scope gets 403 with a code naming the scope, on every
// route that reaches it; inside, it works; /v1/models lists what it may
// use.
func TestKeyScopesRefuseWithTheirCode(t *testing.T) {
	env := harness.Start(t, nil)
	newTenant(t, env, "scoped")
	embOnly := newAPIKey(t, env, "scoped", map[string]any{"name": "embeddings only", "scopes": map[string]any{"models": []string{"text-embedding-3-small"}}})
	chatOnly := newAPIKey(t, env, "scoped", map[string]any{"scopes": map[string]any{"endpoints": []string{"chat"}}})
	jobsNoChat := newAPIKey(t, env, "scoped", map[string]any{"scopes": map[string]any{"endpoints": []string{"jobs", "embeddings"}}})
	normal := newAPIKey(t, env, "scoped", map[string]any{"default_priority": "high", "scopes": map[string]any{"max_priority": "normal"}})
	lowOnly := newAPIKey(t, env, "scoped", map[string]any{"scopes": map[string]any{"max_priority": "low"}})
	elsewhere := newAPIKey(t, env, "scoped", map[string]any{"scopes": map[string]any{"cidrs": []string{"10.0.0.0/8", "2001:db8::/32"}}})
	here := newAPIKey(t, env, "scoped", map[string]any{"scopes": map[string]any{"cidrs": []string{"127.0.0.0/8"}}})

	cases := []struct {
		name   string
		key    string
		path   string
		body   any
		hdr    []string
		status int
		code   string
	}{
		{"model: chat with an embeddings-only key", embOnly.Secret, "/v1/chat/completions", chat(5), nil, 403, "model_not_allowed"},
		{"model: a deployment of a model it may not use", embOnly.Secret, "/openai/deployments/gpt-4o-ptu/chat/completions?api-version=2024-10-21", chat(5), nil, 403, "model_not_allowed"},
		{"model: a job for a model it may not use", embOnly.Secret, "/v1/jobs", jobBody(5, "normal"), nil, 403, "model_not_allowed"},
		{"model: its own model", embOnly.Secret, "/v1/embeddings", embedding(), nil, 200, ""},
		{"endpoint: embeddings with a chat-only key", chatOnly.Secret, "/v1/embeddings", embedding(), nil, 403, "endpoint_not_allowed"},
		{"endpoint: jobs with a chat-only key", chatOnly.Secret, "/v1/jobs", jobBody(5, "normal"), nil, 403, "endpoint_not_allowed"},
		{"endpoint: files with a chat-only key", chatOnly.Secret, "/v1/files", nil, nil, 403, "endpoint_not_allowed"},
		{"endpoint: usage with a chat-only key", chatOnly.Secret, "/v1/usage", nil, nil, 403, "endpoint_not_allowed"},
		{"endpoint: its own", chatOnly.Secret, "/v1/chat/completions", chat(5), nil, 200, ""},
		{"endpoint: a job carrying a chat call, without chat", jobsNoChat.Secret, "/v1/jobs", jobBody(5, "normal"), nil, 403, "endpoint_not_allowed"},
		{"endpoint: a job carrying an embeddings call", jobsNoChat.Secret, "/v1/jobs",
			map[string]any{"endpoint": "/v1/embeddings", "body": embedding()}, nil, 202, ""},
		{"priority: high asked of a normal key", normal.Secret, "/v1/chat/completions", chat(5), []string{"X-Levee-Priority", "high"}, 403, "priority_not_allowed"},
		{"priority: its default is capped, not refused", normal.Secret, "/v1/chat/completions", chat(5), nil, 200, ""},
		{"priority: normal job of a low key", lowOnly.Secret, "/v1/jobs", jobBody(5, "normal"), nil, 403, "priority_not_allowed"},
		{"priority: low job of a low key", lowOnly.Secret, "/v1/jobs", jobBody(5, "low"), nil, 202, ""},
		{"priority: a low key's job asking for none is low", lowOnly.Secret, "/v1/jobs", map[string]any{"endpoint": "/v1/chat/completions", "body": chat(5)}, nil, 202, ""},
		{"address: from outside its ranges", elsewhere.Secret, "/v1/chat/completions", chat(5), nil, 403, "address_not_allowed"},
		{"address: a forged X-Forwarded-For is not believed", elsewhere.Secret, "/v1/chat/completions", chat(5), []string{"X-Forwarded-For", "10.1.2.3"}, 403, "address_not_allowed"},
		{"address: models too", elsewhere.Secret, "/v1/models", nil, nil, 403, "address_not_allowed"},
		{"address: from inside", here.Secret, "/v1/chat/completions", chat(5), nil, 200, ""},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			var resp *http.Response
			var raw []byte
			if c.body == nil {
				resp, raw = call(t, env.BaseURL, c.path, c.key, nil, c.hdr...)
			} else {
				resp, raw = call(t, env.BaseURL, c.path, c.key, c.body, c.hdr...)
			}
			wantCode(t, c.name, resp, raw, c.status, c.code)
		})
	}

	t.Run("models lists what the key may use", func(t *testing.T) {
		_, raw := call(t, env.BaseURL, "/v1/models", embOnly.Secret, nil)
		if ids := modelIDs(t, raw); !slices.Equal(ids, []string{"text-embedding-3-small"}) {
			t.Fatalf("an embeddings-only key sees %v", ids)
		}
		resp, raw := call(t, env.BaseURL, "/v1/models/gpt-4o", embOnly.Secret, nil)
		wantCode(t, "a model outside its scope", resp, raw, 404, "model_not_found")
		_, raw = call(t, env.BaseURL, "/v1/models", chatOnly.Secret, nil)
		if ids := modelIDs(t, raw); !slices.Equal(ids, []string{"gpt-4o", "text-embedding-3-small"}) {
			t.Fatalf("an unscoped-model key sees %v", ids)
		}
	})

	t.Run("an expired key is 401 api_key_expired", func(t *testing.T) {
		exp := time.Now().Add(2 * time.Second)
		k := newAPIKey(t, env, "scoped", map[string]any{"expires_at": exp.Unix() + 1})
		resp, raw := call(t, env.BaseURL, "/v1/chat/completions", k.Secret, chat(5))
		wantCode(t, "before its expiry", resp, raw, 200, "")
		time.Sleep(time.Until(exp.Add(1500 * time.Millisecond)))
		resp, raw = call(t, env.BaseURL, "/v1/chat/completions", k.Secret, chat(5))
		wantCode(t, "after its expiry", resp, raw, 401, "api_key_expired")
		resp, raw = adminCall(t, env, "POST", "/admin/v1/tenants/scoped/keys", map[string]any{"expires_at": time.Now().Add(-time.Hour).Unix()})
		wantCode(t, "a key made already expired", resp, raw, 400, "invalid_expiry")
	})

	t.Run("a rescoped key is refused at once", func(t *testing.T) {
		resp, raw := call(t, env.BaseURL, "/v1/embeddings", chatOnly.Secret, embedding())
		wantCode(t, "before", resp, raw, 403, "endpoint_not_allowed")
		resp, raw = adminCall(t, env, "POST", "/admin/v1/keys/"+chatOnly.ID, map[string]any{"scopes": map[string]any{"endpoints": []string{"chat", "embeddings"}}})
		wantCode(t, "rescope", resp, raw, 200, "")
		resp, raw = call(t, env.BaseURL, "/v1/embeddings", chatOnly.Secret, embedding())
		wantCode(t, "after", resp, raw, 200, "")
	})

	t.Run("bad scopes are refused when set", func(t *testing.T) {
		for _, c := range []struct {
			body  string
			param string
		}{
			{`{"scopes":{"models":["gpt-5"]}}`, "scopes.models[0]"},
			{`{"scopes":{"endpoints":["admin"]}}`, "scopes.endpoints[0]"},
			{`{"scopes":{"endpoints":["Chat"]}}`, "scopes.endpoints[0]"},
			{`{"scopes":{"max_priority":"urgent"}}`, "scopes.max_priority"},
			{`{"scopes":{"cidrs":["10.0.0.0/33"]}}`, "scopes.cidrs[0]"},
			{`{"scopes":{"cidrs":["example.com"]}}`, "scopes.cidrs[0]"},
			{`{"name":"` + strings.Repeat("x", 200) + `"}`, "name"},
			{`{"expires_at":"tomorrow"}`, "expires_at"},
		} {
			resp, raw := adminCall(t, env, "POST", "/admin/v1/tenants/scoped/keys", c.body)
			e := mustEnvelope(t, raw)
			if resp.StatusCode != 400 || deref(e.Error.Param) != c.param {
				t.Errorf("%s: %d, param %q: %s", c.body, resp.StatusCode, deref(e.Error.Param), raw)
			}
		}
		for _, body := range []string{`{"scopes":{"models":["gpt-4o"]},"Scopes":{}}`, `{"scopes":{"models":["gpt-4o"]},"scopes":{}}`} {
			resp, raw := adminCall(t, env, "POST", "/admin/v1/tenants/scoped/keys", body)
			if resp.StatusCode != 400 {
				t.Errorf("%s: %d %s", body, resp.StatusCode, raw)
			}
		}
	})
}

// Tenant keys are refused on the admin API and admin keys on the tenant
// API; admin keys made over the API work and stop working when revoked.
func TestAdminKeysAndTenantKeysDoNotMix(t *testing.T) {
	env := harness.Start(t, nil)
	for _, c := range []struct{ name, key string }{{"no key", ""}, {"a tenant key", env.APIKey}, {"a made-up admin key", "lva-" + strings.Repeat("a", 43)},
		{"the admin key, one character short", env.Config.Auth.AdminKey[:len(env.Config.Auth.AdminKey)-1]}} {
		resp, raw := callAs(t, "GET", env.BaseURL+"/admin/v1/tenants", c.key, nil)
		wantCode(t, c.name, resp, raw, 401, "invalid_admin_key")
	}
	resp, raw := call(t, env.BaseURL, "/v1/chat/completions", env.Config.Auth.AdminKey, chat(5))
	wantCode(t, "an admin key on the tenant API", resp, raw, 401, "invalid_api_key")

	resp, raw = adminCall(t, env, "POST", "/admin/v1/admin_keys", map[string]any{"name": "ops tooling"})
	wantCode(t, "create an admin key", resp, raw, 201, "")
	var ak struct{ ID, Secret string }
	_ = json.Unmarshal(raw, &ak)
	if !strings.HasPrefix(ak.Secret, "lva-") {
		t.Fatalf("admin key %s", raw)
	}
	resp, raw = callAs(t, "GET", env.BaseURL+"/admin/v1/tenants", ak.Secret, nil)
	wantCode(t, "the new admin key", resp, raw, 200, "")
	resp, raw = callAs(t, "POST", env.BaseURL+"/admin/v1/admin_keys/"+ak.ID+"/revoke", ak.Secret, nil)
	wantCode(t, "revoke itself", resp, raw, 200, "")
	resp, raw = callAs(t, "GET", env.BaseURL+"/admin/v1/tenants", ak.Secret, nil)
	wantCode(t, "the revoked admin key", resp, raw, 401, "invalid_admin_key")

	// The audit log names who did it.
	_, raw = adminCall(t, env, "GET", "/admin/v1/audit?limit=100", nil)
	var log struct {
		Data []auditEntry `json:"data"`
	}
	_ = json.Unmarshal(raw, &log)
	var got []string
	for _, e := range log.Data {
		if e.TargetID == ak.ID {
			got = append(got, e.Action+" by "+e.Actor)
		}
	}
	want := []string{"admin_key.create by admin:bootstrap", "admin_key.revoke by admin:" + ak.ID}
	if !slices.Equal(got, want) {
		t.Fatalf("audit of the admin key: %v, want %v\n%s", got, want, raw)
	}
}

type auditEntry struct {
	Actor      string          `json:"actor"`
	Action     string          `json:"action"`
	TargetType string          `json:"target_type"`
	TargetID   string          `json:"target_id"`
	Before     json.RawMessage `json:"before"`
	After      json.RawMessage `json:"after"`
}

func auditOf(t *testing.T, env *harness.Env, tenant string) []auditEntry {
	t.Helper()
	var all []auditEntry
	after := ""
	for {
		resp, raw := adminCall(t, env, "GET", "/admin/v1/audit?limit=2&tenant="+tenant+after, nil)
		if resp.StatusCode != 200 {
			t.Fatalf("audit: %d %s", resp.StatusCode, raw)
		}
		var page struct {
			Data    []auditEntry `json:"data"`
			HasMore bool         `json:"has_more"`
			LastID  string       `json:"last_id"`
		}
		if err := json.Unmarshal(raw, &page); err != nil {
			t.Fatal(err)
		}
		all = append(all, page.Data...)
		if !page.HasMore {
			return all
		}
		after = "&after=" + page.LastID
	}
}

// The admin API end to end: tenants and keys made, listed in pages, read,
// changed, rotated, revoked and deleted, each change in the audit log with
// what it was before and after.
func TestAdminAPITenantsAndKeys(t *testing.T) {
	env := harness.Start(t, slowFile(50*time.Millisecond, 1<<30))
	tenant := newTenant(t, env, "acme")
	for _, n := range []string{"globex", "initech"} {
		newTenant(t, env, n)
	}
	t.Run("create refuses what it cannot keep", func(t *testing.T) {
		for _, c := range []struct {
			body   string
			status int
			code   string
		}{
			{`{"name":"acme"}`, 409, "tenant_exists"},
			{`{"name":"ACME "}`, 400, "invalid_name"},
			{`{"name":"a/b"}`, 400, "invalid_name"},
			{`{"name":"` + strings.Repeat("n", 65) + `"}`, 400, "invalid_name"},
			{`{"name":"x","name":"y"}`, 400, ""},
			{`{"name":"x","Name":"y"}`, 400, ""},
			{`{"name":"x","default_priority":"urgent"}`, 400, "invalid_priority"},
			{`{"name":"x","limits":[{"tpm":-1}]}`, 400, "invalid_limits"},
			{`{"name":"x"`, 400, ""},
		} {
			resp, raw := adminCall(t, env, "POST", "/admin/v1/tenants", c.body)
			wantCode(t, c.body, resp, raw, c.status, c.code)
		}
	})
	t.Run("list in cursor pages", func(t *testing.T) {
		var names []string
		after := ""
		for pages := 0; ; pages++ {
			_, raw := adminCall(t, env, "GET", "/admin/v1/tenants?limit=2"+after, nil)
			var page struct {
				Data    []struct{ Name string } `json:"data"`
				HasMore bool                    `json:"has_more"`
				LastID  string                  `json:"last_id"`
			}
			_ = json.Unmarshal(raw, &page)
			for _, d := range page.Data {
				names = append(names, d.Name)
			}
			if !page.HasMore {
				break
			}
			if pages > 5 {
				t.Fatal("pages do not end")
			}
			after = "&after=" + page.LastID
		}
		want := []string{"acme", "globex", "initech", dev.DevTenant} // the last is the harness's own
		slices.Sort(want)
		if !slices.Equal(names, want) {
			t.Fatalf("tenants %v", names)
		}
	})
	t.Run("get and update", func(t *testing.T) {
		resp, raw := adminCall(t, env, "POST", "/admin/v1/tenants/acme", map[string]any{"default_priority": "normal",
			"limits": []map[string]any{{"tpm": 10000, "rpm": 100}}, "budget": map[string]any{"tokens": 1000000, "period": "month"}})
		wantCode(t, "update", resp, raw, 200, "")
		_, raw = adminCall(t, env, "GET", "/admin/v1/tenants/"+tenant, nil)
		var o struct {
			DefaultPriority string `json:"default_priority"`
			Limits          []struct{ TPM, RPM int64 }
			Budget          struct {
				Tokens int64
				Period string
			}
		}
		_ = json.Unmarshal(raw, &o)
		if o.DefaultPriority != "normal" || len(o.Limits) != 1 || o.Limits[0].TPM != 10000 || o.Budget.Tokens != 1000000 {
			t.Fatalf("after update: %s", raw)
		}
		resp, raw = adminCall(t, env, "GET", "/admin/v1/tenants/nobody", nil)
		wantCode(t, "an unknown tenant", resp, raw, 404, "tenant_not_found")
		resp, raw = adminCall(t, env, "GET", "/admin/v1/tenants/"+uuid.NewString(), nil)
		wantCode(t, "an unknown tenant id", resp, raw, 404, "tenant_not_found")
	})

	var keys []keyCreated
	t.Run("keys", func(t *testing.T) {
		for i := 0; i < 3; i++ {
			keys = append(keys, newAPIKey(t, env, "acme", map[string]any{"name": fmt.Sprintf("k%d", i)}))
		}
		globexKey := newAPIKey(t, env, "globex", nil)
		// The secret is shown once.
		_, raw := adminCall(t, env, "GET", "/admin/v1/keys/"+keys[0].ID, nil)
		if bytes.Contains(raw, []byte(keys[0].Secret)) || bytes.Contains(raw, []byte(`"secret"`)) {
			t.Fatalf("a key read back shows its secret: %s", raw)
		}
		// Used, then listed in pages with when it was last used (recorded
		// in the background, not on the call).
		resp, _ := call(t, env.BaseURL, "/v1/chat/completions", keys[0].Secret, chat(5))
		if resp.StatusCode != 200 {
			t.Fatal(resp.Status)
		}
		var listed []map[string]any
		after := ""
		for {
			_, raw := adminCall(t, env, "GET", "/admin/v1/tenants/acme/keys?limit=2"+after, nil)
			var page struct {
				Data    []map[string]any `json:"data"`
				HasMore bool             `json:"has_more"`
				LastID  string           `json:"last_id"`
			}
			_ = json.Unmarshal(raw, &page)
			listed = append(listed, page.Data...)
			if !page.HasMore {
				break
			}
			after = "&after=" + page.LastID
		}
		if len(listed) != 3 {
			t.Fatalf("acme lists %d keys", len(listed))
		}
		for _, k := range listed {
			if k["tenant"] != "acme" || k["id"] == globexKey.ID || k["prefix"] == "" || k["secret"] != nil {
				t.Fatalf("listed %v", k)
			}
		}
		resp, raw = adminCall(t, env, "GET", "/admin/v1/keys/not-a-uuid", nil)
		wantCode(t, "a malformed key id", resp, raw, 404, "key_not_found")
	})

	t.Run("rotate and revoke", func(t *testing.T) {
		resp, raw := adminCall(t, env, "POST", "/admin/v1/keys/"+keys[1].ID+"/rotate", map[string]any{"grace_seconds": 0})
		wantCode(t, "rotate", resp, raw, 200, "")
		var rotated keyCreated
		_ = json.Unmarshal(raw, &rotated)
		if rotated.Secret == "" || rotated.Secret == keys[1].Secret || rotated.ID != keys[1].ID {
			t.Fatalf("rotated %s", raw)
		}
		resp, raw = call(t, env.BaseURL, "/v1/chat/completions", keys[1].Secret, chat(5))
		wantCode(t, "the old secret, no grace", resp, raw, 401, "invalid_api_key")
		resp, raw = call(t, env.BaseURL, "/v1/chat/completions", rotated.Secret, chat(5))
		wantCode(t, "the new secret", resp, raw, 200, "")
		resp, raw = adminCall(t, env, "POST", "/admin/v1/keys/"+keys[1].ID+"/rotate", map[string]any{"grace_seconds": 31 * 24 * 3600})
		wantCode(t, "a grace beyond 30 days", resp, raw, 400, "invalid_grace")

		resp, raw = adminCall(t, env, "POST", "/admin/v1/keys/"+keys[2].ID+"/revoke", nil)
		wantCode(t, "revoke", resp, raw, 200, "")
		resp, raw = call(t, env.BaseURL, "/v1/chat/completions", keys[2].Secret, chat(5))
		wantCode(t, "a revoked key", resp, raw, 401, "invalid_api_key")
		resp, raw = adminCall(t, env, "POST", "/admin/v1/keys/"+keys[2].ID+"/rotate", nil)
		wantCode(t, "rotating a revoked key", resp, raw, 409, "key_revoked")
	})

	t.Run("delete waits for queued work unless forced", func(t *testing.T) {
		// Slow calls: the job is still queued or running when deleted.
		var ids []string
		for i := 0; i < 4; i++ {
			resp, j := submit(t, env, keys[0].Secret, jobBody(200, "low"))
			if resp.StatusCode != 202 {
				t.Fatal(resp.Status)
			}
			ids = append(ids, j.ID)
		}
		resp, raw := adminCall(t, env, "DELETE", "/admin/v1/tenants/acme", nil)
		wantCode(t, "delete with work", resp, raw, 409, "tenant_has_work")
		resp, raw = adminCall(t, env, "DELETE", "/admin/v1/tenants/acme?force=true", nil)
		wantCode(t, "forced delete", resp, raw, 200, "")
		resp, raw = call(t, env.BaseURL, "/v1/chat/completions", keys[0].Secret, chat(5))
		wantCode(t, "a deleted tenant's key", resp, raw, 401, "invalid_api_key")
		for _, id := range ids {
			var status string
			if err := env.Store.Pool().QueryRow(context.Background(), `SELECT status FROM jobs WHERE id = $1`, strings.TrimPrefix(id, "job_")).Scan(&status); err != nil {
				t.Fatal(err)
			}
			if status != "cancelled" && status != "succeeded" {
				t.Fatalf("job %s of a deleted tenant is %s", id, status)
			}
		}
		resp, raw = adminCall(t, env, "GET", "/admin/v1/tenants/acme", nil)
		wantCode(t, "a deleted tenant", resp, raw, 404, "tenant_not_found")
		resp, raw = adminCall(t, env, "POST", "/admin/v1/tenants", map[string]any{"name": "acme"})
		wantCode(t, "a deleted tenant's name", resp, raw, 409, "tenant_exists")
	})

	t.Run("every change is in the audit log", func(t *testing.T) {
		entries := auditOf(t, env, tenant)
		var got []string
		for _, e := range entries {
			got = append(got, e.Action)
			if e.Actor != "admin:bootstrap" {
				t.Errorf("%s by %q", e.Action, e.Actor)
			}
		}
		want := []string{"tenant.create", "tenant.update", "limits.set", "budget.set", "key.create", "key.create", "key.create",
			"key.rotate", "key.revoke", "tenant.delete"}
		if !slices.Equal(got, want) {
			t.Fatalf("audit:\n got %v\nwant %v", got, want)
		}
		for _, e := range entries {
			switch e.Action {
			case "tenant.update":
				if !bytes.Contains(e.Before, []byte(`"high"`)) || !bytes.Contains(e.After, []byte(`"normal"`)) {
					t.Errorf("tenant.update before %s after %s", e.Before, e.After)
				}
			case "key.revoke":
				if bytes.Contains(e.Before, []byte(`"revoked_at":"`)) || !bytes.Contains(e.After, []byte(`"revoked_at":"`)) {
					t.Errorf("key.revoke before %s after %s", e.Before, e.After)
				}
			}
			for _, k := range keys {
				if bytes.Contains(e.After, []byte(k.Secret)) || bytes.Contains(e.Before, []byte(k.Secret)) {
					t.Errorf("a secret in the audit log: %s", e.Action)
				}
			}
		}
	})
}

// The usage export, CSV and JSON, matches the ledger (usage_events) row for
// row, grouped by tenant, key, model and deployment.
func TestUsageExportMatchesTheLedger(t *testing.T) {
	f := harness.Fast(dev.DefaultFile())
	f.Pricing = *priced()
	env := harness.Start(t, f)
	var secrets []string
	for _, n := range []string{"red", "blue"} {
		newTenant(t, env, n)
		for i := 0; i < 2; i++ {
			secrets = append(secrets, newAPIKey(t, env, n, nil).Secret)
		}
	}
	for i := 0; i < 40; i++ {
		key := secrets[i%len(secrets)]
		body := any(chat(5 + i))
		path := "/v1/chat/completions"
		if i%5 == 0 {
			path, body = "/v1/embeddings", embedding()
		}
		call(t, env.BaseURL, path, key, body)
	}
	env.FlushUsage()

	rows, err := env.Store.Pool().Query(context.Background(), `
		SELECT e.tenant_id::text, t.name, coalesce(e.key_id::text, ''), coalesce(k.name, ''), coalesce(k.prefix, ''), e.model, e.deployment,
			count(*), count(*) FILTER (WHERE e.status >= 400 OR e.status = 0), sum(e.prompt_tokens), sum(e.completion_tokens),
			sum(e.prompt_tokens + e.completion_tokens), sum(e.cost_nanos)
		FROM usage_events e JOIN tenants t ON t.id = e.tenant_id LEFT JOIN api_keys k ON k.id = e.key_id
		GROUP BY 1, 2, 3, 4, 5, 6, 7 ORDER BY 1, 3, 6, 7`)
	if err != nil {
		t.Fatal(err)
	}
	var want [][]string
	for rows.Next() {
		var s [7]string
		var n [6]int64
		if err := rows.Scan(&s[0], &s[1], &s[2], &s[3], &s[4], &s[5], &s[6], &n[0], &n[1], &n[2], &n[3], &n[4], &n[5]); err != nil {
			t.Fatal(err)
		}
		line := s[:]
		for _, v := range n[:5] {
			line = append(line, strconv.FormatInt(v, 10))
		}
		want = append(want, append(line, moneyString(n[5])))
	}
	if rows.Err() != nil {
		t.Fatal(rows.Err())
	}
	if len(want) < 8 {
		t.Fatalf("only %d groups in the ledger: the test proves little", len(want))
	}

	today := time.Now().UTC().Format(time.DateOnly)
	q := "/admin/v1/usage?group_by=tenant,key,model,deployment&start_date=" + today + "&end_date=" + today
	resp, raw := adminCall(t, env, "GET", q, nil, "Accept", "text/csv")
	if resp.StatusCode != 200 || !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/csv") {
		t.Fatalf("csv: %d %s %s", resp.StatusCode, resp.Header.Get("Content-Type"), raw)
	}
	got, err := csv.NewReader(bytes.NewReader(raw)).ReadAll()
	if err != nil {
		t.Fatal(err)
	}
	header := []string{"tenant_id", "tenant", "key_id", "key_name", "key_prefix", "model", "deployment", "requests", "errors",
		"prompt_tokens", "completion_tokens", "total_tokens", "cost"}
	if !slices.Equal(got[0], header) {
		t.Fatalf("csv header %v", got[0])
	}
	if len(got)-1 != len(want) {
		t.Fatalf("csv has %d rows, the ledger %d groups:\n%s", len(got)-1, len(want), raw)
	}
	for i := range want {
		if !slices.Equal(got[i+1], want[i]) {
			t.Fatalf("row %d:\n csv    %v\n ledger %v", i, got[i+1], want[i])
		}
	}

	resp, raw = adminCall(t, env, "GET", q, nil)
	var j struct {
		Currency string           `json:"currency"`
		Data     []map[string]any `json:"data"`
	}
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.UseNumber()
	if err := dec.Decode(&j); err != nil || resp.StatusCode != 200 {
		t.Fatalf("json: %d %v %s", resp.StatusCode, err, raw)
	}
	if len(j.Data) != len(want) || j.Currency != "USD" {
		t.Fatalf("json has %d rows (%s), the ledger %d groups", len(j.Data), j.Currency, len(want))
	}
	for i := range want {
		for c, col := range header {
			if v := fmt.Sprint(j.Data[i][col]); v != want[i][c] {
				t.Fatalf("json row %d %s = %s, ledger %s", i, col, v, want[i][c])
			}
		}
	}

	// Another window holds nothing; bad parameters are named.
	_, raw = adminCall(t, env, "GET", "/admin/v1/usage?group_by=tenant&start_date=2020-01-01&end_date=2020-01-31", nil, "Accept", "text/csv")
	if n := bytes.Count(raw, []byte("\n")); n != 1 {
		t.Fatalf("an empty window has %d lines: %s", n, raw)
	}
	for _, bad := range []struct{ q, param string }{{"group_by=tenant,colour", "group_by"}, {"start_date=yesterday", "start_date"},
		{"start_date=2026-02-01&end_date=2026-01-01", "end_date"}} {
		resp, raw := adminCall(t, env, "GET", "/admin/v1/usage?"+bad.q, nil)
		if e := mustEnvelope(t, raw); resp.StatusCode != 400 || deref(e.Error.Param) != bad.param {
			t.Errorf("%s: %d %s", bad.q, resp.StatusCode, raw)
		}
	}
	// The CLI writes the same rows.
	p := harness.Spawn(t, []string{"DATABASE_URL=" + env.DatabaseURL}, "usage", "export", "--group-by", "tenant,key,model,deployment",
		"--start-date", today, "--end-date", today, "--csv")
	if err := p.Cmd.Wait(); err != nil {
		t.Fatalf("levee usage export: %v\n%s", err, p.Output())
	}
	cli, err := csv.NewReader(strings.NewReader(p.Output())).ReadAll()
	if err != nil || len(cli) != len(got) {
		t.Fatalf("levee usage export --csv: %v, %d lines:\n%s", err, len(cli), p.Output())
	}
	for i := range got {
		if !slices.Equal(cli[i], got[i]) {
			t.Fatalf("CLI row %d %v, API %v", i, cli[i], got[i])
		}
	}
}

// A key revoked through one process's admin API, or with the CLI (which
// has no NATS), is refused by another process within 5 s, however recently
// it was used there; a rotated key's old secret works there until its grace
// ends.
func TestKeyChangesReachEveryProcess(t *testing.T) {
	if testing.Short() {
		t.Skip("runs levee processes")
	}
	env := harness.Start(t, nil)
	newTenant(t, env, "fleet")
	other := gatewayProcesses(t, env, 1, "worker: {enabled: false}\n")[0]
	byAPI := newAPIKey(t, env, "fleet", nil)
	byCLI := newAPIKey(t, env, "fleet", nil)
	rotated := newAPIKey(t, env, "fleet", nil)

	until := func(what, key string, status int) time.Duration {
		t.Helper()
		start := time.Now()
		harness.Eventually(t, 5*time.Second, what, func() bool {
			resp, _ := call(t, other, "/v1/models", key, nil)
			return resp.StatusCode == status
		})
		return time.Since(start)
	}
	for _, k := range []keyCreated{byAPI, byCLI, rotated} {
		until("the key to work on the other process", k.Secret, 200) // cached there now
	}

	resp, raw := adminCall(t, env, "POST", "/admin/v1/keys/"+byAPI.ID+"/revoke", nil)
	wantCode(t, "revoke", resp, raw, 200, "")
	d := until("the other process to refuse a key revoked over the admin API", byAPI.Secret, 401)
	t.Logf("revoked over the admin API: refused by the other process after %v", d.Round(time.Millisecond))

	p := harness.Spawn(t, []string{"DATABASE_URL=" + env.DatabaseURL}, "key", "revoke", byCLI.ID)
	if err := p.Cmd.Wait(); err != nil {
		t.Fatalf("levee key revoke: %v\n%s", err, p.Output())
	}
	d = until("the other process to refuse a key revoked with the CLI", byCLI.Secret, 401)
	t.Logf("revoked with the CLI: refused by the other process after %v", d.Round(time.Millisecond))

	const grace = 3 * time.Second
	resp, raw = adminCall(t, env, "POST", "/admin/v1/keys/"+rotated.ID+"/rotate", map[string]any{"grace_seconds": int(grace / time.Second)})
	wantCode(t, "rotate", resp, raw, 200, "")
	rotatedAt := time.Now()
	var fresh keyCreated
	_ = json.Unmarshal(raw, &fresh)
	for _, base := range []string{env.BaseURL, other} {
		if resp, _ := call(t, base, "/v1/models", fresh.Secret, nil); resp.StatusCode != 200 {
			t.Fatalf("the new secret on %s: %d", base, resp.StatusCode)
		}
		if resp, _ := call(t, base, "/v1/models", rotated.Secret, nil); resp.StatusCode != 200 && time.Since(rotatedAt) < grace {
			t.Fatalf("the old secret within its grace on %s: %d", base, resp.StatusCode)
		}
	}
	time.Sleep(time.Until(rotatedAt.Add(grace)))
	for _, base := range []string{env.BaseURL, other} {
		start := time.Now()
		harness.Eventually(t, 5*time.Second, "the old secret to stop working after its grace", func() bool {
			resp, _ := call(t, base, "/v1/models", rotated.Secret, nil)
			return resp.StatusCode == 401
		})
		t.Logf("%s refused the old secret %v after its grace ended", base, time.Since(start).Round(time.Millisecond))
		if resp, _ := call(t, base, "/v1/models", fresh.Secret, nil); resp.StatusCode != 200 {
			t.Fatalf("the new secret after the grace: %d", resp.StatusCode)
		}
	}
}
