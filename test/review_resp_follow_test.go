package test

import (
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/levee-gw/levee/dev"
	"github.com/levee-gw/levee/test/harness"
)

// Followers of a streamed background response that is cancelled and then
// deleted (DELETE is allowed once it ended) never end: followResponse
// keeps its stale copy of the job (running) when GetJob answers
// ErrNotFound, finds no events (the cascade removed them), and polls
// Postgres every 50 ms for as long as the client stays connected.
func TestRespReviewFollowersOfADeletedResponseNeverEnd(t *testing.T) {
	f := harness.Fast(dev.DefaultFile())
	for i := range f.Deployments {
		f.Deployments[i].Sim.PerToken = 40 * time.Millisecond
		f.Deployments[i].Sim.CompletionTokens = 400
	}
	env := harness.Start(t, f)
	id, _ := startBackgroundStream(t, env.BaseURL, env.APIKey, map[string]any{"model": "gpt-4o", "input": "A long one."})
	// Three followers, started at different moments (their job re-reads are
	// out of phase), each waiting for text before the cancel.
	var wg sync.WaitGroup
	ended := make([]chan struct{}, 3)
	var mu sync.Mutex
	counts := make([]int, 3)
	for i := range ended {
		ended[i] = make(chan struct{})
		resp, cancel := openStream(t, "GET", env.BaseURL+"/v1/responses/"+id+"?stream=true", env.APIKey, nil)
		t.Cleanup(cancel)
		seen := make(chan struct{})
		var once sync.Once
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			defer close(ended[i])
			_ = readEvents(resp, func(e sseEvent) bool {
				mu.Lock()
				counts[i]++
				mu.Unlock()
				if e.Type == "response.output_text.delta" {
					once.Do(func() { close(seen) })
				}
				return true
			})
		}(i)
		select {
		case <-seen:
		case <-time.After(10 * time.Second):
			t.Fatal("no text streamed")
		}
		time.Sleep(170 * time.Millisecond)
	}
	resp, raw := call(t, env.BaseURL, "/v1/responses/"+id+"/cancel", env.APIKey, map[string]any{})
	if resp.StatusCode != 200 || !strings.Contains(string(raw), `"cancelled"`) {
		t.Fatalf("cancel: %d %s", resp.StatusCode, raw)
	}
	resp, raw = callAs(t, "DELETE", env.BaseURL+"/v1/responses/"+id, env.APIKey, nil)
	if resp.StatusCode != 200 {
		t.Fatalf("delete: %d %s", resp.StatusCode, raw)
	}
	deadline := time.After(5 * time.Second)
	var stuck []string
	for i, c := range ended {
		select {
		case <-c:
		case <-deadline:
			deadline = time.After(0)
			mu.Lock()
			stuck = append(stuck, fmt.Sprintf("follower %d (%d events read)", i, counts[i]))
			mu.Unlock()
		}
	}
	if len(stuck) > 0 {
		t.Fatalf("5 s after the response was cancelled and deleted, still streaming (and polling Postgres every 50 ms): %v", stuck)
	}
}

// GET ?stream=true of a background response that was not created with
// stream: OpenAI refuses it (400); Levee holds the connection, polling
// Postgres every 50 ms for as long as the response is queued or running,
// then answers 200 with an empty stream — no event at all, which every SDK
// reports as a broken stream.
func TestRespReviewStreamingANonStreamedBackgroundResponse(t *testing.T) {
	env := harness.Start(t, nil)
	bg := createBackground(t, env.BaseURL, env.APIKey, map[string]any{"model": "gpt-4o", "input": "Not streamed."})
	harness.Eventually(t, 20*time.Second, "the background response to complete", func() bool {
		return getResponse(t, env.BaseURL, env.APIKey, bg.ID).Status == "completed"
	})
	resp, raw := callAs(t, "GET", env.BaseURL+"/v1/responses/"+bg.ID+"?stream=true", env.APIKey, nil)
	if resp.StatusCode == 200 && !strings.Contains(string(raw), "event: ") {
		t.Fatalf("streaming a completed, non-streamed background response: 200 with an empty body %q", raw)
	}
}
