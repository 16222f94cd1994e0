package test

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/levee-gw/levee/test/harness"
)

// The simulator counts a Responses message part of type input_text as 85
// tokens (contentTokens knows only chat's "text"; every other part is an
// image to it), and an item without a role (function_call_output …) as 4
// whatever its size. The real service counts their text. Levee's estimate
// does too, so any test of reconciliation, context_tokens or pinning that
// uses parts or tool outputs reads usage the real service would never
// report.
func TestRespReviewSimCountsInputTextParts(t *testing.T) {
	env := harness.Start(t, nil)
	text := strings.Repeat("levee ", 500)
	usage := func(input any) int {
		resp, raw := call(t, env.BaseURL, "/v1/responses", env.APIKey, map[string]any{"model": "gpt-4o", "input": input, "max_output_tokens": 16})
		if resp.StatusCode != 200 {
			t.Fatalf("%d %s", resp.StatusCode, raw)
		}
		var o responseObj
		_ = json.Unmarshal(raw, &o)
		return o.Usage.InputTokens
	}
	asString := usage(text)
	asPart := usage([]any{map[string]any{"role": "user", "content": []any{map[string]any{"type": "input_text", "text": text}}}})
	asToolOutput := usage([]any{map[string]any{"type": "function_call_output", "call_id": "call_1", "output": text}})
	if asPart < asString*9/10 || asToolOutput < asString*9/10 {
		t.Fatalf("the same %d-token text is %d input tokens as a string, %d as an input_text part, %d as a function_call_output",
			asString, asString, asPart, asToolOutput)
	}
}

// The simulator's response ids are sha256(body + ONE byte of the clock): a
// body sent again has a 1-in-256 chance of the same id. Identical calls
// (retries, load tests, two tenants sending the same prompt) then share an
// id; the simulator overwrites the first stored response with the second,
// and Levee's route (first tenant wins) sends the other caller 404s — or a
// GET of one's response returns the other's.
func TestRespReviewSimResponseIDsCollide(t *testing.T) {
	env := harness.Start(t, nil)
	seen := map[string]int{}
	for i := 0; i < 64; i++ {
		resp, raw := call(t, env.BaseURL, "/v1/responses", env.APIKey, map[string]any{"model": "gpt-4o-standard", "input": "Same prompt.", "max_output_tokens": 16})
		if resp.StatusCode != 200 {
			t.Fatalf("%d %s", resp.StatusCode, raw)
		}
		var o responseObj
		_ = json.Unmarshal(raw, &o)
		seen[o.ID]++
	}
	if len(seen) != 64 {
		t.Fatalf("64 responses, %d distinct ids", len(seen))
	}
}
