package test

import (
	"encoding/base64"
	"strings"
	"testing"

	"github.com/levee-gw/levee/store"
	"github.com/levee-gw/levee/test/harness"
)

// What Levee estimates must be what the deployment reads (README: input
// "in all its shapes"). Three parts of a Responses body the deployment
// counts as input are estimated at (almost) nothing:
//   - a message part of a type other than text/image (input_file's
//     file_data, input_audio…): contentPart reads only "text", so 40 KB of
//     file_data is 1 token;
//   - text.format's JSON schema (structured outputs): never read;
//   - prompt.variables (prompt templates): never read.
//
// With a tenant limit of 2,000 tokens a minute, 40 KB as input_text is
// refused ("no wait would help"); the same 40 KB in any of these passes.
func TestRespReviewUncountedInputPassesTheTenantLimit(t *testing.T) {
	env := harness.Start(t, nil)
	key := env.NewKey("sizes")
	setLimits(t, env, &store.SetLimitsParams{TenantID: tenantOf(t, env, key), TPM: 2000})
	big := strings.Repeat("levee ", 7000) // ~40 KB
	schema := map[string]any{"type": "object", "properties": map[string]any{"answer": map[string]any{"type": "string", "description": big}}}
	cases := []struct {
		name string
		body map[string]any
	}{
		{"input_text (control)", map[string]any{"input": []any{map[string]any{"role": "user", "content": []any{
			map[string]any{"type": "input_text", "text": big}}}}}},
		{"input_file", map[string]any{"input": []any{map[string]any{"role": "user", "content": []any{
			map[string]any{"type": "input_text", "text": "Summarize."},
			map[string]any{"type": "input_file", "filename": "a.txt", "file_data": "data:text/plain;base64," + base64.StdEncoding.EncodeToString([]byte(big))}}}}}},
		{"text.format schema", map[string]any{"input": "Answer.", "text": map[string]any{"format": map[string]any{"type": "json_schema", "name": "a", "schema": schema}}}},
		{"prompt.variables", map[string]any{"input": "Answer.", "prompt": map[string]any{"id": "pmpt_1", "variables": map[string]any{"doc": big}}}},
	}
	var passed []string
	for _, c := range cases {
		c.body["model"], c.body["max_output_tokens"] = "gpt-4o", 16
		resp, raw := call(t, env.BaseURL, "/v1/responses", key, c.body)
		switch {
		case resp.StatusCode == 429 && strings.Contains(string(raw), "no wait would help"):
		case c.name == "input_text (control)":
			t.Fatalf("control: %d %s", resp.StatusCode, raw)
		default:
			passed = append(passed, c.name)
		}
	}
	if len(passed) > 0 {
		t.Fatalf("~10,000 tokens of input passed a 2,000-token limit when carried as: %v", passed)
	}
}
