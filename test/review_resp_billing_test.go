package test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/levee-gw/levee/config"
	"github.com/levee-gw/levee/test/harness"
)

// openAIOrderedResponse is a Response as OpenAI's API reference shows it:
// usage, then user, then metadata (echoed from the request) last.
func openAIOrderedResponse(id string, metadata json.RawMessage, in, out int) string {
	if len(metadata) == 0 {
		metadata = json.RawMessage(`{}`)
	}
	return fmt.Sprintf(`{"id":%q,"object":"response","created_at":1741476542,"status":"completed","background":false,"error":null,`+
		`"incomplete_details":null,"instructions":null,"max_output_tokens":16,"model":"gpt-4o-2024-08-06",`+
		`"output":[{"type":"message","id":"msg_1","status":"completed","role":"assistant","content":[{"type":"output_text","text":"Hi.","annotations":[]}]}],`+
		`"parallel_tool_calls":true,"previous_response_id":null,"reasoning":{"effort":null,"summary":null},"store":true,"temperature":1.0,`+
		`"text":{"format":{"type":"text"}},"tool_choice":"auto","tools":[],"top_p":1.0,"truncation":"disabled",`+
		`"usage":{"input_tokens":%d,"input_tokens_details":{"cached_tokens":0},"output_tokens":%d,"output_tokens_details":{"reasoning_tokens":0},"total_tokens":%d},`+
		`"user":null,"metadata":%s}`, id, in, out, in+out, metadata)
}

// A client names a metadata key "usage". OpenAI echoes metadata after usage
// in its Response, and ParseUsage takes the LAST `"usage":` in the body: it
// finds the metadata string, gives up, and the call goes into the ledger
// with no tokens and no cost although the deployment billed 1,000 + 500.
func TestRespReviewMetadataKeyUsageHidesTheBill(t *testing.T) {
	env := harness.Start(t, nil)
	n := 0
	g := reviewGateway(t, env, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		var req struct {
			Metadata json.RawMessage `json:"metadata"`
		}
		_ = json.Unmarshal(body, &req)
		n++
		w.Header().Set("Content-Type", "application/json")
		_, _ = io.WriteString(w, openAIOrderedResponse(fmt.Sprintf("resp_review%d", n), req.Metadata, 1000, 500))
	}), false, func(c *config.Config) {
		c.Pricing = config.Pricing{Currency: "USD", Prices: []config.Price{{Match: "gpt-4o", Input: 2.5, Output: 10}}}
	})
	base := "http://" + g.Addr
	ctx := context.Background()
	row := func(reqID string) (in, out, cost int64) {
		fctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		if err := g.Ledger.Flush(fctx); err != nil {
			t.Fatal(err)
		}
		if err := env.Store.Pool().QueryRow(ctx, `SELECT prompt_tokens, completion_tokens, cost_nanos FROM usage_events WHERE request_id = $1`,
			reqID).Scan(&in, &out, &cost); err != nil {
			t.Fatalf("ledger row %s: %v", reqID, err)
		}
		return
	}
	// Baseline: the ledger has the deployment's usage.
	resp, raw := call(t, base, "/v1/responses", env.APIKey, map[string]any{"model": "gpt-4o", "input": "Hi", "max_output_tokens": 16,
		"metadata": map[string]string{"team": "a"}})
	if resp.StatusCode != 200 {
		t.Fatalf("%d %s", resp.StatusCode, raw)
	}
	if in, out, cost := row(resp.Header.Get("x-request-id")); in != 1000 || out != 500 || cost == 0 {
		t.Fatalf("baseline ledger: %d in, %d out, cost %d", in, out, cost)
	}
	// The same call with a metadata key named "usage".
	resp, raw = call(t, base, "/v1/responses", env.APIKey, map[string]any{"model": "gpt-4o", "input": "Hi", "max_output_tokens": 16,
		"metadata": map[string]string{"usage": "free"}})
	if resp.StatusCode != 200 || !strings.Contains(string(raw), `"input_tokens":1000`) {
		t.Fatalf("%d %s", resp.StatusCode, raw)
	}
	if in, out, cost := row(resp.Header.Get("x-request-id")); in != 1000 || out != 500 || cost == 0 {
		t.Fatalf(`with metadata {"usage":"free"} the ledger recorded %d in, %d out, cost %d nanos for a response that used 1000 + 500 tokens`, in, out, cost)
	}
}
