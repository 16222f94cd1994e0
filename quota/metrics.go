package quota

import (
	"context"
	"sync"
	"time"

	"github.com/google/uuid"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/levee-gw/levee/store"
)

// SpendReader reads budgets' spend for metrics.
type SpendReader interface {
	BudgetSpends(ctx context.Context, ps []store.BudgetPeriod) (map[uuid.UUID]store.BudgetSpend, error)
}

var budgetUsedDesc = prometheus.NewDesc("levee_budget_used_ratio",
	"Share of a budget spent in its current period (the larger of money and tokens where both are set), by tenant and key (key=\"\" for a tenant's budget).",
	[]string{"tenant", "key"}, nil)

// BudgetCollector reports how much of each budget's current period is
// spent, read from Postgres at most every 15 s.
type BudgetCollector struct {
	q  *Quota
	st SpendReader

	mu   sync.Mutex
	at   time.Time
	last []prometheus.Metric
}

// NewBudgetCollector reports q's budgets with spend read through st.
func NewBudgetCollector(q *Quota, st SpendReader) *BudgetCollector {
	return &BudgetCollector{q: q, st: st}
}

func (c *BudgetCollector) Describe(ch chan<- *prometheus.Desc) { ch <- budgetUsedDesc }

func (c *BudgetCollector) Collect(ch chan<- prometheus.Metric) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if time.Since(c.at) > 15*time.Second {
		if ms, err := c.read(); err == nil {
			c.last, c.at = ms, time.Now()
		}
	}
	for _, m := range c.last {
		ch <- m
	}
}

func (c *BudgetCollector) read() ([]prometheus.Metric, error) {
	now := c.q.now()
	type one struct {
		b      store.Budget
		tenant string
	}
	var bs []one
	var ps []store.BudgetPeriod
	c.q.mu.RLock()
	for _, bg := range c.q.budgets {
		bg.mu.Lock()
		b := bg.b
		bg.mu.Unlock()
		bs = append(bs, one{b, c.q.tenants[b.TenantID]})
		ps = append(ps, store.BudgetPeriod{Budget: b.ID, Start: periodStart(b, now)})
	}
	c.q.mu.RUnlock()
	if len(bs) == 0 {
		return nil, nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	spends, err := c.st.BudgetSpends(ctx, ps)
	if err != nil {
		return nil, err
	}
	out := make([]prometheus.Metric, 0, len(bs))
	for _, o := range bs {
		s := spends[o.b.ID]
		ratio := 0.0
		if o.b.AmountNanos > 0 {
			ratio = float64(s.SpentNanos) / float64(o.b.AmountNanos)
		}
		if o.b.Tokens > 0 {
			ratio = max(ratio, float64(s.SpentTokens)/float64(o.b.Tokens))
		}
		key := ""
		if o.b.KeyID != uuid.Nil {
			key = o.b.KeyID.String()
		}
		tenant := o.tenant
		if tenant == "" {
			tenant = o.b.TenantID.String()
		}
		out = append(out, prometheus.MustNewConstMetric(budgetUsedDesc, prometheus.GaugeValue, ratio, tenant, key))
	}
	return out, nil
}
