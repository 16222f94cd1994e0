package test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/levee-gw/levee/config"
	"github.com/levee-gw/levee/dev"
	"github.com/levee-gw/levee/sim"
	"github.com/levee-gw/levee/store"
	"github.com/levee-gw/levee/test/harness"
)

// While Postgres is down every path that needs it answers 503 with
// Retry-After — never 500 — and synchronous calls with a key already
// checked are still served; when it is back, so is everything else.
func TestPostgresOutageAnswers503(t *testing.T) {
	pg := harness.PrivatePostgres(t)
	env := harness.StartWith(t, nil, dev.StackOptions{DatabaseURL: pg.URL})
	_, j := submit(t, env, env.APIKey, jobBody(5, "low"))
	if resp, raw := call(t, env.BaseURL, "/v1/chat/completions", env.APIKey, chat(5)); resp.StatusCode != 200 {
		t.Fatalf("before: %d %s", resp.StatusCode, raw)
	}
	pg.Stop()
	for _, tc := range []struct {
		name, path string
		body       any
	}{
		{"submit a job", "/v1/jobs", jobBody(5, "low")},
		{"read a job", "/v1/jobs/" + j.ID, nil},
		{"list jobs", "/v1/jobs", nil},
		{"usage", "/v1/usage", nil},
		{"files", "/v1/files", nil},
		{"batches", "/v1/batches", nil},
		{"webhook endpoints", "/v1/webhook_endpoints", nil},
		{"readyz", "/readyz", nil},
	} {
		resp, raw := call(t, env.BaseURL, tc.path, env.APIKey, tc.body)
		if resp.StatusCode != 503 || resp.Header.Get("Retry-After") == "" && tc.path != "/readyz" {
			t.Errorf("%s with Postgres down: %d (Retry-After %q) %s", tc.name, resp.StatusCode, resp.Header.Get("Retry-After"), raw)
		}
		mustEnvelope(t, raw)
	}
	// A key that was checked a moment ago needs no database.
	if resp, raw := call(t, env.BaseURL, "/v1/chat/completions", env.APIKey, chat(5)); resp.StatusCode != 200 {
		t.Errorf("a synchronous call with Postgres down: %d %s", resp.StatusCode, raw)
	}
	pg.Start()
	harness.Eventually(t, 20*time.Second, "jobs to be accepted again", func() bool {
		resp, _ := submit(t, env, env.APIKey, jobBody(5, "low"))
		return resp.StatusCode == 202
	})
	if done := waitJob(t, env, env.APIKey, j.ID, 30*time.Second); done.Status != "succeeded" {
		t.Fatalf("the job accepted before the outage: %+v", done)
	}
}

// A Postgres that stops answering without closing its connections (a hung
// primary) is no different for clients: 503 with Retry-After after
// database_timeout, never a hang, and everything works once it answers.
func TestFrozenPostgresAnswers503(t *testing.T) {
	pg := harness.PrivatePostgres(t)
	f := harness.Fast(dev.DefaultFile())
	f.DatabaseTimeout = time.Second
	env := harness.StartWith(t, f, dev.StackOptions{DatabaseURL: pg.URL})
	if resp, _ := submit(t, env, env.APIKey, jobBody(5, "low")); resp.StatusCode != 202 {
		t.Fatalf("before: %d", resp.StatusCode)
	}
	fresh := env.NewKey("tenant-b")
	pg.Freeze()
	thawed := false
	defer func() {
		if !thawed {
			pg.Thaw()
		}
	}()
	client := &http.Client{Timeout: 8 * time.Second}
	for _, tc := range []struct {
		name, method, path, key, body string
	}{
		{"submit a job", http.MethodPost, "/v1/jobs", env.APIKey, `{"endpoint":"/v1/chat/completions","body":{"model":"gpt-4o",` + hi + `}}`},
		{"list jobs", http.MethodGet, "/v1/jobs", env.APIKey, ""},
		{"usage", http.MethodGet, "/v1/usage", env.APIKey, ""},
		{"a key not yet checked", http.MethodGet, "/v1/models", fresh, ""},
		{"file content", http.MethodGet, "/v1/files/file-00000000-0000-0000-0000-000000000000/content", env.APIKey, ""},
	} {
		var body io.Reader
		if tc.body != "" {
			body = strings.NewReader(tc.body)
		}
		req, _ := http.NewRequest(tc.method, env.BaseURL+tc.path, body)
		req.Header.Set("Authorization", "Bearer "+tc.key)
		start := time.Now()
		resp, err := client.Do(req)
		if err != nil {
			t.Fatalf("%s with Postgres frozen: %v", tc.name, err)
		}
		raw, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		t.Logf("%s: %d after %v", tc.name, resp.StatusCode, time.Since(start).Round(time.Millisecond))
		if resp.StatusCode != 503 || resp.Header.Get("Retry-After") == "" {
			t.Errorf("%s with Postgres frozen: %d %s", tc.name, resp.StatusCode, raw)
		}
	}
	pg.Thaw()
	thawed = true
	harness.Eventually(t, 20*time.Second, "jobs to be accepted again", func() bool {
		resp, _ := submit(t, env, env.APIKey, jobBody(5, "low"))
		return resp.StatusCode == 202
	})
}

// A job whose row was committed by a gateway that died before publishing it
// (here: a row no one publishes) is published by the outbox relay and runs.
func TestOutboxPublishesJobsNobodyPublished(t *testing.T) {
	env := harness.Start(t, nil)
	k, err := env.Store.KeyBySecret(context.Background(), env.APIKey)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := json.Marshal(chat(5))
	j, _, err := env.Store.InsertJob(context.Background(), &store.InsertJobParams{TenantID: k.TenantID, KeyID: k.ID,
		Endpoint: "/v1/chat/completions", Model: "gpt-4o", Body: body, Priority: "low"})
	if err != nil {
		t.Fatal(err)
	}
	if done := waitJob(t, env, env.APIKey, "job_"+j.ID.String(), 20*time.Second); done.Status != "succeeded" {
		t.Fatalf("%+v", done)
	}
}

// NATS away: jobs are still accepted at once (202 means durable in
// Postgres), and run once it is back.
func TestJobsAreAcceptedWhileNATSIsDown(t *testing.T) {
	env := harness.Start(t, nil)
	env.StopNATS()
	var ids []string
	for i := 0; i < 20; i++ {
		start := time.Now()
		resp, j := submit(t, env, env.APIKey, jobBody(5, "low"))
		if resp.StatusCode != 202 {
			t.Fatalf("submit with NATS down: %d", resp.StatusCode)
		}
		if d := time.Since(start); d > time.Second {
			t.Errorf("a submit took %v with NATS down", d)
		}
		ids = append(ids, j.ID)
	}
	resp, raw := call(t, env.BaseURL, "/readyz", "", nil)
	if resp.StatusCode != 200 || !strings.Contains(string(raw), `"nats":"unreachable"`) {
		t.Fatalf("readyz with NATS down: %d %s", resp.StatusCode, raw)
	}
	env.StartNATS()
	for _, id := range ids {
		if j := waitJob(t, env, env.APIKey, id, 30*time.Second); j.Status != "succeeded" {
			t.Fatalf("%s: %+v", id, j)
		}
	}
}

// A `levee worker` told to stop (SIGTERM) finishes its calls in flight, and
// goes on sharing capacity with the fleet until they are done: a 429 one of
// them meets on the way out still marks the deployment full everywhere.
func TestSignalledWorkerSharesCapacityUntilItsCallsEnd(t *testing.T) {
	if testing.Short() {
		t.Skip("runs levee processes")
	}
	f := &dev.File{
		Deployments: []dev.FileDeployment{{Name: "d", Model: "gpt-4o", Kind: config.Standard, TPM: 100_000, RPM: 1 << 20,
			Sim: sim.Deployment{CompletionTokens: 5}}},
		Models: []config.Model{{Name: "gpt-4o", Deployments: []string{"d"}, MaxTokens: 4096}},
	}
	env := harness.StartWith(t, f, dev.StackOptions{NoWorkers: true})
	cfgPath, penv := processConfig(t, env, "127.0.0.1:0", "shutdown_timeout: 20s\n")
	worker := harness.Spawn(t, penv, "worker", "--config", cfgPath, "--metrics", "")
	nc, err := nats.Connect(env.NATSURL)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	type heard struct {
		at      time.Time
		penalty bool
	}
	msgs := make(chan heard, 1024)
	sub, err := nc.Subscribe("levee.capacity.>", func(m *nats.Msg) {
		msgs <- heard{time.Now(), strings.Contains(string(m.Data), `"u":`)}
	})
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Unsubscribe()

	// Someone else fills the deployment behind Levee's back, and its calls
	// are then held 3 s before the deployment decides on them.
	simCall := func(method, path, body string) int {
		req, _ := http.NewRequest(method, env.SimURL+path, strings.NewReader(body))
		req.Header.Set("api-key", env.Config.Deployments[0].Credential)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	for _, maxTokens := range []int{90_000, 1000, 1} {
		for simCall(http.MethodPost, "/openai/deployments/d/chat/completions?api-version=2024-10-21",
			fmt.Sprintf(`{"max_tokens":%d,"messages":[{"role":"user","content":"x"}]}`, maxTokens)) == 200 {
		}
	}
	setFaults(t, env, "d", sim.Faults{Delay: 3 * time.Second})

	_, j := submit(t, env, env.APIKey, jobBody(5, "low"))
	harness.Eventually(t, 20*time.Second, "the worker to start the job", func() bool {
		_, cur := getJob(t, env, env.APIKey, j.ID)
		return cur.Status == "running"
	})
	signalled := time.Now()
	if err := worker.Cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := worker.Cmd.Wait(); err != nil {
		t.Fatalf("worker exit: %v\n%s", err, worker.Output())
	}
	// The worker's last message may still be on its way to this
	// subscriber when the process has exited.
	penalties := 0
	deadline := time.After(5 * time.Second)
	for penalties == 0 {
		select {
		case m := <-msgs:
			if m.penalty && m.at.After(signalled) {
				penalties++
			}
			continue
		case <-deadline:
		}
		break
	}
	if penalties == 0 {
		t.Fatalf("the 429 the worker met after the signal was not shared with the fleet:\n%s", worker.Output())
	}
	// The job went back to the queue for another worker, neither lost nor failed.
	if _, cur := getJob(t, env, env.APIKey, j.ID); cur.Status != "queued" {
		t.Fatalf("the job after its worker stopped: %+v", cur)
	}
}
