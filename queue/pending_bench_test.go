package queue_test

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"testing"

	"github.com/google/uuid"

	"github.com/levee-gw/levee/dev"
	"github.com/levee-gw/levee/queue"
)

// BenchmarkPending is the read every worker dispatch pass starts with: the
// stream's message count per subject, one subject per (priority, model,
// tenant) with queued work. Its cost grows with the tenants that have work
// (issue 13: how cost grows with the work); the round trip to an embedded
// server is in it.
func BenchmarkPending(b *testing.B) {
	for _, tenants := range []int{1, 10, 100, 1000} {
		b.Run(fmt.Sprintf("tenants=%d", tenants), func(b *testing.B) {
			n, err := dev.StartNATS(b.TempDir(), 0)
			if err != nil {
				b.Fatal(err)
			}
			defer n.Stop()
			ctx := context.Background()
			q, err := queue.Open(ctx, queue.Config{URL: n.URL}, nil, slog.New(slog.NewTextHandler(io.Discard, nil)))
			if err != nil {
				b.Fatal(err)
			}
			defer q.Close()
			var refs []queue.JobRef
			for t := 0; t < tenants; t++ {
				tenant := uuid.New()
				for j := 0; j < 3; j++ {
					refs = append(refs, queue.JobRef{ID: uuid.New(), Priority: "low", Model: "gpt-4o", Tenant: tenant})
				}
			}
			if done, err := q.PublishMany(ctx, refs); err != nil || len(done) != len(refs) {
				b.Fatalf("published %d of %d: %v", len(done), len(refs), err)
			}
			b.ReportAllocs()
			for b.Loop() {
				p, err := q.Pending(ctx)
				if err != nil {
					b.Fatal(err)
				}
				if len(p) != tenants {
					b.Fatalf("%d subjects, want %d", len(p), tenants)
				}
			}
		})
	}
}
