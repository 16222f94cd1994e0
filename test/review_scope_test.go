package test

import (
	"testing"

	"github.com/levee-gw/levee/config"
	"github.com/levee-gw/levee/dev"
	"github.com/levee-gw/levee/test/harness"
)

// Two aliases share a deployment: gpt-4o (max_tokens 4096) and
// gpt-4o-small (max_tokens 100). A key scoped to gpt-4o-small names the
// shared deployment directly: allowModel lets it through (the deployment
// serves gpt-4o-small), but Resolve polices the call with the first alias
// that has the deployment, gpt-4o, so the key escapes its own alias's
// policy.
func TestReviewScopedKeyKeepsItsAliasPolicyWhenNamingADeployment(t *testing.T) {
	f := harness.Fast(dev.DefaultFile())
	f.Models = []config.Model{
		{Name: "gpt-4o", Deployments: []string{"gpt-4o-ptu", "gpt-4o-standard"}, MaxTokens: 4096, MaxN: 4},
		{Name: "gpt-4o-small", Deployments: []string{"gpt-4o-ptu"}, MaxTokens: 100},
		{Name: "text-embedding-3-small", Deployments: []string{"text-embedding-3-small"}},
	}
	env := harness.Start(t, f)
	newTenant(t, env, "small")
	k := newAPIKey(t, env, "small", map[string]any{"scopes": map[string]any{"models": []string{"gpt-4o-small"}}})

	big := func(model string) map[string]any {
		return map[string]any{"model": model, "max_tokens": 2000, "messages": []map[string]string{{"role": "user", "content": "hi"}}}
	}
	resp, raw := call(t, env.BaseURL, "/v1/chat/completions", k.Secret, big("gpt-4o"))
	wantCode(t, "the other alias", resp, raw, 403, "model_not_allowed")
	resp, raw = call(t, env.BaseURL, "/v1/chat/completions", k.Secret, big("gpt-4o-small"))
	wantCode(t, "its alias, above its max_tokens", resp, raw, 400, "")
	resp, raw = call(t, env.BaseURL, "/v1/chat/completions", k.Secret, big("gpt-4o-ptu"))
	if resp.StatusCode == 200 {
		t.Fatalf("a key scoped to gpt-4o-small got max_tokens 2000 by naming the deployment gpt-4o-ptu: %d %.120s", resp.StatusCode, raw)
	}
	resp, raw = call(t, env.BaseURL, "/openai/deployments/gpt-4o-ptu/chat/completions?api-version=2024-10-21", k.Secret, big("x"))
	if resp.StatusCode == 200 {
		t.Fatalf("the same through the Azure path: %d %.120s", resp.StatusCode, raw)
	}
}
