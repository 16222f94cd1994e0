package test

import (
	"encoding/json"
	"net/http"
	"testing"
	"time"

	"github.com/levee-gw/levee/test/harness"
)

// A key's limits apply to everything it sends: "a job over its key's limit
// goes back to the queue". A batch created with a key limited to 1 request
// a minute must not run its 8 lines within seconds; its jobs are stored
// without the key (store.StartBatch), so the key's limits and budget never
// see them and the usage export charges them to no key.
func TestReviewBatchLinesObeyTheirKeysLimits(t *testing.T) {
	env := harness.Start(t, nil)
	newTenant(t, env, "bk")
	k := newAPIKey(t, env, "bk", map[string]any{"limits": []map[string]any{{"rpm": 1}}})

	// The limit is in force for the key's own calls (limits reach the
	// process within a second).
	harness.Eventually(t, 10*time.Second, "the key's own calls to be limited", func() bool {
		resp, _ := call(t, env.BaseURL, "/v1/chat/completions", k.Secret, chat(5))
		return resp.StatusCode == 429
	})
	var resp *http.Response
	var raw []byte

	file := uploadFile(t, env, k.Secret, batchLines(8, "b"))
	resp, raw = call(t, env.BaseURL, "/v1/batches", k.Secret, map[string]any{"input_file_id": file, "endpoint": "/v1/chat/completions", "completion_window": "24h"})
	wantCode(t, "create batch", resp, raw, 200, "")
	var b struct{ ID string }
	_ = json.Unmarshal(raw, &b)

	deadline := time.Now().Add(15 * time.Second)
	var st batchState
	for time.Now().Before(deadline) {
		_, raw := call(t, env.BaseURL, "/v1/batches/"+b.ID, k.Secret, nil)
		_ = json.Unmarshal(raw, &st)
		if st.RequestCounts.Completed > 2 {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	if st.RequestCounts.Completed > 2 {
		t.Fatalf("a key limited to 1 request a minute ran %d batch lines within seconds (%s)", st.RequestCounts.Completed, st.Status)
	}
}
