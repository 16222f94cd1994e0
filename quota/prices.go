package quota

import (
	"math"
	"sync/atomic"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/levee-gw/levee/broker"
	"github.com/levee-gw/levee/config"
)

// Prices turn usage into cost, in billionths of the configured currency
// (nanos). A price per million tokens times 1,000 is a price in nanos per
// token, so a cost is tokens times price, rounded once, at the end, to a
// whole nano: exact for any price with up to three decimals.
type Prices struct {
	Currency string
	t        atomic.Pointer[priceTable] // swapped whole by Reload
	spent    *prometheus.CounterVec
}

// priceTable is keyed by deployment name or model. A deployment's model is
// taken from the deployment itself, not from the table: a call in flight on
// a deployment a reload removed or renamed is still priced by its model.
type priceTable struct {
	byName map[string]price
}

type price struct {
	in, cached, out, batch float64
}

// NewPrices builds the price table of a validated config; reg (may be nil)
// gets levee_cost_total.
func NewPrices(cfg *config.Config, reg prometheus.Registerer) *Prices {
	p := &Prices{Currency: cfg.Pricing.Currency,
		spent: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "levee_cost_total",
			Help: "What calls cost, in the price table's currency, by tenant and model."}, []string{"tenant", "model"})}
	if reg != nil {
		reg.MustRegister(p.spent)
	}
	p.Reload(cfg)
	return p
}

// Reload prices calls with cfg's table from now on. The currency is not
// reloaded: budgets were leased in it.
func (p *Prices) Reload(cfg *config.Config) {
	t := &priceTable{byName: map[string]price{}}
	for _, pr := range cfg.Pricing.Prices {
		t.byName[pr.Match] = price{in: pr.Input * 1e3, cached: *pr.CachedInput * 1e3, out: pr.Output * 1e3, batch: pr.BatchDiscount}
	}
	p.t.Store(t)
}

// of is a deployment's price: its own entry, else its model's.
func (p *Prices) of(d *broker.Deployment) (price, bool) {
	t := p.t.Load()
	if pr, ok := t.byName[d.Name]; ok {
		return pr, true
	}
	pr, ok := t.byName[d.Model]
	return pr, ok
}

// Cost is what usage on a deployment cost; batch applies the deployment's
// batch discount. Embeddings are priced by their input alone (they have no
// output tokens).
func (p *Prices) Cost(d *broker.Deployment, u broker.Usage, batch bool) int64 {
	pr, ok := p.of(d)
	if !ok {
		return 0
	}
	cached := u.CachedTokens()
	c := float64(u.PromptTokens-cached)*pr.in + float64(cached)*pr.cached + float64(u.CompletionTokens)*pr.out
	if batch {
		c *= pr.batch
	}
	return int64(math.Round(c))
}

// Record counts a call's cost in levee_cost_total.
func (p *Prices) Record(tenant, model string, nanos int64) {
	if nanos != 0 {
		p.spent.WithLabelValues(tenant, model).Add(float64(nanos) / 1e9)
	}
}

// Estimate is the most a call of tokens (its charged estimate) can cost on
// any deployment of the group: every token at the dearest rate. A budget
// reserves it on admission and gets back what the call did not cost.
func (p *Prices) Estimate(g *broker.Group, tokens int) int64 {
	most := 0.0
	for _, d := range g.Deployments() {
		if pr, ok := p.of(d); ok {
			most = max(most, pr.in, pr.out)
		}
	}
	return int64(math.Ceil(float64(tokens) * most))
}
