package queue_test

import (
	"context"
	"io"
	"log/slog"
	"testing"

	"github.com/google/uuid"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/levee-gw/levee/dev"
	"github.com/levee-gw/levee/queue"
)

// NATS limits a stream that sets no limit of its own to 1,000 consumers.
// Levee makes one per (priority, model, tenant) with queued work, so before
// the stream set its own, the 1,001st tenant's consumer was refused and its
// jobs stayed queued forever (found by make bench-cost with 1,000 tenants).
func TestMoreThanAThousandTenantsGetConsumers(t *testing.T) {
	if testing.Short() {
		t.Skip("creates 1,001 consumers")
	}
	n, err := dev.StartNATS(t.TempDir(), 0)
	if err != nil {
		t.Fatal(err)
	}
	defer n.Stop()
	ctx := context.Background()
	q, err := queue.Open(ctx, queue.Config{URL: n.URL}, nil, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	defer q.Close()
	for i := 0; i < 1001; i++ {
		if _, err := q.Consumer(ctx, "low", "gpt-4o", uuid.New()); err != nil {
			t.Fatalf("consumer %d: %v", i+1, err)
		}
	}
}

// A stream made by an earlier Levee (no consumer limit of its own) gets one
// when a process opens it.
func TestOpenSetsTheConsumerLimitOfAnEarlierStream(t *testing.T) {
	n, err := dev.StartNATS(t.TempDir(), 0)
	if err != nil {
		t.Fatal(err)
	}
	defer n.Stop()
	ctx := context.Background()
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	q, err := queue.Open(ctx, queue.Config{URL: n.URL}, nil, log)
	if err != nil {
		t.Fatal(err)
	}
	js, err := jetstream.New(q.Conn())
	if err != nil {
		t.Fatal(err)
	}
	limit := func() int {
		s, err := js.Stream(ctx, "LEVEE_JOBS")
		if err != nil {
			t.Fatal(err)
		}
		return s.CachedInfo().Config.MaxConsumers
	}
	set := limit()
	if set < 100_000 {
		t.Fatalf("the stream allows %d consumers", set)
	}
	s, _ := js.Stream(ctx, "LEVEE_JOBS")
	old := s.CachedInfo().Config
	old.MaxConsumers = 0 // as an earlier Levee made it: the server's default applies
	if _, err := js.UpdateStream(ctx, old); err != nil {
		t.Fatal(err)
	}
	if got := limit(); got != -1 {
		t.Fatalf("the earlier stream's limit is %d, want -1 (none of its own)", got)
	}
	q.Close()
	q, err = queue.Open(ctx, queue.Config{URL: n.URL}, nil, log)
	if err != nil {
		t.Fatal(err)
	}
	defer q.Close()
	if js, err = jetstream.New(q.Conn()); err != nil {
		t.Fatal(err)
	}
	if got := limit(); got != set {
		t.Fatalf("after Open the stream allows %d consumers, want %d", got, set)
	}
}
