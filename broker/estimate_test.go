package broker

import (
	"errors"
	"strings"
	"testing"
)

func TestParseRequest(t *testing.T) {
	for _, tc := range []struct {
		name      string
		op        Op
		body      string
		wantParam string // "" with wantErr false means success
		wantErr   bool
		check     func(t *testing.T, r *Request)
	}{
		{name: "chat", op: OpChat, body: `{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}],"max_tokens":50,"n":2}`,
			check: func(t *testing.T, r *Request) {
				if r.Model != "gpt-4o" || r.MaxTokens != 50 || r.MaxTokensParam != "max_tokens" || r.N != 2 || r.BestOf != 1 {
					t.Fatalf("%+v", r)
				}
			}},
		{name: "max_completion_tokens", op: OpChat, body: `{"messages":[{"role":"user","content":"hi"}],"max_completion_tokens":70}`,
			check: func(t *testing.T, r *Request) {
				if r.MaxTokens != 70 || r.MaxTokensParam != "max_completion_tokens" {
					t.Fatalf("%+v", r)
				}
			}},
		{name: "stream with usage", op: OpChat, body: `{"messages":[{"role":"user","content":"hi"}],"stream":true,"stream_options":{"include_usage":true}}`,
			check: func(t *testing.T, r *Request) {
				if !r.Stream || !r.IncludeUsage {
					t.Fatalf("%+v", r)
				}
			}},
		{name: "bad json", op: OpChat, body: `{"messages":`, wantErr: true},
		{name: "no messages", op: OpChat, body: `{"model":"x"}`, wantErr: true, wantParam: "messages"},
		{name: "n zero", op: OpChat, body: `{"messages":[{"role":"user","content":"hi"}],"n":0}`, wantErr: true, wantParam: "n"},
		{name: "negative max_tokens", op: OpChat, body: `{"messages":[{"role":"user","content":"hi"}],"max_tokens":-5}`, wantErr: true, wantParam: "max_tokens"},
		{name: "zero max_tokens", op: OpChat, body: `{"messages":[{"role":"user","content":"hi"}],"max_tokens":0}`, wantErr: true, wantParam: "max_tokens"},
		{name: "negative max_completion_tokens beside max_tokens", op: OpChat, body: `{"messages":[{"role":"user","content":"hi"}],"max_tokens":5,"max_completion_tokens":-5}`, wantErr: true, wantParam: "max_completion_tokens"},
		{name: "zero best_of", op: OpCompletions, body: `{"prompt":"x","best_of":0}`, wantErr: true, wantParam: "best_of"},
		{name: "null max_tokens is unset", op: OpChat, body: `{"messages":[{"role":"user","content":"hi"}],"max_tokens":null}`,
			check: func(t *testing.T, r *Request) {
				if r.MaxTokens != 0 {
					t.Fatalf("%+v", r)
				}
			}},
		// What Levee charges must be what the deployment reads: names match
		// exactly, and a variant of a field Levee reads is refused.
		{name: "case variant of max_tokens", op: OpChat, body: `{"model":"gpt-4o","max_tokens":100000,"MAX_TOKENS":5,"messages":[{"role":"user","content":"hi"}]}`, wantErr: true, wantParam: "MAX_TOKENS"},
		{name: "case variant of n", op: OpChat, body: `{"N":1,"n":8,"messages":[{"role":"user","content":"hi"}]}`, wantErr: true, wantParam: "N"},
		{name: "case variant of max_completion_tokens", op: OpChat, body: `{"Max_Completion_Tokens":5,"messages":[{"role":"user","content":"hi"}]}`, wantErr: true, wantParam: "Max_Completion_Tokens"},
		{name: "case variant of model", op: OpChat, body: `{"Model":"cheap","model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}`, wantErr: true, wantParam: "Model"},
		{name: "duplicate max_tokens", op: OpChat, body: `{"max_tokens":5,"max_tokens":100000,"messages":[{"role":"user","content":"hi"}]}`, wantErr: true, wantParam: "max_tokens"},
		{name: "case variant of a message's content", op: OpChat, body: `{"messages":[{"role":"user","content":"hi","Content":"a very long text"}]}`, wantErr: true, wantParam: "messages[0].Content"},
		{name: "case variant of a content part's text", op: OpChat, body: `{"messages":[{"role":"user","content":[{"type":"text","text":"hi","TEXT":"long"}]}]}`, wantErr: true, wantParam: "messages[0].content[0].TEXT"},
		{name: "content of the wrong shape", op: OpChat, body: `{"messages":[{"role":"user","content":42}]}`, wantErr: true, wantParam: "messages[0].content"},
		{name: "case variant of stream_options.include_usage", op: OpChat, body: `{"stream":true,"stream_options":{"INCLUDE_USAGE":true},"messages":[{"role":"user","content":"hi"}]}`, wantErr: true, wantParam: "stream_options.INCLUDE_USAGE"},
		{name: "case variant of input", op: OpEmbeddings, body: `{"input":"x","Input":["a","b"]}`, wantErr: true, wantParam: "Input"},
		{name: "oversized model", op: OpChat, body: `{"model":"` + strings.Repeat("m", 257) + `","messages":[{"role":"user","content":"hi"}]}`, wantErr: true, wantParam: "model"},
		{name: "model with NUL", op: OpChat, body: `{"model":"gpt\u0000","messages":[{"role":"user","content":"hi"}]}`, wantErr: true, wantParam: "model"},
		{name: "embeddings string", op: OpEmbeddings, body: `{"input":"hello world"}`,
			check: func(t *testing.T, r *Request) {
				if len(r.texts) != 1 {
					t.Fatalf("%+v", r)
				}
			}},
		{name: "embeddings token arrays", op: OpEmbeddings, body: `{"input":[[1,2,3],[4,5]]}`,
			check: func(t *testing.T, r *Request) {
				if r.rawToks != 5 {
					t.Fatalf("%+v", r)
				}
			}},
		{name: "embeddings flat ids", op: OpEmbeddings, body: `{"input":[1,2,3,4]}`,
			check: func(t *testing.T, r *Request) {
				if r.rawToks != 4 {
					t.Fatalf("%+v", r)
				}
			}},
		{name: "embeddings missing input", op: OpEmbeddings, body: `{}`, wantErr: true, wantParam: "input"},
		{name: "embeddings bad input", op: OpEmbeddings, body: `{"input":{"a":1}}`, wantErr: true, wantParam: "input"},
		{name: "completions prompt list", op: OpCompletions, body: `{"prompt":["a","b"],"best_of":3}`,
			check: func(t *testing.T, r *Request) {
				if len(r.texts) != 2 || r.BestOf != 3 {
					t.Fatalf("%+v", r)
				}
			}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r, err := ParseRequest(tc.op, []byte(tc.body))
			if tc.wantErr {
				var be *BadRequestError
				if !errors.As(err, &be) {
					t.Fatalf("want BadRequestError, got %v", err)
				}
				if be.Param != tc.wantParam {
					t.Fatalf("param %q, want %q", be.Param, tc.wantParam)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			tc.check(t, r)
		})
	}
}

func TestPromptTokensMatchOpenAICookbook(t *testing.T) {
	tok := NewTokenizers()
	// 3 per message + role + content, + 3 priming (OpenAI's cookbook).
	r, err := ParseRequest(OpChat, []byte(`{"messages":[{"role":"system","content":"You are a helpful assistant."},{"role":"user","content":"Hello!"}]}`))
	if err != nil {
		t.Fatal(err)
	}
	// system(1) + "You are a helpful assistant."(6) + user(1) + "Hello!"(2) + 3*2 + 3 = 19
	if got := tok.PromptTokens("cl100k_base", r); got != 19 {
		t.Fatalf("cl100k prompt tokens %d, want 19", got)
	}
	if got := tok.PromptTokens("o200k_base", r); got < 17 || got > 21 {
		t.Fatalf("o200k prompt tokens %d", got)
	}
	withName, _ := ParseRequest(OpChat, []byte(`{"messages":[{"role":"user","name":"bob","content":"Hello!"}]}`))
	plain, _ := ParseRequest(OpChat, []byte(`{"messages":[{"role":"user","content":"Hello!"}]}`))
	if d := tok.PromptTokens("cl100k_base", withName) - tok.PromptTokens("cl100k_base", plain); d != 2 {
		t.Fatalf("a name adds %d tokens, want 2 (1 + the name)", d)
	}
	img, _ := ParseRequest(OpChat, []byte(`{"messages":[{"role":"user","content":[{"type":"text","text":"Hello!"},{"type":"image_url","image_url":{"url":"x"}}]}]}`))
	if d := tok.PromptTokens("cl100k_base", img) - tok.PromptTokens("cl100k_base", plain); d != imageTokens {
		t.Fatalf("an image adds %d tokens, want %d", d, imageTokens)
	}
}

func TestEstimateChargesLikeAzure(t *testing.T) {
	for _, tc := range []struct {
		body string
		op   Op
		want int
	}{
		{`{"messages":[{"role":"user","content":"x"}],"max_tokens":100}`, OpChat, 10 + 100},
		{`{"messages":[{"role":"user","content":"x"}],"max_tokens":100,"n":3}`, OpChat, 10 + 300},
		{`{"prompt":"x","max_tokens":100,"n":2,"best_of":4}`, OpCompletions, 10 + 400},
		{`{"messages":[{"role":"user","content":"x"}]}`, OpChat, 10 + 1024},
		{`{"input":"x","max_tokens":100}`, OpEmbeddings, 10},
		// Absurd values saturate instead of wrapping around to a negative charge.
		{`{"messages":[{"role":"user","content":"x"}],"max_tokens":9223372036854775807}`, OpChat, maxEstimate},
		{`{"messages":[{"role":"user","content":"x"}],"max_tokens":4611686018427387904,"n":4}`, OpChat, maxEstimate},
	} {
		r, err := ParseRequest(tc.op, []byte(tc.body))
		if err != nil {
			t.Fatal(err)
		}
		if got := Estimate(10, r, 1024); got != tc.want {
			t.Errorf("%s: %d, want %d", tc.body, got, tc.want)
		}
	}
}

func TestWithStreamUsage(t *testing.T) {
	for _, tc := range []struct {
		in            string
		stream, asked bool
		want          string
	}{
		{`{"stream":true,"messages":[]}`, true, false, `{"messages":[],"stream":true,"stream_options":{"include_usage":true}}`},
		{`{"stream":true,"stream_options":{"include_usage":false},"messages":[]}`, true, false, `{"messages":[],"stream":true,"stream_options":{"include_usage":true}}`},
		{`{"stream":true,"stream_options":{"include_usage":true}}`, true, true, `{"stream":true,"stream_options":{"include_usage":true}}`},
		{`{"stream":false}`, false, false, `{"stream":false}`},
	} {
		out, err := WithStreamUsage([]byte(tc.in), &Request{Op: OpChat, Stream: tc.stream, IncludeUsage: tc.asked})
		if err != nil {
			t.Fatal(err)
		}
		if string(out) != tc.want {
			t.Errorf("%s → %s, want %s", tc.in, out, tc.want)
		}
	}
}

func BenchmarkParseAndEstimate(b *testing.B) {
	tok := NewTokenizers()
	body := []byte(`{"model":"gpt-4o","max_tokens":200,"messages":[{"role":"system","content":"You are a helpful assistant that answers briefly."},{"role":"user","content":"What is the capital of France, and why is it famous?"}]}`)
	b.ReportAllocs()
	for b.Loop() {
		r, _ := ParseRequest(OpChat, body)
		_ = Estimate(tok.PromptTokens("o200k_base", r), r, 1024)
	}
}

func TestParseUsage(t *testing.T) {
	for _, tc := range []struct {
		body                           string
		prompt, completion, total, hit int
		ok                             bool
	}{
		{`{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}`, 3, 4, 7, 0, true},
		{`{"usage": {"prompt_tokens":3,"completion_tokens":4,"completion_tokens_details":{"reasoning_tokens":1}}}`, 3, 4, 7, 0, true},
		{`{"usage": {"prompt_tokens":30,"completion_tokens":4,"total_tokens":34,"prompt_tokens_details":{"cached_tokens":20}}}`, 30, 4, 34, 20, true},
		{`{"choices":[{"message":{"content":"my \"usage\": {\"prompt_tokens\": 99} trick"}}],"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}`, 1, 2, 3, 0, true},
		{`{"choices":[{"message":{"content":"\"usage\": {\"prompt_tokens\": 99}"}}]}`, 0, 0, 0, 0, false},
		{`{"choices":[],"usage":null}`, 0, 0, 0, 0, false},
		{`not json "usage":{"prompt_tokens":`, 0, 0, 0, 0, false},
		// Only the object is read: brackets in its strings and what follows it do not count.
		{`{"usage":{"prompt_tokens":5,"completion_tokens":6,"note":"} \"{[","x":[{}]},"id":"chatcmpl-1"}`, 5, 6, 11, 0, true},
		{`{"usage":{"prompt_tokens":5,"completion_tokens":6`, 0, 0, 0, 0, false},
		{`{"usage":{"prompt_tokens":5,"completion_tokens":6]}`, 0, 0, 0, 0, false},
	} {
		got, ok := ParseUsage([]byte(tc.body))
		if ok != tc.ok || (ok && (got.PromptTokens != tc.prompt || got.CompletionTokens != tc.completion || got.TotalTokens != tc.total || got.CachedTokens() != tc.hit)) {
			t.Errorf("%s: %+v (cached %d) %v", tc.body, got, got.CachedTokens(), ok)
		}
	}
}

func TestSystemPromptCacheCountsTheSame(t *testing.T) {
	tok := NewTokenizers()
	r, _ := ParseRequest(OpChat, []byte(`{"messages":[{"role":"system","content":"You are a careful assistant who answers in French."},{"role":"user","content":"hi"}]}`))
	first := tok.PromptTokens("o200k_base", r)
	if second := tok.PromptTokens("o200k_base", r); second != first || len(tok.cache) != 1 {
		t.Fatalf("cached count %d != %d (cache %d entries)", second, first, len(tok.cache))
	}
	if cl := tok.PromptTokens("cl100k_base", r); len(tok.cache) != 2 || cl == 0 {
		t.Fatal("the cache must be per encoding")
	}
}

// FuzzParseRequest: any body either parses or is a BadRequestError, and a
// parsed one can always be estimated.
func FuzzParseRequest(f *testing.F) {
	for _, s := range []string{
		`{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}],"max_tokens":5}`,
		`{"input":["a",[1,2],3]}`,
		`{"prompt":[[1,2],[3]],"n":2,"best_of":3}`,
		`{"messages":[{"role":"user","content":[{"type":"text","text":"x"},{"type":"image_url"}]}]}`,
		`{"messages":null}`, `[]`, `"x"`, `{`,
		`{"messages":[{"role":"user","content":"x"}],"max_tokens":9223372036854775807,"n":9223372036854775807}`,
	} {
		f.Add(s)
	}
	tok := NewTokenizers()
	f.Fuzz(func(t *testing.T, body string) {
		for _, op := range []Op{OpChat, OpCompletions, OpEmbeddings} {
			r, err := ParseRequest(op, []byte(body))
			if err != nil {
				var be *BadRequestError
				if !errors.As(err, &be) {
					t.Fatalf("%q: error of type %T", body, err)
				}
				continue
			}
			if Estimate(tok.PromptTokens("o200k_base", r), r, 1024) < 0 {
				t.Fatalf("%q: negative estimate", body)
			}
		}
	})
}
