package test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/levee-gw/levee/config"
	"github.com/levee-gw/levee/dev"
	"github.com/levee-gw/levee/gateway"
	"github.com/levee-gw/levee/sim"
	"github.com/levee-gw/levee/store"
	"github.com/levee-gw/levee/test/harness"
)

// twoTenants serves model-a on deployment a and model-b on b, so the
// simulator's counters of each deployment are one tenant's.
func twoTenants(lat time.Duration) *dev.File {
	d := sim.Deployment{TTFT: lat, CompletionTokens: 40}
	return &dev.File{
		Deployments: []dev.FileDeployment{
			{Name: "a", Model: "gpt-4o", Kind: config.Standard, TPM: 1 << 30, RPM: 1 << 30, Sim: d},
			{Name: "b", Model: "gpt-4o", Kind: config.Standard, TPM: 1 << 30, RPM: 1 << 30, Sim: d},
		},
		Models: []config.Model{{Name: "model-a", Deployments: []string{"a"}, MaxTokens: 4096}, {Name: "model-b", Deployments: []string{"b"}, MaxTokens: 4096}},
	}
}

func chatFor(model string, maxTokens int) map[string]any {
	return map[string]any{"model": model, "max_tokens": maxTokens,
		"messages": []map[string]string{{"role": "user", "content": "Say hello to the levee."}}}
}

// tenantOf returns a key's tenant id.
func tenantOf(t *testing.T, env *harness.Env, key string) uuid.UUID {
	t.Helper()
	k, err := env.Store.KeyBySecret(context.Background(), key)
	if err != nil {
		t.Fatal(err)
	}
	return k.TenantID
}

func setLimits(t *testing.T, env *harness.Env, p *store.SetLimitsParams) {
	t.Helper()
	if err := env.Store.SetLimits(context.Background(), p); err != nil {
		t.Fatal(err)
	}
	if err := env.Gateway.Quota.Refresh(context.Background()); err != nil {
		t.Fatal(err)
	}
}

// One tenant hammering at three times its TPM gets 429s that describe its
// own limit; another tenant's calls see none, and take no longer; the
// deployment saw the limited tenant at no more than its limit.
func TestTenantRateLimitHoldsAndIsolates(t *testing.T) {
	env := harness.Start(t, twoTenants(20*time.Millisecond))
	limited, other := env.NewKey("limited"), env.NewKey("other")
	const limit = 4000
	setLimits(t, env, &store.SetLimitsParams{TenantID: tenantOf(t, env, limited), TPM: limit})

	// The other tenant alone, first.
	alone := latencies(t, env, other, "model-b", 40, 4)
	// Then with the limited tenant asking for three times its minute.
	resp, _ := call(t, env.BaseURL, "/v1/chat/completions", limited, chatFor("model-a", 100))
	est := limit - headerInt(t, resp, "x-ratelimit-remaining-tokens")
	var statuses sync.Map
	var wg sync.WaitGroup
	var asked atomic.Int64
	for c := 0; c < 6; c++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for asked.Add(est) < 3*limit {
				resp, raw := call(t, env.BaseURL, "/v1/chat/completions", limited, chatFor("model-a", 100))
				n, _ := statuses.LoadOrStore(resp.StatusCode, new(atomic.Int64))
				n.(*atomic.Int64).Add(1)
				if resp.StatusCode == 429 {
					var e envelope
					_ = json.Unmarshal(raw, &e)
					if deref(e.Error.Code) != "tenant_rate_limit_exceeded" || resp.Header.Get("Retry-After") == "" ||
						resp.Header.Get("x-ratelimit-limit-tokens") != strconv.Itoa(limit) || resp.Header.Get("x-ratelimit-remaining-tokens") == "" {
						t.Errorf("429: %v %s", resp.Header, raw)
					}
				}
			}
		}()
	}
	during := latencies(t, env, other, "model-b", 40, 4)
	wg.Wait()
	counts := map[any]int64{}
	statuses.Range(func(k, v any) bool { counts[k] = v.(*atomic.Int64).Load(); return true })
	st := env.Sim.Stats()
	t.Logf("limited tenant (%d TPM, ~%d tokens a call): %v; the deployment's minute peaked at %d", limit, est, counts, st["a"].PeakTokens)
	t.Logf("other tenant p50 alone %v, while the limited one hammers %v", alone[len(alone)/2], during[len(during)/2])
	if counts[429] == 0 || counts[200] == 0 {
		t.Fatalf("the limited tenant was never (or always) refused: %v", counts)
	}
	if st["a"].PeakTokens > limit+est {
		t.Fatalf("the deployment saw the limited tenant at %d tokens a minute, above its %d", st["a"].PeakTokens, limit)
	}
	if st["b"].Refused > 0 || len(during) != 40 {
		t.Fatalf("the other tenant was refused")
	}
	if during[len(during)/2] > 2*alone[len(alone)/2]+50*time.Millisecond {
		t.Fatalf("the other tenant slowed down: p50 %v alone, %v beside the limited one", alone[len(alone)/2], during[len(during)/2])
	}
}

// tenJobsOf submits 10 low jobs of key's tenant on model-b and waits for
// them all to succeed: how long that takes.
func tenJobsOf(t *testing.T, env *harness.Env, key string) time.Duration {
	t.Helper()
	start := time.Now()
	var ids []string
	for i := 0; i < 10; i++ {
		_, j := submit(t, env, key, map[string]any{"endpoint": "/v1/chat/completions", "body": chatFor("model-b", 100), "priority": "low"})
		ids = append(ids, j.ID)
	}
	for _, id := range ids {
		if j := waitJob(t, env, key, id, 60*time.Second); j.Status != "succeeded" {
			t.Fatalf("%+v", j)
		}
	}
	return time.Since(start)
}

// latencies makes n calls with c clients and returns their latencies,
// sorted; every one must succeed.
func latencies(t *testing.T, env *harness.Env, key, model string, n, c int) []time.Duration {
	t.Helper()
	var mu sync.Mutex
	var out []time.Duration
	var wg sync.WaitGroup
	var next atomic.Int64
	for w := 0; w < c; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for next.Add(1) <= int64(n) {
				start := time.Now()
				resp, raw := call(t, env.BaseURL, "/v1/chat/completions", key, chatFor(model, 100))
				if resp.StatusCode != 200 {
					t.Errorf("%s: %d %s", model, resp.StatusCode, raw)
				}
				mu.Lock()
				out = append(out, time.Since(start))
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	sort.Slice(out, func(i, j int) bool { return out[i] < out[j] })
	return out
}

func headerInt(t *testing.T, resp *http.Response, h string) int64 {
	t.Helper()
	v, err := strconv.ParseInt(resp.Header.Get(h), 10, 64)
	if err != nil {
		t.Fatalf("%s: %q", h, resp.Header.Get(h))
	}
	return v
}

// A key's limits sit inside its tenant's; requests per minute and calls in
// flight are limits too; and a tenant without limits is not touched.
func TestKeyLimitsAndOtherKinds(t *testing.T) {
	env := harness.Start(t, twoTenants(300*time.Millisecond))
	k1 := env.NewKey("acme")
	k2 := env.NewKey("acme")
	tenant := tenantOf(t, env, k1)
	key1, _ := env.Store.KeyBySecret(context.Background(), k1)
	setLimits(t, env, &store.SetLimitsParams{TenantID: tenant, RPM: 6})
	setLimits(t, env, &store.SetLimitsParams{TenantID: tenant, KeyID: key1.ID, Concurrency: 1})

	// Two at once on key 1: one in flight is its limit.
	var wg sync.WaitGroup
	codes := make([]string, 2)
	for i := range codes {
		wg.Add(1)
		go func() {
			defer wg.Done()
			resp, raw := call(t, env.BaseURL, "/v1/chat/completions", k1, chatFor("model-a", 10))
			if resp.StatusCode == 429 {
				var e envelope
				_ = json.Unmarshal(raw, &e)
				codes[i] = deref(e.Error.Code)
			}
		}()
		time.Sleep(50 * time.Millisecond)
	}
	wg.Wait()
	if codes[0] != "" || codes[1] != "key_rate_limit_exceeded" {
		t.Fatalf("two calls at once on a key allowed one: %q", codes)
	}
	// The tenant's 6 requests a minute hold over both keys (1 used above).
	got := map[int]int{}
	for i := 0; i < 7; i++ {
		resp, raw := call(t, env.BaseURL, "/v1/chat/completions", k2, chatFor("model-a", 10))
		got[resp.StatusCode]++
		if resp.StatusCode == 429 && (!strings.Contains(string(raw), "tenant_rate_limit_exceeded") || resp.Header.Get("x-ratelimit-limit-requests") != "6") {
			t.Fatalf("%v %s", resp.Header, raw)
		}
	}
	if got[200] != 5 || got[429] != 2 {
		t.Fatalf("7 calls against 5 requests left: %v", got)
	}
	// Nobody else is limited.
	if resp, raw := call(t, env.BaseURL, "/v1/chat/completions", env.APIKey, chatFor("model-a", 10)); resp.StatusCode != 200 || resp.Header.Get("x-ratelimit-limit-requests") != "" {
		t.Fatalf("an unlimited tenant: %d %v %s", resp.StatusCode, resp.Header, raw)
	}
}

// A tenant over its limit submits 1,000 low jobs: none fail, they drain at
// its limit, and another tenant's 10 jobs finish about as fast as alone.
func TestQueuedWorkWaitsAtItsLimit(t *testing.T) {
	f := twoTenants(50 * time.Millisecond)
	f.Worker = config.Worker{Concurrency: 32}
	env := harness.Start(t, f)
	limited, other := env.NewKey("limited"), env.NewKey("other")
	const limit = 3000 // about 20 jobs a minute
	setLimits(t, env, &store.SetLimitsParams{TenantID: tenantOf(t, env, limited), TPM: limit})

	tenJobs := func() time.Duration { return tenJobsOf(t, env, other) }
	alone := tenJobs()
	for i := 0; i < 1000; i++ {
		if resp, _ := submit(t, env, limited, map[string]any{"endpoint": "/v1/chat/completions", "body": chatFor("model-a", 100), "priority": "low"}); resp.StatusCode != 202 {
			t.Fatalf("submit %d: %d", i, resp.StatusCode)
		}
	}
	beside := tenJobs()
	time.Sleep(2 * time.Second)
	var done, failed, queued int
	_ = env.Store.Pool().QueryRow(context.Background(), `SELECT count(*) FILTER (WHERE status = 'succeeded'), count(*) FILTER (WHERE status = 'failed'),
		count(*) FILTER (WHERE status IN ('queued', 'running')) FROM jobs WHERE tenant_id = $1`, tenantOf(t, env, limited)).Scan(&done, &failed, &queued)
	st := env.Sim.Stats()
	t.Logf("other tenant's 10 jobs: %v alone, %v beside 1,000 of a limited tenant; limited tenant: %d done, %d failed, %d queued; its deployment's minute peaked at %d of %d",
		alone.Round(time.Millisecond), beside.Round(time.Millisecond), done, failed, queued, st["a"].PeakTokens, limit)
	if failed != 0 {
		t.Fatalf("%d of the limited tenant's jobs failed", failed)
	}
	if done == 0 || queued == 0 {
		t.Fatalf("the limited tenant's jobs did not drain at its limit: %d done, %d queued", done, queued)
	}
	if st["a"].PeakTokens > limit+150 {
		t.Fatalf("the limited tenant's jobs took %d tokens a minute, above its %d", st["a"].PeakTokens, limit)
	}
	if beside > 2*alone+time.Second {
		t.Fatalf("the other tenant's 10 jobs took %v beside the backlog, %v alone", beside, alone)
	}
}

// A known price table and known usage give exact cents in /v1/usage, in
// job objects and in levee_cost_total.
func TestCostIsExact(t *testing.T) {
	f := harness.Fast(dev.DefaultFile())
	cached := 1.0
	f.Pricing = config.Pricing{Currency: "EUR", Prices: []config.Price{
		{Match: "gpt-4o", Input: 2.5, CachedInput: &cached, Output: 10, BatchDiscount: 0.5},
	}}
	env := harness.Start(t, f)
	key := env.NewKey("billed")
	var wantNanos int64
	for i := 0; i < 3; i++ {
		resp, raw := call(t, env.BaseURL, "/v1/chat/completions", key, chat(20))
		if resp.StatusCode != 200 {
			t.Fatalf("%d %s", resp.StatusCode, raw)
		}
		var body struct {
			Usage struct {
				Prompt     int64 `json:"prompt_tokens"`
				Completion int64 `json:"completion_tokens"`
			} `json:"usage"`
		}
		_ = json.Unmarshal(raw, &body)
		// 2.50 per million prompt tokens, 10 per million completion tokens:
		// 2,500 and 10,000 nanos per token.
		wantNanos += body.Usage.Prompt*2500 + body.Usage.Completion*10_000
	}
	_, j := submit(t, env, key, jobBody(20, "low"))
	done := waitJob(t, env, key, j.ID, 20*time.Second)
	jobNanos := done.Usage.PromptTokens*2500 + done.Usage.CompletionTokens*10_000
	wantNanos += int64(jobNanos)
	var jobObj struct {
		Usage struct {
			Cost json.Number `json:"cost"`
		} `json:"usage"`
	}
	_, raw := call(t, env.BaseURL, "/v1/jobs/"+j.ID, key, nil)
	_ = json.Unmarshal(raw, &jobObj)
	if jobObj.Usage.Cost.String() != string(moneyString(int64(jobNanos))) {
		t.Fatalf("job cost %s, want %s (%s)", jobObj.Usage.Cost, moneyString(int64(jobNanos)), raw)
	}
	env.FlushUsage()
	_, raw = call(t, env.BaseURL, "/v1/usage", key, nil)
	var usage struct {
		Currency string `json:"currency"`
		Total    struct {
			Cost json.Number `json:"cost"`
		} `json:"total"`
	}
	_ = json.Unmarshal(raw, &usage)
	if usage.Currency != "EUR" || usage.Total.Cost.String() != moneyString(wantNanos) {
		t.Fatalf("usage cost %s %s, want %s EUR: %s", usage.Total.Cost, usage.Currency, moneyString(wantNanos), raw)
	}
	// The worker counts a job's cost just after recording its end, so a
	// poll may see the job ended a moment before the metric moves.
	want := fmt.Sprintf(`levee_cost_total{model="gpt-4o",tenant="billed"} %s`, strconv.FormatFloat(float64(wantNanos)/1e9, 'g', -1, 64))
	var metrics []byte
	deadline := time.Now().Add(5 * time.Second)
	for {
		resp, err := http.Get(env.BaseURL + "/metrics")
		if err != nil {
			t.Fatal(err)
		}
		metrics, _ = io.ReadAll(resp.Body)
		resp.Body.Close()
		if strings.Contains(string(metrics), want) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("metrics lack %q:\n%s", want, grepLines(string(metrics), "levee_cost_total"))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func moneyString(nanos int64) string {
	if nanos%1_000_000_000 == 0 {
		return strconv.FormatInt(nanos/1_000_000_000, 10)
	}
	return strings.TrimRight(fmt.Sprintf("%d.%09d", nanos/1_000_000_000, nanos%1_000_000_000), "0")
}

func grepLines(s, what string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, what) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// gatewayProcesses starts n `levee serve` processes on env's Postgres,
// NATS and simulator, and returns their base URLs.
func gatewayProcesses(t *testing.T, env *harness.Env, n int, extra string) []string {
	t.Helper()
	var urls []string
	for i := 0; i < n; i++ {
		addr := freeAddr(t)
		cfgPath, penv := processConfig(t, env, addr, extra)
		harness.Spawn(t, penv, "serve", "--config", cfgPath)
		urls = append(urls, "http://"+addr)
	}
	for _, u := range urls {
		harness.Eventually(t, 30*time.Second, u+" to be ready", func() bool {
			resp, err := http.Get(u + "/readyz")
			if err != nil {
				return false
			}
			resp.Body.Close()
			return resp.StatusCode == 200
		})
	}
	return urls
}

// Two gateway processes hold one tenant's TPM together: the deployment saw
// it at no more than the limit plus one call per process.
func TestRateLimitHoldsAcrossProcesses(t *testing.T) {
	if testing.Short() {
		t.Skip("runs levee processes")
	}
	env := harness.StartWith(t, twoTenants(10*time.Millisecond), dev.StackOptions{NoWorkers: true})
	limited := env.NewKey("limited")
	const limit = 6000
	setLimits(t, env, &store.SetLimitsParams{TenantID: tenantOf(t, env, limited), TPM: limit})
	gws := gatewayProcesses(t, env, 2, "worker: {enabled: false}\n")
	var served, refused atomic.Int64
	var est atomic.Int64
	var wg sync.WaitGroup
	for c := 0; c < 16; c++ {
		wg.Add(1)
		go func(c int) {
			defer wg.Done()
			for i := 0; i < 20; i++ {
				resp, _ := call(t, gws[(c+i)%2], "/v1/chat/completions", limited, chatFor("model-a", 100))
				switch resp.StatusCode {
				case 200:
					served.Add(1)
				case 429:
					refused.Add(1)
				default:
					t.Errorf("%d", resp.StatusCode)
				}
			}
		}(c)
	}
	wg.Wait()
	st := env.Sim.Stats()["a"]
	peak := st.PeakTokens
	est.Store(st.TokensAdmitted / max(st.Admitted, 1))
	t.Logf("2 gateways, 16 clients: %d served, %d refused; the deployment's minute peaked at %d of a %d limit (a call is %d tokens)",
		served.Load(), refused.Load(), peak, limit, est.Load())
	if refused.Load() == 0 {
		t.Fatal("the load did not reach the limit: the test proves nothing")
	}
	if peak > limit+2*est.Load() {
		t.Fatalf("two processes let %d tokens a minute through a %d limit (more than one call each over)", peak, limit)
	}
}

// The budget race, over two processes: 64 callers against a budget of 100
// calls. At most one call per process more is served, the spend recorded is
// the spend served, and no call is refused while a call's worth remains.
func TestBudgetHoldsUnderARace(t *testing.T) {
	if testing.Short() {
		t.Skip("runs levee processes")
	}
	env := harness.StartWith(t, twoTenants(5*time.Millisecond), dev.StackOptions{NoWorkers: true})
	key := env.NewKey("budgeted")
	tenant := tenantOf(t, env, key)
	// What one call uses, measured (prompt and its 5 completion tokens).
	resp, raw := call(t, env.BaseURL, "/v1/chat/completions", env.APIKey, chatFor("model-a", 5))
	var one struct {
		Usage struct {
			Total int64 `json:"total_tokens"`
		} `json:"usage"`
	}
	if resp.StatusCode != 200 || json.Unmarshal(raw, &one) != nil || one.Usage.Total == 0 {
		t.Fatalf("%d %s", resp.StatusCode, raw)
	}
	perCall := one.Usage.Total
	budget := 100 * perCall
	if err := env.Store.SetBudget(context.Background(), &store.SetBudgetParams{TenantID: tenant, Tokens: budget, Period: "day", Soft: 0.8, OnExhausted: "wait"}); err != nil {
		t.Fatal(err)
	}
	gws := gatewayProcesses(t, env, 2, "worker: {enabled: false}\n")
	var served, exceeded atomic.Int64
	var wg sync.WaitGroup
	for c := 0; c < 64; c++ {
		wg.Add(1)
		go func(c int) {
			defer wg.Done()
			for i := 0; ; i++ {
				resp, raw := call(t, gws[(c+i)%2], "/v1/chat/completions", key, chatFor("model-a", 5))
				switch {
				case resp.StatusCode == 200:
					served.Add(1)
				case resp.StatusCode == 429 && strings.Contains(string(raw), "budget_exceeded"):
					exceeded.Add(1)
					return
				default:
					t.Errorf("%d %s", resp.StatusCode, raw)
					return
				}
			}
		}(c)
	}
	wg.Wait()
	// The processes write spend every half second, usage every 200 ms.
	var spent, ledger int64
	harness.Eventually(t, 10*time.Second, "spend and usage to be written", func() bool {
		_ = env.Store.Pool().QueryRow(context.Background(), `SELECT coalesce(sum(s.spent_tokens), 0) FROM budget_spend s JOIN budgets b ON b.id = s.budget_id WHERE b.tenant_id = $1`, tenant).Scan(&spent)
		_ = env.Store.Pool().QueryRow(context.Background(), `SELECT coalesce(sum(prompt_tokens + completion_tokens), 0) FROM usage_events WHERE tenant_id = $1 AND status = 200`, tenant).Scan(&ledger)
		return ledger == served.Load()*perCall && spent == ledger
	})
	t.Logf("64 callers over 2 gateways, a budget of 100 calls (%d tokens): %d served, %d refused; spend recorded %d, ledger %d", budget, served.Load(), exceeded.Load(), spent, ledger)
	if served.Load() > 102 {
		t.Fatalf("%d calls served on a budget of 100", served.Load())
	}
	if budget-spent >= perCall {
		t.Fatalf("calls were refused with %d tokens of the budget left (a call takes %d)", budget-spent, perCall)
	}
}

// A change made with the CLI reaches running gateways within 5 seconds.
func TestLimitChangesReachEveryProcess(t *testing.T) {
	if testing.Short() {
		t.Skip("runs levee processes")
	}
	env := harness.StartWith(t, twoTenants(0), dev.StackOptions{NoWorkers: true})
	key := env.NewKey("acme")
	gws := gatewayProcesses(t, env, 2, "worker: {enabled: false}\n")
	for _, g := range gws {
		if resp, _ := call(t, g, "/v1/chat/completions", key, chatFor("model-a", 5)); resp.StatusCode != 200 {
			t.Fatalf("before: %d", resp.StatusCode)
		}
	}
	p := harness.Spawn(t, []string{"DATABASE_URL=" + env.DatabaseURL}, "tenant", "update", "acme", "--rpm", "1")
	if err := p.Cmd.Wait(); err != nil || !strings.Contains(p.Output(), "rpm 1") {
		t.Fatalf("levee tenant update: %v\n%s", err, p.Output())
	}
	changed := time.Now()
	for _, g := range gws {
		harness.Eventually(t, 5*time.Second, g+" to apply the new limit", func() bool {
			resp, _ := call(t, g, "/v1/chat/completions", key, chatFor("model-a", 5))
			return resp.StatusCode == 429 && resp.Header.Get("x-ratelimit-limit-requests") == "1"
		})
	}
	t.Logf("the change reached both gateways within %v", time.Since(changed).Round(time.Millisecond))
}

// A spent budget: a synchronous call gets 429 budget_exceeded; the
// tenant's endpoints get budget.threshold_reached and budget.exceeded, once
// each; with on_exhausted fail its queued work fails visibly with that code,
// with wait it stays queued.
func TestSpentBudgetRefusesNotifiesAndHoldsOrFailsQueuedWork(t *testing.T) {
	f := twoTenants(0)
	f.Webhooks = fastWebhooks().Webhooks
	env := harness.Start(t, f)
	waiting, failing := env.NewKey("waits"), env.NewKey("fails")
	var rcvs []*receiver
	for _, k := range []string{waiting, failing} {
		rcv := newReceiver(t)
		resp, raw := call(t, env.BaseURL, "/v1/webhook_endpoints", k, map[string]any{"url": rcv.srv.URL, "events": []string{"budget.threshold_reached", "budget.exceeded"}})
		if resp.StatusCode != 200 {
			t.Fatalf("%d %s", resp.StatusCode, raw)
		}
		var e struct {
			Secret string `json:"secret"`
		}
		_ = json.Unmarshal(raw, &e)
		rcv.setSecret(e.Secret)
		rcvs = append(rcvs, rcv)
	}
	for _, tc := range []struct {
		key, mode string
	}{{waiting, "wait"}, {failing, "fail"}} {
		if err := env.Store.SetBudget(context.Background(), &store.SetBudgetParams{TenantID: tenantOf(t, env, tc.key), Tokens: 300, Period: "month", Soft: 0.5, OnExhausted: tc.mode}); err != nil {
			t.Fatal(err)
		}
	}
	if err := env.Gateway.Quota.Refresh(context.Background()); err != nil {
		t.Fatal(err)
	}
	// ~20-token calls against 300 tokens: spent within a few calls.
	spend := func(key string) {
		for i := 0; i < 40; i++ {
			resp, raw := call(t, env.BaseURL, "/v1/chat/completions", key, chatFor("model-a", 5))
			if resp.StatusCode == 429 {
				if !strings.Contains(string(raw), `"code":"budget_exceeded"`) || resp.Header.Get("Retry-After") == "" {
					t.Fatalf("%v %s", resp.Header, raw)
				}
				return
			}
		}
		t.Fatal("the budget was never spent")
	}
	spend(waiting)
	spend(failing)
	var waitJobs, failJobs []string
	for i := 0; i < 3; i++ {
		_, j := submit(t, env, waiting, map[string]any{"endpoint": "/v1/chat/completions", "body": chatFor("model-a", 5), "priority": "low"})
		waitJobs = append(waitJobs, j.ID)
		_, j = submit(t, env, failing, map[string]any{"endpoint": "/v1/chat/completions", "body": chatFor("model-a", 5), "priority": "low"})
		failJobs = append(failJobs, j.ID)
	}
	for _, id := range failJobs {
		if j := waitJob(t, env, failing, id, 20*time.Second); j.Status != "failed" || j.Error == nil || j.Error.Code != "budget_exceeded" {
			t.Fatalf("a job of a spent budget that fails: %+v", j)
		}
	}
	for _, id := range waitJobs {
		if _, j := getJob(t, env, waiting, id); j.Status != "queued" {
			t.Fatalf("a job of a spent budget that waits: %+v", j)
		}
	}
	for _, rcv := range rcvs {
		harness.Eventually(t, 20*time.Second, "each tenant's budget events", func() bool {
			n := map[string]int{}
			for _, typ := range rcv.delivered() {
				n[typ]++
			}
			return n["budget.threshold_reached"] == 1 && n["budget.exceeded"] == 1
		})
	}
}

// A call larger than the whole budget, or than what is left of it, is
// refused alone: the tenant's other calls go on, and budget.exceeded waits
// for the budget to be spent.
func TestOversizedCallLeavesTheBudgetOpen(t *testing.T) {
	env := harness.Start(t, twoTenants(0))
	k1, k2 := env.NewKey("acme"), env.NewKey("acme")
	tenant := tenantOf(t, env, k1)
	ctx := context.Background()
	if err := env.Store.SetBudget(ctx, &store.SetBudgetParams{TenantID: tenant, Tokens: 5000, Period: "day", Soft: 0.8, OnExhausted: "wait"}); err != nil {
		t.Fatal(err)
	}
	if err := env.Gateway.Quota.Refresh(ctx); err != nil {
		t.Fatal(err)
	}
	big := chatFor("model-a", 4096)
	big["messages"] = []map[string]string{{"role": "user", "content": strings.Repeat("levee ", 1000)}}
	resp, raw := call(t, env.BaseURL, "/v1/chat/completions", k1, big)
	if resp.StatusCode != 429 || !strings.Contains(string(raw), `"code":"budget_exceeded"`) || resp.Header.Get("Retry-After") != "" {
		t.Fatalf("a call larger than the whole budget: %d %v %s", resp.StatusCode, resp.Header, raw)
	}
	if resp, raw := call(t, env.BaseURL, "/v1/chat/completions", k2, chatFor("model-a", 5)); resp.StatusCode != 200 {
		t.Fatalf("a small call right after it: %d %s", resp.StatusCode, raw)
	}
	// ~3,500 of what is left (a long prompt: spent, not just estimated),
	// then 2,000 more does not fit, and the small calls still do.
	mid := chatFor("model-a", 5)
	mid["messages"] = []map[string]string{{"role": "user", "content": strings.Repeat("levee ", 1700)}}
	if resp, raw := call(t, env.BaseURL, "/v1/chat/completions", k1, mid); resp.StatusCode != 200 {
		t.Fatalf("a call within what is left: %d %s", resp.StatusCode, raw)
	}
	resp, raw = call(t, env.BaseURL, "/v1/chat/completions", k1, chatFor("model-a", 2000))
	if resp.StatusCode != 429 || !strings.Contains(string(raw), "What is left of the budget") || resp.Header.Get("Retry-After") == "" {
		t.Fatalf("a call larger than what is left: %d %v %s", resp.StatusCode, resp.Header, raw)
	}
	if resp, raw := call(t, env.BaseURL, "/v1/chat/completions", k2, chatFor("model-a", 5)); resp.StatusCode != 200 {
		t.Fatalf("a small call after it: %d %s", resp.StatusCode, raw)
	}
	env.Gateway.Quota.Flush(ctx)
	var marked bool
	if err := env.Store.Pool().QueryRow(ctx, `SELECT exceeded_at IS NOT NULL FROM budget_spend s JOIN budgets b ON b.id = s.budget_id WHERE b.tenant_id = $1`, tenant).Scan(&marked); err != nil {
		t.Fatal(err)
	}
	if marked {
		t.Fatal("budget.exceeded recorded for a budget with room left")
	}
}

// A per-model limit counts the calls that name one of the model's
// deployments directly; and jobs pinned to a deployment run.
func TestModelLimitCountsCallsNamingItsDeployment(t *testing.T) {
	env := harness.Start(t, twoTenants(0))
	key := env.NewKey("acme")
	setLimits(t, env, &store.SetLimitsParams{TenantID: tenantOf(t, env, key), Model: "model-a", RPM: 2})
	got := map[int]int{}
	for _, m := range []string{"model-a", "a", "a", "a"} {
		resp, _ := call(t, env.BaseURL, "/v1/chat/completions", key, chatFor(m, 5))
		got[resp.StatusCode]++
	}
	if got[200] != 2 || got[429] != 2 {
		t.Fatalf("RPM 2 on model-a, calls to it and its deployment a: %v", got)
	}
	_, pinned := submit(t, env, key, map[string]any{"endpoint": "/v1/chat/completions", "body": chatFor("b", 5), "priority": "low"})
	if j := waitJob(t, env, key, pinned.ID, 20*time.Second); j.Status != "succeeded" {
		t.Fatalf("a job naming deployment b: %+v", j)
	}
	_, held := submit(t, env, key, map[string]any{"endpoint": "/v1/chat/completions", "body": chatFor("a", 5), "priority": "low"})
	time.Sleep(time.Second)
	if _, j := getJob(t, env, key, held.ID); j.Status != "queued" {
		t.Fatalf("a job naming deployment a, its model at its limit: %+v", j)
	}
}

// The CLI refuses what it could not enforce as written, and changes
// nothing when it refuses.
func TestBudgetCLIRefusesWhatItCannotEnforce(t *testing.T) {
	env := harness.StartWith(t, twoTenants(0), dev.StackOptions{NoWorkers: true})
	tenant := tenantOf(t, env, env.NewKey("acme"))
	cfgEnv := []string{"DATABASE_URL=" + env.DatabaseURL, "AZURE_PTU_KEY=a", "AZURE_STD_KEY=b", "OPENAI_API_KEY=c"}
	const example = "../deploy/levee.example.yaml"
	row := func() string {
		var s string
		if err := env.Store.Pool().QueryRow(context.Background(), `SELECT coalesce(amount_nanos::text, '-') || ' ' || coalesce(currency, '-') || ' ' || coalesce(tokens::text, '-') || '/' || period
			FROM budgets WHERE tenant_id = $1 AND key_id IS NULL`, tenant).Scan(&s); err != nil {
			return "none"
		}
		return s
	}
	for _, tc := range []struct {
		args    []string
		refused string // a part of the error, or "" when it must succeed
		row     string // the budget afterwards
	}{
		{[]string{"--budget", "500USD/month"}, "", "500000000000 USD -/month"},
		{[]string{"--budget-tokens", "1000000/day"}, "the money budget is per month", "500000000000 USD -/month"},
		{[]string{"--budget", "20usd/day", "--budget-tokens", "1000000/day"}, "", "20000000000 USD 1000000/day"},
		{[]string{"--budget", "30USD/month"}, "the token budget is per day", "20000000000 USD 1000000/day"},
		{[]string{"--budget", "0.0000000001USD/day"}, "between 0.000000001", "20000000000 USD 1000000/day"},
		{[]string{"--budget", "500€/day"}, "three-letter currency", "20000000000 USD 1000000/day"},
		{[]string{"--budget", "10000000000000USD/day"}, "between 0.000000001", "20000000000 USD 1000000/day"},
		{[]string{"--budget-tokens", "1000000000000000000/day"}, "between 1 and", "20000000000 USD 1000000/day"},
		{[]string{"--budget", "500EUR/day", "--config", example}, "not the price table's currency", "20000000000 USD 1000000/day"},
		{[]string{"--model", "GPT-4o", "--tpm", "5", "--config", example}, "no such model", "20000000000 USD 1000000/day"},
		{[]string{"--model", "gpt-4o", "--tpm", "5", "--config", example}, "", "20000000000 USD 1000000/day"},
		{[]string{"--no-budget"}, "", "none"},
	} {
		p := harness.Spawn(t, cfgEnv, append([]string{"tenant", "update", "acme"}, tc.args...)...)
		err := p.Cmd.Wait()
		switch {
		case tc.refused == "" && err != nil:
			t.Fatalf("%v: %v\n%s", tc.args, err, p.Output())
		case tc.refused != "" && (err == nil || !strings.Contains(p.Output(), tc.refused)):
			t.Fatalf("%v: want refused with %q, got %v\n%s", tc.args, tc.refused, err, p.Output())
		}
		if got := row(); got != tc.row {
			t.Fatalf("%v: budget %q, want %q", tc.args, got, tc.row)
		}
	}
}

// Moving the end of a fixed budget starts a new period then: never one
// stretched back over spend already made.
func TestFixedBudgetNewEndStartsAFreshPeriod(t *testing.T) {
	env := harness.Start(t, twoTenants(0))
	key := env.NewKey("acme")
	tenant := tenantOf(t, env, key)
	ctx := context.Background()
	now := time.Now().UTC()
	if err := env.Store.SetBudget(ctx, &store.SetBudgetParams{TenantID: tenant, Tokens: 1000, Period: "fixed", ResetAt: now.Add(24 * time.Hour), Soft: 0.8, OnExhausted: "wait"}); err != nil {
		t.Fatal(err)
	}
	// As if made 40 days ago with 30-day periods, the first spent in full.
	start := now.Add(-40 * 24 * time.Hour).Truncate(time.Second)
	var id uuid.UUID
	if err := env.Store.Pool().QueryRow(ctx, `UPDATE budgets SET starts_at = $2, reset_at = $3 WHERE tenant_id = $1 RETURNING id`, tenant, start, start.Add(30*24*time.Hour)).Scan(&id); err != nil {
		t.Fatal(err)
	}
	if _, err := env.Store.Pool().Exec(ctx, `INSERT INTO budget_spend (budget_id, period_start, spent_tokens) VALUES ($1, $2, 1000)`, id, start); err != nil {
		t.Fatal(err)
	}
	p := harness.Spawn(t, []string{"DATABASE_URL=" + env.DatabaseURL}, "tenant", "update", "acme", "--reset-at", now.Add(24*time.Hour).Format(time.RFC3339))
	if err := p.Cmd.Wait(); err != nil {
		t.Fatalf("%v\n%s", err, p.Output())
	}
	if err := env.Gateway.Quota.Refresh(ctx); err != nil {
		t.Fatal(err)
	}
	if resp, raw := call(t, env.BaseURL, "/v1/chat/completions", key, chatFor("model-a", 5)); resp.StatusCode != 200 {
		t.Fatalf("the new period's first call: %d %s", resp.StatusCode, raw)
	}
	// And a change of something else keeps the period (and its spend).
	var before, after time.Time
	_ = env.Store.Pool().QueryRow(ctx, `SELECT starts_at FROM budgets WHERE id = $1`, id).Scan(&before)
	p = harness.Spawn(t, []string{"DATABASE_URL=" + env.DatabaseURL}, "tenant", "update", "acme", "--soft", "0.5")
	if err := p.Cmd.Wait(); err != nil {
		t.Fatalf("%v\n%s", err, p.Output())
	}
	_ = env.Store.Pool().QueryRow(ctx, `SELECT starts_at FROM budgets WHERE id = $1`, id).Scan(&after)
	if !after.Equal(before) {
		t.Fatalf("changing --soft moved the period's start from %v to %v", before, after)
	}
}

// customGateway starts one more gateway (API only) on env's Postgres and
// NATS whose deployments are all served by h.
func customGateway(t *testing.T, env *harness.Env, h http.Handler, pricing *config.Pricing) *gateway.Gateway {
	t.Helper()
	var edit func(*config.Config)
	if pricing != nil {
		edit = func(c *config.Config) { c.Pricing = *pricing }
	}
	return gatewayOver(t, env, h, false, edit)
}

// gatewayOver starts a second gateway on env's Postgres and NATS whose
// deployments all point at h (a fake deployment; nil: the simulator), with
// workers if asked, its config changed by edit (and validated again).
func gatewayOver(t *testing.T, env *harness.Env, h http.Handler, workers bool, edit func(*config.Config)) *gateway.Gateway {
	t.Helper()
	upURL := env.SimURL
	if h != nil {
		up := httptest.NewServer(h)
		t.Cleanup(up.Close)
		upURL = up.URL
	}
	cfg := *env.Config
	cfg.Listen = "127.0.0.1:0"
	cfg.Deployments = append([]config.Deployment(nil), env.Config.Deployments...)
	for i := range cfg.Deployments {
		cfg.Deployments[i].Endpoint = upURL
	}
	if edit != nil {
		edit(&cfg)
		if err := cfg.Validate(); err != nil {
			t.Fatal(err)
		}
	}
	log := slog.New(slog.NewTextHandler(testLogWriter{t}, &slog.HandlerOptions{Level: slog.LevelWarn}))
	g, err := gateway.Start(context.Background(), &cfg, env.Store, gateway.Roles{API: true, Workers: workers}, log)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		_ = g.Shutdown(ctx)
	})
	return g
}

type testLogWriter struct{ t *testing.T }

func (w testLogWriter) Write(p []byte) (int, error) { w.t.Log(string(p)); return len(p), nil }

func priced() *config.Pricing {
	return &config.Pricing{Currency: "USD", Prices: []config.Price{{Match: "gpt-4o", Input: 2.5, Output: 10}}}
}

// A deployment's refusal that carries no usage (a content filter, say)
// costs nothing in the ledger, and nothing in the budget: the budget is
// charged what the ledger records.
func TestBudgetChargesWhatTheLedgerRecords(t *testing.T) {
	env := harness.Start(t, twoTenants(0))
	g := customGateway(t, env, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(400)
		_, _ = w.Write([]byte(`{"error":{"code":"content_filter","message":"The response was filtered","status":400}}`))
	}), priced())
	key := env.NewKey("acme")
	tenant := tenantOf(t, env, key)
	ctx := context.Background()
	if err := env.Store.SetBudget(ctx, &store.SetBudgetParams{TenantID: tenant, AmountNanos: 1_000_000_000, Currency: "USD", Period: "day", Soft: 0.8, OnExhausted: "wait"}); err != nil {
		t.Fatal(err)
	}
	if err := g.Quota.Refresh(ctx); err != nil {
		t.Fatal(err)
	}
	// Each call reserves 4,096 tokens at $10/M, about $0.04: 40 of them
	// are worth more than the budget, so none may stay charged.
	codes := map[int]int{}
	for i := 0; i < 40; i++ {
		resp, _ := call(t, "http://"+g.Addr, "/v1/chat/completions", key, chatFor("model-a", 4096))
		codes[resp.StatusCode]++
	}
	g.Quota.Flush(ctx)
	fctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if err := g.Ledger.Flush(fctx); err != nil {
		t.Fatal(err)
	}
	var spent, ledger int64
	_ = env.Store.Pool().QueryRow(ctx, `SELECT coalesce(sum(s.spent_nanos), 0) FROM budget_spend s JOIN budgets b ON b.id = s.budget_id WHERE b.tenant_id = $1`, tenant).Scan(&spent)
	_ = env.Store.Pool().QueryRow(ctx, `SELECT coalesce(sum(cost_nanos), 0) FROM usage_events WHERE tenant_id = $1`, tenant).Scan(&ledger)
	if codes[400] != 40 || spent != 0 || ledger != 0 {
		t.Fatalf("40 calls refused by the deployment: the client saw %v; budget charged %d nanos, ledger %d", codes, spent, ledger)
	}
}

// A tenant whose queued work cannot run (its key at its limit, or its
// budget spent) fills its queue's in-flight window with messages waiting
// out delays; other tenants' jobs must not slow down beside it.
func TestWorkHeldAtItsLimitDoesNotSlowOthers(t *testing.T) {
	for _, held := range []string{"key limit", "spent budget"} {
		t.Run(held, func(t *testing.T) {
			f := twoTenants(50 * time.Millisecond)
			f.Worker = config.Worker{Concurrency: 32}
			env := harness.Start(t, f)
			limited, other := env.NewKey("limited"), env.NewKey("other")
			tenant := tenantOf(t, env, limited)
			ctx := context.Background()
			if held == "key limit" {
				k, err := env.Store.KeyBySecret(ctx, limited)
				if err != nil {
					t.Fatal(err)
				}
				setLimits(t, env, &store.SetLimitsParams{TenantID: tenant, KeyID: k.ID, RPM: 1})
			} else {
				if err := env.Store.SetBudget(ctx, &store.SetBudgetParams{TenantID: tenant, Tokens: 100, Period: "month", Soft: 0.8, OnExhausted: "wait"}); err != nil {
					t.Fatal(err)
				}
				if err := env.Gateway.Quota.Refresh(ctx); err != nil {
					t.Fatal(err)
				}
			}
			for i := 0; i < 10; i++ { // use the limit up
				if resp, _ := call(t, env.BaseURL, "/v1/chat/completions", limited, chatFor("model-a", 5)); resp.StatusCode == 429 {
					break
				}
			}
			tenJobs := func() time.Duration { return tenJobsOf(t, env, other) }
			alone := tenJobs()
			for i := 0; i < 600; i++ {
				submit(t, env, limited, map[string]any{"endpoint": "/v1/chat/completions", "body": chatFor("model-a", 5), "priority": "low"})
			}
			time.Sleep(3 * time.Second) // the held jobs are taken, refused and put back
			beside := tenJobs()
			t.Logf("%s: another tenant's 10 jobs took %v alone, %v beside 600 held jobs", held, alone.Round(time.Millisecond), beside.Round(time.Millisecond))
			if beside > 2*alone+100*time.Millisecond {
				t.Fatalf("the other tenant slowed down: %v alone, %v beside", alone, beside)
			}
		})
	}
}

// A call that sets no max_tokens is charged default_max_tokens, and sent
// with it: the deployment cannot generate past what the tenant's limit was
// charged, however long its answers would otherwise be.
func TestCallWithoutCeilingIsSentTheOneItIsCharged(t *testing.T) {
	f := twoTenants(100 * time.Millisecond)
	for i := range f.Deployments {
		f.Deployments[i].Sim.CompletionTokens = 4000 // far past default_max_tokens (1,024)
		f.Deployments[i].Sim.DefaultMaxTokens = 16384
	}
	env := harness.Start(t, f)
	key := env.NewKey("acme")
	const limit = 5000
	setLimits(t, env, &store.SetLimitsParams{TenantID: tenantOf(t, env, key), TPM: limit})
	body := map[string]any{"model": "model-a", "messages": []map[string]string{{"role": "user", "content": "Say hello to the levee."}}}
	var total, served atomic.Int64
	var wg sync.WaitGroup
	deadline := time.Now().Add(3 * time.Second)
	for c := 0; c < 8; c++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for time.Now().Before(deadline) {
				resp, raw := call(t, env.BaseURL, "/v1/chat/completions", key, body)
				if resp.StatusCode != 200 {
					time.Sleep(50 * time.Millisecond)
					continue
				}
				var u struct {
					Usage struct {
						Completion int64 `json:"completion_tokens"`
						Total      int64 `json:"total_tokens"`
					} `json:"usage"`
				}
				_ = json.Unmarshal(raw, &u)
				if u.Usage.Completion > 1024 {
					t.Errorf("a call without max_tokens generated %d tokens, past the 1,024 it was charged", u.Usage.Completion)
				}
				served.Add(1)
				total.Add(u.Usage.Total)
			}
		}()
	}
	wg.Wait()
	t.Logf("TPM %d, calls without max_tokens: %d served, %d tokens", limit, served.Load(), total.Load())
	if served.Load() == 0 || total.Load() > limit {
		t.Fatalf("%d calls served %d tokens within a minute of a %d-token limit", served.Load(), total.Load(), limit)
	}
}
