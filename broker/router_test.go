package broker

import (
	"context"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/levee-gw/levee/config"
)

func testBroker(t *testing.T, deps ...config.Deployment) *Broker {
	t.Helper()
	names := []string{}
	for i := range deps {
		deps[i].Model, deps[i].Endpoint, deps[i].Credential = "gpt-4o", "http://127.0.0.1:1", "k"
		names = append(names, deps[i].Name)
	}
	cfg := &config.Config{Deployments: deps, Models: []config.Model{{Name: "gpt-4o", Deployments: names}}}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	return New(cfg, NewTokenizers(), NewClient(), nil, slog.New(slog.NewTextHandler(io.Discard, nil)))
}

func TestTiersPutProvisionedFirstThenPriority(t *testing.T) {
	b := testBroker(t,
		config.Deployment{Name: "std-p1", Kind: config.Standard, Priority: 1, TPM: 1000},
		config.Deployment{Name: "std-p0", Kind: config.Standard, Priority: 0, TPM: 1000},
		config.Deployment{Name: "ptu-p0", Kind: config.Provisioned, Priority: 0, TPM: 1000},
		config.Deployment{Name: "ptu-p1", Kind: config.Provisioned, Priority: 1, TPM: 1000},
	)
	g, _ := b.Resolve("gpt-4o")
	var got []string
	for _, d := range g.Deployments() {
		got = append(got, d.Name)
	}
	want := []string{"ptu-p0", "std-p0", "ptu-p1", "std-p1"}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("order %v, want %v", got, want)
		}
	}
}

func TestPickSkipsFullOpenAndTriedDeployments(t *testing.T) {
	b := testBroker(t,
		config.Deployment{Name: "a", Kind: config.Provisioned, TPM: 1000, RPM: 60_000},
		config.Deployment{Name: "b", Kind: config.Standard, TPM: 1000, RPM: 60_000},
		config.Deployment{Name: "c", Kind: config.Standard, Priority: 1, TPM: 1000, RPM: 60_000},
	)
	g, _ := b.Resolve("gpt-4o")
	est := func(*Deployment) int { return 400 }
	pickName := func(tried ...*Deployment) string {
		d, res, _, _ := b.pick(g, tried, est, false)
		if d == nil {
			return ""
		}
		res.Release()
		return d.Name
	}
	if n := pickName(); n != "a" {
		t.Fatalf("picked %s, want the provisioned a", n)
	}
	a, _ := b.Deployment("a")
	a.Capacity.Reserve(time.Now(), 700) // a has 300 left: too little
	if n := pickName(); n != "b" {
		t.Fatalf("picked %s with a full, want b", n)
	}
	bd, _ := b.Deployment("b")
	for i := 0; i < b.Deployments()[0].circuit.threshold; i++ {
		bd.circuit.failure(time.Now())
	}
	if n := pickName(); n != "c" {
		t.Fatalf("picked %s with b's circuit open, want c", n)
	}
	c, _ := b.Deployment("c")
	if n := pickName(c); n != "" {
		t.Fatalf("picked %s with every deployment excluded", n)
	}
	_, _, _, at := b.pick(g, []*Deployment{c}, est, false)
	if at.IsZero() {
		t.Fatal("no retry time when full")
	}
}

func TestPickHonoursWeights(t *testing.T) {
	b := testBroker(t,
		config.Deployment{Name: "heavy", TPM: 1 << 30, RPM: 1 << 30, Weight: 3},
		config.Deployment{Name: "light", TPM: 1 << 30, RPM: 1 << 30, Weight: 1},
	)
	g, _ := b.Resolve("gpt-4o")
	n := map[string]int{}
	for i := 0; i < 4000; i++ {
		d, res, _, _ := b.pick(g, nil, func(*Deployment) int { return 1 }, false)
		res.Release()
		n[d.Name]++
	}
	// 3:1 expected; allow generous noise (4000 draws: sd of heavy ≈ 27).
	if n["heavy"] < 2800 || n["heavy"] > 3200 {
		t.Fatalf("weights 3:1 gave %v", n)
	}
}

func TestResolvePinsADeploymentUnderItsAliasPolicy(t *testing.T) {
	b := testBroker(t, config.Deployment{Name: "a", TPM: 1000}, config.Deployment{Name: "b", TPM: 1000})
	g, ok := b.Resolve("b")
	if !ok || len(g.Deployments()) != 1 || g.Deployments()[0].Name != "b" {
		t.Fatalf("pinned group %+v", g)
	}
	if _, ok := b.Resolve("nope"); ok {
		t.Fatal("resolved an unknown name")
	}
}

func TestAliasesOf(t *testing.T) {
	deps := []config.Deployment{{Name: "a", TPM: 1000}, {Name: "b", TPM: 1000}, {Name: "c", TPM: 1000}}
	for i := range deps {
		deps[i].Model, deps[i].Endpoint, deps[i].Credential = "gpt-4o", "http://127.0.0.1:1", "k"
	}
	cfg := &config.Config{Deployments: deps, Models: []config.Model{
		{Name: "gpt-4o", Deployments: []string{"a", "b"}}, {Name: "fast", Deployments: []string{"b"}}, {Name: "c", Deployments: []string{"c"}}}}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	b := New(cfg, NewTokenizers(), NewClient(), nil, slog.New(slog.NewTextHandler(io.Discard, nil)))
	for _, tc := range []struct {
		name string
		want []string
	}{
		{"gpt-4o", []string{"gpt-4o"}},
		{"fast", []string{"fast"}},
		{"a", []string{"gpt-4o"}},
		{"b", []string{"fast", "gpt-4o"}}, // every alias it serves, sorted
		{"c", []string{"c"}},              // an alias of the same name wins
		{"nope", nil},
	} {
		if got := b.AliasesOf(tc.name); !slices.Equal(got, tc.want) {
			t.Errorf("AliasesOf(%q) = %v, want %v", tc.name, got, tc.want)
		}
	}
}

// TestCallGivenUpMidwayKeepsItsCharge: a call abandoned while the deployment
// has it (client gone, job cancelled) was charged there on arrival, so the
// view keeps the charge; a call that never connected gives it back.
func TestCallGivenUpMidwayKeepsItsCharge(t *testing.T) {
	release := make(chan struct{})
	hang := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-release:
		case <-r.Context().Done():
		}
	}))
	defer hang.Close()
	defer close(release) // before Close, which waits for the handlers
	for _, tc := range []struct {
		name     string
		endpoint string
		stream   bool
		kept     bool
	}{
		{"buffered, abandoned midway", hang.URL, false, true},
		{"streamed, abandoned midway", hang.URL, true, true},
		{"never connected", "http://127.0.0.1:1", false, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := testBroker(t, config.Deployment{Name: "d", Kind: config.Standard, TPM: 100_000})
			b.Deployments()[0].Endpoint = tc.endpoint
			g, _ := b.Resolve("gpt-4o")
			body := []byte(`{"model":"gpt-4o","max_tokens":500,"stream":` + strconv.FormatBool(tc.stream) + `,"messages":[{"role":"user","content":"hi"}]}`)
			req, err := ParseRequest(OpChat, body)
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
			defer cancel()
			if _, err := b.Do(ctx, &Call{Group: g, Req: req, Body: body, Header: http.Header{}}); err == nil {
				t.Fatal("want an error")
			}
			left, _ := b.Deployments()[0].Capacity.Headroom(time.Now())
			if kept := left <= 100_000-500; kept != tc.kept {
				t.Fatalf("headroom after the call %d: charge kept %v, want %v", left, kept, tc.kept)
			}
		})
	}
}
