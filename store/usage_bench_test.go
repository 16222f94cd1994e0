package store_test

import (
	"context"
	"io"
	"log/slog"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/levee-gw/levee/store"
)

// BenchmarkLedgerBatch is one flush of the usage ledger as a gateway at
// 2,000 calls/s makes it every 200 ms: 400 events recorded, then written
// (COPY plus the rollup). Its allocations are the writer's garbage per
// batch; its time, the burst of work the flush puts beside the calls.
func BenchmarkLedgerBatch(b *testing.B) {
	_, st, _ := migrated(b)
	ctx := context.Background()
	tenant, err := st.CreateTenant(ctx, &store.CreateTenantParams{Name: "acme"})
	if err != nil {
		b.Fatal(err)
	}
	k, _, err := st.CreateKey(ctx, &store.CreateKeyParams{TenantName: "acme"})
	if err != nil {
		b.Fatal(err)
	}
	// The interval is long: each flush below is the benchmark's own.
	l := st.NewLedger(store.LedgerConfig{FlushInterval: time.Hour, BatchSize: 1000, BufferSize: 8192, MaxPending: 500_000},
		slog.New(slog.NewTextHandler(io.Discard, nil)))
	defer l.Close(ctx)
	const batch = 400
	ids := make([]string, batch)
	for i := range ids {
		ids[i] = "req_" + uuid.NewString()
	}
	b.ReportAllocs()
	for b.Loop() {
		for i := range batch {
			l.Record(store.UsageEvent{At: time.Now(), RequestID: ids[i], TenantID: tenant.ID, KeyID: k.ID, Deployment: "bench", Model: "gpt-4o",
				Operation: "chat/completions", Status: 200, PromptTokens: 20, CompletionTokens: 16, Latency: 150 * time.Microsecond, Priority: "high", Attempts: 1, CostNanos: 1234})
		}
		if err := l.Flush(ctx); err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	if l.Dropped() != 0 {
		b.Fatalf("%d events dropped", l.Dropped())
	}
}
