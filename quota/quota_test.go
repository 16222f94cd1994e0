package quota

import (
	"context"
	"io"
	"log/slog"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/levee-gw/levee/store"
)

// memStore is Postgres's part of budgets, in memory, with the same rules
// as store.LeaseBudget and store.SettleBudget (spent plus leased never
// passes the limit).
type memStore struct {
	mu       sync.Mutex
	q        *store.Quotas
	spend    map[time.Time]*store.BudgetSpend
	leases   int
	exceeded int
}

func (m *memStore) SettingsVersion(context.Context) (int64, error)    { return m.q.Version, nil }
func (m *memStore) LoadQuotas(context.Context) (*store.Quotas, error) { return m.q, nil }
func (m *memStore) MarkBudgetExceeded(context.Context, uuid.UUID, uuid.UUID, time.Time) error {
	m.mu.Lock()
	m.exceeded++
	m.mu.Unlock()
	return nil
}

func (m *memStore) row(p time.Time) *store.BudgetSpend {
	if m.spend == nil {
		m.spend = map[time.Time]*store.BudgetSpend{}
	}
	if m.spend[p] == nil {
		m.spend[p] = &store.BudgetSpend{}
	}
	return m.spend[p]
}

func (m *memStore) LeaseBudget(_ context.Context, p *store.LeaseParams) (store.Lease, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.leases++
	r := m.row(p.PeriodStart)
	um, ut := r.SpentNanos+r.LeasedNanos, r.SpentTokens+r.LeasedTokens
	cm, ct := max(p.Nanos, p.ChunkNanos), max(p.Tokens, p.ChunkTokens)
	gm, gt := p.Nanos, p.Tokens
	if (p.LimitNanos == 0 || um+4*cm <= p.LimitNanos) && (p.LimitTokens == 0 || ut+4*ct <= p.LimitTokens) {
		gm, gt = cm, ct
	}
	if (p.LimitNanos > 0 && um+gm > p.LimitNanos) || (p.LimitTokens > 0 && ut+gt > p.LimitTokens) {
		return store.Lease{UsedNanos: um, UsedTokens: ut, LeasedNanos: r.LeasedNanos, LeasedTokens: r.LeasedTokens}, nil
	}
	r.LeasedNanos += gm
	r.LeasedTokens += gt
	return store.Lease{Nanos: gm, Tokens: gt, OK: true, UsedNanos: um, UsedTokens: ut, LeasedNanos: r.LeasedNanos - gm, LeasedTokens: r.LeasedTokens - gt}, nil
}

func (m *memStore) SettleBudget(_ context.Context, p *store.SettleParams) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	r := m.row(p.PeriodStart)
	r.SpentNanos += p.SpentNanos
	r.SpentTokens += p.SpentTokens
	r.LeasedNanos = max(r.LeasedNanos-p.ReleaseNanos, 0)
	r.LeasedTokens = max(r.LeasedTokens-p.ReleaseTokens, 0)
	return nil
}

var (
	tenant = uuid.MustParse("00000000-0000-0000-0000-00000000000a")
	key    = uuid.MustParse("00000000-0000-0000-0000-0000000000b1")
	t0     = time.Date(2031, 5, 10, 12, 0, 0, 0, time.UTC)
	quiet  = slog.New(slog.NewTextHandler(io.Discard, nil))
)

func newQuota(t *testing.T, st *memStore) *Quota {
	t.Helper()
	q := New(st, "USD", time.Second, quiet)
	q.now = func() time.Time { return t0 }
	q.Load(st.q)
	return q
}

// at sets q's clock.
func at(q *Quota, t time.Time) *Quota {
	q.now = func() time.Time { return t }
	return q
}

func TestRateLimitsRefuseAndTellWhen(t *testing.T) {
	st := &memStore{q: &store.Quotas{Version: 1, Limits: []store.Limits{
		{TenantID: tenant, TPM: 1000, RPM: 5},
		{TenantID: tenant, KeyID: key, Concurrency: 2},
	}}}
	q := newQuota(t, st)
	me := Caller{Tenant: tenant, Key: key, Model: "gpt-4o"}
	ctx := context.Background()

	// 400 + 400 fit a 1,000 TPM minute; a third does not, until the minute
	// of the first has passed.
	a1, r, _ := q.Admit(ctx, me, Charge{Tokens: 400})
	a2, r2, _ := q.Admit(ctx, me, Charge{Tokens: 400})
	if r != nil || r2 != nil {
		t.Fatalf("refused: %+v %+v", r, r2)
	}
	if a2.Headers.LimitTokens != 1000 || a2.Headers.RemainingTokens != 200 || a2.Headers.LimitRequests != 5 || a2.Headers.RemainingRequests != 3 {
		t.Fatalf("headers %+v", a2.Headers)
	}
	// Two in flight: the key's concurrency binds first.
	if _, r, _ := q.Admit(ctx, me, Charge{Tokens: 10}); r == nil || r.Code != "key_rate_limit_exceeded" || r.What != "concurrency" {
		t.Fatalf("third call in flight: %+v", r)
	}
	a1.Finish(Usage{Tokens: 300}, true) // cheaper than estimated: the charge stays
	_, r, _ = q.Admit(ctx, me, Charge{Tokens: 400})
	if r == nil || r.Code != "tenant_rate_limit_exceeded" || r.What != "tokens" || !r.RetryAt.After(t0.Add(59*time.Second)) {
		t.Fatalf("over TPM: %+v", r)
	}
	a2.Finish(Usage{}, false) // never reached a deployment: all of it back
	if a, r, _ := q.Admit(ctx, me, Charge{Tokens: 400}); r != nil {
		t.Fatalf("after a release: %+v", r)
	} else {
		a.Finish(Usage{Tokens: 900}, true) // dearer: 500 more charged now
	}
	if _, r, _ := at(q, t0.Add(time.Second)).Admit(ctx, me, Charge{Tokens: 1}); r == nil || r.What != "tokens" {
		t.Fatalf("after a call cost more than its estimate: %+v", r)
	}
	if _, r, _ := at(q, t0.Add(61*time.Second)).Admit(ctx, me, Charge{Tokens: 1001}); r == nil || !r.RetryAt.IsZero() {
		t.Fatalf("larger than the limit is never: %+v", r)
	}
	// A tenant with nothing configured costs a map lookup.
	if a, r, _ := q.Admit(ctx, Caller{Tenant: uuid.New()}, Charge{Tokens: 1 << 40}); r != nil || a != none {
		t.Fatalf("unconfigured tenant: %v %+v", a, r)
	}
}

func TestRequestsPerMinute(t *testing.T) {
	st := &memStore{q: &store.Quotas{Version: 1, Limits: []store.Limits{{TenantID: tenant, Model: "gpt-4o", RPM: 3}}}}
	q := newQuota(t, st)
	me := Caller{Tenant: tenant, Key: key, Model: "gpt-4o"}
	for i := 0; i < 3; i++ {
		a, r, _ := q.Admit(context.Background(), me, Charge{Tokens: 1})
		if r != nil {
			t.Fatalf("call %d: %+v", i, r)
		}
		a.Finish(Usage{Tokens: 1}, true)
	}
	if _, r, _ := q.Admit(context.Background(), me, Charge{Tokens: 1}); r == nil || r.What != "requests" {
		t.Fatalf("fourth: %+v", r)
	}
	// Another model is not limited.
	if _, r, _ := q.Admit(context.Background(), Caller{Tenant: tenant, Model: "other"}, Charge{Tokens: 1}); r != nil {
		t.Fatalf("another model: %+v", r)
	}
}

// Two processes, 64 callers, a budget of 100 calls: exactly 100 are served,
// and the spend recorded is the spend served.
func TestBudgetHoldsExactlyAcrossProcesses(t *testing.T) {
	bid := uuid.New()
	st := &memStore{q: &store.Quotas{Version: 1, Budgets: []store.Budget{{ID: bid, TenantID: tenant, Tokens: 100 * 50, Period: "day", Soft: 0.8, OnExhausted: "wait"}}}}
	qs := []*Quota{newQuota(t, st), newQuota(t, st)}
	// A clock that runs (from t0): a refusal's brief memory ends.
	start := time.Now()
	for _, q := range qs {
		q.now = func() time.Time { return t0.Add(time.Since(start)) }
	}
	var mu sync.Mutex
	served, refused, held := 0, 0, 0
	var wg sync.WaitGroup
	for c := 0; c < 64; c++ {
		wg.Add(1)
		go func(c int) {
			defer wg.Done()
			q := qs[c%2]
			for {
				a, r, err := q.Admit(context.Background(), Caller{Tenant: tenant, Key: key}, Charge{Tokens: 50})
				if err != nil {
					t.Error(err)
					return
				}
				if r != nil && r.What == "budget_held" {
					// Budget left in pieces across the processes: a
					// caller retries when told to, and is served once
					// the pieces come together.
					mu.Lock()
					held++
					mu.Unlock()
					time.Sleep(time.Millisecond)
					continue
				}
				if r != nil {
					mu.Lock()
					refused++
					mu.Unlock()
					return
				}
				a.Finish(Usage{Tokens: 50}, true)
				mu.Lock()
				served++
				mu.Unlock()
				if c%7 == 0 {
					q.Flush(context.Background())
				}
			}
		}(c)
	}
	wg.Wait()
	for _, q := range qs {
		q.Flush(context.Background())
	}
	p := periodStart(st.q.Budgets[0], t0)
	if served != 100 {
		for _, q := range qs {
			for _, b := range q.budgets {
				t.Logf("grant %+v held %+v consumed %+v spent %+v pending %+v", b.grant, b.held, b.consumed, b.spent, b.pending)
			}
		}
		t.Fatalf("served %d calls of a 100-call budget (%d refused); store %+v", served, refused, st.spend[periodStart(st.q.Budgets[0], t0)])
	}
	if got := st.spend[p].SpentTokens; got != 100*50 {
		t.Fatalf("spend recorded %d, served %d", got, 100*50)
	}
	t.Logf("100 calls over 2 processes took %d leases; %d calls were told to retry while the budget left was held in pieces", st.leases, held)
}

func TestBudgetLeasesInChunksWhilePlentyRemains(t *testing.T) {
	bid := uuid.New()
	st := &memStore{q: &store.Quotas{Version: 1, Budgets: []store.Budget{{ID: bid, TenantID: tenant, AmountNanos: 64_000_000, Currency: "USD", Period: "month", Soft: 0.8}}}}
	q := newQuota(t, st)
	for i := 0; i < 100; i++ {
		a, r, err := q.Admit(context.Background(), Caller{Tenant: tenant}, Charge{Tokens: 10, Nanos: 1000})
		if err != nil || r != nil {
			t.Fatalf("call %d: %v %+v", i, err, r)
		}
		a.Finish(Usage{Tokens: 10, Nanos: 400}, true)
	}
	if st.leases != 1 {
		t.Fatalf("100 small calls took %d leases of a big budget, want 1", st.leases)
	}
	q.Flush(context.Background())
	r := st.spend[periodStart(st.q.Budgets[0], t0)]
	if r.SpentNanos != 100*400 || r.LeasedNanos != 1_000_000-100*1000 {
		t.Fatalf("after a flush: %+v", r)
	}
}

// A call too large for what is left refuses that call only; a call larger
// than the whole budget is never; only a budget actually spent closes to
// every call, and says so once.
func TestBudgetTellsSpentFromTooLarge(t *testing.T) {
	st := &memStore{q: &store.Quotas{Version: 1, Budgets: []store.Budget{
		{ID: uuid.New(), TenantID: tenant, Tokens: 5000, Period: "day", Soft: 0.8, OnExhausted: "wait"}}}}
	q := newQuota(t, st)
	me := Caller{Tenant: tenant, Key: key, Model: "gpt-4o"}
	ctx := context.Background()
	admit := func(tokens int64) *Refusal {
		t.Helper()
		a, r, err := q.Admit(ctx, me, Charge{Tokens: tokens})
		if err != nil {
			t.Fatal(err)
		}
		if r == nil {
			a.Finish(Usage{Tokens: tokens}, true)
		}
		return r
	}
	if r := admit(6000); r == nil || r.Code != "budget_exceeded" || !r.Never || !r.RetryAt.IsZero() {
		t.Fatalf("larger than the whole budget: %+v", r)
	}
	if r := admit(20); r != nil {
		t.Fatalf("a small call after a too-large one: %+v", r)
	}
	if r := admit(4000); r != nil {
		t.Fatalf("4,000 of 4,980 left: %+v", r)
	}
	if r := admit(2000); r == nil || r.What != "budget_left" || r.Never || r.RetryAt.IsZero() {
		t.Fatalf("2,000 with 980 left: %+v", r)
	}
	if r := admit(20); r != nil {
		t.Fatalf("a small call after one too large for what is left: %+v", r)
	}
	if st.exceeded != 0 || q.Room(tenant, "gpt-4o", 20) == 0 {
		t.Fatalf("not spent yet, but marked %d times, or closed to queued work", st.exceeded)
	}
	for i := 0; i < 48; i++ { // 960 more: 0 left
		if r := admit(20); r != nil {
			t.Fatalf("call %d of the last: %+v", i, r)
		}
	}
	for i := 0; i < 3; i++ {
		if r := admit(20); r == nil || r.What != "budget" {
			t.Fatalf("a spent budget: %+v", r)
		}
	}
	if st.exceeded != 1 || q.Room(tenant, "gpt-4o", 20) != 0 {
		t.Fatalf("spent: marked %d times (want 1), room %d (want 0)", st.exceeded, q.Room(tenant, "gpt-4o", 20))
	}
	// Raised: open again at once.
	raised := *st.q
	raised.Version++
	raised.Budgets = []store.Budget{raised.Budgets[0]}
	raised.Budgets[0].Tokens = 10_000
	q.Load(&raised)
	if r := admit(20); r != nil {
		t.Fatalf("after the budget was raised: %+v", r)
	}
}

// A process that stops gives its whole lease back, busy or not: leases
// outlive their process in Postgres until the period ends.
func TestStoppingGivesTheLeaseBack(t *testing.T) {
	st := &memStore{q: &store.Quotas{Version: 1, Budgets: []store.Budget{
		{ID: uuid.New(), TenantID: tenant, Tokens: 64_000, Period: "day", Soft: 0.8, OnExhausted: "wait"}}}}
	q := newQuota(t, st)
	a, r, err := q.Admit(context.Background(), Caller{Tenant: tenant, Key: key, Model: "m"}, Charge{Tokens: 10})
	if err != nil || r != nil {
		t.Fatal(err, r)
	}
	a.Finish(Usage{Tokens: 7}, true)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	q.Run(ctx) // returns at once, after its last flush
	row := st.spend[periodStart(st.q.Budgets[0], t0)]
	if row.SpentTokens != 7 || row.LeasedTokens != 0 {
		t.Fatalf("after stopping: %+v, want 7 spent and nothing leased", row)
	}
}

func TestBudgetPeriods(t *testing.T) {
	for _, tc := range []struct {
		b         store.Budget
		now, want time.Time
	}{
		{store.Budget{Period: "day"}, time.Date(2031, 5, 10, 23, 59, 0, 0, time.UTC), time.Date(2031, 5, 10, 0, 0, 0, 0, time.UTC)},
		{store.Budget{Period: "month"}, time.Date(2031, 5, 31, 23, 0, 0, 0, time.FixedZone("x", -5*3600)), time.Date(2031, 6, 1, 0, 0, 0, 0, time.UTC)},
		{store.Budget{Period: "fixed", StartsAt: t0, ResetAt: t0.Add(7 * 24 * time.Hour)}, t0.Add(10 * 24 * time.Hour), t0.Add(7 * 24 * time.Hour)},
	} {
		if got := periodStart(tc.b, tc.now); !got.Equal(tc.want) {
			t.Errorf("%s at %v: %v, want %v", tc.b.Period, tc.now, got, tc.want)
		}
	}
}

// What a synchronous call's limit and budget checks cost: tenant and key
// limits and a tenant budget, admitted out of the grant and finished.
func BenchmarkAdmitFinish(b *testing.B) {
	st := &memStore{q: &store.Quotas{Version: 1,
		Limits:  []store.Limits{{TenantID: tenant, TPM: 1 << 50, RPM: 1 << 50, Concurrency: 1 << 20}, {TenantID: tenant, KeyID: key, TPM: 1 << 50}},
		Budgets: []store.Budget{{ID: uuid.New(), TenantID: tenant, Tokens: 1 << 60, Period: "month", Soft: 0.8, OnExhausted: "wait"}}}}
	q := New(st, "USD", time.Second, quiet)
	q.Load(st.q)
	me := Caller{Tenant: tenant, Key: key, Model: "gpt-4o"}
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		a, r, err := q.Admit(ctx, me, Charge{Tokens: 120, Nanos: 1200})
		if err != nil || r != nil {
			b.Fatal(err, r)
		}
		a.Finish(Usage{Tokens: 100, Nanos: 1000}, true)
	}
}

// And a tenant with nothing configured.
func BenchmarkAdmitUnconfigured(b *testing.B) {
	q := New(&memStore{q: &store.Quotas{}}, "USD", time.Second, quiet)
	me := Caller{Tenant: tenant, Key: key, Model: "gpt-4o"}
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		a, _, _ := q.Admit(ctx, me, Charge{Tokens: 120})
		a.Finish(Usage{Tokens: 100}, true)
	}
}
