package broker

import (
	"io"
	"log/slog"
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
	for i := 0; i < b.order[0].circuit.threshold; i++ {
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
