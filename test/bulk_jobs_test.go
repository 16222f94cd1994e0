package test

import (
	"encoding/json"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/levee-gw/levee/test/harness"
)

type jobList struct {
	Object string `json:"object"`
	Data   []job  `json:"data"`
}

func submitArray(t *testing.T, env *harness.Env, key string, body any, hdr ...string) (int, jobList, []byte) {
	t.Helper()
	resp, raw := call(t, env.BaseURL, "/v1/jobs", key, body, hdr...)
	var l jobList
	if resp.StatusCode == 202 {
		if err := json.Unmarshal(raw, &l); err != nil {
			t.Fatal(err)
		}
	}
	return resp.StatusCode, l, raw
}

func countJobs(t *testing.T, env *harness.Env) int {
	t.Helper()
	var n int
	if err := env.Store.Pool().QueryRow(t.Context(), `SELECT count(*) FROM jobs`).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

func TestBulkJobSubmit(t *testing.T) {
	env := harness.Start(t, nil)
	var arr []any
	for i := range 40 {
		b := jobBody(5+i%3, []string{"low", "normal"}[i%2])
		b["metadata"] = map[string]string{"i": fmt.Sprint(i)}
		arr = append(arr, b)
	}
	status, l, raw := submitArray(t, env, env.APIKey, arr)
	if status != 202 || l.Object != "list" || len(l.Data) != 40 {
		t.Fatalf("%d %s", status, raw)
	}
	seen := map[string]bool{}
	for i, j := range l.Data {
		if j.Object != "job" || j.Status != "queued" || seen[j.ID] || string(j.Metadata) != fmt.Sprintf(`{"i":"%d"}`, i) {
			t.Fatalf("job %d: %+v", i, j)
		}
		seen[j.ID] = true
	}
	// Each ends with its own result, in the ledger once.
	for _, j := range l.Data {
		done := waitJob(t, env, env.APIKey, j.ID, 20*time.Second)
		if done.Status != "succeeded" || done.Result == nil || done.Result.StatusCode != 200 || done.Usage == nil {
			t.Fatalf("%s: %+v", j.ID, done)
		}
	}
	env.FlushUsage()
	var n int
	_ = env.Store.Pool().QueryRow(t.Context(), `SELECT count(DISTINCT request_id) FROM usage_events WHERE request_id LIKE 'job_%'`).Scan(&n)
	if n != 40 {
		t.Fatalf("%d usage rows, want 40", n)
	}
	// Another tenant sees none of them.
	other := env.NewKey("tenant-b")
	if status, _ := getJob(t, env, other, l.Data[0].ID); status != 404 {
		t.Fatalf("another tenant's job: %d", status)
	}
}

func TestBulkJobSubmitRefusesAsAWhole(t *testing.T) {
	env := harness.Start(t, nil)
	good := jobBody(5, "low")
	tooMany := make([]any, 1001)
	for i := range tooMany {
		tooMany[i] = good
	}
	for _, tc := range []struct {
		name  string
		body  any
		param string
		code  string
	}{
		{"empty", `[]`, "", "invalid_request"},
		{"over 1,000", tooMany, "", "too_many_jobs"},
		{"one over policy", []any{good, good, good, jobBody(99999, "low")}, "[3].body.max_tokens", ""},
		{"not an object", []any{good, "x"}, "[1]", "invalid_request"},
		{"case-variant key", `[{"endpoint":"/v1/chat/completions","Endpoint":"/v1/embeddings","body":{"model":"gpt-4o","messages":[{"role":"user","content":"x"}]}}]`, "[0].Endpoint", ""},
		{"duplicate key", `[{"endpoint":"/v1/chat/completions","endpoint":"/v1/embeddings","body":{"model":"gpt-4o","messages":[{"role":"user","content":"x"}]}}]`, "[0].endpoint", ""},
		{"bad webhook", []any{good, map[string]any{"endpoint": "/v1/chat/completions", "body": chat(5), "webhook": map[string]string{"url": "ftp://x"}}}, "[1].webhook.url", "invalid_url"},
		{"bad metadata", []any{good, good, map[string]any{"endpoint": "/v1/chat/completions", "body": chat(5), "metadata": map[string]string{"k": strings.Repeat("x", 600)}}}, "[2].metadata", "invalid_metadata"},
		{"malformed", `[{"endpoint":"/v1/chat/completions"`, "", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			status, _, raw := submitArray(t, env, env.APIKey, tc.body)
			if status != 400 {
				t.Fatalf("%d %s", status, raw)
			}
			e := mustEnvelope(t, raw)
			if tc.param != "" && deref(e.Error.Param) != tc.param || tc.code != "" && deref(e.Error.Code) != tc.code {
				t.Fatalf("param %q code %q, want %q %q: %s", deref(e.Error.Param), deref(e.Error.Code), tc.param, tc.code, raw)
			}
		})
	}
	if n := countJobs(t, env); n != 0 {
		t.Fatalf("%d jobs stored from refused calls", n)
	}
}

func TestBulkJobIdempotency(t *testing.T) {
	env := harness.Start(t, nil)
	arr := []any{jobBody(5, "low"), jobBody(6, "low"), jobBody(7, "low")}
	s1, l1, raw := submitArray(t, env, env.APIKey, arr, "Idempotency-Key", "run-1")
	s2, l2, _ := submitArray(t, env, env.APIKey, arr, "Idempotency-Key", "run-1")
	if s1 != 202 || s2 != 202 || len(l1.Data) != 3 || len(l2.Data) != 3 {
		t.Fatalf("%d %d %s", s1, s2, raw)
	}
	for i := range l1.Data {
		if l1.Data[i].ID != l2.Data[i].ID {
			t.Fatalf("retry of the same array got job %d %s, first %s", i, l2.Data[i].ID, l1.Data[i].ID)
		}
	}
	// The same key with another array: 409, and its new job is not kept.
	changed := []any{jobBody(5, "low"), jobBody(8, "low"), jobBody(7, "low"), jobBody(9, "low")}
	if status, _, raw := submitArray(t, env, env.APIKey, changed, "Idempotency-Key", "run-1"); status != 409 {
		t.Fatalf("%d %s", status, raw)
	}
	// A single submit under the same key is another job.
	r, j := submit(t, env, env.APIKey, jobBody(5, "low"), "Idempotency-Key", "run-1")
	if r.StatusCode != 202 || j.ID == l1.Data[0].ID {
		t.Fatalf("single submit under the array's key: %d %s", r.StatusCode, j.ID)
	}
	if n := countJobs(t, env); n != 4 {
		t.Fatalf("%d jobs stored, want 4", n)
	}
}

// Single submits arriving together share statements (group commit); each
// still gets its own job, and retries under one key get one job.
func TestConcurrentSubmitsEachGetTheirJob(t *testing.T) {
	env := harness.Start(t, nil)
	const n = 120
	ids := make([]string, n)
	var wg sync.WaitGroup
	// 16 at a time: enough to share statements, under the gateway's
	// limits on one caller's requests in flight.
	slots := make(chan struct{}, 16)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			slots <- struct{}{}
			defer func() { <-slots }()
			var hdr []string
			if i%3 == 0 {
				hdr = []string{"Idempotency-Key", fmt.Sprintf("k%d", i/6)} // i and i+3 share a key
			}
			body := jobBody(5, "low")
			if i%3 == 0 {
				body["metadata"] = map[string]string{"k": fmt.Sprint(i / 6)}
			} else {
				body["metadata"] = map[string]string{"i": fmt.Sprint(i)}
			}
			resp, j := submit(t, env, env.APIKey, body, hdr...)
			if resp.StatusCode != 202 {
				t.Errorf("submit %d: %d", i, resp.StatusCode)
			}
			ids[i] = j.ID
		}()
	}
	wg.Wait()
	distinct := map[string]bool{}
	for i, id := range ids {
		distinct[id] = true
		if i%6 == 3 && id != ids[i-3] {
			t.Fatalf("submits %d and %d share a key: %s and %s", i-3, i, ids[i-3], id)
		}
	}
	want := n - n/6
	if len(distinct) != want || countJobs(t, env) != want {
		t.Fatalf("%d distinct ids, %d stored; want %d", len(distinct), countJobs(t, env), want)
	}
	for id := range distinct {
		if !strings.HasPrefix(id, "job_") {
			t.Fatalf("id %q", id)
		}
	}
}
