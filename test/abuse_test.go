package test

// The abuse suite: what a hostile tenant tries against every body Levee
// parses and every string it stores — case-variant and duplicate JSON keys,
// stalled and malformed bodies, oversized and invalid strings, webhook
// targets that reach inside, and the answers that used to be wrong.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"mime/multipart"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/levee-gw/levee/config"
	"github.com/levee-gw/levee/dev"
	"github.com/levee-gw/levee/sim"
	"github.com/levee-gw/levee/test/harness"
)

const hi = `"messages":[{"role":"user","content":"hi"}]`

// What the deployment reads and what Levee checks and charges must be the
// same fields: every parsed body refuses a duplicate or a case variant of a
// field Levee reads, naming it, and nothing reaches the deployment.
func TestAbuseCaseVariantsAndDuplicateKeys(t *testing.T) {
	env := harness.Start(t, nil)
	f := uploadFile(t, env, env.APIKey, batchLines(1, "v"))
	ep, _ := createEndpoint(t, env, "http://127.0.0.1:9/hook")
	for _, tc := range []struct {
		name, path, body string
		hdr              []string
		param            string
	}{
		// The observed bypass: admitted under a 4,096 ceiling, 100,000 sent.
		{"chat MAX_TOKENS", "/v1/chat/completions", `{"model":"gpt-4o","max_tokens":100000,"MAX_TOKENS":5,` + hi + `}`, nil, "MAX_TOKENS"},
		{"chat Max_Completion_Tokens", "/v1/chat/completions", `{"model":"gpt-4o","max_completion_tokens":100000,"Max_Completion_Tokens":5,` + hi + `}`, nil, "Max_Completion_Tokens"},
		{"chat N", "/v1/chat/completions", `{"model":"gpt-4o","n":4,"N":1,` + hi + `}`, nil, "N"},
		{"chat variant alone", "/v1/chat/completions", `{"model":"gpt-4o","Max_Tokens":5,` + hi + `}`, nil, "Max_Tokens"},
		{"chat duplicate max_tokens", "/v1/chat/completions", `{"model":"gpt-4o","max_tokens":100000,"max_tokens":5,` + hi + `}`, nil, "max_tokens"},
		{"chat duplicate deep in an unread field", "/v1/chat/completions", `{"model":"gpt-4o","response_format":{"type":"text","type":"json_object"},` + hi + `}`, nil, "response_format.type"},
		{"chat message Content", "/v1/chat/completions", `{"model":"gpt-4o","messages":[{"role":"user","content":"hi","Content":"a much longer prompt"}]}`, nil, "messages[0].Content"},
		{"chat content part TEXT", "/v1/chat/completions", `{"model":"gpt-4o","messages":[{"role":"user","content":[{"type":"text","text":"hi","TEXT":"long"}]}]}`, nil, "messages[0].content[0].TEXT"},
		{"chat Model", "/v1/chat/completions", `{"model":"gpt-4o","Model":"text-embedding-3-small",` + hi + `}`, nil, "Model"},
		{"completions PROMPT", "/v1/completions", `{"model":"gpt-4o","prompt":"x","PROMPT":"a longer prompt"}`, nil, "PROMPT"},
		{"embeddings Input", "/v1/embeddings", `{"model":"text-embedding-3-small","input":"x","Input":["a","b"]}`, nil, "Input"},
		{"azure path", "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21", `{"max_tokens":100000,"MAX_TOKENS":5,` + hi + `}`, nil, "MAX_TOKENS"},
		{"azure v1 path", "/openai/v1/chat/completions", `{"model":"gpt-4o","max_tokens":100000,"MAX_TOKENS":5,` + hi + `}`, nil, "MAX_TOKENS"},
		{"deferred call", "/v1/chat/completions", `{"model":"gpt-4o","max_tokens":100000,"MAX_TOKENS":5,` + hi + `}`, []string{"X-Levee-Priority", "low"}, "MAX_TOKENS"},
		{"job body", "/v1/jobs", `{"endpoint":"/v1/chat/completions","body":{"model":"gpt-4o","max_tokens":100000,"MAX_TOKENS":5,` + hi + `}}`, nil, "body.MAX_TOKENS"},
		{"job Endpoint", "/v1/jobs", `{"endpoint":"/v1/chat/completions","Endpoint":"/v1/embeddings","body":{"model":"gpt-4o",` + hi + `}}`, nil, "Endpoint"},
		{"job duplicate priority", "/v1/jobs", `{"endpoint":"/v1/chat/completions","priority":"low","priority":"normal","body":{"model":"gpt-4o",` + hi + `}}`, nil, "priority"},
		{"job duplicate metadata key", "/v1/jobs", `{"endpoint":"/v1/chat/completions","metadata":{"k":"a","k":"b"},"body":{"model":"gpt-4o",` + hi + `}}`, nil, "metadata.k"},
		{"job webhook URL", "/v1/jobs", `{"endpoint":"/v1/chat/completions","webhook":{"url":"http://127.0.0.1:9/a","URL":"http://127.0.0.1:9/b"},"body":{"model":"gpt-4o",` + hi + `}}`, nil, "webhook.URL"},
		{"batch INPUT_FILE_ID", "/v1/batches", `{"input_file_id":"` + f + `","INPUT_FILE_ID":"file-x","endpoint":"/v1/chat/completions","completion_window":"24h"}`, nil, "INPUT_FILE_ID"},
		{"batch duplicate completion_window", "/v1/batches", `{"input_file_id":"` + f + `","endpoint":"/v1/chat/completions","completion_window":"1h","completion_window":"24h"}`, nil, "completion_window"},
		{"webhook endpoint URL", "/v1/webhook_endpoints", `{"url":"http://127.0.0.1:9/a","URL":"http://127.0.0.1:9/b"}`, nil, "URL"},
		{"webhook endpoint update Enabled", "/v1/webhook_endpoints/" + ep, `{"enabled":true,"Enabled":false}`, nil, "Enabled"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			calls := simTotal(env, func(s sim.Stats) int64 { return s.Calls })
			resp, raw := call(t, env.BaseURL, tc.path, env.APIKey, tc.body, tc.hdr...)
			if resp.StatusCode != 400 {
				t.Fatalf("%d %s", resp.StatusCode, raw)
			}
			if e := mustEnvelope(t, raw); deref(e.Error.Param) != tc.param {
				t.Fatalf("param %q, want %q: %s", deref(e.Error.Param), tc.param, e.Error.Message)
			}
			if now := simTotal(env, func(s sim.Stats) int64 { return s.Calls }); now != calls {
				t.Fatalf("a refused call reached the deployment (%d calls, then %d)", calls, now)
			}
		})
	}

	// Batch lines: the line itself at upload, the body when the batch is
	// validated (by line number).
	resp, raw := upload(t, env, env.APIKey, strings.NewReader(`{"custom_id":"a","CUSTOM_ID":"b","method":"POST","url":"/v1/chat/completions","body":{"model":"gpt-4o",`+hi+`}}`+"\n"), "batch")
	if resp.StatusCode != 400 || !strings.Contains(string(raw), "line 1") || !strings.Contains(string(raw), "CUSTOM_ID") {
		t.Fatalf("line with CUSTOM_ID: %d %s", resp.StatusCode, raw)
	}
	resp, raw = upload(t, env, env.APIKey, strings.NewReader(`{"custom_id":"a","method":"POST","url":"/v1/chat/completions","body":{"model":"gpt-4o","Model":"x",`+hi+`}}`+"\n"), "batch")
	if resp.StatusCode != 400 || !strings.Contains(string(raw), "line 1") {
		t.Fatalf("line with body.Model: %d %s", resp.StatusCode, raw)
	}
	b := createBatch(t, env, []byte(`{"custom_id":"a","method":"POST","url":"/v1/chat/completions","body":{"model":"gpt-4o","max_tokens":100000,"MAX_TOKENS":5,`+hi+`}}`+"\n"), "/v1/chat/completions")
	raw = waitBatch(t, env, env.APIKey, b, "failed")
	if !strings.Contains(string(raw), "MAX_TOKENS") || !strings.Contains(string(raw), `"line":1`) {
		t.Fatalf("batch with a MAX_TOKENS line: %s", raw)
	}
}

// Fifty uploads that send one line and stop, from thirteen tenants, hold no
// database connection: another tenant's jobs, an uncached key and /readyz
// keep answering while they stall, and each stalled upload is cut off
// (408) once its body is overdue, storing nothing.
func TestAbuseStalledUploadsFreezeNobody(t *testing.T) {
	f := harness.Fast(dev.DefaultFile())
	f.DatabaseMaxConns = 8 // the pool the stalls used to exhaust
	f.HTTP = config.HTTP{BodyTimeout: 4 * time.Second, BodyMinRate: 1 << 20, MaxUploads: 64}
	env := harness.Start(t, f)

	// Every key is made first: the stalls must not be what a helper of the
	// test waits on.
	keys := make([]string, 13)
	for i := range keys {
		keys[i] = env.NewKey(fmt.Sprintf("stall-%d", i))
	}
	other := env.NewKey("bystander") // never used: its first call needs Postgres
	type stall struct {
		conn net.Conn
		br   *bufio.Reader
	}
	open := func(key string) stall {
		c, err := net.Dial("tcp", strings.TrimPrefix(env.BaseURL, "http://"))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		part := "--b\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.jsonl\"\r\n\r\n" +
			string(batchLines(1, "s"))
		fmt.Fprintf(c, "POST /v1/files HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\nContent-Type: multipart/form-data; boundary=b\r\nContent-Length: 100000\r\n\r\n%s", key, part)
		return stall{c, bufio.NewReader(c)}
	}
	var stalls []stall
	for i := 0; i < 50; i++ {
		stalls = append(stalls, open(keys[i/4])) // 4 per tenant: the per-tenant cap
	}
	time.Sleep(500 * time.Millisecond) // let every handler reach its stalled read

	// A fifth upload of one tenant is refused at once.
	fifth := open(keys[0])
	_ = fifth.conn.SetReadDeadline(time.Now().Add(3 * time.Second))
	if resp, err := http.ReadResponse(fifth.br, nil); err != nil || resp.StatusCode != 429 {
		t.Fatalf("a fifth concurrent upload of one tenant: %v %v", resp, err)
	}

	// Meanwhile everyone else is served as usual.
	quick := &http.Client{Timeout: 3 * time.Second}
	for _, check := range []struct {
		name   string
		do     func() (*http.Response, error)
		status int
	}{
		{"an uncached key's job", func() (*http.Response, error) {
			b, _ := json.Marshal(jobBody(5, "low"))
			r, _ := http.NewRequest(http.MethodPost, env.BaseURL+"/v1/jobs", bytes.NewReader(b))
			r.Header.Set("Authorization", "Bearer "+other)
			return quick.Do(r)
		}, 202},
		{"readyz", func() (*http.Response, error) { return quick.Get(env.BaseURL + "/readyz") }, 200},
		{"usage", func() (*http.Response, error) {
			r, _ := http.NewRequest(http.MethodGet, env.BaseURL+"/v1/usage", nil)
			r.Header.Set("Authorization", "Bearer "+other)
			return quick.Do(r)
		}, 200},
	} {
		start := time.Now()
		resp, err := check.do()
		if err != nil {
			t.Fatalf("%s while 50 uploads stall: %v", check.name, err)
		}
		resp.Body.Close()
		t.Logf("%s answered %d in %v while 50 uploads stall", check.name, resp.StatusCode, time.Since(start).Round(time.Millisecond))
		if resp.StatusCode != check.status {
			t.Fatalf("%s: %d", check.name, resp.StatusCode)
		}
	}

	// Each stall is cut off when its body is overdue, and stores nothing.
	for i, s := range stalls {
		_ = s.conn.SetReadDeadline(time.Now().Add(15 * time.Second))
		resp, err := http.ReadResponse(s.br, nil)
		if err != nil {
			t.Fatalf("stalled upload %d: %v", i, err)
		}
		body, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != http.StatusRequestTimeout || !strings.Contains(string(body), "request_timeout") {
			t.Fatalf("stalled upload %d: %d %s", i, resp.StatusCode, body)
		}
	}
	var files int
	_ = env.Store.Pool().QueryRow(context.Background(), `SELECT count(*) FROM files`).Scan(&files)
	if files != 0 {
		t.Fatalf("%d files stored from stalled uploads", files)
	}

	// A request answered before its body arrives (a bad key, a wrong
	// method) is answered at once and its connection closed: the server does
	// not wait for the body it did not need.
	for _, head := range []string{
		"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer lv-wrong\r\nContent-Length: 100000\r\n\r\n",
		"POST /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + env.APIKey + "\r\nContent-Length: 1000\r\n\r\n",
		"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer lv-wrong\r\nExpect: 100-continue\r\nContent-Length: 1000\r\n\r\n",
	} {
		c, err := net.Dial("tcp", strings.TrimPrefix(env.BaseURL, "http://"))
		if err != nil {
			t.Fatal(err)
		}
		fmt.Fprint(c, head)
		_ = c.SetReadDeadline(time.Now().Add(3 * time.Second))
		br := bufio.NewReader(c)
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatalf("%q: no answer before its body: %v", head, err)
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		if _, err := br.ReadByte(); err != io.EOF {
			t.Fatalf("%q: %d, and the connection stayed open (%v)", head, resp.StatusCode, err)
		}
		c.Close()
	}

	// A stalled call body is cut off the same way.
	c, err := net.Dial("tcp", strings.TrimPrefix(env.BaseURL, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fmt.Fprintf(c, "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\nContent-Length: 1000\r\n\r\n{\"model\":", env.APIKey)
	_ = c.SetReadDeadline(time.Now().Add(15 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil || resp.StatusCode != http.StatusRequestTimeout {
		t.Fatalf("stalled call body: %v %v", resp, err)
	}
}

// Every string Levee stores from a request is bounded and valid text.
func TestAbuseOversizedAndInvalidStrings(t *testing.T) {
	env := harness.Start(t, nil)
	big := strings.Repeat("m", 200<<10)
	for _, tc := range []struct {
		name, path string
		body       any
		hdr        []string
		status     int
		param      string
	}{
		{"200 KB model", "/v1/chat/completions", `{"model":"` + big + `",` + hi + `}`, nil, 400, "model"},
		{"model with NUL", "/v1/chat/completions", `{"model":"gpt-4o\u0000",` + hi + `}`, nil, 400, "model"},
		{"unknown model", "/v1/chat/completions", `{"model":"no-such-model",` + hi + `}`, nil, 404, "model"},
		{"metadata NUL", "/v1/jobs", map[string]any{"endpoint": "/v1/chat/completions", "body": chat(5), "metadata": map[string]string{"k": "a\x00b"}}, nil, 400, "metadata"},
		{"metadata long key", "/v1/jobs", map[string]any{"endpoint": "/v1/chat/completions", "body": chat(5), "metadata": map[string]string{strings.Repeat("k", 65): "v"}}, nil, 400, "metadata"},
		{"metadata long value", "/v1/jobs", map[string]any{"endpoint": "/v1/chat/completions", "body": chat(5), "metadata": map[string]string{"k": strings.Repeat("v", 513)}}, nil, 400, "metadata"},
		{"job huge endpoint", "/v1/jobs", map[string]any{"endpoint": big, "body": chat(5)}, nil, 400, "endpoint"},
		{"job webhook url over 2 KB", "/v1/jobs", map[string]any{"endpoint": "/v1/chat/completions", "body": chat(5), "webhook": map[string]string{"url": "http://127.0.0.1/" + strings.Repeat("p", 2100)}}, nil, 400, "webhook.url"},
		{"Idempotency-Key not ASCII", "/v1/jobs", jobBody(5, "low"), []string{"Idempotency-Key", "k\xff\xfe"}, 400, "Idempotency-Key"},
		{"batch metadata NUL", "/v1/batches", map[string]any{"input_file_id": "file-x", "endpoint": "/v1/chat/completions", "completion_window": "24h", "metadata": map[string]string{"k": "\x00"}}, nil, 400, "metadata"},
		{"webhook endpoint url over 2 KB", "/v1/webhook_endpoints", map[string]any{"url": "http://127.0.0.1/" + strings.Repeat("p", 2100)}, nil, 400, "url"},
		{"webhook endpoint duplicate events", "/v1/webhook_endpoints", map[string]any{"url": "http://127.0.0.1:9/x", "events": []string{"job.failed", "job.failed"}}, nil, 400, "events"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			resp, raw := call(t, env.BaseURL, tc.path, env.APIKey, tc.body, tc.hdr...)
			if resp.StatusCode != tc.status {
				t.Fatalf("%d %.300s", resp.StatusCode, raw)
			}
			if e := mustEnvelope(t, raw); deref(e.Error.Param) != tc.param || len(raw) > 2048 {
				t.Fatalf("param %q (want %q), %d bytes: %.300s", deref(e.Error.Param), tc.param, len(raw), raw)
			}
		})
	}
	resp, raw := call(t, env.BaseURL, "/openai/deployments/"+strings.Repeat("d", 4000)+"/chat/completions", env.APIKey, `{`+hi+`}`)
	if resp.StatusCode != 404 || len(raw) > 1024 {
		t.Fatalf("long deployment name: %d, %d bytes", resp.StatusCode, len(raw))
	}
	// What was refused leaves no string of the client's in the ledger.
	env.FlushUsage()
	_, raw = call(t, env.BaseURL, "/v1/usage", env.APIKey, nil)
	if strings.Contains(string(raw), "mmmmmmmm") || strings.Contains(string(raw), "no-such-model") || !strings.Contains(string(raw), `"(unknown)"`) {
		t.Fatalf("usage after refused calls: %.500s", raw)
	}

	// Upload names and custom_ids.
	for _, tc := range []struct {
		name, filename, line, want string
	}{
		{"long filename", strings.Repeat("f", 300) + ".jsonl", string(batchLines(1, "a")), "file name"},
		{"filename not UTF-8", "in\xff.jsonl", string(batchLines(1, "a")), "file name"},
		{"long custom_id", "in.jsonl", `{"custom_id":"` + strings.Repeat("c", 600) + `","method":"POST","url":"/v1/chat/completions","body":{"model":"gpt-4o",` + hi + `}}`, "custom_id must be"},
		{"custom_id NUL", "in.jsonl", `{"custom_id":"a\u0000","method":"POST","url":"/v1/chat/completions","body":{"model":"gpt-4o",` + hi + `}}`, "custom_id must be"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			resp, raw := uploadNamed(t, env, env.APIKey, tc.filename, "batch", []byte(tc.line+"\n"))
			if resp.StatusCode != 400 || !strings.Contains(string(raw), tc.want) {
				t.Fatalf("%d %.300s", resp.StatusCode, raw)
			}
		})
	}

	// A body with \u0000 in a message is the client's business: the batch
	// runs, with the body forwarded as sent.
	b := createBatch(t, env, []byte(`{"custom_id":"nul","method":"POST","url":"/v1/chat/completions","body":{"model":"gpt-4o","max_tokens":5,"messages":[{"role":"user","content":"a\u0000b"}]}}`+"\n"), "/v1/chat/completions")
	raw = waitBatch(t, env, env.APIKey, b, "completed")
	if !strings.Contains(string(raw), `"completed":1`) {
		t.Fatalf("batch with \\u0000 in a message: %s", raw)
	}
}

// Webhook targets that reach back inside are refused even where levee dev
// opens loopback (the guard's whole table is webhook/guard_test.go).
func TestAbuseWebhookTargets(t *testing.T) {
	env := harness.Start(t, nil)
	for _, u := range []string{
		"http://0.0.0.1/", "http://255.255.255.255/", "http://198.18.0.1/", "http://[::127.0.0.1]/",
		"http://[64:ff9b::c612:1]/", "http://[2002:c612:1::1]/", "http://[::ffff:198.18.0.1]/", "http://224.0.0.1/",
		"http://user:pass@127.0.0.1/", "ftp://127.0.0.1/", "http:///x",
	} {
		for _, path := range []string{"/v1/webhook_endpoints", "/v1/jobs"} {
			body := map[string]any{"url": u}
			param := "url"
			if path == "/v1/jobs" {
				body, param = map[string]any{"endpoint": "/v1/chat/completions", "body": chat(5), "webhook": map[string]string{"url": u}}, "webhook.url"
			}
			resp, raw := call(t, env.BaseURL, path, env.APIKey, body)
			if resp.StatusCode != 400 || deref(mustEnvelope(t, raw).Error.Param) != param {
				t.Errorf("%s %s: %d %s", path, u, resp.StatusCode, raw)
			}
		}
	}
}

// Answers that used to be wrong.
func TestAbuseWrongAnswers(t *testing.T) {
	env := harness.Start(t, nil)
	other := env.NewKey("tenant-b")
	for _, tc := range []struct {
		name, body, param string
	}{
		{"max_tokens 0", `{"model":"gpt-4o","max_tokens":0,` + hi + `}`, "max_tokens"},
		{"max_completion_tokens -5", `{"model":"gpt-4o","max_completion_tokens":-5,` + hi + `}`, "max_completion_tokens"},
		{"n 0", `{"model":"gpt-4o","n":0,` + hi + `}`, "n"},
	} {
		resp, raw := call(t, env.BaseURL, "/v1/chat/completions", env.APIKey, tc.body)
		if resp.StatusCode != 400 || deref(mustEnvelope(t, raw).Error.Param) != tc.param {
			t.Errorf("%s: %d %s", tc.name, resp.StatusCode, raw)
		}
	}

	// Deliveries of an endpoint that is not the caller's: 404, not [].
	ep, _ := createEndpoint(t, env, "http://127.0.0.1:9/hook")
	for _, who := range []struct{ key, id string }{
		{env.APIKey, "we_00000000-0000-0000-0000-000000000000"}, {env.APIKey, "garbage"}, {other, ep},
	} {
		resp, raw := call(t, env.BaseURL, "/v1/webhook_endpoints/"+who.id+"/deliveries", who.key, nil)
		if resp.StatusCode != 404 {
			t.Errorf("deliveries of %s: %d %s", who.id, resp.StatusCode, raw)
		}
	}
	if resp, raw := call(t, env.BaseURL, "/v1/webhook_endpoints/"+ep+"/deliveries", env.APIKey, nil); resp.StatusCode != 200 {
		t.Errorf("own deliveries: %d %s", resp.StatusCode, raw)
	}

	// Two file parts: 400, and nothing stored.
	var body bytes.Buffer
	mw := multipart.NewWriter(&body)
	_ = mw.WriteField("purpose", "batch")
	for i := 0; i < 2; i++ {
		w, _ := mw.CreateFormFile("file", fmt.Sprintf("in%d.jsonl", i))
		_, _ = w.Write(batchLines(1, fmt.Sprint(i)))
	}
	_ = mw.Close()
	resp, raw := call(t, env.BaseURL, "/v1/files", env.APIKey, body.Bytes(), "Content-Type", mw.FormDataContentType())
	if resp.StatusCode != 400 {
		t.Fatalf("two file parts: %d %s", resp.StatusCode, raw)
	}
	var files int
	_ = env.Store.Pool().QueryRow(context.Background(), `SELECT count(*) FROM files`).Scan(&files)
	if files != 0 {
		t.Fatalf("two file parts stored %d files", files)
	}

	// Content-Length with Transfer-Encoding: answered, then the connection
	// closes, so no second request can ride on it.
	c, err := net.Dial("tcp", strings.TrimPrefix(env.BaseURL, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	chunk := `{"model":"gpt-4o","max_tokens":5,` + hi + `}`
	fmt.Fprintf(c, "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n", env.APIKey, len(chunk), chunk)
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	br := bufio.NewReader(c)
	resp, err = http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	if !resp.Close {
		t.Fatalf("CL+TE request: %d, connection kept open", resp.StatusCode)
	}
	fmt.Fprintf(c, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
	if resp, err := http.ReadResponse(br, nil); err == nil {
		t.Fatalf("a second request was served on the connection: %d", resp.StatusCode)
	}
}

// Unknown keys are cached, and an address that keeps failing is throttled
// without costing lookups; a key in use keeps working from it, and other
// addresses are not affected at all.
func TestAbuseFailedAuthentication(t *testing.T) {
	f := harness.Fast(dev.DefaultFile())
	f.Auth = config.Auth{FailureRate: 0.01, FailureBurst: 20}
	env := harness.Start(t, f)
	if resp, raw := call(t, env.BaseURL, "/v1/chat/completions", env.APIKey, chat(5)); resp.StatusCode != 200 {
		t.Fatalf("before: %d %s", resp.StatusCode, raw)
	}
	statuses := map[int]int{}
	for i := 0; i < 100; i++ {
		resp, _ := call(t, env.BaseURL, "/v1/models", fmt.Sprintf("lv-guess-%d", i), nil)
		statuses[resp.StatusCode]++
	}
	if statuses[401] != 20 || statuses[429] != 80 {
		t.Fatalf("100 wrong keys from one address: %v (want 20 401s, then 429s)", statuses)
	}
	if resp, raw := call(t, env.BaseURL, "/v1/chat/completions", env.APIKey, chat(5)); resp.StatusCode != 200 {
		t.Fatalf("the tenant's key in use, from the same address: %d %s", resp.StatusCode, raw)
	}
	// A new key from another address (127.0.0.2 is loopback too).
	fresh := env.NewKey("tenant-c")
	other := &http.Client{Transport: &http.Transport{DialContext: (&net.Dialer{LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 2)}}).DialContext}}
	req, _ := http.NewRequest(http.MethodGet, env.BaseURL+"/v1/models", nil)
	req.Header.Set("Authorization", "Bearer "+fresh)
	resp, err := other.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("a new key from another address: %d", resp.StatusCode)
	}
}

// uploadNamed uploads content under a file name.
func uploadNamed(t *testing.T, env *harness.Env, key, name, purpose string, content []byte) (*http.Response, []byte) {
	t.Helper()
	var body bytes.Buffer
	mw := multipart.NewWriter(&body)
	_ = mw.WriteField("purpose", purpose)
	h := make(map[string][]string)
	h["Content-Disposition"] = []string{fmt.Sprintf(`form-data; name="file"; filename="%s"`, name)}
	h["Content-Type"] = []string{"application/jsonl"}
	w, _ := mw.CreatePart(h)
	_, _ = w.Write(content)
	_ = mw.Close()
	return call(t, env.BaseURL, "/v1/files", key, body.Bytes(), "Content-Type", mw.FormDataContentType())
}

// uploadFile uploads batch lines and returns the file id.
func uploadFile(t *testing.T, env *harness.Env, key string, content []byte) string {
	t.Helper()
	resp, raw := upload(t, env, key, bytes.NewReader(content), "batch")
	if resp.StatusCode != 200 {
		t.Fatalf("upload: %d %s", resp.StatusCode, raw)
	}
	var f struct {
		ID string `json:"id"`
	}
	_ = json.Unmarshal(raw, &f)
	return f.ID
}

func waitBatch(t *testing.T, env *harness.Env, key, id, status string) []byte {
	t.Helper()
	var raw []byte
	harness.Eventually(t, 30*time.Second, "batch "+id+" to be "+status, func() bool {
		_, raw = call(t, env.BaseURL, "/v1/batches/"+id, key, nil)
		return strings.Contains(string(raw), `"status":"`+status+`"`)
	})
	return raw
}
