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
		if got := p.Cost(tc.deployment, tc.u, tc.batch); got != tc.want {
			t.Errorf("%s: %d nanos, want %d", tc.name, got, tc.want)
		}
	}
}
