package quota_test

import (
	"context"
	"io"
	"log/slog"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"

	"github.com/levee-gw/levee/quota"
	"github.com/levee-gw/levee/store"
)

// startNATS runs an embedded NATS server for the test.
func startNATS(t *testing.T) *server.Server {
	t.Helper()
	ns, err := server.NewServer(&server.Options{Host: "127.0.0.1", Port: server.RANDOM_PORT, NoSigs: true, NoLog: true})
	if err != nil {
		t.Fatal(err)
	}
	go ns.Start()
	t.Cleanup(ns.Shutdown)
	if !ns.ReadyForConnections(10 * time.Second) {
		t.Fatal("nats did not start")
	}
	return ns
}

// linked starts one view per process sharing over ns; each stops sharing
// when its context is cancelled, and done waits for all to have stopped.
func linked(t *testing.T, ns *server.Server, src fixed, ctxs ...context.Context) (views []*quota.Quota, done func()) {
	t.Helper()
	var wg sync.WaitGroup
	for _, ctx := range ctxs {
		nc, err := nats.Connect(ns.ClientURL())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(nc.Close)
		q := quota.New(src, "USD", time.Second, slog.New(slog.NewTextHandler(io.Discard, nil)))
		if err := q.Refresh(ctx); err != nil {
			t.Fatal(err)
		}
		wg.Add(1)
		go func() { defer wg.Done(); _ = q.Share(ctx, nc, "test.quota") }()
		views = append(views, q)
	}
	time.Sleep(100 * time.Millisecond) // subscriptions in place, peers introduced
	return views, wg.Wait
}

type fixed struct{ q *store.Quotas }

func (f fixed) SettingsVersion(context.Context) (int64, error)    { return f.q.Version, nil }
func (f fixed) LoadQuotas(context.Context) (*store.Quotas, error) { return f.q, nil }
func (fixed) LeaseBudget(context.Context, *store.LeaseParams) (store.Lease, error) {
	return store.Lease{}, nil
}
func (fixed) SettleBudget(context.Context, *store.SettleParams) error { return nil }
func (fixed) MarkBudgetExceeded(context.Context, uuid.UUID, uuid.UUID, time.Time) error {
	return nil
}

// Two processes' views, linked over a real NATS server, with 32 callers
// each hammering one tenant's TPM: together they admit no more than the
// limit plus one call each.
func TestSharedLimitHoldsAcrossProcesses(t *testing.T) {
	ns := startNATS(t)
	tenant := uuid.New()
	const limit, est = 20_000, 100
	src := fixed{&store.Quotas{Version: 1, Limits: []store.Limits{{TenantID: tenant, TPM: limit}}}}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	views, done := linked(t, ns, src, ctx, ctx)
	var admitted atomic.Int64
	var callers sync.WaitGroup
	for c := 0; c < 64; c++ {
		callers.Add(1)
		go func(c int) {
			defer callers.Done()
			q := views[c%2]
			for i := 0; i < 100; i++ {
				a, r, err := q.Admit(ctx, quota.Caller{Tenant: tenant, Model: "m"}, quota.Charge{Tokens: est})
				if err != nil {
					t.Error(err)
					return
				}
				if r != nil {
					continue
				}
				admitted.Add(est)
				a.Finish(quota.Usage{Tokens: est}, true)
			}
		}(c)
	}
	callers.Wait()
	cancel()
	done()
	t.Logf("64 callers over 2 linked views admitted %d tokens against a %d limit", admitted.Load(), limit)
	if admitted.Load() > limit+2*est {
		t.Fatalf("admitted %d tokens: more than the limit plus one call per process", admitted.Load())
	}
	if admitted.Load() < limit-2*est {
		t.Fatalf("admitted only %d tokens of %d: room was left unused", admitted.Load(), limit)
	}
}

// A process that stops sharing (killed, cut off) must not hold the others'
// callers: once no acknowledgement comes they go on, each still within the
// limit as its own process sees it.
func TestSilentPeerDoesNotHoldAdmissions(t *testing.T) {
	ns := startNATS(t)
	tenant := uuid.New()
	const limit, est = 2_000, 100
	src := fixed{&store.Quotas{Version: 1, Limits: []store.Limits{{TenantID: tenant, TPM: limit}}}}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	silent, stop := context.WithCancel(ctx)
	views, done := linked(t, ns, src, ctx, silent)
	stop() // the second process falls silent, its peer still counting it
	var admitted int64
	for i := 0; i < 2*limit/est; i++ {
		actx, acancel := context.WithTimeout(ctx, 5*time.Second)
		a, r, err := views[0].Admit(actx, quota.Caller{Tenant: tenant, Model: "m"}, quota.Charge{Tokens: est})
		acancel()
		if err != nil {
			t.Fatalf("admission %d: %v", i, err)
		}
		if r == nil {
			admitted += est
			a.Finish(quota.Usage{Tokens: est}, true)
		}
	}
	cancel()
	done()
	if admitted != limit {
		t.Fatalf("admitted %d tokens with a silent peer, want the whole %d limit and no more", admitted, limit)
	}
}
