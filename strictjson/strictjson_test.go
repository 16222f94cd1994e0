package strictjson

import (
	"encoding/json"
	"fmt"
	"strings"
	"testing"
)

type part struct {
	Type string `json:"type"`
	Text string `json:"text"`
}

type message struct {
	Role    string          `json:"role"`
	Content json.RawMessage `json:"content"`
	Parts   []part          `json:"parts"`
}

type body struct {
	Model     string            `json:"model"`
	MaxTokens *int              `json:"max_tokens"`
	Messages  []message         `json:"messages"`
	Metadata  map[string]string `json:"metadata"`
	Options   *struct {
		IncludeUsage bool `json:"include_usage"`
	} `json:"stream_options"`
	Raw json.RawMessage `json:"raw"`
}

func TestUnmarshal(t *testing.T) {
	for _, tc := range []struct {
		name, in  string
		param     string // "" with wantErr: the body as a whole
		wantErr   bool
		maxTokens int
	}{
		{name: "plain", in: `{"model":"m","max_tokens":7,"temperature":1}`, maxTokens: 7},
		{name: "unknown members are skipped", in: `{"model":"m","tools":[{"type":"function","TYPE":"x"}],"max_tokens":3}`, maxTokens: 3},
		{name: "case variant beside the field", in: `{"model":"m","max_tokens":100000,"MAX_TOKENS":5}`, wantErr: true, param: "MAX_TOKENS"},
		{name: "case variant alone", in: `{"model":"m","Max_Tokens":5}`, wantErr: true, param: "Max_Tokens"},
		{name: "dash variant", in: `{"model":"m","max-tokens":5}`, wantErr: true, param: "max-tokens"},
		{name: "dotless i in a read name", in: `{"model":"m","MODEL_\u0131D":"x","m\u0131n":1}`},
		{name: "dotless i variant of a field", in: `{"model":"m","messages":[],"max_tokens":1,"stream_opt\u0131ons":{}}`, wantErr: true, param: "stream_opt\u0131ons"},
		{name: "kelvin sign variant", in: `{"model":"m","max_to\u212aens":5}`, wantErr: true, param: "max_to\u212aens"},
		{name: "dotless i variant", in: `{"model":"m","max_tokens":5,"max_tokens_\u0131":5}`, wantErr: false, maxTokens: 5},
		{name: "dotted capital I variant", in: `{"model":"m","Max_Tokens":5}`, wantErr: true, param: "Max_Tokens"},
		{name: "exact duplicate", in: `{"model":"m","max_tokens":1,"max_tokens":2}`, wantErr: true, param: "max_tokens"},
		{name: "duplicate deep inside a raw value", in: `{"model":"m","raw":{"a":{"b":1,"b":2}}}`, wantErr: true, param: "raw.a.b"},
		{name: "duplicate in an unread member", in: `{"model":"m","tools":[{"x":1,"x":1}]}`, wantErr: true, param: "tools[0].x"},
		{name: "nested case variant", in: `{"model":"m","messages":[{"role":"user","CONTENT":"x"}]}`, wantErr: true, param: "messages[0].CONTENT"},
		{name: "nested variant in a struct slice", in: `{"messages":[{"role":"u","parts":[{"type":"text","Text":"x"}]}]}`, wantErr: true, param: "messages[0].parts[0].Text"},
		{name: "variant in a pointer struct", in: `{"stream_options":{"Include_Usage":true}}`, wantErr: true, param: "stream_options.Include_Usage"},
		{name: "map keys are data, not names", in: `{"metadata":{"A":"1","a":"2"}}`},
		{name: "wrong type", in: `{"max_tokens":"many"}`, wantErr: true, param: "max_tokens"},
		{name: "fraction", in: `{"max_tokens":1.5}`, wantErr: true, param: "max_tokens"},
		{name: "invalid UTF-8", in: "{\"model\":\"\xff\"}", wantErr: true},
		{name: "not JSON", in: `{"model":`, wantErr: true},
		{name: "trailing garbage", in: `{"model":"m"} {}`, wantErr: true},
		{name: "not an object", in: `[1]`, wantErr: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var b body
			err := Unmarshal([]byte(tc.in), &b)
			if !tc.wantErr {
				if err != nil {
					t.Fatalf("unexpected error: %v", err)
				}
				if tc.maxTokens != 0 && (b.MaxTokens == nil || *b.MaxTokens != tc.maxTokens) {
					t.Fatalf("max_tokens = %v, want %d", b.MaxTokens, tc.maxTokens)
				}
				return
			}
			e, ok := err.(*Error)
			if !ok {
				t.Fatalf("error %T %v, want *Error", err, err)
			}
			if e.Param != tc.param {
				t.Fatalf("param %q, want %q (%s)", e.Param, tc.param, e.Msg)
			}
			if e.Msg == "" || strings.Contains(e.Msg, "\xff") {
				t.Fatalf("message %q", e.Msg)
			}
		})
	}
}

func TestValidText(t *testing.T) {
	for s, want := range map[string]bool{"run 42": true, "tab\there": true, "": true, "nul\x00": false, "bell\x07": false, "\xff": false, "ümlaut": true} {
		if got := ValidText(s); got != want {
			t.Errorf("ValidText(%q) = %v, want %v", s, got, want)
		}
	}
}

func BenchmarkUnmarshalChat(b *testing.B) {
	in := []byte(`{"model":"gpt-4o","max_tokens":300,"temperature":0.2,"messages":[{"role":"system","content":"You are a helpful assistant that answers briefly."},{"role":"user","content":"Summarize the following text in one sentence: Levee sits between applications and their model deployments and makes sure that every token of paid capacity is used."}]}`)
	b.ReportAllocs()
	for b.Loop() {
		var v body
		if err := Unmarshal(in, &v); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkStdlibUnmarshalChat(b *testing.B) {
	in := []byte(`{"model":"gpt-4o","max_tokens":300,"temperature":0.2,"messages":[{"role":"system","content":"You are a helpful assistant that answers briefly."},{"role":"user","content":"Summarize the following text in one sentence: Levee sits between applications and their model deployments and makes sure that every token of paid capacity is used."}]}`)
	b.ReportAllocs()
	for b.Loop() {
		var v body
		if err := json.Unmarshal(in, &v); err != nil {
			b.Fatal(err)
		}
	}
}

// A body of many unknown names costs a fold each; it must stay cheap.
func BenchmarkUnmarshalManyUnknownNames(b *testing.B) {
	var sb strings.Builder
	sb.WriteString(`{"model":"m"`)
	for i := 0; i < 10000; i++ {
		fmt.Fprintf(&sb, `,"unknown_field_%d":1`, i)
	}
	sb.WriteString(`}`)
	in := []byte(sb.String())
	b.SetBytes(int64(len(in)))
	for b.Loop() {
		var v body
		if err := Unmarshal(in, &v); err != nil {
			b.Fatal(err)
		}
	}
}
