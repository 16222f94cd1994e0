package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/google/uuid"

	"github.com/levee-gw/levee/config"
	"github.com/levee-gw/levee/store"
)

// quotaFlags are the limits and budget of `levee tenant update` and
// `levee key update`; a flag not given leaves its setting as it is.
type quotaFlags struct {
	fs                    *flag.FlagSet
	model                 string
	tpm, rpm, concurrency int64
	budget, budgetTokens  string
	resetAt, onBudget     string
	soft                  float64
	noBudget              bool
	config                string
}

func newQuotaFlags(name string) *quotaFlags {
	q := &quotaFlags{fs: flag.NewFlagSet(name, flag.ContinueOnError)}
	q.fs.StringVar(&q.model, "model", "", "limits for this model alias only (default: every model)")
	q.fs.Int64Var(&q.tpm, "tpm", -1, "tokens per minute (0: no limit)")
	q.fs.Int64Var(&q.rpm, "rpm", -1, "requests per minute (0: no limit)")
	q.fs.Int64Var(&q.concurrency, "concurrency", -1, "calls in flight (0: no limit)")
	q.fs.StringVar(&q.budget, "budget", "", "money per period, e.g. 500USD/month, 20USD/day, 1000USD/fixed (with --reset-at)")
	q.fs.StringVar(&q.budgetTokens, "budget-tokens", "", "tokens per period, e.g. 5000000/month")
	q.fs.StringVar(&q.resetAt, "reset-at", "", "end of the first period of a fixed budget (RFC 3339)")
	q.fs.Float64Var(&q.soft, "soft", 0, "share of the budget that sends budget.threshold_reached (default 0.8)")
	q.fs.StringVar(&q.onBudget, "on-budget", "", "what queued work does when the budget is spent: wait (default) or fail")
	q.fs.BoolVar(&q.noBudget, "no-budget", false, "remove the budget")
	q.fs.StringVar(&q.config, "config", "", "the gateway's config file: --model and the budget's currency are checked against it")
	return q
}

func (q *quotaFlags) set(name string) bool {
	found := false
	q.fs.Visit(func(f *flag.Flag) { found = found || f.Name == name })
	return found
}

// apply writes the flags given: limits through store.SetLimits, a budget
// through store.SetBudget — the functions the admin API will use too.
func (q *quotaFlags) apply(ctx context.Context, st *store.Store, tenant, key uuid.UUID, out io.Writer, getenv func(string) string) error {
	cur, err := st.LoadQuotas(ctx)
	if err != nil {
		return err
	}
	var cfg *config.Config
	if q.config != "" {
		if cfg, err = config.Load(q.config, getenv); err != nil {
			return err
		}
		if q.model != "" && !servesModel(cfg, q.model) {
			return fmt.Errorf("--model %q: %s serves no such model alias or deployment (names are case-sensitive)", q.model, q.config)
		}
	}
	if q.set("tpm") || q.set("rpm") || q.set("concurrency") {
		p := &store.SetLimitsParams{TenantID: tenant, KeyID: key, Model: q.model}
		for _, l := range cur.Limits {
			if l.TenantID == tenant && l.KeyID == key && l.Model == q.model {
				p.TPM, p.RPM, p.Concurrency = l.TPM, l.RPM, l.Concurrency
			}
		}
		for _, f := range []struct {
			name string
			v    int64
			dst  *int64
		}{{"tpm", q.tpm, &p.TPM}, {"rpm", q.rpm, &p.RPM}, {"concurrency", q.concurrency, &p.Concurrency}} {
			if q.set(f.name) {
				if f.v < 0 {
					return fmt.Errorf("--%s must be >= 0", f.name)
				}
				*f.dst = f.v
			}
		}
		if err := st.SetLimits(ctx, p); err != nil {
			return err
		}
		fmt.Fprintf(out, "limits%s: tpm %s, rpm %s, concurrency %s\n", forModel(q.model), orNone(p.TPM), orNone(p.RPM), orNone(p.Concurrency))
	}
	if !q.noBudget && q.budget == "" && q.budgetTokens == "" && !q.set("soft") && !q.set("on-budget") && !q.set("reset-at") {
		return nil
	}
	if q.model != "" {
		return errors.New("budgets are for every model: drop --model")
	}
	p := &store.SetBudgetParams{TenantID: tenant, KeyID: key, Period: "month", Soft: 0.8, OnExhausted: "wait"}
	existed := false
	for _, b := range cur.Budgets {
		if b.TenantID == tenant && b.KeyID == key {
			existed = true
			p.AmountNanos, p.Currency, p.Tokens, p.Period, p.Soft, p.OnExhausted = b.AmountNanos, b.Currency, b.Tokens, b.Period, b.Soft, b.OnExhausted
			if b.Period == "fixed" {
				p.ResetAt = b.ResetAt
			}
		}
	}
	stored := p.Period
	if q.noBudget {
		p.AmountNanos, p.Tokens = 0, 0
	}
	if q.budget != "" {
		nanos, currency, period, err := parseMoney(q.budget)
		if err != nil {
			return fmt.Errorf("--budget: %w", err)
		}
		if cfg != nil && currency != cfg.Pricing.Currency {
			return fmt.Errorf("--budget: %s is not the price table's currency (%s): the budget could not be enforced", currency, cfg.Pricing.Currency)
		}
		if q.budgetTokens == "" && p.Tokens > 0 && period != stored {
			return fmt.Errorf("--budget: the token budget is per %s; give --budget-tokens with the same period too, or remove it", stored)
		}
		p.AmountNanos, p.Currency, p.Period = nanos, currency, period
	}
	if q.budgetTokens != "" {
		n, period, err := parsePerPeriod(q.budgetTokens)
		if err != nil {
			return fmt.Errorf("--budget-tokens: %w", err)
		}
		v, err := strconv.ParseInt(n, 10, 64)
		if err != nil || v <= 0 || v > maxBudget {
			return fmt.Errorf("--budget-tokens: %q is not a number of tokens between 1 and %d", n, int64(maxBudget))
		}
		if q.budget != "" && period != p.Period {
			return errors.New("--budget and --budget-tokens must have the same period")
		}
		if q.budget == "" && p.AmountNanos > 0 && period != stored {
			return fmt.Errorf("--budget-tokens: the money budget is per %s; give --budget with the same period too, or remove it", stored)
		}
		p.Tokens, p.Period = v, period
	}
	if q.resetAt != "" {
		t, err := time.Parse(time.RFC3339, q.resetAt)
		if err != nil {
			return fmt.Errorf("--reset-at: %w", err)
		}
		p.ResetAt = t
	}
	// A new fixed period needs its end in the future; a fixed budget past
	// its first period keeps the end it had.
	if p.Period == "fixed" && (q.resetAt != "" || stored != "fixed" || !existed) && !p.ResetAt.After(time.Now()) {
		return errors.New("a fixed budget needs --reset-at in the future")
	}
	if p.Period != "fixed" {
		p.ResetAt = time.Time{}
	}
	if q.set("soft") {
		if q.soft <= 0 || q.soft > 1 {
			return errors.New("--soft must be in (0, 1]")
		}
		p.Soft = q.soft
	}
	if q.onBudget != "" {
		if q.onBudget != "wait" && q.onBudget != "fail" {
			return errors.New("--on-budget must be wait or fail")
		}
		p.OnExhausted = q.onBudget
	}
	if err := st.SetBudget(ctx, p); err != nil {
		return err
	}
	if p.AmountNanos == 0 && p.Tokens == 0 {
		fmt.Fprintln(out, "budget: none")
		return nil
	}
	var parts []string
	if p.AmountNanos > 0 {
		parts = append(parts, fmt.Sprintf("%s %s", strconv.FormatFloat(float64(p.AmountNanos)/1e9, 'f', -1, 64), p.Currency))
	}
	if p.Tokens > 0 {
		parts = append(parts, fmt.Sprintf("%d tokens", p.Tokens))
	}
	fmt.Fprintf(out, "budget: %s per %s, threshold at %g%%, queued work %ss when it is spent\n", strings.Join(parts, " and "), p.Period, p.Soft*100, p.OnExhausted)
	return nil
}

// maxBudgetMoney (currency units) and maxBudget (tokens) bound a budget, so
// sums of spend and leases (in nanos, or tokens) stay far from overflowing.
const (
	maxBudgetMoney = 1e8
	maxBudget      = 1e15
)

var moneyRE = regexp.MustCompile(`^([0-9]+(?:\.[0-9]+)?)([A-Za-z]{3})$`)

// parseMoney parses "500USD/month" into billionths of the currency, the
// currency (ISO 4217: three letters) and the period.
func parseMoney(s string) (nanos int64, currency, period string, err error) {
	amount, period, err := parsePerPeriod(s)
	if err != nil {
		return 0, "", "", err
	}
	m := moneyRE.FindStringSubmatch(amount)
	if m == nil {
		return 0, "", "", fmt.Errorf("%q: want an amount and a three-letter currency, such as 500USD or 12.5EUR", amount)
	}
	v, err := strconv.ParseFloat(m[1], 64)
	if err != nil || math.Round(v*1e9) < 1 || v > maxBudgetMoney {
		return 0, "", "", fmt.Errorf("%q: the amount must be between 0.000000001 and %d", m[1], int64(maxBudgetMoney))
	}
	return int64(math.Round(v * 1e9)), strings.ToUpper(m[2]), period, nil
}

// servesModel reports whether cfg has an alias or deployment named m.
func servesModel(cfg *config.Config, m string) bool {
	for _, a := range cfg.Models {
		if a.Name == m {
			return true
		}
	}
	for _, d := range cfg.Deployments {
		if d.Name == m {
			return true
		}
	}
	return false
}

// parsePerPeriod splits "N/period".
func parsePerPeriod(s string) (string, string, error) {
	n, period, ok := strings.Cut(s, "/")
	switch {
	case !ok:
		return "", "", fmt.Errorf("%q: want AMOUNT/day, /month or /fixed", s)
	case period != "day" && period != "month" && period != "fixed":
		return "", "", fmt.Errorf("%q: the period must be day, month or fixed", period)
	}
	return n, period, nil
}

func forModel(m string) string {
	if m == "" {
		return ""
	}
	return " for " + m
}

func orNone(v int64) string {
	if v == 0 {
		return "none"
	}
	return strconv.FormatInt(v, 10)
}
