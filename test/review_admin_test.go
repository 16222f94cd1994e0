package test

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/levee-gw/levee/test/harness"
)

// grace_seconds is bounded to 30 days; a value whose nanoseconds overflow
// int64 must be refused as out of range, not wrapped into the range.
func TestReviewRotateGraceOverflowIsRefused(t *testing.T) {
	env := harness.Start(t, nil)
	newTenant(t, env, "grace")
	k := newAPIKey(t, env, "grace", nil)
	// 18446744074 s = 2^64 ns + 0.29 s: wraps to 0.29 s; 9223372037 wraps negative.
	for _, g := range []string{"18446744074", "9223372037", "9223372036854775807"} {
		resp, raw := adminCall(t, env, "POST", "/admin/v1/keys/"+k.ID+"/rotate", `{"grace_seconds":`+g+`}`)
		if resp.StatusCode != 400 {
			t.Errorf("grace_seconds %s: %d %s (want 400 invalid_grace)", g, resp.StatusCode, raw)
		}
	}
}

// A key whose expires_at Postgres cannot hold must be refused with 400, and
// a key must never be stored with an expiry other than the one asked for.
func TestReviewExpiresAtOutOfRange(t *testing.T) {
	env := harness.Start(t, nil)
	newTenant(t, env, "exp")
	for _, v := range []string{"10000000000000", "100000000000000", "1000000000000000", "9000000000000000", "20000000000000000", "9223372036854775807", "9223372036854775000"} {
		resp, raw := adminCall(t, env, "POST", "/admin/v1/tenants/exp/keys", `{"expires_at":`+v+`}`)
		switch resp.StatusCode {
		case 400:
			continue
		case 201:
			var o struct {
				ExpiresAt *int64 `json:"expires_at"`
			}
			_ = json.Unmarshal(raw, &o)
			if o.ExpiresAt == nil || jsonInt(*o.ExpiresAt) != v {
				t.Errorf("expires_at %s was answered 201 and stored as %s", v, func() string {
					if o.ExpiresAt == nil {
						return "null"
					}
					return jsonInt(*o.ExpiresAt)
				}())
			}
		default:
			t.Errorf("expires_at %s: %d %s (want 400 invalid_expiry)", v, resp.StatusCode, raw)
		}
	}
}

func jsonInt(v int64) string { b, _ := json.Marshal(v); return string(b) }

// "409 key_revoked: changing a revoked key" — also when the change is only
// to its limits or budget.
func TestReviewQuotaChangeOfARevokedKeyIsRefused(t *testing.T) {
	env := harness.Start(t, nil)
	newTenant(t, env, "rq")
	k := newAPIKey(t, env, "rq", nil)
	resp, raw := adminCall(t, env, "POST", "/admin/v1/keys/"+k.ID+"/revoke", nil)
	wantCode(t, "revoke", resp, raw, 200, "")
	resp, raw = adminCall(t, env, "POST", "/admin/v1/keys/"+k.ID, map[string]any{"limits": []map[string]any{{"tpm": 1000}}})
	wantCode(t, "limits on a revoked key", resp, raw, 409, "key_revoked")
	resp, raw = adminCall(t, env, "POST", "/admin/v1/keys/"+k.ID, map[string]any{"budget": map[string]any{"tokens": 1000, "period": "day"}})
	wantCode(t, "a budget on a revoked key", resp, raw, 409, "key_revoked")
}

// A tenant deleted while one of its clients is still sending a job's body:
// the job must not be accepted and run for a tenant that no longer exists
// (no keys, no limits, no budget).
func TestReviewTenantDeleteRacingJobSubmit(t *testing.T) {
	env := harness.Start(t, nil)
	tenant := newTenant(t, env, "racer")
	k := newAPIKey(t, env, "racer", nil)

	body, _ := json.Marshal(jobBody(5, "low"))
	pr, pw := io.Pipe()
	req, _ := http.NewRequest("POST", env.BaseURL+"/v1/jobs", pr)
	req.ContentLength = int64(len(body))
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Authorization", "Bearer "+k.Secret)
	type result struct {
		status int
		raw    []byte
		err    error
	}
	done := make(chan result, 1)
	go func() {
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			done <- result{err: err}
			return
		}
		defer resp.Body.Close()
		raw, _ := io.ReadAll(resp.Body)
		done <- result{status: resp.StatusCode, raw: raw}
	}()
	if _, err := pw.Write(body[:10]); err != nil {
		t.Fatal(err)
	}
	time.Sleep(500 * time.Millisecond) // the key has been checked; the body is on its way

	resp, raw := adminCall(t, env, "DELETE", "/admin/v1/tenants/racer", nil)
	wantCode(t, "delete (no work yet)", resp, raw, 200, "")

	if _, err := pw.Write(body[10:]); err != nil {
		t.Fatal(err)
	}
	_ = pw.Close()
	r := <-done
	if r.err != nil {
		t.Fatal(r.err)
	}
	if r.status != 202 {
		return // refused: fine
	}
	time.Sleep(3 * time.Second)
	rows, err := env.Store.Pool().Query(context.Background(), `SELECT status FROM jobs WHERE tenant_id = $1`, tenant)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	for rows.Next() {
		var st string
		_ = rows.Scan(&st)
		if st != "cancelled" && st != "failed" {
			t.Fatalf("a job submitted as its tenant was deleted was accepted (%d %s) and is %s", r.status, bytes.TrimSpace(r.raw), st)
		}
	}
}

// Tenant names may have the shape of a UUID (the README's token mapping
// without a tenants map makes a client id such as azp the tenant's name),
// but /admin/v1/tenants/{id or name} reads anything uuid.Parse accepts as
// an id: such a tenant cannot be addressed by its name, and a name equal
// to another tenant's id addresses that other tenant.
func TestReviewUUIDShapedTenantNameAddressesAnotherTenant(t *testing.T) {
	env := harness.Start(t, nil)
	victim := newTenant(t, env, "victim")
	for _, name := range []string{victim, strings.ReplaceAll(victim, "-", ""), "6e74172b-be56-4843-9ff4-e66a39bb12e3"} {
		resp, raw := adminCall(t, env, "POST", "/admin/v1/tenants", map[string]any{"name": name})
		if resp.StatusCode == 400 {
			continue // refused as ambiguous: fine
		}
		wantCode(t, "create "+name, resp, raw, 201, "")
		resp, raw = adminCall(t, env, "GET", "/admin/v1/tenants/"+name, nil)
		var o struct{ Name string }
		_ = json.Unmarshal(raw, &o)
		if resp.StatusCode != 200 || o.Name != name {
			t.Errorf("GET /admin/v1/tenants/%s (a tenant of that name exists): %d, tenant %q", name, resp.StatusCode, o.Name)
		}
	}
}
