package test

import (
	"encoding/json"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/levee-gw/levee/config"
	"github.com/levee-gw/levee/dev"
	"github.com/levee-gw/levee/sim"
	"github.com/levee-gw/levee/store"
	"github.com/levee-gw/levee/test/harness"
)

// A follow-up that runs as a job (background, POST /v1/jobs, or a deferred
// normal/low call) is estimated by the worker from its body alone: Admit
// re-parses job.Body and ContextTokens (the conversation the deployment
// counts as input) is lost. The synchronous path charges the conversation:
// with a tenant limit of 2,000 tokens a minute, a follow-up of a 3,000-token
// conversation is refused "no wait would help". The same follow-up with
// background: true is estimated at a few tokens, passes the tenant's limit
// (and the deployment's room, and the budget) and runs.
func TestRespReviewQueuedFollowUpsAreEstimatedWithoutTheConversation(t *testing.T) {
	env := harness.Start(t, nil)
	key := env.NewKey("convo")
	resp, raw := call(t, env.BaseURL, "/v1/responses", key, map[string]any{"model": "gpt-4o",
		"input": strings.Repeat("levee ", 1500), "max_output_tokens": 16})
	if resp.StatusCode != 200 {
		t.Fatalf("%d %s", resp.StatusCode, raw)
	}
	var first responseObj
	_ = json.Unmarshal(raw, &first)
	setLimits(t, env, &store.SetLimitsParams{TenantID: tenantOf(t, env, key), TPM: 2000})
	follow := map[string]any{"model": "gpt-4o", "input": "Go on.", "previous_response_id": first.ID, "max_output_tokens": 16}
	resp, raw = call(t, env.BaseURL, "/v1/responses", key, follow)
	if resp.StatusCode != 429 || !strings.Contains(string(raw), "no wait would help") {
		t.Fatalf("the synchronous follow-up of a %d-token conversation under a 2000 TPM limit: %d %s", first.Usage.InputTokens, resp.StatusCode, raw)
	}
	bg := createBackground(t, env.BaseURL, key, follow)
	var st string
	harness.Eventually(t, 20*time.Second, "the background follow-up to end", func() bool {
		st = getResponse(t, env.BaseURL, key, bg.ID).Status
		return st != "queued" && st != "in_progress"
	})
	if st == "completed" || st == "incomplete" {
		_, raw := call(t, env.BaseURL, "/v1/responses/"+bg.ID, key, nil)
		t.Fatalf("the same follow-up in the background ran under the tenant's 2000 TPM limit: %s", raw)
	}
}

// DELETE of a background response deletes Levee's job and answers
// {"deleted":true} whatever the deployment said to its own DELETE. When the
// deployment's DELETE fails, the route is kept (ForgetResponse runs only on
// a 200), so the "deleted" conversation is still stored upstream and still
// continues with previous_response_id.
func TestRespReviewDeletedBackgroundResponseStillContinues(t *testing.T) {
	env := harness.Start(t, nil)
	bg := createBackground(t, env.BaseURL, env.APIKey, map[string]any{"model": "gpt-4o", "input": "Forget me."})
	harness.Eventually(t, 20*time.Second, "the background response to complete", func() bool {
		return getResponse(t, env.BaseURL, env.APIKey, bg.ID).Status == "completed"
	})
	// A gateway whose deployments fail every call (an outage, a timeout).
	down := reviewGateway(t, env, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusServiceUnavailable)
	}), false, nil)
	resp, raw := callAs(t, "DELETE", "http://"+down.Addr+"/v1/responses/"+bg.ID, env.APIKey, nil)
	if resp.StatusCode != 200 {
		t.Skipf("the DELETE was refused (%d %s): the bug is not reached", resp.StatusCode, raw)
	}
	if !strings.Contains(string(raw), `"deleted":true`) {
		t.Fatalf("DELETE: %s", raw)
	}
	resp, raw = call(t, env.BaseURL, "/v1/responses", env.APIKey, map[string]any{"model": "gpt-4o", "input": "Do you remember?",
		"previous_response_id": bg.ID})
	if resp.StatusCode != 404 {
		t.Fatalf("a background response answered deleted:true continues: %d %s", resp.StatusCode, raw)
	}
}

// A follow-up of a background response is sent upstream under the
// deployment's own id (pinResponse rewrites previous_response_id) and the
// rewritten body is what is stored and echoed: the caller's Response says
// previous_response_id is an id it never saw (the deployment's), not the
// resp_lv… it sent — both in the synchronous answer and in a queued
// background follow-up. That id is then useless to it (404).
func TestRespReviewFollowUpOfBackgroundEchoesTheUpstreamID(t *testing.T) {
	env := harness.Start(t, nil)
	bg := createBackground(t, env.BaseURL, env.APIKey, map[string]any{"model": "gpt-4o", "input": "First."})
	harness.Eventually(t, 20*time.Second, "the background response to complete", func() bool {
		return getResponse(t, env.BaseURL, env.APIKey, bg.ID).Status == "completed"
	})
	var got struct {
		PreviousResponseID string `json:"previous_response_id"`
	}
	resp, raw := call(t, env.BaseURL, "/v1/responses", env.APIKey, map[string]any{"model": "gpt-4o", "input": "Second.", "previous_response_id": bg.ID})
	if resp.StatusCode != 200 {
		t.Fatalf("%d %s", resp.StatusCode, raw)
	}
	_ = json.Unmarshal(raw, &got)
	sync := got.PreviousResponseID
	resp, raw = call(t, env.BaseURL, "/v1/responses", env.APIKey, map[string]any{"model": "gpt-4o", "input": "Third.", "previous_response_id": bg.ID,
		"background": true})
	if resp.StatusCode != 200 {
		t.Fatalf("%d %s", resp.StatusCode, raw)
	}
	got.PreviousResponseID = ""
	_ = json.Unmarshal(raw, &got)
	queued := got.PreviousResponseID
	if sync != bg.ID || queued != bg.ID {
		resp, raw := call(t, env.BaseURL, "/v1/responses", env.APIKey, map[string]any{"model": "gpt-4o", "input": "x", "previous_response_id": sync})
		t.Fatalf("follow-ups of %s say previous_response_id %q (synchronous) and %q (background, queued); continuing that id: %d %s",
			bg.ID, sync, queued, resp.StatusCode, raw)
	}
}

// A key scoped to one model continues a conversation stored on another:
// allowModel checks the body's model, then pinResponse swaps the group for
// the deployment that stores previous_response_id (and setModel rewrites
// the body's model to it) without checking the key may use that one. A
// key limited to a cheap model runs the expensive one by continuing any
// response of its tenant (a sibling key's, say).
func TestRespReviewModelScopedKeyContinuesOnAnotherModel(t *testing.T) {
	s := sim.Deployment{CompletionTokens: 10}
	f := &dev.File{
		Deployments: []dev.FileDeployment{
			{Name: "cheap-d", Model: "gpt-4o-mini", Kind: config.Standard, TPM: 1 << 20, RPM: 1 << 20, Sim: s},
			{Name: "big-d", Model: "gpt-4o", Kind: config.Standard, TPM: 1 << 20, RPM: 1 << 20, Sim: s},
		},
		Models: []config.Model{
			{Name: "cheap", Deployments: []string{"cheap-d"}, MaxTokens: 4096},
			{Name: "gpt-4o", Deployments: []string{"big-d"}, MaxTokens: 4096},
		},
	}
	env := harness.Start(t, f)
	newTenant(t, env, "team")
	full := newAPIKey(t, env, "team", map[string]any{})
	scoped := newAPIKey(t, env, "team", map[string]any{"scopes": map[string]any{"models": []string{"cheap"}}})
	resp, raw := call(t, env.BaseURL, "/v1/responses", scoped.Secret, map[string]any{"model": "gpt-4o", "input": "x"})
	wantCode(t, "the scoped key on gpt-4o", resp, raw, 403, "model_not_allowed")
	resp, raw = call(t, env.BaseURL, "/v1/responses", full.Secret, map[string]any{"model": "gpt-4o", "input": "Start."})
	if resp.StatusCode != 200 {
		t.Fatalf("%d %s", resp.StatusCode, raw)
	}
	var first responseObj
	_ = json.Unmarshal(raw, &first)
	resp, raw = call(t, env.BaseURL, "/v1/responses", scoped.Secret, map[string]any{"model": "cheap", "input": "Go on.", "previous_response_id": first.ID})
	if resp.StatusCode == 200 {
		t.Fatalf("a key scoped to cheap was served by %s (%s)", resp.Header.Get("x-levee-deployment"), strings.SplitN(string(raw), `"output"`, 2)[0])
	}
}
