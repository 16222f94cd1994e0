package quota

import (
	"encoding/json"
	"testing"

	"github.com/levee-gw/levee/broker"
	"github.com/levee-gw/levee/config"
)

func TestCostIsExactPerCall(t *testing.T) {
	cached, embCached := 1.25, 0.02
	cfg := &config.Config{
		Deployments: []config.Deployment{{Name: "chat", Model: "gpt-4o"}, {Name: "emb", Model: "text-embedding-3-small"}, {Name: "own", Model: "gpt-4o"}},
		Pricing: config.Pricing{Currency: "USD", Prices: []config.Price{
			{Match: "gpt-4o", Input: 2.5, CachedInput: &cached, Output: 10, BatchDiscount: 0.5},
			{Match: "text-embedding-3-small", Input: 0.02, CachedInput: &embCached, BatchDiscount: 1},
			{Match: "own", Input: 0.001, CachedInput: &embCached, Output: 0.003, BatchDiscount: 1}, // a deployment's own price
		}}}
	p := NewPrices(cfg, nil)
	deps := map[string]config.Deployment{"nope": {Name: "nope", Model: "nope"}}
	for _, d := range cfg.Deployments {
		deps[d.Name] = d
	}
	var withCache broker.Usage
	if err := json.Unmarshal([]byte(`{"prompt_tokens":1000,"completion_tokens":10,"prompt_tokens_details":{"cached_tokens":400}}`), &withCache); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name       string
		deployment string
		u          broker.Usage
		batch      bool
		want       int64 // nanos
	}{
		{"prompt and completion", "chat", broker.Usage{PromptTokens: 1000, CompletionTokens: 10}, false, 1000*2500 + 10*10_000},
		{"cached prompt tokens at their price", "chat", withCache, false, 600*2500 + 400*1250 + 10*10_000},
		{"a batch line at its discount", "chat", broker.Usage{PromptTokens: 1000, CompletionTokens: 10}, true, (1000*2500 + 10*10_000) / 2},
		{"a small embedding is not free", "emb", broker.Usage{PromptTokens: 24}, false, 480},
		{"a deployment's own price wins", "own", broker.Usage{PromptTokens: 1, CompletionTokens: 1}, false, 1 + 3},
		{"an unpriced deployment costs nothing", "nope", broker.Usage{PromptTokens: 1000}, false, 0},
	} {
		if got := p.Cost(&broker.Deployment{Deployment: deps[tc.deployment]}, tc.u, tc.batch); got != tc.want {
			t.Errorf("%s: %d nanos, want %d", tc.name, got, tc.want)
		}
	}
}

// A call in flight when a reload removes (or renames) its deployment
// finishes on that deployment: it is priced by the model it ran, not free.
func TestCostOfACallOnADeploymentRemovedByReload(t *testing.T) {
	cached := 1.25
	priced := []config.Price{{Match: "gpt-4o", Input: 2.5, CachedInput: &cached, Output: 10, BatchDiscount: 0.5}}
	before := &config.Config{Deployments: []config.Deployment{{Name: "east", Model: "gpt-4o"}},
		Models:  []config.Model{{Name: "chat", Deployments: []string{"east"}}},
		Pricing: config.Pricing{Currency: "USD", Prices: priced}}
	after := &config.Config{Deployments: []config.Deployment{{Name: "east-2", Model: "gpt-4o"}},
		Models:  []config.Model{{Name: "chat", Deployments: []string{"east-2"}}},
		Pricing: config.Pricing{Currency: "USD", Prices: priced}}
	p := NewPrices(before, nil)
	b := broker.New(before, broker.NewTokenizers(), broker.NewClient(), nil, nil)
	g, _ := b.Resolve("chat") // the group the call was admitted with
	d, _ := b.Deployment("east")
	u := broker.Usage{PromptTokens: 1000, CompletionTokens: 10}
	want := int64(1000*2500 + 10*10_000)
	if got := p.Cost(d, u, false); got != want {
		t.Fatalf("before the reload: %d nanos, want %d", got, want)
	}
	p.Reload(after)
	b.Reload(after)
	if got := p.Cost(d, u, false); got != want {
		t.Errorf("a call on the removed deployment, finishing after the reload: %d nanos, want %d", got, want)
	}
	if got := p.Estimate(g, 1000); got != 1000*10_000 {
		t.Errorf("the estimate of a call admitted before the reload: %d nanos, want %d", got, 1000*10_000)
	}
}
