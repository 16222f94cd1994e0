package broker

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/levee-gw/levee/config"
)

// How routing costs grow with the deployments behind one model (issue 13):
// one provisioned deployment and n-1 standard ones at the same priority, so
// the standard tier is one weighted draw over n-1 candidates.
var routeSizes = []int{2, 10, 50}

func benchBroker(b *testing.B, n int, endpoint string) (*Broker, *Group) {
	b.Helper()
	deps := make([]config.Deployment, n)
	names := make([]string, n)
	for i := range deps {
		kind := config.Standard
		if i == 0 {
			kind = config.Provisioned
		}
		names[i] = fmt.Sprintf("d%02d", i)
		deps[i] = config.Deployment{Name: names[i], Model: "gpt-4o", Kind: kind, TPM: 1 << 40, RPM: 1 << 40, Endpoint: endpoint, Credential: "k"}
	}
	cfg := &config.Config{Deployments: deps, Models: []config.Model{{Name: "gpt-4o", Deployments: names}}}
	if err := cfg.Validate(); err != nil {
		b.Fatal(err)
	}
	br := New(cfg, NewTokenizers(), NewClient(), nil, slog.New(slog.NewTextHandler(io.Discard, nil)))
	g, _ := br.Resolve("gpt-4o")
	return br, g
}

// BenchmarkRoute is the routing decision and its reservation (pick, then
// the charge given back), without the HTTP call: with room on the
// provisioned deployment (the usual case), with it full so every call
// spills to the standard tier, and with every deployment full (each one is
// tried before the caller hears 429).
func BenchmarkRoute(b *testing.B) {
	est := func(*Deployment) int { return 400 }
	for _, n := range routeSizes {
		for _, state := range []string{"room", "spill", "full"} {
			b.Run(fmt.Sprintf("deployments=%d/%s", n, state), func(b *testing.B) {
				br, g := benchBroker(b, n, "http://127.0.0.1:1")
				now := time.Now()
				switch state {
				case "spill":
					br.Deployments()[0].Capacity.Penalize(now, time.Hour)
				case "full":
					for _, d := range br.Deployments() {
						d.Capacity.Penalize(now, time.Hour)
					}
				}
				b.ReportAllocs()
				for b.Loop() {
					d, res, _, _ := br.pick(g, nil, est, false)
					if (d == nil) != (state == "full") {
						b.Fatalf("%s: picked %v", state, d)
					}
					if d != nil {
						res.Release()
						d.circuit.success()
					}
				}
			})
		}
	}
}

// BenchmarkDo is a whole synchronous call through the broker to a
// zero-latency upstream on loopback: estimate, route, reserve, send, read,
// reconcile. The upstream's part is the same for every size, so the growth
// between sizes is the broker's.
func BenchmarkDo(b *testing.B) {
	answer := []byte(`{"id":"x","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":1,"total_tokens":13}}`)
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write(answer)
	}))
	defer up.Close()
	body := []byte(`{"model":"gpt-4o","max_tokens":8,"messages":[{"role":"user","content":"Summarize the river's course in one line."}]}`)
	for _, n := range routeSizes {
		for _, state := range []string{"room", "spill"} {
			b.Run(fmt.Sprintf("deployments=%d/%s", n, state), func(b *testing.B) {
				br, g := benchBroker(b, n, up.URL)
				if state == "spill" {
					br.Deployments()[0].Capacity.Penalize(time.Now(), time.Hour)
				}
				ctx := context.Background()
				b.ReportAllocs()
				for b.Loop() {
					g, req, err := br.Admit(OpChat, body, g)
					if err != nil {
						b.Fatal(err)
					}
					res, err := br.Do(ctx, &Call{Group: g, Req: req, Body: body, Header: http.Header{}})
					if err != nil {
						b.Fatal(err)
					}
					raw, err := io.ReadAll(res.Resp.Body)
					res.Resp.Body.Close()
					if err != nil {
						b.Fatal(err)
					}
					u, _ := ParseUsage(raw)
					res.Finish(&u, nil)
				}
			})
		}
	}
}

// BenchmarkBackgroundSlots is what a worker's dispatch pass asks of each
// model with queued work: how many background calls its deployments take
// now. It walks every deployment of the model.
func BenchmarkBackgroundSlots(b *testing.B) {
	for _, n := range routeSizes {
		b.Run(fmt.Sprintf("deployments=%d", n), func(b *testing.B) {
			_, g := benchBroker(b, n, "http://127.0.0.1:1")
			b.ReportAllocs()
			for b.Loop() {
				if g.BackgroundSlots(time.Now(), 400) == 0 {
					b.Fatal("no slots on empty deployments")
				}
			}
		})
	}
}
