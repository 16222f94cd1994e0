package test

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/option"
	"github.com/openai/openai-go/v3/responses"
	"github.com/openai/openai-go/v3/webhooks"

	"github.com/levee-gw/levee/config"
	"github.com/levee-gw/levee/dev"
	"github.com/levee-gw/levee/sim"
	"github.com/levee-gw/levee/store"
	"github.com/levee-gw/levee/test/harness"
)

// The official openai-go SDK's Responses API through Levee: create (plain
// and streamed), a follow-up with previous_response_id, retrieve, input
// items, delete; and what the ledger recorded.
func TestResponsesWithOpenAIGoSDK(t *testing.T) {
	env := harness.Start(t, nil)
	ctx := context.Background()
	c := openai.NewClient(option.WithBaseURL(env.BaseURL+"/v1/"), option.WithAPIKey(env.APIKey), option.WithMaxRetries(0))
	var served *http.Response
	first, err := c.Responses.New(ctx, responses.ResponseNewParams{Model: "gpt-4o", Instructions: openai.String("Be brief."),
		Input: responses.ResponseNewParamsInputUnion{OfString: openai.String("Say hello to the levee.")}}, option.WithResponseInto(&served))
	if err != nil {
		t.Fatal(err)
	}
	if first.Status != "completed" || first.OutputText() == "" || first.Usage.InputTokens == 0 || first.Usage.OutputTokens == 0 ||
		!strings.HasPrefix(first.ID, "resp_") {
		t.Fatalf("response %+v", first)
	}
	home := served.Header.Get("x-levee-deployment")

	// Streamed: every event, in order, ending with response.completed.
	st := c.Responses.NewStreaming(ctx, responses.ResponseNewParams{Model: "gpt-4o",
		Input: responses.ResponseNewParamsInputUnion{OfString: openai.String("Say hello to the levee.")}})
	var seq []int64
	var text strings.Builder
	var done *responses.Response
	for st.Next() {
		ev := st.Current()
		seq = append(seq, ev.SequenceNumber)
		switch ev.Type {
		case "response.output_text.delta":
			text.WriteString(ev.Delta)
		case "response.completed":
			r := ev.Response
			done = &r
		}
	}
	if err := st.Err(); err != nil {
		t.Fatal(err)
	}
	for i, n := range seq {
		if n != int64(i) {
			t.Fatalf("sequence numbers %v", seq)
		}
	}
	if done == nil || done.OutputText() != text.String() || done.Usage.TotalTokens == 0 {
		t.Fatalf("stream ended with %+v after %q", done, text.String())
	}

	// A follow-up goes where the first response is stored (the other
	// deployment would not know it), however the router would pick.
	for i := 0; i < 6; i++ {
		var r *http.Response
		next, err := c.Responses.New(ctx, responses.ResponseNewParams{Model: "gpt-4o", PreviousResponseID: openai.String(first.ID),
			Input: responses.ResponseNewParamsInputUnion{OfString: openai.String("And again.")}}, option.WithResponseInto(&r))
		if err != nil {
			t.Fatalf("follow-up %d: %v", i, err)
		}
		if d := r.Header.Get("x-levee-deployment"); d != home || next.PreviousResponseID != first.ID {
			t.Fatalf("follow-up %d served by %s, the first by %s", i, d, home)
		}
		// The conversation is carried: the deployment counts it as input.
		if next.Usage.InputTokens <= first.Usage.InputTokens {
			t.Fatalf("follow-up input %d, first %d", next.Usage.InputTokens, first.Usage.InputTokens)
		}
	}

	got, err := c.Responses.Get(ctx, first.ID, responses.ResponseGetParams{})
	if err != nil || got.ID != first.ID || got.OutputText() != first.OutputText() {
		t.Fatalf("retrieve: %v %+v", err, got)
	}
	items, err := c.Responses.InputItems.List(ctx, first.ID, responses.InputItemListParams{})
	if err != nil || len(items.Data) != 1 {
		t.Fatalf("input items: %v %+v", err, items)
	}
	if err := c.Responses.Delete(ctx, first.ID); err != nil {
		t.Fatal(err)
	}
	_, err = c.Responses.Get(ctx, first.ID, responses.ResponseGetParams{})
	var apiErr *openai.Error
	if !errors.As(err, &apiErr) || apiErr.StatusCode != 404 {
		t.Fatalf("a deleted response: %v", err)
	}
	_, err = c.Responses.New(ctx, responses.ResponseNewParams{Model: "gpt-4o", PreviousResponseID: openai.String(first.ID),
		Input: responses.ResponseNewParamsInputUnion{OfString: openai.String("Still there?")}})
	if !errors.As(err, &apiErr) || apiErr.StatusCode != 404 || apiErr.Code != "previous_response_not_found" {
		t.Fatalf("a follow-up of a deleted response: %v", err)
	}

	// The ledger has each call's true usage.
	env.FlushUsage()
	var rows, in, out int64
	if err := env.Store.Pool().QueryRow(ctx, `SELECT count(*), coalesce(sum(prompt_tokens), 0), coalesce(sum(completion_tokens), 0)
		FROM usage_events WHERE operation = 'responses' AND status = 200`).Scan(&rows, &in, &out); err != nil {
		t.Fatal(err)
	}
	if rows != 8 || in == 0 || out == 0 {
		t.Fatalf("ledger: %d responses, %d in, %d out", rows, in, out)
	}
}

// twoResources serves gpt-4o from two deployments, each its own resource
// (its own stored responses); the router prefers b 100 to 1.
func twoResources(tpmA int) *dev.File {
	s := sim.Deployment{CompletionTokens: 20}
	return &dev.File{
		Deployments: []dev.FileDeployment{
			{Name: "res-a", Model: "gpt-4o", Kind: config.Standard, TPM: tpmA, RPM: 1 << 20, Weight: 1, Sim: s},
			{Name: "res-b", Model: "gpt-4o", Kind: config.Standard, TPM: 1 << 30, RPM: 1 << 30, Weight: 100, Sim: s},
		},
		Models: []config.Model{{Name: "gpt-4o", Deployments: []string{"res-a", "res-b"}, MaxTokens: 4096}},
	}
}

type responseObj struct {
	ID     string `json:"id"`
	Status string `json:"status"`
	Usage  struct {
		InputTokens int `json:"input_tokens"`
	} `json:"usage"`
}

// A follow-up reaches the deployment that stores the conversation even
// when another has far more room; when its own has none, a high-priority
// follow-up gets a 429, and nothing is sent elsewhere to fail.
func TestResponseFollowUpsStayWithTheirDeployment(t *testing.T) {
	env := harness.Start(t, twoResources(4000))
	resp, raw := call(t, env.BaseURL, "/v1/responses", env.APIKey, map[string]any{"model": "res-a", "input": "Start here.", "max_output_tokens": 50})
	if resp.StatusCode != 200 {
		t.Fatalf("%d %s", resp.StatusCode, raw)
	}
	var prev responseObj
	_ = json.Unmarshal(raw, &prev)
	for i := 0; i < 10; i++ {
		resp, raw := call(t, env.BaseURL, "/v1/responses", env.APIKey, map[string]any{"model": "gpt-4o", "input": "Go on.",
			"previous_response_id": prev.ID, "max_output_tokens": 50})
		if resp.StatusCode != 200 || resp.Header.Get("x-levee-deployment") != "res-a" {
			t.Fatalf("follow-up %d: %d from %s: %s", i, resp.StatusCode, resp.Header.Get("x-levee-deployment"), raw)
		}
		_ = json.Unmarshal(raw, &prev)
	}
	if b := env.Sim.Stats()["res-b"]; b.Calls != 0 {
		t.Fatalf("res-b saw %d calls of a conversation stored on res-a", b.Calls)
	}
	a := env.Sim.Stats()["res-a"]
	// res-a's minute holds the conversation; a turn larger than its room
	// is refused by Levee, not sent to res-b (nor to res-a to be refused).
	resp, raw = call(t, env.BaseURL, "/v1/responses", env.APIKey, map[string]any{"model": "gpt-4o", "input": "Tell me everything.",
		"previous_response_id": prev.ID, "max_output_tokens": 4000 - int(a.WindowTokens) + 100})
	wantCode(t, "a follow-up without room on its deployment", resp, raw, 429, "rate_limit_exceeded")
	if resp.Header.Get("Retry-After") == "" {
		t.Fatal("no Retry-After")
	}
	if b := env.Sim.Stats()["res-b"]; b.Calls != 0 {
		t.Fatal("the follow-up went to res-b")
	}
	if a2 := env.Sim.Stats()["res-a"]; a2.Calls != a.Calls {
		t.Fatalf("res-a was sent a call it had no room for (%d calls, then %d)", a.Calls, a2.Calls)
	}
	// Levee's estimate carried the conversation: the deployment charged
	// what Levee did, so it never refused a turn.
	if a.Refused != 0 {
		t.Fatalf("res-a refused %d turns", a.Refused)
	}
}

// Another tenant's response ids do not exist for a caller; bad bodies get
// their param.
func TestResponsesRefuseWhatTheyShould(t *testing.T) {
	env := harness.Start(t, nil)
	resp, raw := call(t, env.BaseURL, "/v1/responses", env.APIKey, map[string]any{"model": "gpt-4o", "input": "Mine."})
	if resp.StatusCode != 200 {
		t.Fatalf("%d %s", resp.StatusCode, raw)
	}
	var mine responseObj
	_ = json.Unmarshal(raw, &mine)
	other := env.NewKey("other")
	for _, c := range []struct {
		name, method, path string
		body               any
		status             int
		code               string
	}{
		{"another tenant's response", "GET", "/v1/responses/" + mine.ID, nil, 404, "response_not_found"},
		{"another tenant's input items", "GET", "/v1/responses/" + mine.ID + "/input_items", nil, 404, "response_not_found"},
		{"deleting another tenant's response", "DELETE", "/v1/responses/" + mine.ID, nil, 404, "response_not_found"},
		{"continuing another tenant's response", "POST", "/v1/responses", map[string]any{"model": "gpt-4o", "input": "x", "previous_response_id": mine.ID}, 404, "previous_response_not_found"},
		{"an id that is not one", "GET", "/v1/responses/resp_..%2f..%2fadmin", nil, 404, ""},
	} {
		resp, raw := callAs(t, c.method, env.BaseURL+c.path, other, c.body)
		wantCode(t, c.name, resp, raw, c.status, c.code)
	}
	// Still there for its owner.
	resp, raw = callAs(t, "GET", env.BaseURL+"/v1/responses/"+mine.ID, env.APIKey, nil)
	wantCode(t, "the owner reads it", resp, raw, 200, "")

	for _, c := range []struct{ body, param string }{
		{`{"model":"gpt-4o","input":"x","max_output_tokens":100000}`, "max_output_tokens"},
		{`{"model":"gpt-4o","input":"x","max_output_tokens":4}`, "max_output_tokens"},
		{`{"model":"gpt-4o","input":"x","Input":"y"}`, "Input"},
		{`{"model":"gpt-4o","input":"x","model":"gpt-4o"}`, "model"},
		{`{"model":"gpt-4o"}`, "input"},
		{`{"model":"gpt-4o","input":[{"role":"user","content":[{"type":"input_text","TEXT":"x"}]}]}`, "input[0].content[0].TEXT"},
		{`{"model":"gpt-4o","input":"x","previous_response_id":"../admin"}`, "previous_response_id"},
	} {
		resp, raw := call(t, env.BaseURL, "/v1/responses", env.APIKey, c.body)
		e := mustEnvelope(t, raw)
		if resp.StatusCode != 400 || deref(e.Error.Param) != c.param {
			t.Errorf("%s: %d param %q: %s", c.body, resp.StatusCode, deref(e.Error.Param), raw)
		}
	}
	// Azure's surfaces.
	for _, p := range []string{"/openai/v1/responses", "/openai/responses?api-version=2025-04-01-preview"} {
		resp, raw := call(t, env.BaseURL, p, env.APIKey, map[string]any{"model": "gpt-4o", "input": "Azure."}, "api-key", env.APIKey)
		wantCode(t, p, resp, raw, 200, "")
	}
	// A key scoped away from responses.
	newTenant(t, env, "scoped")
	k := newAPIKey(t, env, "scoped", map[string]any{"scopes": map[string]any{"endpoints": []string{"chat"}}})
	resp, raw = call(t, env.BaseURL, "/v1/responses", k.Secret, map[string]any{"model": "gpt-4o", "input": "x"})
	wantCode(t, "a chat-only key", resp, raw, 403, "endpoint_not_allowed")
}

// A normal-priority response waits as a deferred job, and its follow-up
// still finds the deployment that stores it.
func TestDeferredResponseIsRecordedForFollowUps(t *testing.T) {
	env := harness.Start(t, nil)
	resp, raw := call(t, env.BaseURL, "/v1/responses", env.APIKey, map[string]any{"model": "gpt-4o", "input": "Later is fine."},
		"X-Levee-Priority", "normal", "Prefer", "wait=30")
	if resp.StatusCode != 200 || resp.Header.Get("x-levee-job") == "" {
		t.Fatalf("deferred: %d %s", resp.StatusCode, raw)
	}
	var first responseObj
	_ = json.Unmarshal(raw, &first)
	resp, raw = call(t, env.BaseURL, "/v1/responses", env.APIKey, map[string]any{"model": "gpt-4o", "input": "And now?",
		"previous_response_id": first.ID}, "X-Levee-Priority", "normal", "Prefer", "wait=30")
	if resp.StatusCode != 200 {
		t.Fatalf("deferred follow-up: %d %s", resp.StatusCode, raw)
	}
}

// Background responses through openai-go: created queued with Levee's id,
// polled until completed, continued with a follow-up (sent to the
// deployment under its own id), input items, a webhook the SDK's Unwrap
// verifies, cancelled while queued (never sent), deleted.
func TestBackgroundResponses(t *testing.T) {
	f := fastWebhooks()
	f.Worker = config.Worker{Concurrency: 4}
	env := harness.Start(t, f)
	ctx := context.Background()
	c := openai.NewClient(option.WithBaseURL(env.BaseURL+"/v1/"), option.WithAPIKey(env.APIKey), option.WithMaxRetries(0))

	var mu sync.Mutex
	var events []webhooks.UnwrapWebhookEventUnion
	var secret string
	hook := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		mu.Lock()
		defer mu.Unlock()
		ev, err := c.Webhooks.Unwrap(body, r.Header, option.WithWebhookSecret(secret))
		if err != nil {
			t.Errorf("unwrap: %v", err)
			w.WriteHeader(400)
			return
		}
		events = append(events, *ev)
		w.WriteHeader(204)
	}))
	defer hook.Close()
	_, sec := createEndpoint(t, env, hook.URL, "response.completed", "response.cancelled")
	mu.Lock()
	secret = sec
	mu.Unlock()

	bg, err := c.Responses.New(ctx, responses.ResponseNewParams{Model: "gpt-4o", Background: openai.Bool(true),
		Input: responses.ResponseNewParamsInputUnion{OfString: openai.String("Take your time.")}})
	if err != nil {
		t.Fatal(err)
	}
	if bg.Status != "queued" && bg.Status != "in_progress" || !bg.Background || !strings.HasPrefix(bg.ID, "resp_lv") {
		t.Fatalf("created %+v", bg)
	}
	var done *responses.Response
	harness.Eventually(t, 30*time.Second, "the background response to complete", func() bool {
		r, err := c.Responses.Get(ctx, bg.ID, responses.ResponseGetParams{})
		if err != nil {
			t.Fatal(err)
		}
		done = r
		return r.Status == "completed"
	})
	if done.ID != bg.ID || done.OutputText() == "" || done.Usage.TotalTokens == 0 || !done.Background {
		t.Fatalf("completed %+v", done)
	}
	items, err := c.Responses.InputItems.List(ctx, bg.ID, responses.InputItemListParams{})
	if err != nil || len(items.Data) != 1 {
		t.Fatalf("input items: %v %+v", err, items)
	}
	next, err := c.Responses.New(ctx, responses.ResponseNewParams{Model: "gpt-4o", PreviousResponseID: openai.String(bg.ID),
		Input: responses.ResponseNewParamsInputUnion{OfString: openai.String("Now, quickly.")}})
	if err != nil || next.Usage.InputTokens <= done.Usage.InputTokens {
		t.Fatalf("a follow-up of a background response: %v %+v", err, next)
	}

	// Cancelled while queued: the deployments never see it. The tenant's
	// one request a minute is spent, so the job waits in the queue.
	setLimits(t, env, &store.SetLimitsParams{TenantID: tenantOf(t, env, env.APIKey), RPM: 1})
	if resp, raw := call(t, env.BaseURL, "/v1/chat/completions", env.APIKey, chat(5)); resp.StatusCode != 200 {
		t.Fatalf("%d %s", resp.StatusCode, raw)
	}
	calls := simTotal(env, func(s sim.Stats) int64 { return s.Calls })
	queued, err := c.Responses.New(ctx, responses.ResponseNewParams{Model: "gpt-4o", Background: openai.Bool(true),
		Input: responses.ResponseNewParamsInputUnion{OfString: openai.String("Never mind.")}})
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(300 * time.Millisecond) // a worker has looked at it
	cancelled, err := c.Responses.Cancel(ctx, queued.ID)
	if err != nil || cancelled.Status != "cancelled" {
		t.Fatalf("cancel: %v %+v", err, cancelled)
	}
	if now := simTotal(env, func(s sim.Stats) int64 { return s.Calls }); now != calls {
		t.Fatalf("a response cancelled while queued reached a deployment (%d calls, then %d)", calls, now)
	}
	again, err := c.Responses.Cancel(ctx, queued.ID)
	if err != nil || again.Status != "cancelled" {
		t.Fatalf("cancelling again: %v %+v", err, again)
	}
	setLimits(t, env, &store.SetLimitsParams{TenantID: tenantOf(t, env, env.APIKey)})

	harness.Eventually(t, 20*time.Second, "response.completed and response.cancelled webhooks", func() bool {
		mu.Lock()
		defer mu.Unlock()
		seen := map[string]string{}
		for _, e := range events {
			seen[e.Type] = e.Data.ID
		}
		return seen["response.completed"] == bg.ID && seen["response.cancelled"] == queued.ID
	})

	if err := c.Responses.Delete(ctx, bg.ID); err != nil {
		t.Fatal(err)
	}
	_, err = c.Responses.Get(ctx, bg.ID, responses.ResponseGetParams{})
	var apiErr *openai.Error
	if !errors.As(err, &apiErr) || apiErr.StatusCode != 404 {
		t.Fatalf("a deleted background response: %v", err)
	}
	// Another tenant cannot see, cancel or continue one.
	other := env.NewKey("other")
	for _, p := range []struct{ method, path string }{{"GET", "/v1/responses/" + queued.ID}, {"POST", "/v1/responses/" + queued.ID + "/cancel"}} {
		resp, raw := callAs(t, p.method, env.BaseURL+p.path, other, nil)
		wantCode(t, p.method+" "+p.path, resp, raw, 404, "response_not_found")
	}
}

func createBackground(t *testing.T, base, key string, body map[string]any) responseObj {
	t.Helper()
	body["background"] = true
	resp, raw := call(t, base, "/v1/responses", key, body)
	var o responseObj
	if resp.StatusCode != 200 || json.Unmarshal(raw, &o) != nil || o.Status != "queued" {
		t.Fatalf("background create: %d %s", resp.StatusCode, raw)
	}
	return o
}

func getResponse(t *testing.T, base, key, id string) responseObj {
	t.Helper()
	resp, raw := call(t, base, "/v1/responses/"+id, key, nil)
	var o responseObj
	if resp.StatusCode != 200 || json.Unmarshal(raw, &o) != nil {
		t.Fatalf("get %s: %d %s", id, resp.StatusCode, raw)
	}
	return o
}

// A background response submitted when high-priority traffic has taken the
// deployment's whole minute waits in the queue, and completes once the
// minute has room, without the deployment refusing one call.
func TestBackgroundResponseWaitsBehindAFullMinute(t *testing.T) {
	if testing.Short() {
		t.Skip("waits out a minute")
	}
	f := &dev.File{
		Deployments: []dev.FileDeployment{{Name: "d", Model: "gpt-4o", Kind: config.Standard, TPM: 6000, RPM: 1 << 20, SyncReserve: 0.2,
			Sim: sim.Deployment{CompletionTokens: 10}}},
		Models: []config.Model{{Name: "gpt-4o", Deployments: []string{"d"}, MaxTokens: 4096}},
	}
	env := harness.Start(t, f)
	served := 0
	for {
		resp, raw := call(t, env.BaseURL, "/v1/chat/completions", env.APIKey, chat(500))
		if resp.StatusCode == 429 {
			break
		}
		if resp.StatusCode != 200 {
			t.Fatalf("%d %s", resp.StatusCode, raw)
		}
		served++
	}
	start := time.Now()
	bg := createBackground(t, env.BaseURL, env.APIKey, map[string]any{"model": "gpt-4o", "input": "When there is room.", "max_output_tokens": 500})
	time.Sleep(2 * time.Second)
	if o := getResponse(t, env.BaseURL, env.APIKey, bg.ID); o.Status != "queued" {
		t.Fatalf("with the minute full the background response is %s", o.Status)
	}
	harness.Eventually(t, 90*time.Second, "the background response to complete", func() bool {
		return getResponse(t, env.BaseURL, env.APIKey, bg.ID).Status == "completed"
	})
	t.Logf("%d high-priority calls took the minute; the background response waited %v and completed", served, time.Since(start).Round(time.Second))
	if st := env.Sim.Stats()["d"]; st.Refused != 0 {
		t.Fatalf("the deployment refused %d calls", st.Refused)
	}
}

// Workers killed (SIGKILL) while background responses are in flight: each
// still completes, once: one result, one usage row, one route.
func TestKilledWorkerMidResponseCompletesOnce(t *testing.T) {
	if testing.Short() {
		t.Skip("runs levee processes")
	}
	f := &dev.File{
		Deployments: []dev.FileDeployment{{Name: "d", Model: "gpt-4o", Kind: config.Standard, TPM: 1 << 30, RPM: 1 << 30,
			Sim: sim.Deployment{TTFT: 50 * time.Millisecond, PerToken: 60 * time.Millisecond, CompletionTokens: 20}}},
		Models: []config.Model{{Name: "gpt-4o", Deployments: []string{"d"}, MaxTokens: 4096}},
	}
	env := harness.StartWith(t, f, dev.StackOptions{NoWorkers: true})
	cfgPath, penv := processConfig(t, env, "127.0.0.1:0", "queue: {ack_wait: 2s}\nworker: {concurrency: 16}\n")
	var ids []string
	for i := 0; i < 8; i++ {
		ids = append(ids, createBackground(t, env.BaseURL, env.APIKey, map[string]any{"model": "gpt-4o", "input": "Slowly " + strings.Repeat("x", i)}).ID)
	}
	worker := harness.Spawn(t, penv, "worker", "--config", cfgPath, "--metrics", "")
	harness.Eventually(t, 20*time.Second, "responses in flight", func() bool {
		var n int
		_ = env.Store.Pool().QueryRow(context.Background(), `SELECT count(*) FROM jobs WHERE status = 'running'`).Scan(&n)
		return n >= 4
	})
	time.Sleep(300 * time.Millisecond) // mid-generation
	worker.Kill()
	var succeeded int
	_ = env.Store.Pool().QueryRow(context.Background(), `SELECT count(*) FROM jobs WHERE status = 'succeeded'`).Scan(&succeeded)
	if succeeded == len(ids) {
		t.Fatal("every response ended before the kill: the test proves nothing")
	}
	harness.Spawn(t, penv, "worker", "--config", cfgPath, "--metrics", "")
	for _, id := range ids {
		harness.Eventually(t, 60*time.Second, id+" to complete", func() bool {
			return getResponse(t, env.BaseURL, env.APIKey, id).Status == "completed"
		})
	}
	ctx := context.Background()
	var rows, distinct, routes int
	_ = env.Store.Pool().QueryRow(ctx, `SELECT count(*), count(DISTINCT request_id) FROM usage_events WHERE request_id LIKE 'job_%'`).Scan(&rows, &distinct)
	_ = env.Store.Pool().QueryRow(ctx, `SELECT count(*) FROM response_routes WHERE id LIKE 'resp_lv%'`).Scan(&routes)
	if rows != len(ids) || distinct != len(ids) || routes != len(ids) {
		t.Fatalf("%d usage rows (%d distinct) and %d routes for %d responses", rows, distinct, routes, len(ids))
	}
	t.Logf("killed with %d of %d done; the simulator admitted %d calls for them", succeeded, len(ids), env.Sim.Stats()["d"].Admitted)
}

// A streamed background response: the client follows it live, drops the
// connection midway and picks it up again from the last event it saw
// (openai-go's GetStreaming with starting_after); every event arrives once,
// in order, and the text is whole.
func TestBackgroundStreamResumes(t *testing.T) {
	f := harness.Fast(dev.DefaultFile())
	for i := range f.Deployments {
		f.Deployments[i].Sim.PerToken = 20 * time.Millisecond
		f.Deployments[i].Sim.CompletionTokens = 30
	}
	env := harness.Start(t, f)
	c := openai.NewClient(option.WithBaseURL(env.BaseURL+"/v1/"), option.WithAPIKey(env.APIKey), option.WithMaxRetries(0))
	ctx, cancel := context.WithCancel(context.Background())
	st := c.Responses.NewStreaming(ctx, responses.ResponseNewParams{Model: "gpt-4o", Background: openai.Bool(true),
		Input: responses.ResponseNewParamsInputUnion{OfString: openai.String("Tell me slowly.")}})
	var seqs []int64
	var text strings.Builder
	var id string
	for st.Next() {
		ev := st.Current()
		seqs = append(seqs, ev.SequenceNumber)
		if ev.Type == "response.created" {
			id = ev.Response.ID
			if ev.Response.Status != "queued" || !ev.Response.Background {
				t.Fatalf("created: status %s, background %v", ev.Response.Status, ev.Response.Background)
			}
		}
		if ev.Type == "response.output_text.delta" {
			text.WriteString(ev.Delta)
			if strings.Count(text.String(), " ") >= 5 {
				break // the connection drops midway
			}
		}
	}
	cancel()
	_ = st.Close()
	if !strings.HasPrefix(id, "resp_lv") || len(seqs) < 4 {
		t.Fatalf("first part: id %q, %d events", id, len(seqs))
	}
	last := seqs[len(seqs)-1]
	st = c.Responses.GetStreaming(context.Background(), id, responses.ResponseGetParams{StartingAfter: openai.Int(last)})
	var final *responses.Response
	for st.Next() {
		ev := st.Current()
		seqs = append(seqs, ev.SequenceNumber)
		if ev.Type == "response.output_text.delta" {
			text.WriteString(ev.Delta)
		}
		if ev.Type == "response.completed" {
			r := ev.Response
			final = &r
		}
	}
	if err := st.Err(); err != nil {
		t.Fatal(err)
	}
	for i, n := range seqs {
		if n != int64(i) {
			t.Fatalf("sequence numbers across the reconnect: %v", seqs)
		}
	}
	if final == nil || final.ID != id || final.OutputText() != text.String() || final.Usage.TotalTokens == 0 {
		t.Fatalf("resumed to %+v; text %q", final, text.String())
	}
	// Read again from the start, after it ended: the whole stream is kept.
	resp, raw := callAs(t, "GET", env.BaseURL+"/v1/responses/"+id+"?stream=true", env.APIKey, nil)
	if resp.StatusCode != 200 || strings.Count(string(raw), "event: ") != len(seqs) {
		t.Fatalf("replay: %d, %d events of %d", resp.StatusCode, strings.Count(string(raw), "event: "), len(seqs))
	}
	// The job ends just after its last event is stored, which a follower
	// may read first.
	harness.Eventually(t, 5*time.Second, "the response to read completed after its stream", func() bool {
		return getResponse(t, env.BaseURL, env.APIKey, id).Status == "completed"
	})
}
