package test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/chromedp/cdproto/browser"
	"github.com/chromedp/cdproto/cdp"
	"github.com/chromedp/cdproto/log"
	"github.com/chromedp/cdproto/page"
	"github.com/chromedp/cdproto/runtime"
	"github.com/chromedp/chromedp"

	"github.com/levee-gw/levee/config"
	"github.com/levee-gw/levee/dev"
	"github.com/levee-gw/levee/sim"
	"github.com/levee-gw/levee/test/harness"
)

// The operator's console, driven in a real headless Chromium. The tests
// skip without a chromium binary (CI installs Debian's); everything they
// wait for is polled with a deadline, since other tests share the cores.

// chromiumPath finds a Chromium or Chrome binary ("" if none).
func chromiumPath() string {
	for _, name := range []string{"chromium", "chromium-browser", "google-chrome", "google-chrome-stable"} {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	return ""
}

// page is one browser tab on the console, with what it reported.
type consolePage struct {
	t        *testing.T
	ctx      context.Context
	base     string
	shots    string
	download string

	dialogs  atomic.Int32
	mu       sync.Mutex
	problems []string // uncaught exceptions and Content-Security-Policy refusals
}

func newConsolePage(t *testing.T, base string) *consolePage {
	t.Helper()
	path := chromiumPath()
	if path == "" {
		t.Skip("no chromium binary on PATH: the console's browser tests need one (apt-get install chromium)")
	}
	shots := os.Getenv("LEVEE_SCREENSHOTS")
	if shots == "" {
		shots = t.TempDir()
	} else if err := os.MkdirAll(shots, 0o755); err != nil {
		t.Fatal(err)
	}
	p := &consolePage{t: t, base: base, shots: shots, download: t.TempDir()}
	opts := append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(path),
		chromedp.Headless,
		chromedp.NoSandbox,
		chromedp.DisableGPU,
		chromedp.NoFirstRun,
		chromedp.Flag("disable-quic", true),
		chromedp.Flag("disable-background-networking", true),
		chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-sync", true),
		chromedp.UserDataDir(t.TempDir()),
		chromedp.WindowSize(1280, 900),
	)
	actx, cancelAlloc := chromedp.NewExecAllocator(context.Background(), opts...)
	var ctx context.Context
	var cancelTab context.CancelFunc
	// The listener sees the tab's events from its start; it runs in the
	// tab's read loop, so it only notes them (and answers a dialog from
	// another goroutine).
	ctx, cancelTab = chromedp.NewContext(actx, chromedp.WithListener(func(ev any) {
		switch ev := ev.(type) {
		case *page.EventJavascriptDialogOpening:
			p.dialogs.Add(1)
			p.problem("a JavaScript dialog opened: " + ev.Message)
			go func() {
				_, _ = chromedp.Call(ctx, page.HandleJavaScriptDialog, page.HandleJavaScriptDialogParams{Accept: false})
			}()
		case *runtime.EventExceptionThrown:
			d := ev.ExceptionDetails
			msg := d.Text
			if d.Exception != nil {
				msg += " " + d.Exception.Description
			}
			p.problem("uncaught exception: " + msg)
		case *log.EventEntryAdded:
			if strings.Contains(ev.Entry.Text, "Content Security Policy") {
				p.problem("CSP: " + ev.Entry.Text)
			}
		}
	}))
	t.Cleanup(func() {
		cancelTab()
		cancelAlloc()
	})
	p.ctx = ctx
	// The first call starts the browser for the context's whole life: no
	// deadline on it.
	if err := chromedp.Do(ctx); err != nil {
		t.Fatalf("start chromium (%s): %v", path, err)
	}
	sctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if _, err := chromedp.Call(sctx, log.Enable, cdp.Empty{}); err != nil {
		t.Fatalf("chromium: enable the log: %v", err)
	}
	if _, err := chromedp.CallBrowser(sctx, browser.SetDownloadBehavior, browser.SetDownloadBehaviorParams{
		Behavior: browser.SetDownloadBehaviorBehaviorAllow, DownloadPath: p.download}); err != nil {
		t.Fatalf("chromium: allow downloads: %v", err)
	}
	return p
}

// use makes t the test that the page's helpers fail (a subtest's, until
// it ends).
func (p *consolePage) use(t *testing.T) {
	parent := p.t
	p.t = t
	t.Cleanup(func() { p.t = parent })
}

func (p *consolePage) problem(s string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.problems = append(p.problems, s)
}

// clean fails the test if the page threw, opened a dialog or had anything
// refused by its Content-Security-Policy.
func (p *consolePage) clean() {
	p.t.Helper()
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.problems) > 0 {
		p.t.Fatalf("the console page misbehaved:\n%s", strings.Join(p.problems, "\n"))
	}
}

// do runs browser actions with a deadline.
func (p *consolePage) do(what string, actions ...chromedp.Action[chromedp.Void]) {
	p.t.Helper()
	ctx, cancel := context.WithTimeout(p.ctx, 30*time.Second)
	defer cancel()
	if err := chromedp.Do(ctx, actions...); err != nil {
		p.shot("failed")
		p.t.Fatalf("%s: %v", what, err)
	}
}

// eval evaluates a JavaScript expression.
func eval[T any](p *consolePage, expr string) T {
	p.t.Helper()
	ctx, cancel := context.WithTimeout(p.ctx, 30*time.Second)
	defer cancel()
	v, err := chromedp.Run(ctx, chromedp.Evaluate[T](expr))
	if err != nil {
		p.t.Fatalf("evaluate %s: %v", expr, err)
	}
	return v
}

// waitJS polls a JavaScript expression until it is true.
func (p *consolePage) waitJS(timeout time.Duration, what, expr string) {
	p.t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		ctx, cancel := context.WithTimeout(p.ctx, 10*time.Second)
		ok, err := chromedp.Run(ctx, chromedp.Evaluate[bool]("!!("+expr+")"))
		cancel()
		if err == nil && ok {
			return
		}
		if time.Now().After(deadline) {
			p.shot("timeout")
			p.t.Fatalf("timed out after %v waiting for %s (%s; last error %v)", timeout, what, expr, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// visit opens a console route (the part after #/) and waits for its h1.
func (p *consolePage) visit(route, h1 string) {
	p.t.Helper()
	p.do("open "+route, chromedp.Navigate(p.base+"/console/#/"+route))
	p.waitJS(20*time.Second, "the page "+route, `(document.querySelector('main h1')?.textContent || '').includes(`+jsString(h1)+`)`)
}

// shot saves a full-page screenshot (PNG) as name.png.
func (p *consolePage) shot(name string) {
	ctx, cancel := context.WithTimeout(p.ctx, 20*time.Second)
	defer cancel()
	buf, err := chromedp.Run(ctx, chromedp.FullScreenshot(100))
	if err == nil {
		err = os.WriteFile(filepath.Join(p.shots, name+".png"), buf, 0o644)
	}
	if err != nil {
		p.t.Logf("screenshot %s: %v", name, err)
	}
}

// phoneShot saves a screenshot at a phone's width, then goes back.
func (p *consolePage) phoneShot(name string) {
	p.do("phone viewport", chromedp.EmulateViewport(390, 844, chromedp.EmulateScale(2), chromedp.EmulateMobile))
	p.shot(name)
	p.do("laptop viewport", chromedp.EmulateViewport(1280, 900))
}

// waitFile waits for a downloaded file whose name has prefix and suffix,
// written whole, and returns its content.
func (p *consolePage) waitFile(prefix, suffix string) []byte {
	p.t.Helper()
	var content []byte
	harness.Eventually(p.t, 20*time.Second, "the download "+prefix+"…"+suffix, func() bool {
		entries, _ := os.ReadDir(p.download)
		for _, e := range entries {
			if strings.HasPrefix(e.Name(), prefix) && strings.HasSuffix(e.Name(), suffix) {
				b, err := os.ReadFile(filepath.Join(p.download, e.Name()))
				if err == nil && len(b) > 0 {
					content = b
					return true
				}
			}
		}
		return false
	})
	return content
}

func jsString(s string) string {
	b, _ := json.Marshal(s)
	return string(b)
}

// signIn opens the console and signs in with the admin key.
func (p *consolePage) signIn(key string) {
	p.t.Helper()
	p.do("open the console", chromedp.Navigate(p.base+"/console/"))
	p.waitJS(20*time.Second, "the sign-in form", `!!document.querySelector('input[name=key]')`)
	p.shot("01-sign-in")
	p.do("sign in", chromedp.SendKeys(chromedp.CSS(`input[name=key]`), key), chromedp.Click(chromedp.CSS(`form button[type=submit]`)))
	p.waitJS(20*time.Second, "the capacity page after signing in", `(document.querySelector('main h1')?.textContent || '') === 'Live capacity' && !document.getElementById('nav').hidden`)
}

// consoleFile: two gpt-4o deployments whose pacing drains a backlog over
// seconds (so the chart has something to draw), embeddings, and a "slow"
// alias whose deployment answers after 20 s, so a job stays running long
// enough to be cancelled from the page.
func consoleFile() *dev.File {
	fast := sim.Deployment{CompletionTokens: 20}
	return &dev.File{
		Deployments: []dev.FileDeployment{
			{Name: "gpt-4o-ptu", Model: "gpt-4o", Kind: config.Provisioned, TPM: 30_000, Sim: fast},
			{Name: "gpt-4o-standard", Model: "gpt-4o", Kind: config.Standard, TPM: 30_000, Sim: fast},
			{Name: "text-embedding-3-small", Model: "text-embedding-3-small", Kind: config.Standard, TPM: 350_000},
			{Name: "gpt-4o-slow", Model: "gpt-4o", Kind: config.Standard, TPM: 1_000_000, Timeout: time.Minute,
				Sim: sim.Deployment{TTFT: 20 * time.Second, CompletionTokens: 5}},
		},
		Models: []config.Model{
			{Name: "gpt-4o", Deployments: []string{"gpt-4o-ptu", "gpt-4o-standard"}, MaxTokens: 4096},
			{Name: "text-embedding-3-small", Deployments: []string{"text-embedding-3-small"}},
			{Name: "slow", Deployments: []string{"gpt-4o-slow"}},
		},
		Pricing: config.Pricing{Currency: "USD", Prices: []config.Price{{Match: "gpt-4o", Input: 2.5, Output: 10}}},
	}
}

// submitJobs submits n low-priority jobs with key, 8 at a time.
func submitJobs(t *testing.T, env *harness.Env, key string, n int) []string {
	t.Helper()
	ids := make([]string, n)
	var wg sync.WaitGroup
	sem := make(chan struct{}, 8)
	var failed atomic.Value
	for i := range n {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			resp, raw := callAs(t, "POST", env.BaseURL+"/v1/jobs", key, jobBody(60, "low"))
			if resp.StatusCode != 202 {
				failed.Store(fmt.Sprintf("%d %s", resp.StatusCode, raw))
				return
			}
			var j job
			_ = json.Unmarshal(raw, &j)
			ids[i] = j.ID
		}()
	}
	wg.Wait()
	if f := failed.Load(); f != nil {
		t.Fatalf("submit: %v", f)
	}
	return ids
}

func TestConsole(t *testing.T) {
	started := time.Now()
	env := harness.Start(t, consoleFile())
	p := newConsolePage(t, env.BaseURL)
	t.Logf("screenshots in %s (LEVEE_SCREENSHOTS keeps them)", p.shots)

	p.signIn(env.Config.Auth.AdminKey)
	if stored := eval[string](p, `sessionStorage.getItem('levee.adminKey')`); stored != env.Config.Auth.AdminKey {
		t.Fatalf("the admin key is not in sessionStorage after signing in")
	}

	t.Run("capacity chart moves while a backlog drains", func(t *testing.T) {
		p.use(t)
		bg := `Math.max(...[...document.querySelectorAll('figure[data-deployment^="gpt-4o-"]')].map(f => +f.dataset.backgroundRate))`
		p.waitJS(20*time.Second, "two samples on the chart", `+(document.querySelector('figure[data-deployment="gpt-4o-ptu"]')?.dataset.samples || 0) >= 2`)
		before := eval[float64](p, bg)
		if before != 0 {
			t.Fatalf("background tokens/min before any job: %v", before)
		}
		ids := submitJobs(t, env, env.APIKey, 80)
		p.waitJS(30*time.Second, "the chart's background tokens to rise", bg+` > 0`)
		p.waitJS(10*time.Second, "a background area drawn", `[...document.querySelectorAll('figure[data-deployment^="gpt-4o-"] path[data-series="background"]')].some(e => (e.getAttribute('d') || '').length > 20)`)
		p.shot("02-capacity-draining")
		p.phoneShot("02-capacity-phone")
		for _, id := range ids {
			waitJob(t, env, env.APIKey, id, 60*time.Second)
		}
		peak := eval[float64](p, `Math.max(...[...document.querySelectorAll('figure[data-deployment^="gpt-4o-"]')].map(f => +f.dataset.backgroundPeak))`)
		if peak <= 0 {
			t.Fatalf("background peak %v after the backlog drained", peak)
		}
		p.clean()
	})

	var keyID, secret string
	t.Run("create a tenant and a scoped key", func(t *testing.T) {
		p.use(t)
		p.visit("tenants", "Tenants and keys")
		p.do("create tenant", chromedp.SendKeys(chromedp.CSS(`form input[name=name]`), "acme-console"),
			chromedp.Click(chromedp.Search(`//button[text()="Create tenant"]`)))
		p.waitJS(20*time.Second, "the tenant's page", `(document.querySelector('main h1')?.textContent || '') === 'Tenant acme-console'`)
		// Limits and a budget through the editors.
		p.do("add a limit", chromedp.Click(chromedp.Search(`//button[text()="Add a limit"]`)),
			chromedp.SendKeys(chromedp.CSS(`input[name=tpm]`), "100000"),
			chromedp.Click(chromedp.Search(`//button[text()="Save limits"]`)))
		p.waitJS(20*time.Second, "the limit saved", `document.querySelector('main dl.facts')?.textContent.includes('every model: 100,000 TPM')`)
		p.do("set a budget", chromedp.SendKeys(chromedp.CSS(`input[name=amount]`), "25"),
			chromedp.Click(chromedp.Search(`//button[text()="Save budget"]`)))
		p.waitJS(20*time.Second, "the budget's spend", `!!document.querySelector('main progress') && document.querySelector('main').textContent.includes('0 of 25 USD spent')`)

		p.do("open the key form", chromedp.Click(chromedp.Search(`//summary[text()="New key"]`)))
		tomorrow := time.Now().Add(48 * time.Hour).Format("2006-01-02T15:04")
		p.do("fill the key form",
			chromedp.SendKeys(chromedp.CSS(`details form input[name=name]`), "ci-bot"),
			chromedp.Click(chromedp.CSS(`details input[name=models][value="gpt-4o"]`)),
			chromedp.Click(chromedp.CSS(`details input[name=endpoints][value="chat"]`)),
			chromedp.Click(chromedp.CSS(`details input[name=endpoints][value="jobs"]`)),
			chromedp.SetValue(chromedp.CSS(`details select[name=max_priority]`), "normal"),
			chromedp.SendKeys(chromedp.CSS(`details textarea[name=cidrs]`), "127.0.0.0/8"),
			chromedp.SetValue(chromedp.CSS(`details input[name=expires]`), tomorrow),
			chromedp.Click(chromedp.Search(`//details//button[text()="Create key"]`)))
		p.waitJS(20*time.Second, "the secret, shown once", `!!document.querySelector('dialog[open] input[data-secret]')`)
		secret = eval[string](p, `document.querySelector('dialog[open] input[data-secret]').value`)
		p.do("copy it", chromedp.Click(chromedp.Search(`//dialog//button[text()="Copy"]`)))
		p.waitJS(10*time.Second, "the copy's outcome", `/Cop(ied|y failed)/.test(document.querySelector('dialog[open] [role=status]').textContent)`)
		p.shot("03-key-secret")
		p.do("close the dialog", chromedp.Click(chromedp.Search(`//dialog//button[text()="Done"]`)))
		p.waitJS(10*time.Second, "the key listed", `[...document.querySelectorAll('main table tbody th')].some(e => e.textContent === 'ci-bot')`)
		p.shot("04-tenant")
		p.phoneShot("04-tenant-phone")

		resp, raw := adminCall(t, env, "GET", "/admin/v1/tenants/acme-console/keys", nil)
		wantCode(t, "list keys", resp, raw, 200, "")
		var keys struct {
			Data []struct {
				ID     string `json:"id"`
				Name   string `json:"name"`
				Scopes struct {
					Models      []string `json:"models"`
					Endpoints   []string `json:"endpoints"`
					MaxPriority *string  `json:"max_priority"`
					CIDRs       []string `json:"cidrs"`
				} `json:"scopes"`
				ExpiresAt *int64 `json:"expires_at"`
			} `json:"data"`
		}
		_ = json.Unmarshal(raw, &keys)
		if len(keys.Data) != 1 {
			t.Fatalf("keys: %s", raw)
		}
		k := keys.Data[0]
		if k.Name != "ci-bot" || strings.Join(k.Scopes.Models, ",") != "gpt-4o" || strings.Join(k.Scopes.Endpoints, ",") != "chat,jobs" ||
			deref(k.Scopes.MaxPriority) != "normal" || strings.Join(k.Scopes.CIDRs, ",") != "127.0.0.0/8" || k.ExpiresAt == nil ||
			*k.ExpiresAt < time.Now().Add(47*time.Hour).Unix() {
			t.Fatalf("the key as stored: %s", raw)
		}
		keyID = k.ID
		resp, raw = call(t, env.BaseURL, "/v1/chat/completions", secret, chat(5))
		wantCode(t, "a chat call with the new key", resp, raw, 200, "")
		resp, raw = call(t, env.BaseURL, "/v1/embeddings", secret, embedding())
		wantCode(t, "an embedding call outside its scope", resp, raw, 403, "endpoint_not_allowed")
		resp, raw = adminCall(t, env, "GET", "/admin/v1/tenants/acme-console", nil)
		if !strings.Contains(string(raw), `"tpm":100000`) || !strings.Contains(string(raw), `"amount":25`) {
			t.Fatalf("the tenant's limits and budget as stored: %d %s", resp.StatusCode, raw)
		}
		p.clean()
	})

	t.Run("revoke the key", func(t *testing.T) {
		p.use(t)
		if keyID == "" {
			t.Skip("no key")
		}
		p.do("manage the key", chromedp.Click(chromedp.CSS(`button[aria-label="Manage key ci-bot"]`)))
		p.waitJS(10*time.Second, "the key's panel", `!!document.querySelector('#key-panel h2')`)
		p.do("revoke", chromedp.Click(chromedp.Search(`//button[text()="Revoke key"]`)))
		p.waitJS(10*time.Second, "the confirmation", `!!document.querySelector('dialog[open]')`)
		p.shot("05-revoke-confirm")
		p.do("confirm", chromedp.Click(chromedp.Search(`//dialog//button[text()="Revoke key"]`)))
		p.waitJS(20*time.Second, "the key shown revoked", `[...document.querySelectorAll('main table tbody tr')].some(r => r.textContent.includes('ci-bot') && r.textContent.includes('revoked'))`)
		harness.Eventually(t, 10*time.Second, "the revoked key to be refused", func() bool {
			resp, _ := call(t, env.BaseURL, "/v1/chat/completions", secret, chat(5))
			return resp.StatusCode == 401
		})
		p.clean()
	})

	t.Run("cancel a job", func(t *testing.T) {
		p.use(t)
		body := map[string]any{"endpoint": "/v1/chat/completions", "priority": "normal",
			"body": map[string]any{"model": "slow", "max_tokens": 5, "messages": []map[string]string{{"role": "user", "content": "wait"}}}}
		resp, j := submit(t, env, env.APIKey, body)
		if resp.StatusCode != 202 {
			t.Fatalf("submit: %d", resp.StatusCode)
		}
		p.visit("jobs", "Jobs")
		p.waitJS(20*time.Second, "the job listed", `[...document.querySelectorAll('main table a')].some(a => a.textContent === `+jsString(j.ID)+`)`)
		p.shot("06-jobs")
		p.do("find it by id", chromedp.SendKeys(chromedp.CSS(`input[name=id]`), j.ID), chromedp.Click(chromedp.Search(`//button[text()="Find job"]`)))
		p.waitJS(20*time.Second, "the job's page", `!!document.getElementById('cancel-job')`)
		p.shot("07-job")
		p.do("cancel", chromedp.Click(chromedp.CSS(`#cancel-job`)))
		p.waitJS(10*time.Second, "the confirmation", `!!document.querySelector('dialog[open]')`)
		p.do("confirm", chromedp.Click(chromedp.Search(`//dialog//button[text()="Cancel job"]`)))
		p.waitJS(20*time.Second, "the job cancelled", `[...document.querySelectorAll('main .badge')].some(b => b.textContent === 'cancelled')`)
		if code, got := getJob(t, env, env.APIKey, j.ID); code != 200 || got.Status != "cancelled" {
			t.Fatalf("the job after cancel: %d %+v", code, got)
		}
		p.clean()
	})

	t.Run("usage and its CSV", func(t *testing.T) {
		p.use(t)
		env.FlushUsage()
		p.visit("usage", "Usage and cost")
		p.waitJS(20*time.Second, "the usage table", `[...document.querySelectorAll('main table tbody td')].some(td => td.textContent === 'dev')`)
		p.waitJS(10*time.Second, "the usage chart", `document.querySelectorAll('#usage-chart rect.bar').length > 0`)
		p.shot("08-usage")
		p.do("export CSV", chromedp.Click(chromedp.CSS(`#usage-csv`)))
		csvText := string(p.waitFile("levee-usage-", ".csv"))
		if !strings.HasPrefix(csvText, "day,tenant_id,tenant,model,requests,errors,prompt_tokens,completion_tokens,total_tokens,cost") ||
			!strings.Contains(csvText, ",dev,gpt-4o,") {
			t.Fatalf("the CSV: %q", csvText)
		}
		p.clean()
	})

	t.Run("follow a batch to completion and download its output", func(t *testing.T) {
		p.use(t)
		id := createBatch(t, env, batchLines(30, "c"), "/v1/chat/completions")
		p.visit("batches", "Batches")
		p.waitJS(20*time.Second, "the batch listed", `[...document.querySelectorAll('main table a')].some(a => a.textContent === `+jsString(id)+`)`)
		p.shot("09-batches")
		p.do("open it", chromedp.Click(chromedp.Search(`//main//table//a[text()=`+jsString(id)+`]`)))
		p.waitJS(60*time.Second, "the batch completed", `!!document.getElementById('download-output') && [...document.querySelectorAll('main .badge')].some(b => b.textContent === 'completed')`)
		value := eval[float64](p, `document.querySelector('main progress').value`)
		max := eval[float64](p, `document.querySelector('main progress').max`)
		if value != 30 || max != 30 {
			t.Fatalf("the progress bar at the end: %v of %v", value, max)
		}
		if txt := eval[string](p, `document.querySelector('main').textContent`); strings.Contains(txt, "null") || strings.Contains(txt, "undefined") {
			t.Fatalf("the batch's page shows an absent value as text: %q", txt)
		}
		p.shot("10-batch")
		p.do("download the output", chromedp.Click(chromedp.CSS(`#download-output`)))
		out := p.waitFile("batch_", "_output.jsonl")
		if n := bytes.Count(out, []byte("\n")); n != 30 {
			t.Fatalf("the output file has %d lines, want 30", n)
		}
		for i := range 30 {
			if !bytes.Contains(out, []byte(fmt.Sprintf(`"custom_id":"c%d"`, i))) {
				t.Fatalf("line c%d missing from the output", i)
			}
		}
		p.clean()
	})

	// The console is its own route group: the proxy's answers carry none
	// of its headers.
	resp, _ := call(t, env.BaseURL, "/v1/chat/completions", env.APIKey, chat(5))
	if resp.Header.Get("Content-Security-Policy") != "" {
		t.Fatalf("a proxied call carries the console's policy: the console is not a separate route group")
	}
	t.Logf("TestConsole took %v", time.Since(started).Round(100*time.Millisecond))
}

// Names, metadata and bodies that hold markup are shown as text: nothing
// they hold becomes an element, runs, or is even attempted (a refusal by
// the Content-Security-Policy would show an attempt).
func TestConsoleRendersDataAsText(t *testing.T) {
	env := harness.Start(t, nil)
	p := newConsolePage(t, env.BaseURL)
	const script = `<script>alert(1)</script>`
	const attr = `"><img src=x onerror=alert(1)>`
	payload := script + attr

	newTenant(t, env, "xss")
	k := newAPIKey(t, env, "xss", map[string]any{"name": payload})
	body := map[string]any{"endpoint": "/v1/chat/completions", "priority": "normal", "metadata": map[string]string{attr: payload},
		"body": map[string]any{"model": "gpt-4o", "max_tokens": 5, "messages": []map[string]string{{"role": "user", "content": payload}}}}
	resp, j := submit(t, env, k.Secret, body)
	if resp.StatusCode != 202 {
		t.Fatalf("submit: %d", resp.StatusCode)
	}
	waitJob(t, env, k.Secret, j.ID, 30*time.Second)
	env.FlushUsage()

	noMarkup := func(where string) {
		t.Helper()
		n := eval[int](p, `document.querySelectorAll('main img, main script, img[src="x"], script:not([src])').length`)
		if n != 0 {
			t.Fatalf("%s: %d elements made from the data", where, n)
		}
		p.clean()
		if d := p.dialogs.Load(); d != 0 {
			t.Fatalf("%s: %d dialogs opened", where, d)
		}
	}
	shows := func(where, text string) {
		t.Helper()
		p.waitJS(20*time.Second, where+" showing the text literally", `document.querySelector('main').textContent.includes(`+jsString(text)+`)`)
	}

	p.signIn(env.Config.Auth.AdminKey)
	p.visit("tenants/xss", "Tenant xss")
	shows("the tenant's keys", payload)
	noMarkup("the tenant's keys")
	p.shot("11-xss-keys")

	p.visit("jobs/"+j.ID, "Job "+j.ID)
	shows("the job's body", payload)
	shows("the job's metadata", attr)
	pre := eval[string](p, `document.getElementById('job-body').textContent`)
	if !strings.Contains(pre, `"content": "<script>alert(1)</script>\"><img src=x onerror=alert(1)>"`) {
		t.Fatalf("the body as shown: %s", pre)
	}
	noMarkup("the job")
	p.shot("12-xss-job")

	p.visit("usage?group_by=day,tenant,key,model", "Usage and cost")
	shows("the usage table", payload)
	noMarkup("the usage page")

	// An error that quotes what was asked for is text too.
	p.visit("jobs?tenant="+strings.NewReplacer("<", "%3C", ">", "%3E", `"`, "%22", " ", "%20").Replace(attr), "Jobs")
	shows("the error", `No tenant "\"><img src=x onerror=alert(1)>".`)
	noMarkup("the error")
}

// The console's own files: served without a key, with a strict policy.
func TestConsoleFilesAndHeaders(t *testing.T) {
	env := harness.Start(t, nil)
	for _, path := range []string{"/console/", "/console/js/app.js", "/console/style.css"} {
		resp, err := http.Get(env.BaseURL + path)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		csp := resp.Header.Get("Content-Security-Policy")
		if resp.StatusCode != 200 || !strings.Contains(csp, "default-src 'self'") || !strings.Contains(csp, "frame-ancestors 'none'") ||
			strings.Contains(csp, "unsafe-inline") || resp.Header.Get("X-Content-Type-Options") != "nosniff" {
			t.Fatalf("%s: %d, headers %v", path, resp.StatusCode, resp.Header)
		}
	}
	for _, path := range []string{"/console/js/", "/console/nothing.js", "/console/../admin/v1/tenants"} {
		resp, err := http.Get(env.BaseURL + path)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != 404 {
			t.Fatalf("%s: %d, want 404", path, resp.StatusCode)
		}
	}
	// The /console redirect lands on the app.
	resp, err := http.Get(env.BaseURL + "/console")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 || resp.Request.URL.Path != "/console/" {
		t.Fatalf("/console: %d at %s", resp.StatusCode, resp.Request.URL)
	}
}
