package test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/levee-gw/levee/config"
	"github.com/levee-gw/levee/dev"
	"github.com/levee-gw/levee/sim"
	"github.com/levee-gw/levee/test/harness"
)

func TestMain(m *testing.M) { harness.Main(m) }

// call posts body to path with the key in the header named by how.
func call(t testing.TB, base, path, key string, body any, hdr ...string) (*http.Response, []byte) {
	t.Helper()
	method := http.MethodPost
	if body == nil {
		method = http.MethodGet
	}
	return callAs(t, method, base+path, key, body, hdr...)
}

func chat(maxTokens int) map[string]any {
	return map[string]any{"model": "gpt-4o", "max_tokens": maxTokens,
		"messages": []map[string]string{{"role": "user", "content": "Say hello to the levee."}}}
}

type envelope struct {
	Error struct {
		Message string  `json:"message"`
		Type    string  `json:"type"`
		Param   *string `json:"param"`
		Code    *string `json:"code"`
	} `json:"error"`
}

// simTotal sums one of the simulator's counters over its deployments.
func simTotal(env *harness.Env, field func(sim.Stats) int64) int64 {
	var n int64
	for _, st := range env.Sim.Stats() {
		n += field(st)
	}
	return n
}

func mustEnvelope(t *testing.T, raw []byte) envelope {
	t.Helper()
	var e envelope
	if err := json.Unmarshal(raw, &e); err != nil || e.Error.Message == "" || e.Error.Type == "" {
		t.Fatalf("not an OpenAI error envelope: %s", raw)
	}
	return e
}

func TestChatCompletionsEveryPath(t *testing.T) {
	env := harness.Start(t, nil)
	key := env.APIKey
	body := chat(20)
	for _, tc := range []struct {
		name, path string
		hdr        []string
		body       any
	}{
		{"openai", "/v1/chat/completions", nil, body},
		{"azure classic with api-key", "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21", []string{"api-key", key, "Authorization", ""}, body},
		{"azure v1", "/openai/v1/chat/completions", nil, body},
		{"pinned deployment", "/openai/deployments/gpt-4o-standard/chat/completions?api-version=2024-10-21", nil, body},
	} {
		t.Run(tc.name, func(t *testing.T) {
			k := key
			if tc.hdr != nil {
				k = ""
			}
			resp, raw := call(t, env.BaseURL, tc.path, k, tc.body, tc.hdr...)
			if resp.StatusCode != 200 {
				t.Fatalf("status %d: %s", resp.StatusCode, raw)
			}
			var out struct {
				Object  string `json:"object"`
				Choices []struct {
					Message struct{ Content string } `json:"message"`
				} `json:"choices"`
				Usage struct {
					PromptTokens, CompletionTokens int
				} `json:"usage"`
			}
			if err := json.Unmarshal(raw, &out); err != nil || out.Object != "chat.completion" || len(out.Choices) != 1 || out.Choices[0].Message.Content == "" {
				t.Fatalf("bad completion: %s", raw)
			}
			if resp.Header.Get("x-request-id") == "" || resp.Header.Get("x-levee-deployment") == "" {
				t.Fatalf("missing Levee headers: %v", resp.Header)
			}
			if tc.name == "pinned deployment" && resp.Header.Get("x-levee-deployment") != "gpt-4o-standard" {
				t.Fatalf("pinned call went to %s", resp.Header.Get("x-levee-deployment"))
			}
		})
	}
}

func TestCredentialsNeverCross(t *testing.T) {
	env := harness.Start(t, nil)
	resp, raw := call(t, env.BaseURL, "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21", env.APIKey, chat(5),
		"api-key", env.APIKey, "Cookie", "session=secret")
	if resp.StatusCode != 200 {
		t.Fatalf("status %d: %s", resp.StatusCode, raw)
	}
	simKey := env.Config.Deployments[0].Credential
	dep := resp.Header.Get("x-levee-deployment")
	seen := env.Sim.Seen(dep)
	if len(seen) == 0 {
		t.Fatal("simulator saw no call")
	}
	for _, h := range seen {
		for name, vs := range h {
			for _, v := range vs {
				if strings.Contains(v, env.APIKey) {
					t.Fatalf("client key reached upstream in %s", name)
				}
			}
		}
		if h.Get("Cookie") != "" {
			t.Fatal("cookie reached upstream")
		}
		if h.Get("api-key") != simKey {
			t.Fatal("upstream credential not added")
		}
	}
	for name, vs := range resp.Header {
		for _, v := range vs {
			if strings.Contains(v, simKey) {
				t.Fatalf("upstream key leaked to client in header %s", name)
			}
		}
		if strings.HasPrefix(strings.ToLower(name), "x-ratelimit-") {
			t.Fatalf("deployment rate-limit header %s passed to client", name)
		}
	}
	if bytes.Contains(raw, []byte(simKey)) {
		t.Fatal("upstream key leaked to client in body")
	}
}

// readSSE returns the data payloads of a stream.
func readSSE(t *testing.T, r io.Reader) []string {
	t.Helper()
	var out []string
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		if d, ok := strings.CutPrefix(sc.Text(), "data: "); ok {
			out = append(out, d)
		}
	}
	return out
}

func stream(t *testing.T, env *harness.Env, includeUsage bool) []string {
	t.Helper()
	body := chat(12)
	body["stream"] = true
	if includeUsage {
		body["stream_options"] = map[string]bool{"include_usage": true}
	}
	raw, _ := json.Marshal(body)
	req, _ := http.NewRequest(http.MethodPost, env.BaseURL+"/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21", bytes.NewReader(raw))
	req.Header.Set("api-key", env.APIKey)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 || !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/event-stream") {
		b, _ := io.ReadAll(resp.Body)
		t.Fatalf("status %d %s: %s", resp.StatusCode, resp.Header.Get("Content-Type"), b)
	}
	return readSSE(t, resp.Body)
}

func TestStreamingUsage(t *testing.T) {
	env := harness.Start(t, nil)
	t.Run("client asked for usage", func(t *testing.T) {
		events := stream(t, env, true)
		if events[len(events)-1] != "[DONE]" {
			t.Fatalf("stream did not end with [DONE]: %v", events)
		}
		usage := events[len(events)-2]
		if !strings.Contains(usage, `"prompt_tokens"`) || !strings.Contains(usage, `"choices":[]`) {
			t.Fatalf("usage chunk missing: %s", usage)
		}
	})
	t.Run("client did not ask", func(t *testing.T) {
		events := stream(t, env, false)
		for _, e := range events {
			if strings.Contains(e, `"prompt_tokens"`) {
				t.Fatalf("usage chunk passed to a client that did not ask: %s", e)
			}
		}
		if events[len(events)-1] != "[DONE]" || len(events) < 5 {
			t.Fatalf("stream incomplete: %v", events)
		}
		// Levee asked upstream for usage anyway, so the ledger has real counts.
		env.FlushUsage()
		var prompt, completion int64
		err := env.Store.Pool().QueryRow(context.Background(),
			`SELECT prompt_tokens, completion_tokens FROM usage_events WHERE status = 200 ORDER BY created_at DESC LIMIT 1`).Scan(&prompt, &completion)
		if err != nil || prompt == 0 || completion == 0 {
			t.Fatalf("streamed usage not recorded: %d/%d %v", prompt, completion, err)
		}
	})
}

func TestStreamPassesThroughChunkByChunk(t *testing.T) {
	f := dev.DefaultFile()
	for i := range f.Deployments {
		f.Deployments[i].Sim = sim.Deployment{PerToken: 40 * time.Millisecond}
	}
	env := harness.Start(t, f)
	body := chat(10)
	body["stream"] = true
	raw, _ := json.Marshal(body)
	req, _ := http.NewRequest(http.MethodPost, env.BaseURL+"/v1/chat/completions", bytes.NewReader(raw))
	req.Header.Set("Authorization", "Bearer "+env.APIKey)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	// With 40 ms between tokens upstream, a buffering proxy would deliver
	// everything at once; a streaming one delivers events spread over time.
	sc := bufio.NewScanner(resp.Body)
	var arrivals []time.Time
	for sc.Scan() {
		if strings.HasPrefix(sc.Text(), "data: ") {
			arrivals = append(arrivals, time.Now())
		}
	}
	if len(arrivals) < 5 {
		t.Fatalf("only %d events", len(arrivals))
	}
	if spread := arrivals[len(arrivals)-1].Sub(arrivals[0]); spread < 150*time.Millisecond {
		t.Fatalf("events arrived within %v: the stream was buffered", spread)
	}
}

func TestClientDisconnectCancelsUpstream(t *testing.T) {
	f := dev.DefaultFile()
	for i := range f.Deployments {
		f.Deployments[i].Sim = sim.Deployment{PerToken: 50 * time.Millisecond, CompletionTokens: 200}
	}
	env := harness.Start(t, f)
	body := chat(400)
	body["stream"] = true
	raw, _ := json.Marshal(body)
	ctx, cancel := context.WithCancel(context.Background())
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, env.BaseURL+"/v1/chat/completions", bytes.NewReader(raw))
	req.Header.Set("Authorization", "Bearer "+env.APIKey)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(resp.Body)
	if _, err := br.ReadString('\n'); err != nil {
		t.Fatal(err)
	}
	cancel()
	resp.Body.Close()
	harness.Eventually(t, 5*time.Second, "the simulator to see the call cancelled", func() bool {
		return simTotal(env, func(s sim.Stats) int64 { return s.Cancelled }) == 1
	})
}

func TestEmbeddings(t *testing.T) {
	env := harness.Start(t, nil)
	for _, input := range []any{"one text", []string{"a", "b", "c"}} {
		resp, raw := call(t, env.BaseURL, "/v1/embeddings", env.APIKey, map[string]any{"model": "text-embedding-3-small", "input": input})
		if resp.StatusCode != 200 {
			t.Fatalf("status %d: %s", resp.StatusCode, raw)
		}
		var out struct {
			Data []struct{ Embedding []float64 } `json:"data"`
		}
		want := 1
		if s, ok := input.([]string); ok {
			want = len(s)
		}
		if json.Unmarshal(raw, &out) != nil || len(out.Data) != want || len(out.Data[0].Embedding) == 0 {
			t.Fatalf("bad embeddings: %s", raw)
		}
	}
}

func TestBadInputGetsItsStatusAndEnvelope(t *testing.T) {
	f := harness.Fast(dev.DefaultFile())
	// A deployment too small for a large request, to exercise 429.
	f.Deployments = append(f.Deployments, dev.FileDeployment{Name: "tiny", Model: "tiny-model", TPM: 1000, Kind: config.Standard})
	f.Models = append(f.Models, config.Model{Name: "tiny", Deployments: []string{"tiny"}, MaxTokens: 900})
	env := harness.Start(t, f)
	k := env.APIKey
	big := strings.Repeat("x", int(env.Config.MaxBodyBytes)+10)
	for _, tc := range []struct {
		name   string
		path   string
		key    string
		body   any
		hdr    []string
		status int
		param  string
		code   string
	}{
		{"no key", "/v1/chat/completions", "", chat(5), nil, 401, "", "invalid_api_key"},
		{"unknown key", "/v1/chat/completions", "lv-not-a-key-at-all-000000", chat(5), nil, 401, "", "invalid_api_key"},
		{"unknown deployment", "/openai/deployments/nope/chat/completions?api-version=2024-10-21", k, chat(5), nil, 404, "", "DeploymentNotFound"},
		{"unknown model", "/v1/chat/completions", k, map[string]any{"model": "gpt-9", "messages": []map[string]string{{"role": "user", "content": "x"}}}, nil, 404, "model", "model_not_found"},
		{"missing model", "/v1/chat/completions", k, map[string]any{"messages": []map[string]string{{"role": "user", "content": "x"}}}, nil, 400, "model", "missing_model"},
		{"malformed JSON", "/v1/chat/completions", k, `{"model":"gpt-4o",`, nil, 400, "", "invalid_request"},
		{"no messages", "/v1/chat/completions", k, map[string]any{"model": "gpt-4o"}, nil, 400, "messages", "invalid_request"},
		{"max_tokens above ceiling", "/v1/chat/completions", k, chat(5000), nil, 400, "max_tokens", "invalid_request"},
		{"max_completion_tokens above ceiling", "/v1/chat/completions", k, map[string]any{"model": "gpt-4o", "max_completion_tokens": 9000, "messages": []map[string]string{{"role": "user", "content": "x"}}}, nil, 400, "max_completion_tokens", "invalid_request"},
		{"n above policy", "/v1/chat/completions", k, map[string]any{"model": "gpt-4o", "n": 9, "max_tokens": 5, "messages": []map[string]string{{"role": "user", "content": "x"}}}, nil, 400, "n", "invalid_request"},
		{"best_of above policy", "/v1/completions", k, map[string]any{"model": "gpt-4o", "best_of": 3, "max_tokens": 5, "prompt": "x"}, nil, 400, "best_of", "invalid_request"},
		{"negative max_tokens", "/v1/chat/completions", k, chat(-1), nil, 400, "max_tokens", "invalid_request"},
		{"body over limit", "/v1/chat/completions", k, big, nil, 413, "", "request_too_large"},
		{"bad priority", "/v1/chat/completions", k, chat(5), []string{"X-Levee-Priority", "urgent"}, 400, "X-Levee-Priority", "invalid_priority"},
		{"unknown route", "/v1/nothing-here", k, chat(5), nil, 404, "", "unknown_url"},
		{"wrong method", "/v1/chat/completions", k, nil, nil, 405, "", "method_not_allowed"},
		{"bad usage date", "/v1/usage?start_date=yesterday", k, nil, nil, 400, "start_date", "invalid_date"},
		{"estimate above every TPM", "/v1/chat/completions", k, map[string]any{"model": "tiny", "max_tokens": 900, "n": 1, "messages": []map[string]string{{"role": "user", "content": strings.Repeat("word ", 200)}}}, nil, 400, "max_tokens", "request_too_large"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			resp, raw := call(t, env.BaseURL, tc.path, tc.key, tc.body, tc.hdr...)
			if resp.StatusCode != tc.status {
				t.Fatalf("status %d, want %d: %s", resp.StatusCode, tc.status, raw)
			}
			e := mustEnvelope(t, raw)
			if got := deref(e.Error.Param); got != tc.param {
				t.Errorf("param %q, want %q", got, tc.param)
			}
			if got := deref(e.Error.Code); got != tc.code {
				t.Errorf("code %q, want %q", got, tc.code)
			}
		})
	}
	t.Run("no deployment has room: 429 with Retry-After", func(t *testing.T) {
		body := map[string]any{"model": "tiny", "max_tokens": 600, "messages": []map[string]string{{"role": "user", "content": "x"}}}
		resp, raw := call(t, env.BaseURL, "/v1/chat/completions", k, body)
		if resp.StatusCode != 200 {
			t.Fatalf("first call: %d %s", resp.StatusCode, raw)
		}
		resp, raw = call(t, env.BaseURL, "/v1/chat/completions", k, body)
		if resp.StatusCode != 429 {
			t.Fatalf("second call: %d %s", resp.StatusCode, raw)
		}
		e := mustEnvelope(t, raw)
		if deref(e.Error.Code) != "rate_limit_exceeded" {
			t.Fatalf("code %v", deref(e.Error.Code))
		}
		ra := resp.Header.Get("Retry-After")
		var secs int
		if _, err := fmt.Sscan(ra, &secs); err != nil || secs < 1 || secs > 61 {
			t.Fatalf("Retry-After %q", ra)
		}
		if st := env.Sim.Stats()["tiny"]; st.Calls != 1 || st.Refused != 0 {
			t.Fatalf("Levee sent a call to a deployment it knew was full: %+v", st)
		}
	})
}

func deref(s *string) string {
	if s == nil {
		return ""
	}
	return *s
}

func TestUsageLedgerAndRollup(t *testing.T) {
	env := harness.Start(t, nil)
	other := env.NewKey("other-tenant")
	for i := 0; i < 3; i++ {
		if resp, raw := call(t, env.BaseURL, "/v1/chat/completions", env.APIKey, chat(10)); resp.StatusCode != 200 {
			t.Fatalf("%d %s", resp.StatusCode, raw)
		}
	}
	call(t, env.BaseURL, "/v1/chat/completions", env.APIKey, chat(99999)) // a rejected call is a row too
	call(t, env.BaseURL, "/v1/chat/completions", other, chat(10))
	env.FlushUsage()

	var rows, failed int
	if err := env.Store.Pool().QueryRow(context.Background(),
		`SELECT count(*), count(*) FILTER (WHERE status >= 400) FROM usage_events e JOIN tenants t ON t.id = e.tenant_id WHERE t.name = 'dev'`).Scan(&rows, &failed); err != nil {
		t.Fatal(err)
	}
	if rows != 4 || failed != 1 {
		t.Fatalf("ledger has %d rows (%d failed), want 4 (1 failed)", rows, failed)
	}
	resp, raw := call(t, env.BaseURL, "/v1/usage", env.APIKey, nil)
	if resp.StatusCode != 200 {
		t.Fatalf("%d %s", resp.StatusCode, raw)
	}
	var u struct {
		Tenant string `json:"tenant"`
		Total  struct {
			Requests         int64 `json:"requests"`
			Errors           int64 `json:"errors"`
			PromptTokens     int64 `json:"prompt_tokens"`
			CompletionTokens int64 `json:"completion_tokens"`
		} `json:"total"`
	}
	if err := json.Unmarshal(raw, &u); err != nil {
		t.Fatal(err)
	}
	if u.Tenant != "dev" || u.Total.Requests != 4 || u.Total.Errors != 1 {
		t.Fatalf("usage for the wrong tenant or count: %s", raw)
	}
	// The rollup agrees with the simulator's own usage figures.
	var sum int64
	_ = env.Store.Pool().QueryRow(context.Background(),
		`SELECT sum(prompt_tokens + completion_tokens) FROM usage_events e JOIN tenants t ON t.id = e.tenant_id WHERE t.name = 'dev'`).Scan(&sum)
	if sum == 0 || sum != u.Total.PromptTokens+u.Total.CompletionTokens {
		t.Fatalf("rollup total %d != ledger total %d", u.Total.PromptTokens+u.Total.CompletionTokens, sum)
	}
}

func TestHealthReadyMetrics(t *testing.T) {
	env := harness.Start(t, nil)
	for _, p := range []string{"/healthz", "/readyz"} {
		if resp, raw := call(t, env.BaseURL, p, "", nil); resp.StatusCode != 200 {
			t.Fatalf("%s: %d %s", p, resp.StatusCode, raw)
		}
	}
	call(t, env.BaseURL, "/v1/chat/completions", env.APIKey, chat(5))
	resp, raw := call(t, env.BaseURL, "/metrics", "", nil)
	if resp.StatusCode != 200 || !bytes.Contains(raw, []byte(`levee_requests_total{model="gpt-4o",status="200"} 1`)) ||
		!bytes.Contains(raw, []byte("levee_deployment_headroom_tokens")) {
		t.Fatalf("metrics missing: %s", raw)
	}
	resp, raw = call(t, env.BaseURL, "/v1/models", env.APIKey, nil)
	if resp.StatusCode != 200 || !bytes.Contains(raw, []byte(`"id":"gpt-4o"`)) {
		t.Fatalf("models: %d %s", resp.StatusCode, raw)
	}
}

func TestReadyzFailsWithoutPostgres(t *testing.T) {
	env := harness.Start(t, nil)
	env.Store.Close()
	resp, raw := call(t, env.BaseURL, "/readyz", "", nil)
	if resp.StatusCode != 503 {
		t.Fatalf("readyz with Postgres gone: %d %s", resp.StatusCode, raw)
	}
	mustEnvelope(t, raw)
}

// parallel runs n calls with c workers and returns status counts.
func parallel(t *testing.T, n, c int, do func(i int) int) map[int]int {
	t.Helper()
	var mu sync.Mutex
	counts := map[int]int{}
	next := make(chan int)
	var wg sync.WaitGroup
	for w := 0; w < c; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range next {
				s := do(i)
				mu.Lock()
				counts[s]++
				mu.Unlock()
			}
		}()
	}
	for i := 0; i < n; i++ {
		next <- i
	}
	close(next)
	wg.Wait()
	return counts
}

// A max_tokens near the integer limit on a model with no ceiling is refused
// as too large; it must not wrap around into a charge that frees capacity.
func TestAbsurdMaxTokensCannotFreeCapacity(t *testing.T) {
	f := harness.Fast(dev.DefaultFile())
	f.Models[0].MaxTokens = 0 // no ceiling
	env := harness.Start(t, f)
	body := map[string]any{"model": "gpt-4o", "max_tokens": int64(9223372036854775807), "messages": []map[string]string{{"role": "user", "content": "x"}}}
	resp, raw := call(t, env.BaseURL, "/v1/chat/completions", env.APIKey, body)
	if resp.StatusCode != 400 || !strings.Contains(string(raw), "request_too_large") {
		t.Fatalf("%d %s", resp.StatusCode, raw)
	}
	for _, d := range env.Gateway.Broker.Deployments() {
		if tok, _ := d.Capacity.Headroom(time.Now()); tok > int64(d.TPM) {
			t.Fatalf("%s has %d tokens of headroom, more than its TPM %d", d.Name, tok, d.TPM)
		}
	}
}
