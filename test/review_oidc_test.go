package test

import (
	"strings"
	"testing"
	"time"

	"github.com/levee-gw/levee/config"
	"github.com/levee-gw/levee/dev"
	"github.com/levee-gw/levee/test/harness"
)

// The README's own grants: Levee.Chat may chat with gpt-4o at priority
// normal at most; Levee.Batch may use jobs, batches and files. A token
// holding both roles gets "the union of the grants": nothing in it lets it
// chat at priority high. Levee merges the grants dimension by dimension,
// and the Batch grant's absent max_priority lifts the Chat grant's cap.
func TestReviewGrantUnionDoesNotLiftAnotherGrantsCap(t *testing.T) {
	idp := newIdP(t)
	f := harness.Fast(dev.DefaultFile())
	is := idp.issuer("acme")
	is.Grants = []config.Grant{
		{Claim: "roles", Value: "Levee.Chat", Models: []string{"gpt-4o"}, Endpoints: []string{"chat"}, MaxPriority: "normal"},
		{Claim: "roles", Value: "Levee.Batch", Endpoints: []string{"jobs", "batches", "files"}},
	}
	f.Auth.OIDC = config.OIDC{Issuers: []config.Issuer{is}}
	env := harness.Start(t, f)
	newTenant(t, env, "acme")

	chatOnly := idp.token(t, map[string]any{"roles": []string{"Levee.Chat"}, "sub": "chat-only"})
	resp, raw := call(t, env.BaseURL, "/v1/chat/completions", chatOnly, chat(5), "X-Levee-Priority", "high")
	wantCode(t, "Levee.Chat alone at high", resp, raw, 403, "priority_not_allowed")

	both := idp.token(t, map[string]any{"roles": []string{"Levee.Chat", "Levee.Batch"}, "sub": "both"})
	resp, raw = call(t, env.BaseURL, "/v1/chat/completions", both, chat(5), "X-Levee-Priority", "high")
	wantCode(t, "Levee.Chat + Levee.Batch at high", resp, raw, 403, "priority_not_allowed")
}

// "A key in use keeps working from that address ... so one address cannot
// lock a tenant out." A token that verified a moment ago is in use just as
// much; yet every token call is charged to the address's failure budget
// before the token cache is looked at, so one client sending bad keys from
// a shared address (a NAT, a load balancer not listed in trusted_proxies)
// locks every token caller behind it out.
func TestReviewTokenInUseIsNotLockedOutByAddressFailures(t *testing.T) {
	idp := newIdP(t)
	f := harness.Fast(dev.DefaultFile())
	f.Auth.OIDC = config.OIDC{Issuers: []config.Issuer{idp.issuer("acme")}}
	f.Auth.FailureRate, f.Auth.FailureBurst = 0.01, 5
	env := harness.Start(t, f)
	newTenant(t, env, "acme")
	key := env.NewKey("acme")

	tok := idp.token(t, nil)
	resp, raw := call(t, env.BaseURL, "/v1/chat/completions", tok, chat(5))
	wantCode(t, "the token, before", resp, raw, 200, "")
	resp, raw = call(t, env.BaseURL, "/v1/chat/completions", key, chat(5))
	wantCode(t, "the key, before", resp, raw, 200, "")

	throttled := false
	for i := 0; i < 20 && !throttled; i++ {
		resp, _ := call(t, env.BaseURL, "/v1/chat/completions", "lv-"+strings.Repeat("x", 40)+string(rune('a'+i)), chat(5))
		throttled = resp.StatusCode == 429
	}
	if !throttled {
		t.Fatal("the address was never throttled: the test proves nothing")
	}
	time.Sleep(100 * time.Millisecond)
	resp, raw = call(t, env.BaseURL, "/v1/chat/completions", key, chat(5))
	wantCode(t, "the key in use, after", resp, raw, 200, "")
	resp, raw = call(t, env.BaseURL, "/v1/chat/completions", tok, chat(5))
	wantCode(t, "the token in use, after", resp, raw, 200, "")
}
