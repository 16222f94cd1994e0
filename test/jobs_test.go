package test

import (
	"encoding/json"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/levee-gw/levee/config"
	"github.com/levee-gw/levee/dev"
	"github.com/levee-gw/levee/sim"
	"github.com/levee-gw/levee/test/harness"
)

type job struct {
	ID         string          `json:"id"`
	Object     string          `json:"object"`
	Status     string          `json:"status"`
	Priority   string          `json:"priority"`
	Attempts   int             `json:"attempts"`
	Deployment *string         `json:"deployment"`
	Metadata   json.RawMessage `json:"metadata"`
	Usage      *struct {
		PromptTokens     int `json:"prompt_tokens"`
		CompletionTokens int `json:"completion_tokens"`
	} `json:"usage"`
	Result *struct {
		StatusCode int             `json:"status_code"`
		Body       json.RawMessage `json:"body"`
	} `json:"result"`
	Error *struct {
		Code    string `json:"code"`
		Message string `json:"message"`
	} `json:"error"`
}

func jobBody(maxTokens int, prio string) map[string]any {
	return map[string]any{"endpoint": "/v1/chat/completions", "body": chat(maxTokens), "priority": prio,
		"metadata": map[string]string{"run": "t"}}
}

func submit(t *testing.T, env *harness.Env, key string, body any, hdr ...string) (*http.Response, job) {
	t.Helper()
	resp, raw := call(t, env.BaseURL, "/v1/jobs", key, body, hdr...)
	var j job
	if resp.StatusCode == 202 {
		if err := json.Unmarshal(raw, &j); err != nil {
			t.Fatal(err)
		}
	}
	return resp, j
}

func getJob(t *testing.T, env *harness.Env, key, id string) (int, job) {
	t.Helper()
	resp, raw := call(t, env.BaseURL, "/v1/jobs/"+id, key, nil)
	var j job
	_ = json.Unmarshal(raw, &j)
	return resp.StatusCode, j
}

func waitJob(t *testing.T, env *harness.Env, key, id string, timeout time.Duration) job {
	t.Helper()
	var j job
	harness.Eventually(t, timeout, "job "+id+" to end", func() bool {
		_, j = getJob(t, env, key, id)
		return j.Status == "succeeded" || j.Status == "failed" || j.Status == "cancelled"
	})
	return j
}

func TestJobSubmitPollAndResult(t *testing.T) {
	env := harness.Start(t, nil)
	resp, j := submit(t, env, env.APIKey, jobBody(10, "low"))
	if resp.StatusCode != 202 || j.Object != "job" || j.Status != "queued" || !strings.HasPrefix(j.ID, "job_") {
		t.Fatalf("submit: %d %+v", resp.StatusCode, j)
	}
	if resp.Header.Get("Location") != "/v1/jobs/"+j.ID {
		t.Fatalf("Location %q", resp.Header.Get("Location"))
	}
	done := waitJob(t, env, env.APIKey, j.ID, 10*time.Second)
	if done.Status != "succeeded" || done.Result == nil || done.Result.StatusCode != 200 || done.Usage == nil || done.Usage.PromptTokens == 0 ||
		done.Deployment == nil || done.Attempts != 1 || string(done.Metadata) != `{"run":"t"}` {
		t.Fatalf("finished job: %+v", done)
	}
	var cc struct {
		Object string `json:"object"`
	}
	if json.Unmarshal(done.Result.Body, &cc) != nil || cc.Object != "chat.completion" {
		t.Fatalf("result body: %s", done.Result.Body)
	}
	// Its usage is in the ledger exactly once.
	env.FlushUsage()
	var n int
	_ = env.Store.Pool().QueryRow(t.Context(), `SELECT count(*) FROM usage_events WHERE request_id = $1`, j.ID).Scan(&n)
	if n != 1 {
		t.Fatalf("%d usage rows for the job", n)
	}
}

func TestJobValidationAndIsolation(t *testing.T) {
	env := harness.Start(t, nil)
	other := env.NewKey("tenant-b")
	for _, tc := range []struct {
		name   string
		body   any
		status int
		param  string
	}{
		{"bad endpoint", map[string]any{"endpoint": "/v1/images", "body": chat(5)}, 400, "endpoint"},
		{"no body", map[string]any{"endpoint": "/v1/chat/completions"}, 400, "body"},
		{"unknown model", map[string]any{"endpoint": "/v1/chat/completions", "body": map[string]any{"model": "nope", "messages": []map[string]string{{"role": "user", "content": "x"}}}}, 404, "body.model"},
		{"over policy", map[string]any{"endpoint": "/v1/chat/completions", "body": chat(99999)}, 400, "body.max_tokens"},
		{"stream", map[string]any{"endpoint": "/v1/chat/completions", "body": map[string]any{"model": "gpt-4o", "stream": true, "messages": []map[string]string{{"role": "user", "content": "x"}}}}, 400, "body.stream"},
		{"bad priority", map[string]any{"endpoint": "/v1/chat/completions", "body": chat(5), "priority": "urgent"}, 400, "priority"},
		{"bad metadata", map[string]any{"endpoint": "/v1/chat/completions", "body": chat(5), "metadata": map[string]int{"a": 1}}, 400, "metadata"},
		{"bad webhook", map[string]any{"endpoint": "/v1/chat/completions", "body": chat(5), "webhook": map[string]string{"url": "ftp://x"}}, 400, "webhook.url"},
		{"malformed", `{"endpoint":`, 400, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			resp, raw := call(t, env.BaseURL, "/v1/jobs", env.APIKey, tc.body)
			if resp.StatusCode != tc.status {
				t.Fatalf("%d %s", resp.StatusCode, raw)
			}
			if e := mustEnvelope(t, raw); deref(e.Error.Param) != tc.param {
				t.Fatalf("param %q, want %q", deref(e.Error.Param), tc.param)
			}
		})
	}
	_, j := submit(t, env, env.APIKey, jobBody(5, "normal"))
	for _, path := range []string{"/v1/jobs/" + j.ID, "/v1/jobs/job_00000000-0000-0000-0000-000000000000", "/v1/jobs/garbage"} {
		status, _ := getJob(t, env, other, strings.TrimPrefix(path, "/v1/jobs/"))
		if status != 404 {
			t.Fatalf("%s as another tenant: %d", path, status)
		}
	}
	if resp, raw := call(t, env.BaseURL, "/v1/jobs/"+j.ID+"/cancel", other, ""); resp.StatusCode != 404 {
		t.Fatalf("cancel as another tenant: %d %s", resp.StatusCode, raw)
	}
	resp, raw := call(t, env.BaseURL, "/v1/jobs", other, nil)
	if resp.StatusCode != 200 || strings.Contains(string(raw), j.ID) {
		t.Fatalf("another tenant's list shows the job: %s", raw)
	}
}

func TestJobIdempotency(t *testing.T) {
	env := harness.Start(t, nil)
	body := jobBody(5, "normal")
	r1, j1 := submit(t, env, env.APIKey, body, "Idempotency-Key", "abc")
	r2, j2 := submit(t, env, env.APIKey, body, "Idempotency-Key", "abc")
	if r1.StatusCode != 202 || r2.StatusCode != 202 || j1.ID != j2.ID {
		t.Fatalf("same key and body: %d %s / %d %s", r1.StatusCode, j1.ID, r2.StatusCode, j2.ID)
	}
	resp, raw := call(t, env.BaseURL, "/v1/jobs", env.APIKey, jobBody(6, "normal"), "Idempotency-Key", "abc")
	if resp.StatusCode != 409 {
		t.Fatalf("same key, other body: %d %s", resp.StatusCode, raw)
	}
	// The same key from another tenant is another job.
	_, j3 := submit(t, env, env.NewKey("tenant-b"), body, "Idempotency-Key", "abc")
	if j3.ID == "" || j3.ID == j1.ID {
		t.Fatalf("another tenant's key collided: %q", j3.ID)
	}
	waitJob(t, env, env.APIKey, j1.ID, 10*time.Second)
	var n int
	_ = env.Store.Pool().QueryRow(t.Context(), `SELECT count(*) FROM jobs`).Scan(&n)
	if n != 2 {
		t.Fatalf("%d jobs stored, want 2", n)
	}
}

// slowFile is a single slow deployment, so jobs stay queued long enough to
// be cancelled and listed.
func slowFile(perToken time.Duration, tpm int) *dev.File {
	return &dev.File{
		Deployments: []dev.FileDeployment{{Name: "slow", Model: "gpt-4o", Kind: config.Standard, TPM: tpm, RPM: 1 << 30,
			Sim: sim.Deployment{PerToken: perToken, CompletionTokens: 10}}},
		Models: []config.Model{{Name: "gpt-4o", Deployments: []string{"slow"}, MaxTokens: 4096}},
		Worker: config.Worker{Concurrency: 2},
	}
}

func TestJobCancelAndList(t *testing.T) {
	env := harness.Start(t, slowFile(50*time.Millisecond, 1<<30))
	var ids []string
	for i := 0; i < 12; i++ {
		_, j := submit(t, env, env.APIKey, jobBody(10, "low"))
		ids = append(ids, j.ID)
	}
	// The last one is still queued behind the others (two at a time, ~0.5 s each).
	last := ids[len(ids)-1]
	resp, raw := call(t, env.BaseURL, "/v1/jobs/"+last+"/cancel", env.APIKey, "")
	if resp.StatusCode != 200 || !strings.Contains(string(raw), `"status":"cancelled"`) {
		t.Fatalf("cancel: %d %s", resp.StatusCode, raw)
	}
	calls := env.Sim.Stats()["slow"].Calls
	for _, id := range ids[:len(ids)-1] {
		waitJob(t, env, env.APIKey, id, 20*time.Second)
	}
	if _, j := getJob(t, env, env.APIKey, last); j.Status != "cancelled" {
		t.Fatalf("cancelled job is %s", j.Status)
	}
	if got := env.Sim.Stats()["slow"].Calls; got-calls > int64(len(ids)-1) || got != int64(len(ids)-1) {
		t.Fatalf("the simulator saw %d calls for %d live jobs: the cancelled one went upstream", got, len(ids)-1)
	}
	if resp, _ := call(t, env.BaseURL, "/v1/jobs/"+ids[0]+"/cancel", env.APIKey, ""); resp.StatusCode != 409 {
		t.Fatalf("cancel after success: %d", resp.StatusCode)
	}
	// Cursor pagination, newest first, every job once.
	seen := map[string]bool{}
	after := ""
	for page := 0; page < 10; page++ {
		path := "/v1/jobs?limit=5"
		if after != "" {
			path += "&after=" + after
		}
		resp, raw := call(t, env.BaseURL, path, env.APIKey, nil)
		var l struct {
			Data    []job  `json:"data"`
			HasMore bool   `json:"has_more"`
			LastID  string `json:"last_id"`
		}
		if resp.StatusCode != 200 || json.Unmarshal(raw, &l) != nil {
			t.Fatalf("%d %s", resp.StatusCode, raw)
		}
		for _, j := range l.Data {
			if seen[j.ID] {
				t.Fatalf("%s listed twice", j.ID)
			}
			seen[j.ID] = true
		}
		if !l.HasMore {
			break
		}
		after = l.LastID
	}
	if len(seen) != len(ids) {
		t.Fatalf("listed %d of %d jobs", len(seen), len(ids))
	}
	resp, raw = call(t, env.BaseURL, "/v1/jobs?status=cancelled", env.APIKey, nil)
	if resp.StatusCode != 200 || strings.Count(string(raw), `"object":"job"`) != 1 {
		t.Fatalf("status filter: %s", raw)
	}
}

func TestDeferredSynchronousCall(t *testing.T) {
	env := harness.Start(t, slowFile(40*time.Millisecond, 1<<30))
	t.Run("done in time: the normal response", func(t *testing.T) {
		resp, raw := call(t, env.BaseURL, "/v1/chat/completions", env.APIKey, chat(5), "X-Levee-Priority", "low")
		if resp.StatusCode != 200 || resp.Header.Get("x-levee-job") == "" {
			t.Fatalf("%d %v %s", resp.StatusCode, resp.Header, raw)
		}
		var cc struct {
			Object string `json:"object"`
		}
		if json.Unmarshal(raw, &cc) != nil || cc.Object != "chat.completion" {
			t.Fatalf("not a completion: %s", raw)
		}
	})
	t.Run("not in time: 202 and the job", func(t *testing.T) {
		resp, raw := call(t, env.BaseURL, "/v1/chat/completions", env.APIKey, chat(10), "X-Levee-Priority", "low", "Prefer", "wait=0")
		if resp.StatusCode != 202 || !strings.HasPrefix(resp.Header.Get("Location"), "/v1/jobs/job_") {
			t.Fatalf("%d %v %s", resp.StatusCode, resp.Header, raw)
		}
		var j job
		_ = json.Unmarshal(raw, &j)
		if done := waitJob(t, env, env.APIKey, j.ID, 10*time.Second); done.Status != "succeeded" {
			t.Fatalf("%+v", done)
		}
	})
	t.Run("high priority stays synchronous", func(t *testing.T) {
		resp, _ := call(t, env.BaseURL, "/v1/chat/completions", env.APIKey, chat(5))
		if resp.StatusCode != 200 || resp.Header.Get("x-levee-job") != "" {
			t.Fatalf("%d %v", resp.StatusCode, resp.Header)
		}
	})
}

func TestJobFailsVisiblyAfterMaxAttempts(t *testing.T) {
	f := slowFile(0, 1<<30)
	f.Queue = config.Queue{MaxAttempts: 2, Backoff: []time.Duration{100 * time.Millisecond}}
	env := harness.Start(t, f)
	setFaults(t, env, "slow", sim.Faults{Outage: true})
	_, j := submit(t, env, env.APIKey, jobBody(5, "normal"))
	done := waitJob(t, env, env.APIKey, j.ID, 15*time.Second)
	if done.Status != "failed" || done.Error == nil || done.Error.Code != "upstream_unavailable" || done.Attempts != 2 {
		t.Fatalf("%+v (error %+v)", done, done.Error)
	}
}

// TestIdleConsumersGoAndComeBack: a tenant's consumer is removed once idle
// for queue.consumer_idle, and the tenant's next job still runs.
func TestIdleConsumersGoAndComeBack(t *testing.T) {
	f := harness.Fast(dev.DefaultFile())
	f.Queue.ConsumerIdle = time.Second
	env := harness.Start(t, f)
	js, err := jetstream.New(env.Gateway.Queue.Conn())
	if err != nil {
		t.Fatal(err)
	}
	consumers := func() []string {
		s, err := js.Stream(t.Context(), "LEVEE_JOBS")
		if err != nil {
			t.Fatal(err)
		}
		var names []string
		l := s.ConsumerNames(t.Context())
		for n := range l.Name() {
			names = append(names, n)
		}
		return names
	}
	for round := 1; round <= 2; round++ {
		resp, j := submit(t, env, env.APIKey, jobBody(10, "low"))
		if resp.StatusCode != 202 {
			t.Fatalf("round %d: submit %d", round, resp.StatusCode)
		}
		if got := waitJob(t, env, env.APIKey, j.ID, 30*time.Second); got.Status != "succeeded" {
			t.Fatalf("round %d: job ended %s", round, got.Status)
		}
		if n := consumers(); len(n) == 0 {
			t.Fatalf("round %d: no consumer after a job ran", round)
		}
		harness.Eventually(t, 30*time.Second, "the idle consumer to be removed", func() bool { return len(consumers()) == 0 })
	}
}

// TestCancellingARunningJobStopsItsCall: cancel means stop spending. The
// worker running the job aborts its upstream call, whether it hears the
// cancel notice or (notice missed) finds at its next lease extension that
// the job is no longer running; and the job stays cancelled.
func TestCancellingARunningJobStopsItsCall(t *testing.T) {
	for _, tc := range []struct {
		name   string
		cancel func(t *testing.T, env *harness.Env, id string)
	}{
		{"notice", func(t *testing.T, env *harness.Env, id string) {
			if resp, _ := call(t, env.BaseURL, "/v1/jobs/"+id+"/cancel", env.APIKey, map[string]any{}); resp.StatusCode != 200 {
				t.Fatalf("cancel: %d", resp.StatusCode)
			}
		}},
		{"missed notice", func(t *testing.T, env *harness.Env, id string) {
			// Cancelled behind the API's back: no notice is published.
			j, err := env.Store.JobByID(t.Context(), uuid.MustParse(strings.TrimPrefix(id, "job_")))
			if err != nil {
				t.Fatal(err)
			}
			if _, err := env.Store.CancelJob(t.Context(), j.TenantID, j.ID); err != nil {
				t.Fatal(err)
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := harness.Fast(dev.DefaultFile())
			for i := range f.Deployments {
				f.Deployments[i].Sim = sim.Deployment{PerToken: 50 * time.Millisecond, CompletionTokens: 200} // 10 s a call
			}
			f.Queue.AckWait = 1500 * time.Millisecond // leases extended every 0.5 s
			env := harness.Start(t, f)
			resp, j := submit(t, env, env.APIKey, jobBody(400, "low"))
			if resp.StatusCode != 202 {
				t.Fatalf("submit %d", resp.StatusCode)
			}
			harness.Eventually(t, 10*time.Second, "the job to start", func() bool {
				_, j = getJob(t, env, env.APIKey, j.ID)
				return j.Status == "running"
			})
			started := time.Now()
			tc.cancel(t, env, j.ID)
			harness.Eventually(t, 5*time.Second, "the simulator to see the call aborted", func() bool {
				return simTotal(env, func(s sim.Stats) int64 { return s.Cancelled }) == 1
			})
			t.Logf("call aborted %v after the cancel", time.Since(started).Round(time.Millisecond))
			time.Sleep(500 * time.Millisecond) // let a wrong outcome land, if one were coming
			if _, j = getJob(t, env, env.APIKey, j.ID); j.Status != "cancelled" || j.Usage != nil || j.Result != nil {
				t.Fatalf("after the abort the job is %+v", j)
			}
			if admitted := simTotal(env, func(s sim.Stats) int64 { return s.Admitted }); admitted != 1 {
				t.Fatalf("the simulator admitted %d calls, want the one (no retry after the abort)", admitted)
			}
		})
	}
}
