package test

import (
	"bytes"
	"context"
	"io"
	"net/http"
	"testing"

	"github.com/levee-gw/levee/config"
	"github.com/levee-gw/levee/dev"
	"github.com/levee-gw/levee/sim"
	"github.com/levee-gw/levee/store"
	"github.com/levee-gw/levee/test/harness"
)

// BenchmarkProxyChat is one non-streamed chat call through the whole HTTP
// stack (client → Levee → simulator with no latency → back), in parallel.
// Compare with BenchmarkDirectChat for what Levee adds.
func BenchmarkProxyChat(b *testing.B) {
	env := benchEnv(b)
	benchCalls(b, env.BaseURL+"/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21", env.APIKey)
}

// BenchmarkDirectChat is the same call sent straight to the simulator.
func BenchmarkDirectChat(b *testing.B) {
	env := benchEnv(b)
	benchCalls(b, env.SimURL+"/openai/deployments/bench/chat/completions?api-version=2024-10-21", env.Config.Deployments[0].Credential)
}

func benchEnv(b *testing.B) *harness.Env {
	return harness.Start(b, &dev.File{
		Deployments: []dev.FileDeployment{{Name: "bench", Model: "gpt-4o", Kind: config.Provisioned, TPM: 1 << 40, RPM: 1 << 40,
			Sim: sim.Deployment{TPM: 0, CompletionTokens: 16}}},
		Models: []config.Model{{Name: "gpt-4o", Deployments: []string{"bench"}}},
	})
}

var benchBody = []byte(`{"model":"gpt-4o","max_tokens":16,"messages":[{"role":"system","content":"You are terse."},{"role":"user","content":"Say something short about rivers."}]}`)

func benchCalls(b *testing.B, url, key string) {
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 256}}
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			oneCall(b, client, url, key)
		}
	})
}

func oneCall(b *testing.B, client *http.Client, url, key string) {
	req, _ := http.NewRequest(http.MethodPost, url, bytes.NewReader(benchBody))
	req.Header.Set("api-key", key)
	resp, err := client.Do(req)
	if err != nil {
		b.Fatal(err)
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 {
		b.Fatalf("status %d", resp.StatusCode)
	}
}

// The Serial variants send one call at a time: their ns/op is the latency
// of a call on an otherwise idle machine.
func BenchmarkProxyChatSerial(b *testing.B) {
	env := benchEnv(b)
	serialCalls(b, env.BaseURL+"/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21", env.APIKey)
}

func BenchmarkDirectChatSerial(b *testing.B) {
	env := benchEnv(b)
	serialCalls(b, env.SimURL+"/openai/deployments/bench/chat/completions?api-version=2024-10-21", env.Config.Deployments[0].Credential)
}

func serialCalls(b *testing.B, url, key string) {
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 4}}
	b.ReportAllocs()
	for b.Loop() {
		oneCall(b, client, url, key)
	}
}

// BenchmarkProxyChatLimitedSerial is BenchmarkProxyChatSerial for a tenant
// with tenant and key limits and a budget, none binding: the difference is
// what the checks add to a call (in one process, without network noise).
func BenchmarkProxyChatLimitedSerial(b *testing.B) {
	env := benchEnv(b)
	key := env.NewKey("limited")
	ctx := context.Background()
	k, err := env.Store.KeyBySecret(ctx, key)
	if err != nil {
		b.Fatal(err)
	}
	for _, p := range []*store.SetLimitsParams{{TenantID: k.TenantID, TPM: 1 << 40, RPM: 1 << 40, Concurrency: 1 << 20}, {TenantID: k.TenantID, KeyID: k.ID, TPM: 1 << 40}} {
		if err := env.Store.SetLimits(ctx, p); err != nil {
			b.Fatal(err)
		}
	}
	if err := env.Store.SetBudget(ctx, &store.SetBudgetParams{TenantID: k.TenantID, Tokens: 1 << 50, Period: "month", Soft: 0.8, OnExhausted: "wait"}); err != nil {
		b.Fatal(err)
	}
	if err := env.Gateway.Quota.Refresh(ctx); err != nil {
		b.Fatal(err)
	}
	serialCalls(b, env.BaseURL+"/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21", key)
}
