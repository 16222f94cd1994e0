package api

import (
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/labstack/echo/v4"

	"github.com/levee-gw/levee/config"
)

func TestEventDataAndUsage(t *testing.T) {
	for _, tc := range []struct {
		event      string
		data       string
		usage      bool
		prompt     int
		emptyChoic bool
	}{
		{"data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\n", `{"choices":[{"delta":{"content":"hi"}}],"usage":null}`, false, 0, false},
		{"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":2,\"total_tokens\":9}}\r\n\r\n", `{"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":2,"total_tokens":9}}`, true, 7, true},
		{"data: {\"choices\": [], \"usage\": {\"prompt_tokens\": 3, \"completion_tokens\": 1}}\n\n", `{"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1}}`, true, 3, true},
		{"event: ping\ndata: [DONE]\n\n", `[DONE]`, false, 0, false},
		{": keep-alive\n\n", ``, false, 0, false},
		// Azure's first chunk: no choices, prompt filter results, no usage.
		{"data: {\"choices\":[],\"prompt_filter_results\":[{\"prompt_index\":0}]}\n\n", `{"choices":[],"prompt_filter_results":[{"prompt_index":0}]}`, false, 0, true},
	} {
		data := eventData([]byte(tc.event))
		if string(data) != tc.data {
			t.Errorf("%q: data %q, want %q", tc.event, data, tc.data)
			continue
		}
		u, ok := chunkUsage(data)
		if ok != tc.usage || (ok && u.PromptTokens != tc.prompt) {
			t.Errorf("%q: usage %v %+v", tc.event, ok, u)
		}
		if got := strings.Contains(string(compact(data)), string(emptyList)); got != tc.emptyChoic {
			t.Errorf("%q: empty choices %v", tc.event, got)
		}
	}
}

func TestPreferWait(t *testing.T) {
	s := &Server{cfg: &config.Config{Queue: config.Queue{DefaultWait: 60 * time.Second, MaxWait: 120 * time.Second}}}
	for _, tc := range []struct {
		prefer []string
		want   time.Duration
	}{
		{nil, 60 * time.Second},
		{[]string{"wait=10"}, 10 * time.Second},
		{[]string{"respond-async, wait=0"}, 0},
		{[]string{"wait=9999"}, 120 * time.Second},
		{[]string{"wait=soon"}, 60 * time.Second},
		{[]string{"handling=lenient", "wait=5"}, 5 * time.Second},
	} {
		r := httptest.NewRequest(http.MethodPost, "/", nil)
		for _, p := range tc.prefer {
			r.Header.Add("Prefer", p)
		}
		if got := s.preferWait(r); got != tc.want {
			t.Errorf("%v: %v, want %v", tc.prefer, got, tc.want)
		}
	}
}

func TestPresentedKey(t *testing.T) {
	for _, tc := range []struct {
		hdr  map[string]string
		want string
	}{
		{map[string]string{"api-key": "a"}, "a"},
		{map[string]string{"Authorization": "Bearer b"}, "b"},
		{map[string]string{"Authorization": "bearer  c "}, "c"},
		{map[string]string{"api-key": "a", "Authorization": "Bearer a"}, "a"},
		{map[string]string{"Authorization": "Basic xyz"}, ""},
		{map[string]string{}, ""},
	} {
		r := httptest.NewRequest(http.MethodPost, "/", nil)
		for k, v := range tc.hdr {
			r.Header.Set(k, v)
		}
		if got := presentedKey(r); got != tc.want {
			t.Errorf("%v: %q, want %q", tc.hdr, got, tc.want)
		}
	}
}

func TestErrorEnvelope(t *testing.T) {
	s := &Server{}
	e := echo.New()
	rec := httptest.NewRecorder()
	c := e.NewContext(httptest.NewRequest(http.MethodPost, "/v1/chat/completions", nil), rec)
	s.errorHandler(&Error{Status: 429, Type: "tokens", Code: "rate_limit_exceeded", Message: "full", RetryAfter: 1500 * time.Millisecond}, c)
	if rec.Code != 429 || rec.Header().Get("Retry-After") != "2" || rec.Header().Get("retry-after-ms") != "1500" ||
		!strings.Contains(rec.Body.String(), `{"error":{"message":"full","type":"tokens","param":null,"code":"rate_limit_exceeded"}}`) {
		t.Fatalf("%d %v %s", rec.Code, rec.Header(), rec.Body)
	}
}
