package broker

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/levee-gw/levee/config"
)

type seenRequest struct {
	method, uri, body string
	header            http.Header
}

// TestBufferedAndStreamingPathsSendAndReturnTheSame holds the fasthttp path
// to the net/http one: same request upstream (credentials swapped, only the
// forwarded headers passed on), same status, headers and body back.
func TestBufferedAndStreamingPathsSendAndReturnTheSame(t *testing.T) {
	seen := make(chan seenRequest, 1)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		seen <- seenRequest{method: r.Method, uri: r.URL.RequestURI(), body: string(b), header: r.Header.Clone()}
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("x-ratelimit-remaining-tokens", "1234")
		w.Header().Set("retry-after-ms", "250")
		w.Header().Add("X-Multi", "a")
		w.Header().Add("X-Multi", "b")
		w.WriteHeader(http.StatusTooManyRequests)
		_, _ = io.WriteString(w, `{"error":{"code":"429"}}`)
	}))
	defer srv.Close()

	from := http.Header{}
	from.Set("api-key", "client-secret")
	from.Set("Authorization", "Bearer client-secret")
	from.Set("Cookie", "session=1")
	from.Set("User-Agent", "sdk/1.0")
	from.Set("X-Ms-Client-Request-Id", "abc")

	c := NewClient()
	for _, tc := range []struct {
		name      string
		d         config.Deployment
		wantURI   string
		wantAuth  [2]string // header, value
		wantModel string
	}{
		{"azure", config.Deployment{Name: "a", API: config.Azure, Endpoint: srv.URL, UpstreamName: "gpt-4o-dep", APIVersion: "2024-10-21", Credential: "up-key", Timeout: 5 * time.Second},
			"/openai/deployments/gpt-4o-dep/chat/completions?api-version=2024-10-21", [2]string{"Api-Key", "up-key"}, `"model":"gpt-4o"`},
		{"openai", config.Deployment{Name: "o", API: config.OpenAI, Endpoint: srv.URL, UpstreamName: "gpt-4o-2024-08-06", Credential: "up-key", Timeout: 5 * time.Second},
			"/v1/chat/completions", [2]string{"Authorization", "Bearer up-key"}, `"model":"gpt-4o-2024-08-06"`},
	} {
		for _, path := range []struct {
			name string
			send func(context.Context, *config.Deployment, Op, []byte, http.Header) (*http.Response, error)
		}{{"Do", c.Do}, {"Buffered", c.Buffered}} {
			t.Run(tc.name+"/"+path.name, func(t *testing.T) {
				resp, err := path.send(context.Background(), &tc.d, OpChat, []byte(`{"model":"gpt-4o","messages":[]}`), from)
				if err != nil {
					t.Fatal(err)
				}
				body, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				got := <-seen
				if got.method != http.MethodPost || got.uri != tc.wantURI {
					t.Errorf("sent %s %s, want POST %s", got.method, got.uri, tc.wantURI)
				}
				if v := got.header.Get(tc.wantAuth[0]); v != tc.wantAuth[1] {
					t.Errorf("%s = %q, want %q", tc.wantAuth[0], v, tc.wantAuth[1])
				}
				for _, h := range []string{"Cookie", "api-key", "Authorization"} {
					if h == tc.wantAuth[0] || (h == "api-key" && tc.wantAuth[0] == "Api-Key") {
						continue
					}
					if v := got.header.Get(h); v != "" {
						t.Errorf("client's %s leaked upstream: %q", h, v)
					}
				}
				if got.header.Get("User-Agent") != "sdk/1.0" || got.header.Get("X-Ms-Client-Request-Id") != "abc" {
					t.Errorf("forwarded headers lost: %v", got.header)
				}
				if !strings.Contains(got.body, tc.wantModel) {
					t.Errorf("body %s, want %s in it", got.body, tc.wantModel)
				}
				if resp.StatusCode != http.StatusTooManyRequests || string(body) != `{"error":{"code":"429"}}` {
					t.Errorf("got %d %s", resp.StatusCode, body)
				}
				if RetryAfter(resp.Header, time.Now()) != 250*time.Millisecond {
					t.Errorf("retry-after-ms not read: %v", resp.Header)
				}
				if rt, _ := Remaining(resp.Header); rt != 1234 {
					t.Errorf("remaining tokens %d, want 1234", rt)
				}
				if got := resp.Header.Values("X-Multi"); len(got) != 2 {
					t.Errorf("X-Multi = %v, want both values", got)
				}
			})
		}
	}
}

// TestBufferedRetriesAConnectionClosedWhileIdle: a deployment that closes a
// kept-alive connection without saying so must not fail the next call, and
// no call may be sent twice.
func TestBufferedRetriesAConnectionClosedWhileIdle(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var served atomic.Int64
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer conn.Close()
				br := bufio.NewReader(conn)
				req, err := http.ReadRequest(br)
				if err != nil {
					return
				}
				_, _ = io.Copy(io.Discard, req.Body)
				n := served.Add(1)
				body := fmt.Sprintf(`{"n":%d}`, n)
				// Keep-alive is implied, then the connection is dropped.
				fmt.Fprintf(conn, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s", len(body), body)
			}()
		}
	}()
	c := NewClient()
	d := &config.Deployment{Name: "flaky", API: config.Azure, Endpoint: "http://" + ln.Addr().String(), UpstreamName: "x", APIVersion: "v", Credential: "k", Timeout: 5 * time.Second}
	for i := 1; i <= 5; i++ {
		resp, err := c.Buffered(context.Background(), d, OpChat, []byte(`{}`), http.Header{})
		if err != nil {
			t.Fatalf("call %d: %v", i, err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if want := fmt.Sprintf(`{"n":%d}`, i); string(b) != want {
			t.Fatalf("call %d got %s, want %s", i, b, want)
		}
		time.Sleep(10 * time.Millisecond) // let the close land before the next call
	}
	if n := served.Load(); n != 5 {
		t.Fatalf("deployment served %d calls, want 5", n)
	}
}

// TestBufferedHonoursTheContextAndTheTimeout: the fast path cannot abort a
// call in flight, but it must not start one for a finished context, and it
// stops waiting at the earlier of the context's deadline and the
// deployment's timeout, saying which.
func TestBufferedHonoursTheContextAndTheTimeout(t *testing.T) {
	var calls atomic.Int64
	release := make(chan struct{})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		calls.Add(1)
		select {
		case <-release:
		case <-r.Context().Done():
		}
	}))
	defer srv.Close()
	defer close(release)
	c := NewClient()
	d := config.Deployment{Name: "slow", API: config.Azure, Endpoint: srv.URL, UpstreamName: "x", APIVersion: "v", Credential: "k", Timeout: time.Minute}

	cancelled, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := c.Buffered(cancelled, &d, OpChat, []byte(`{}`), http.Header{}); !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled context: err %v", err)
	}
	if calls.Load() != 0 {
		t.Fatal("a call was sent for a cancelled context")
	}

	ctx, cancel2 := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel2()
	if _, err := c.Buffered(ctx, &d, OpChat, []byte(`{}`), http.Header{}); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("context deadline: err %v, want DeadlineExceeded", err)
	}

	short := d
	short.Timeout = 50 * time.Millisecond
	if _, err := c.Buffered(context.Background(), &short, OpChat, []byte(`{}`), http.Header{}); !errors.Is(err, ErrTimeout) {
		t.Fatalf("deployment timeout: err %v, want ErrTimeout", err)
	}
}

func TestWithDefaultMaxTokens(t *testing.T) {
	p := config.Model{DefaultMaxTokens: 300}
	for _, tc := range []struct {
		name  string
		op    Op
		param string // the model's max_tokens_param
		body  string
		want  string // the ceiling sent, as the upstream reads it
		keys  int    // how many ceilings the body carries
	}{
		{"chat without a ceiling", OpChat, "", `{"model":"m","messages":[{"role":"user","content":"hi"}]}`, "max_completion_tokens=300", 1},
		{"chat, endpoint knows only max_tokens", OpChat, "max_tokens", ` { "messages":[{"role":"user","content":"hi"}]}`, "max_tokens=300", 1},
		{"chat, sent as it came", OpChat, "none", `{"messages":[{"role":"user","content":"hi"}]}`, "", 0},
		{"chat with its own ceiling", OpChat, "", `{"messages":[{"role":"user","content":"hi"}],"max_tokens":5}`, "max_tokens=5", 1},
		{"a ceiling sent as null is replaced", OpChat, "", `{"messages":[{"role":"user","content":"hi"}],"max_completion_tokens":null}`, "max_completion_tokens=300", 1},
		{"the other ceiling sent as null goes", OpChat, "", `{"messages":[{"role":"user","content":"hi"}],"max_tokens":null}`, "max_completion_tokens=300", 1},
		{"legacy completions", OpCompletions, "", `{"prompt":"hi"}`, "max_tokens=300", 1},
		{"the key named in content is not a ceiling", OpChat, "", `{"messages":[{"role":"user","content":"\"max_tokens\":1"}]}`, "max_completion_tokens=300", 1},
		{"embeddings have none", OpEmbeddings, "", `{"input":"hi"}`, "", 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r, err := ParseRequest(tc.op, []byte(tc.body))
			if err != nil {
				t.Fatal(err)
			}
			p.MaxTokensParam = tc.param
			out := WithDefaultMaxTokens([]byte(tc.body), r, p)
			// What Levee forwards must parse strictly (no duplicate key) and
			// carry the ceiling it was charged for.
			back, err := ParseRequest(tc.op, out)
			if err != nil {
				t.Fatalf("%s: %v", out, err)
			}
			got := ""
			if back.MaxTokensParam != "" {
				got = fmt.Sprintf("%s=%d", back.MaxTokensParam, back.MaxTokens)
			}
			var m map[string]json.RawMessage
			_ = json.Unmarshal(out, &m)
			keys := 0
			for _, k := range []string{"max_tokens", "max_completion_tokens"} {
				if _, ok := m[k]; ok {
					keys++
				}
			}
			if got != tc.want || keys != tc.keys {
				t.Fatalf("%s: ceiling %q over %d keys, want %q over %d", out, got, keys, tc.want, tc.keys)
			}
		})
	}
}

func TestValidTraceparent(t *testing.T) {
	for _, tc := range []struct {
		v    string
		want bool
	}{
		{"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", true},
		{"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00", true},
		{"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01", false}, // uppercase
		{"00-00000000000000000000000000000000-00f067aa0ba902b7-01", false}, // zero trace id
		{"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", false}, // zero parent id
		{"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", false}, // forbidden version
		{"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-", false},
		{"00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", false},
		{"", false},
	} {
		if got := validTraceparent(tc.v); got != tc.want {
			t.Errorf("validTraceparent(%q) = %v, want %v", tc.v, got, tc.want)
		}
	}
}
