package store_test

import (
	"context"
	"testing"
	"time"

	"github.com/levee-gw/levee/store"
)

func TestBudgetLeasesAreExact(t *testing.T) {
	_, st, _ := migrated(t)
	ctx := context.Background()
	ten, err := st.CreateTenant(ctx, &store.CreateTenantParams{Name: "acme"})
	if err != nil {
		t.Fatal(err)
	}
	if err := st.SetBudget(ctx, &store.SetBudgetParams{TenantID: ten.ID, Tokens: 1000, AmountNanos: 5_000_000, Currency: "USD", Period: "day", Soft: 0.5, OnExhausted: "wait"}); err != nil {
		t.Fatal(err)
	}
	q, err := st.LoadQuotas(ctx)
	if err != nil || len(q.Budgets) != 1 || q.Budgets[0].Tokens != 1000 || q.Tenants[ten.ID] != "acme" {
		t.Fatalf("%v %+v", err, q)
	}
	b := q.Budgets[0]
	p := time.Date(2031, 1, 2, 0, 0, 0, 0, time.UTC)
	if _, err := st.CreateWebhookEndpoint(ctx, ten.ID, "http://127.0.0.1:9/x", "whsec_x", nil); err != nil {
		t.Fatal(err)
	}
	events := func() map[string]int {
		t.Helper()
		rows, err := st.Pool().Query(ctx, `SELECT type, count(*) FROM webhook_events e JOIN webhook_deliveries d ON d.event_id = e.id GROUP BY type`)
		if err != nil {
			t.Fatal(err)
		}
		defer rows.Close()
		out := map[string]int{}
		for rows.Next() {
			var typ string
			var n int
			_ = rows.Scan(&typ, &n)
			out[typ] = n
		}
		return out
	}
	lease := func(tokens, chunk int64) (int64, bool) {
		t.Helper()
		l, err := st.LeaseBudget(ctx, &store.LeaseParams{BudgetID: b.ID, PeriodStart: p, Tokens: tokens, ChunkTokens: chunk, LimitTokens: 1000, LimitNanos: 5_000_000})
		if err != nil {
			t.Fatal(err)
		}
		return l.Tokens, l.OK
	}
	// Plenty left: the chunk; little left: just what is wanted; too little: none.
	if got, ok := lease(10, 100); !ok || got != 100 {
		t.Fatalf("first lease %d %v", got, ok)
	}
	if got, ok := lease(10, 300); !ok || got != 10 { // 100 + 4*300 > 1000
		t.Fatalf("near the end %d %v", got, ok)
	}
	if l, err := st.LeaseBudget(ctx, &store.LeaseParams{BudgetID: b.ID, PeriodStart: p, Tokens: 900, LimitTokens: 1000}); err != nil || l.OK || l.Tokens != 0 || l.UsedTokens != 110 {
		t.Fatalf("over the budget: %v %+v, want refused with 110 used", err, l)
	}
	if got, ok := lease(890, 0); !ok || got != 890 {
		t.Fatalf("to the last token %d %v", got, ok)
	}
	// Spend 600 of the 1000 leased, give the rest back: the threshold (500)
	// is crossed once.
	if err := st.SettleBudget(ctx, &store.SettleParams{BudgetID: b.ID, TenantID: ten.ID, PeriodStart: p, SpentTokens: 600, ReleaseTokens: 1000,
		ThresholdTokens: 500, LimitTokens: 1000}); err != nil {
		t.Fatal(err)
	}
	sp, err := st.GetBudgetSpend(ctx, b.ID, p)
	if err != nil || sp.SpentTokens != 600 || sp.LeasedTokens != 0 {
		t.Fatalf("%v %+v", err, sp)
	}
	if got, ok := lease(400, 0); !ok || got != 400 {
		t.Fatalf("what was given back %d %v", got, ok)
	}
	if ev := events(); ev["budget.threshold_reached"] != 1 || ev["budget.exceeded"] != 0 {
		t.Fatalf("after crossing the threshold: %v", ev)
	}
	// The rest is spent: budget.exceeded, once, however it is noticed.
	if err := st.SettleBudget(ctx, &store.SettleParams{BudgetID: b.ID, TenantID: ten.ID, PeriodStart: p, SpentTokens: 400, ReleaseTokens: 400,
		ThresholdTokens: 500, LimitTokens: 1000}); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 2; i++ {
		if err := st.MarkBudgetExceeded(ctx, b.ID, ten.ID, p); err != nil {
			t.Fatal(err)
		}
	}
	if ev := events(); ev["budget.threshold_reached"] != 1 || ev["budget.exceeded"] != 1 {
		t.Fatalf("after spending it all: %v", ev)
	}
	// Another period starts afresh.
	if got, ok := lease(10, 0); ok {
		t.Fatalf("a spent period granted %d", got)
	}
	next := p.AddDate(0, 0, 1)
	if l, err := st.LeaseBudget(ctx, &store.LeaseParams{BudgetID: b.ID, PeriodStart: next, Tokens: 10, LimitTokens: 1000}); err != nil || !l.OK || l.Tokens != 10 || l.UsedTokens != 0 {
		t.Fatalf("the next period: %v %+v", err, l)
	}
}
