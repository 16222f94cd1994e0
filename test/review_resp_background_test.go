package test

import (
	"context"
	"encoding/json"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/levee-gw/levee/config"
	"github.com/levee-gw/levee/dev"
	"github.com/levee-gw/levee/sim"
	"github.com/levee-gw/levee/store"
	"github.com/levee-gw/levee/test/harness"
)

// startBackgroundStream posts a streamed background response and returns
// its id (from Levee's response.created), closing the connection.
func startBackgroundStream(t *testing.T, base, key string, body map[string]any) (id string, job uuid.UUID) {
	t.Helper()
	body["background"], body["stream"] = true, true
	resp, cancel := openStream(t, "POST", base+"/v1/responses", key, body)
	defer cancel()
	if resp.StatusCode != 200 {
		t.Fatalf("create: %d", resp.StatusCode)
	}
	_ = readEvents(resp, func(e sseEvent) bool {
		if e.Type == "response.created" {
			r, _ := e.Data["response"].(map[string]any)
			id, _ = r["id"].(string)
			return false
		}
		return true
	})
	if !strings.HasPrefix(id, "resp_lv") {
		t.Fatalf("no id from the stream")
	}
	job, err := uuid.Parse(strings.TrimPrefix(id, "resp_lv"))
	if err != nil {
		t.Fatal(err)
	}
	return id, job
}

// A streamed background response the deployment refuses with a 4xx (here:
// a body Levee accepts and the deployment does not) is a JSON error, not a
// stream: streamEvents finds no terminal event, returns ErrUnexpectedEOF,
// and the worker requeues it as a broken read — without ever checking
// max_attempts. It is sent to the deployment again and again, forever; it
// never fails, and no response.failed webhook or event ever comes.
// (The same body without stream fails after one attempt.)
func TestRespReviewStreamedBackgroundRefusedIsRetriedForever(t *testing.T) {
	f := harness.Fast(dev.DefaultFile())
	f.Queue = config.Queue{MaxAttempts: 2, Backoff: []time.Duration{50 * time.Millisecond}}
	env := harness.Start(t, f)
	ctx := context.Background()

	// Control: not streamed, it fails at once.
	plain := createBackground(t, env.BaseURL, env.APIKey, map[string]any{"model": "gpt-4o", "input": "x", "n": "oops"})
	harness.Eventually(t, 10*time.Second, "the plain background response to fail", func() bool {
		return getResponse(t, env.BaseURL, env.APIKey, plain.ID).Status == "failed"
	})

	id, job := startBackgroundStream(t, env.BaseURL, env.APIKey, map[string]any{"model": "gpt-4o", "input": "x", "n": "oops"})
	deadline := time.Now().Add(8 * time.Second)
	var status string
	var attempts int
	for time.Now().Before(deadline) {
		if err := env.Store.Pool().QueryRow(ctx, `SELECT status, attempts FROM jobs WHERE id = $1`, job).Scan(&status, &attempts); err != nil {
			t.Fatal(err)
		}
		if status == "failed" {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	calls := simTotal(env, func(s sim.Stats) int64 { return s.Calls })
	if status != "failed" || attempts > 2 {
		t.Fatalf("a streamed background response the deployment refuses: after 8 s it is %q with %d attempts (max_attempts 2); "+
			"the deployments saw %d calls; GET says %s", status, attempts, calls, getResponse(t, env.BaseURL, env.APIKey, id).Status)
	}
}

// A worker's read of a streamed background response breaks (a worker dies,
// or the deployment drops the stream) after many events; the rerun's answer
// is shorter. Its events are numbered from 2 again, every one of them is a
// number already stored, ON CONFLICT DO NOTHING drops them all — the
// terminal response.completed included. The job succeeds, GET says
// completed, but the stream (live or replayed) ends without a terminal
// event, which SDKs report as an error.
func TestRespReviewShorterRerunLosesTheTerminalEvent(t *testing.T) {
	f := harness.Fast(dev.DefaultFile())
	f.Queue = config.Queue{Backoff: []time.Duration{50 * time.Millisecond}}
	env := harness.StartWith(t, f, dev.StackOptions{NoWorkers: true})
	attempt := 0
	g := reviewGateway(t, env, fakeStreamDeployment(func() (deltas int, complete bool) {
		attempt++
		if attempt == 1 {
			return 30, false // breaks off before its end
		}
		return 3, true
	}), true, func(c *config.Config) { c.Queue.Backoff = []time.Duration{50 * time.Millisecond} })
	base := "http://" + g.Addr
	id, _ := startBackgroundStream(t, base, env.APIKey, map[string]any{"model": "gpt-4o", "input": "x"})
	harness.Eventually(t, 15*time.Second, "the response to complete", func() bool {
		return getResponse(t, base, env.APIKey, id).Status == "completed"
	})
	resp, cancel := openStream(t, "GET", base+"/v1/responses/"+id+"?stream=true", env.APIKey, nil)
	defer cancel()
	var types []string
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = readEvents(resp, func(e sseEvent) bool { types = append(types, e.Type); return true })
	}()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("the replay did not end")
	}
	last := ""
	if len(types) > 0 {
		last = types[len(types)-1]
	}
	if last != "response.completed" {
		t.Fatalf("a completed response's stream (%d events, %d attempts upstream) ends with %q, not response.completed", len(types), attempt, last)
	}
}

// fakeStreamDeployment answers every Responses call with a stream of
// shape() deltas, complete (with its terminal event) or broken off.
func fakeStreamDeployment(shape func() (int, bool)) *fakeStream {
	return &fakeStream{shape: shape}
}

type fakeStream struct {
	shape func() (int, bool)
	n     int
}

func (f *fakeStream) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	deltas, complete := f.shape()
	f.n++
	id := "resp_fake" + strings.Repeat("x", f.n)
	w.Header().Set("Content-Type", "text/event-stream")
	w.WriteHeader(200)
	seq := 0
	send := func(typ string, v map[string]any) {
		v["type"], v["sequence_number"] = typ, seq
		seq++
		b, _ := json.Marshal(v)
		_, _ = w.Write([]byte("event: " + typ + "\ndata: " + string(b) + "\n\n"))
		w.(http.Flusher).Flush()
	}
	obj := func(status string, usage any) map[string]any {
		return map[string]any{"id": id, "object": "response", "status": status, "output": []any{}, "usage": usage, "store": true}
	}
	send("response.created", map[string]any{"response": obj("in_progress", nil)})
	send("response.in_progress", map[string]any{"response": obj("in_progress", nil)})
	send("response.output_item.added", map[string]any{"output_index": 0, "item": map[string]any{"id": "msg_1", "type": "message"}})
	send("response.content_part.added", map[string]any{"item_id": "msg_1", "output_index": 0, "content_index": 0})
	for i := 0; i < deltas; i++ {
		send("response.output_text.delta", map[string]any{"item_id": "msg_1", "output_index": 0, "content_index": 0, "delta": " word"})
	}
	if !complete {
		return
	}
	send("response.output_text.done", map[string]any{"item_id": "msg_1"})
	send("response.content_part.done", map[string]any{"item_id": "msg_1"})
	send("response.output_item.done", map[string]any{"output_index": 0})
	done := obj("completed", map[string]any{"input_tokens": 5, "output_tokens": deltas, "total_tokens": 5 + deltas})
	send("response.completed", map[string]any{"response": done})
}

// A background response whose first run recorded its route (the worker
// records it just before FinishJob) and was then run again (its worker
// died before FinishJob, or FinishJob could not reach Postgres and the
// lease ran out) records the rerun's route under the same resp_lv… id. The
// upsert updates only context_tokens and expires_at: upstream_id and
// deployment stay the first run's. GET serves the rerun's response (the
// job's result), while follow-ups, input_items and DELETE go to the first
// run's — and the rerun's stored copy can never be deleted.
func TestRespReviewRerunKeepsTheFirstRunsRoute(t *testing.T) {
	env := harness.Start(t, nil)
	ctx := context.Background()
	tenant := tenantOf(t, env, env.APIKey)
	id := "resp_lv" + strings.ReplaceAll(uuid.NewString(), "-", "")
	for _, r := range []struct{ dep, up string }{{"gpt-4o-ptu", "resp_firstrun"}, {"gpt-4o-standard", "resp_rerun"}} {
		if err := env.Store.RecordResponse(ctx, &store.ResponseRoute{ID: id, TenantID: tenant, Deployment: r.dep, UpstreamID: r.up, ContextTokens: 10},
			time.Hour); err != nil {
			t.Fatal(err)
		}
	}
	rt, err := env.Store.ResponseRouteOf(ctx, tenant, id)
	if err != nil {
		t.Fatal(err)
	}
	if rt.UpstreamID != "resp_rerun" || rt.Deployment != "gpt-4o-standard" {
		t.Fatalf("after the rerun the route still names %s on %s", rt.UpstreamID, rt.Deployment)
	}
}
