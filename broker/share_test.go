package broker_test

import (
	"context"
	"io"
	"log/slog"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/levee-gw/levee/broker"
	"github.com/levee-gw/levee/config"
	"github.com/levee-gw/levee/dev"
)

func TestSharerKeepsProcessesInStep(t *testing.T) {
	n, err := dev.StartNATS(t.TempDir(), 0)
	if err != nil {
		t.Fatal(err)
	}
	defer n.Stop()
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	newBroker := func() *broker.Broker {
		cfg := &config.Config{Deployments: []config.Deployment{{Name: "gpt-4o.ptu", Model: "gpt-4o", Endpoint: "http://127.0.0.1:1", Credential: "k", TPM: 10_000, RPM: 60_000}}}
		if err := cfg.Validate(); err != nil {
			t.Fatal(err)
		}
		b := broker.New(cfg, broker.NewTokenizers(), broker.NewClient(), nil, log)
		nc, err := nats.Connect(n.URL)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(nc.Close)
		ctx, cancel := context.WithCancel(context.Background())
		t.Cleanup(cancel)
		go func() { _ = broker.NewSharer(nc, b, "test.capacity", log).Run(ctx) }()
		return b
	}
	a, b := newBroker(), newBroker()
	time.Sleep(50 * time.Millisecond) // both subscribed
	da, _ := a.Deployment("gpt-4o.ptu")
	db, _ := b.Deployment("gpt-4o.ptu")
	res, ok, _ := da.Capacity.Reserve(time.Now(), 6_000)
	if !ok {
		t.Fatal("reserve refused")
	}
	eventually := func(what string, cond func() bool) {
		t.Helper()
		deadline := time.Now().Add(2 * time.Second)
		for !cond() {
			if time.Now().After(deadline) {
				t.Fatalf("%s: not seen by the other process", what)
			}
			time.Sleep(2 * time.Millisecond)
		}
	}
	eventually("a charge", func() bool { tok, _ := db.Capacity.Headroom(time.Now()); return tok == 4_000 })
	if _, ok, _ := db.Capacity.Reserve(time.Now(), 5_000); ok {
		t.Fatal("the other process admitted past the shared limit")
	}
	res.Release()
	eventually("a refund", func() bool { tok, _ := db.Capacity.Headroom(time.Now()); return tok == 10_000 })
	da.Capacity.Penalize(time.Now(), 3*time.Second)
	eventually("a 429 penalty", func() bool { tok, _ := db.Capacity.Headroom(time.Now()); return tok == 0 })
	// A process never applies its own messages twice.
	if tok, _ := da.Capacity.Headroom(time.Now().Add(4 * time.Second)); tok != 10_000 {
		t.Fatalf("own charges echoed back: headroom %d", tok)
	}
}
