package test

import (
	"bytes"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	standardwebhooks "github.com/standard-webhooks/standard-webhooks/libraries/go"

	"github.com/levee-gw/levee/config"
	"github.com/levee-gw/levee/dev"
	"github.com/levee-gw/levee/test/harness"
)

// receiver verifies every delivery with the standardwebhooks library and
// records what arrived; down makes it answer 503 while true.
type receiver struct {
	t    *testing.T
	mu   sync.Mutex
	wh   *standardwebhooks.Webhook
	down bool
	// per webhook-id: the attempts seen, and the event type
	attempts map[string]int
	types    map[string]string
	bad      int
	srv      *httptest.Server
}

func newReceiver(t *testing.T) *receiver {
	r := &receiver{t: t, attempts: map[string]int{}, types: map[string]string{}}
	r.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		body, _ := io.ReadAll(req.Body)
		r.mu.Lock()
		defer r.mu.Unlock()
		id := req.Header.Get("webhook-id")
		r.attempts[id]++
		if r.down {
			w.WriteHeader(http.StatusServiceUnavailable)
			return
		}
		if r.wh == nil || r.wh.Verify(body, req.Header) != nil {
			r.bad++
			w.WriteHeader(http.StatusUnauthorized)
			return
		}
		var ev struct {
			ID   string `json:"id"`
			Type string `json:"type"`
		}
		if json.Unmarshal(body, &ev) != nil || ev.ID != id {
			r.bad++
		}
		r.types[id] = ev.Type
		w.WriteHeader(http.StatusNoContent)
	}))
	t.Cleanup(r.srv.Close)
	return r
}

func (r *receiver) setSecret(secret string) {
	wh, err := standardwebhooks.NewWebhook(secret)
	if err != nil {
		r.t.Fatal(err)
	}
	r.mu.Lock()
	r.wh = wh
	r.mu.Unlock()
}

func (r *receiver) delivered() map[string]string {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := map[string]string{}
	for k, v := range r.types {
		out[k] = v
	}
	return out
}

func createEndpoint(t *testing.T, env *harness.Env, url string, events ...string) (string, string) {
	t.Helper()
	body := map[string]any{"url": url}
	if len(events) > 0 {
		body["events"] = events
	}
	resp, raw := call(t, env.BaseURL, "/v1/webhook_endpoints", env.APIKey, body)
	if resp.StatusCode != 200 {
		t.Fatalf("create endpoint: %d %s", resp.StatusCode, raw)
	}
	var e struct {
		ID     string `json:"id"`
		Secret string `json:"secret"`
	}
	_ = json.Unmarshal(raw, &e)
	if !strings.HasPrefix(e.Secret, "whsec_") {
		t.Fatalf("no secret shown: %s", raw)
	}
	return e.ID, e.Secret
}

func fastWebhooks() *dev.File {
	f := slowFile(0, 1<<30)
	f.Webhooks = config.Webhooks{Schedule: []time.Duration{100 * time.Millisecond, 200 * time.Millisecond, 300 * time.Millisecond,
		400 * time.Millisecond, 500 * time.Millisecond, 500 * time.Millisecond, 500 * time.Millisecond, 500 * time.Millisecond, 500 * time.Millisecond}}
	return f
}

func TestWebhooksAreSignedAndSurviveADownReceiver(t *testing.T) {
	env := harness.Start(t, fastWebhooks())
	rcv := newReceiver(t)
	epID, secret := createEndpoint(t, env, rcv.srv.URL)
	rcv.setSecret(secret)
	// The secret is shown once only.
	if _, raw := call(t, env.BaseURL, "/v1/webhook_endpoints/"+epID, env.APIKey, nil); strings.Contains(string(raw), "whsec_") {
		t.Fatalf("secret shown again: %s", raw)
	}

	rcv.mu.Lock()
	rcv.down = true
	rcv.mu.Unlock()
	var ids []string
	for i := 0; i < 5; i++ {
		_, j := submit(t, env, env.APIKey, jobBody(5, "normal"))
		ids = append(ids, j.ID)
	}
	_, cancelled := submit(t, env, env.APIKey, jobBody(5, "low"))
	call(t, env.BaseURL, "/v1/jobs/"+cancelled.ID+"/cancel", env.APIKey, "")
	for _, id := range ids {
		waitJob(t, env, env.APIKey, id, 10*time.Second)
	}
	time.Sleep(700 * time.Millisecond) // several failed attempts
	rcv.mu.Lock()
	rcv.down = false
	rcv.mu.Unlock()
	harness.Eventually(t, 15*time.Second, "every event to arrive once the receiver is back", func() bool {
		return len(rcv.delivered()) >= 6
	})
	got := rcv.delivered()
	counts := map[string]int{}
	for _, typ := range got {
		counts[typ]++
	}
	if counts["job.succeeded"] < 5 || rcv.bad != 0 {
		t.Fatalf("delivered %v (bad signatures %d)", counts, rcv.bad)
	}
	rcv.mu.Lock()
	retried := 0
	for id, n := range rcv.attempts {
		if n > 1 {
			retried++
		}
		if !strings.HasPrefix(id, "evt_") {
			t.Fatalf("webhook-id %q", id)
		}
	}
	rcv.mu.Unlock()
	if retried == 0 {
		t.Fatal("no delivery was retried: the receiver was never down for it")
	}
	// A batch's end is an event too.
	resp0, raw0 := upload(t, env, env.APIKey, bytes.NewReader(batchLines(3, "w")), "batch")
	if resp0.StatusCode != 200 {
		t.Fatalf("upload: %s", raw0)
	}
	var f struct {
		ID string `json:"id"`
	}
	_ = json.Unmarshal(raw0, &f)
	call(t, env.BaseURL, "/v1/batches", env.APIKey, map[string]any{"input_file_id": f.ID, "endpoint": "/v1/chat/completions", "completion_window": "24h"})
	harness.Eventually(t, 15*time.Second, "batch.completed to arrive", func() bool {
		for _, typ := range rcv.delivered() {
			if typ == "batch.completed" {
				return true
			}
		}
		return false
	})
	// Every attempt is recorded and visible.
	resp, raw := call(t, env.BaseURL, "/v1/webhook_endpoints/"+epID+"/deliveries", env.APIKey, nil)
	if resp.StatusCode != 200 || !strings.Contains(string(raw), `"status":"delivered"`) || !strings.Contains(string(raw), `"status_code":503`) {
		t.Fatalf("deliveries: %d %.500s", resp.StatusCode, raw)
	}
}

func TestJobWebhookOverrideAndSSRFGuard(t *testing.T) {
	env := harness.Start(t, fastWebhooks())
	rcv := newReceiver(t)
	resp, raw := call(t, env.BaseURL, "/v1/jobs", env.APIKey, map[string]any{"endpoint": "/v1/chat/completions", "body": chat(5),
		"webhook": map[string]string{"url": rcv.srv.URL + "/hook"}})
	if resp.StatusCode != 202 {
		t.Fatalf("%d %s", resp.StatusCode, raw)
	}
	var j struct {
		ID      string `json:"id"`
		Webhook struct {
			Secret string `json:"secret"`
		} `json:"webhook"`
	}
	_ = json.Unmarshal(raw, &j)
	rcv.setSecret(j.Webhook.Secret)
	harness.Eventually(t, 10*time.Second, "the job's own webhook", func() bool { return len(rcv.delivered()) == 1 })
	for _, typ := range rcv.delivered() {
		if typ != "job.succeeded" {
			t.Fatalf("event %s", typ)
		}
	}
	for _, url := range []string{"http://169.254.169.254/latest/meta-data", "http://10.0.0.1/hook", "http://[::ffff:169.254.169.254]/x"} {
		resp, raw := call(t, env.BaseURL, "/v1/webhook_endpoints", env.APIKey, map[string]any{"url": url})
		if resp.StatusCode != 400 || !strings.Contains(string(raw), "metadata address") {
			t.Fatalf("endpoint %s: %d %s", url, resp.StatusCode, raw)
		}
		resp, raw = call(t, env.BaseURL, "/v1/jobs", env.APIKey, map[string]any{"endpoint": "/v1/chat/completions", "body": chat(5),
			"webhook": map[string]string{"url": url}})
		if resp.StatusCode != 400 {
			t.Fatalf("job webhook %s: %d %s", url, resp.StatusCode, raw)
		}
	}
}

func TestGoneDisablesEndpoint(t *testing.T) {
	env := harness.Start(t, fastWebhooks())
	gone := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { w.WriteHeader(http.StatusGone) }))
	defer gone.Close()
	epID, _ := createEndpoint(t, env, gone.URL, "job.succeeded")
	_, j := submit(t, env, env.APIKey, jobBody(5, "normal"))
	waitJob(t, env, env.APIKey, j.ID, 10*time.Second)
	harness.Eventually(t, 10*time.Second, "the endpoint to be disabled", func() bool {
		_, raw := call(t, env.BaseURL, "/v1/webhook_endpoints/"+epID, env.APIKey, nil)
		return strings.Contains(string(raw), `"enabled":false`) && strings.Contains(string(raw), "410")
	})
}

// With no endpoint and no job webhook, ending jobs writes no events.
func TestNoEventsWithoutReceivers(t *testing.T) {
	env := harness.Start(t, fastWebhooks())
	_, j := submit(t, env, env.APIKey, jobBody(5, "normal"))
	waitJob(t, env, env.APIKey, j.ID, 10*time.Second)
	var n int
	_ = env.Store.Pool().QueryRow(t.Context(), `SELECT count(*) FROM webhook_events`).Scan(&n)
	if n != 0 {
		t.Fatalf("%d events written for nobody", n)
	}
}
