package store

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
)

// Limits are rate limits of a tenant, or of one of its keys, for every model
// or for one. A zero field is no limit.
type Limits struct {
	TenantID uuid.UUID
	// KeyID is uuid.Nil for the tenant's own limits.
	KeyID       uuid.UUID
	Model       string
	TPM, RPM    int64
	Concurrency int64
}

// Budget is what a tenant, or one of its keys, may spend per period.
type Budget struct {
	ID       uuid.UUID
	TenantID uuid.UUID
	KeyID    uuid.UUID
	// AmountNanos is in billionths of Currency (0: no money budget);
	// Tokens is a token budget (0: none).
	AmountNanos int64
	Currency    string
	Tokens      int64
	// Period is day or month (calendar, UTC), or fixed: periods of
	// ResetAt-StartsAt, the first ending at ResetAt.
	Period   string
	StartsAt time.Time
	ResetAt  time.Time
	// Soft is the share of the budget at which budget.threshold_reached is
	// sent; OnExhausted is what queued work does then: wait or fail.
	Soft        float64
	OnExhausted string
}

// Quotas is every tenant's and key's limits and budgets, and tenant names.
type Quotas struct {
	Version int64
	Limits  []Limits
	Budgets []Budget
	Tenants map[uuid.UUID]string
}

// bumpSettings moves settings_version, inside the transaction that changed
// them, so every process reloads.
func bumpSettings(ctx context.Context, tx pgx.Tx) error {
	_, err := tx.Exec(ctx, `UPDATE settings_version SET version = version + 1`)
	return err
}

// SettingsVersion is the current version of limits and budgets.
func (s *Store) SettingsVersion(ctx context.Context) (int64, error) {
	var v int64
	err := s.pool.QueryRow(ctx, `SELECT version FROM settings_version`).Scan(&v)
	if err != nil {
		return 0, fmt.Errorf("store: settings version: %w", err)
	}
	return v, nil
}

// LoadQuotas reads every limit and budget, with the version they are at.
func (s *Store) LoadQuotas(ctx context.Context) (*Quotas, error) {
	q := &Quotas{Tenants: map[uuid.UUID]string{}}
	err := pgx.BeginTxFunc(ctx, s.pool, pgx.TxOptions{IsoLevel: pgx.RepeatableRead, AccessMode: pgx.ReadOnly}, func(tx pgx.Tx) error {
		if err := tx.QueryRow(ctx, `SELECT version FROM settings_version`).Scan(&q.Version); err != nil {
			return err
		}
		rows, err := tx.Query(ctx, `SELECT tenant_id, coalesce(key_id, '00000000-0000-0000-0000-000000000000'), model,
			coalesce(tpm, 0), coalesce(rpm, 0), coalesce(concurrency, 0) FROM limits
			WHERE tenant_id IN (SELECT id FROM tenants WHERE deleted_at IS NULL)`)
		if err != nil {
			return err
		}
		q.Limits, err = pgx.CollectRows(rows, func(r pgx.CollectableRow) (Limits, error) {
			var l Limits
			return l, r.Scan(&l.TenantID, &l.KeyID, &l.Model, &l.TPM, &l.RPM, &l.Concurrency)
		})
		if err != nil {
			return err
		}
		rows, err = tx.Query(ctx, `SELECT `+budgetColumns+` FROM budgets WHERE tenant_id IN (SELECT id FROM tenants WHERE deleted_at IS NULL)`)
		if err != nil {
			return err
		}
		q.Budgets, err = pgx.CollectRows(rows, func(r pgx.CollectableRow) (Budget, error) { return scanBudget(r) })
		if err != nil {
			return err
		}
		rows, err = tx.Query(ctx, `SELECT id, name FROM tenants WHERE id IN (SELECT tenant_id FROM limits UNION SELECT tenant_id FROM budgets)`)
		if err != nil {
			return err
		}
		for rows.Next() {
			var id uuid.UUID
			var name string
			if err := rows.Scan(&id, &name); err != nil {
				return err
			}
			q.Tenants[id] = name
		}
		return rows.Err()
	})
	if err != nil {
		return nil, fmt.Errorf("store: load quotas: %w", err)
	}
	return q, nil
}

// QuotasOf returns one scope's limits (every model's and each model's)
// and budget (nil: none): a tenant's (key uuid.Nil) or a key's.
func (s *Store) QuotasOf(ctx context.Context, tenant, key uuid.UUID) ([]Limits, *Budget, error) {
	rows, err := s.pool.Query(ctx, `SELECT tenant_id, coalesce(key_id, '00000000-0000-0000-0000-000000000000'), model,
		coalesce(tpm, 0), coalesce(rpm, 0), coalesce(concurrency, 0) FROM limits
		WHERE tenant_id = $1 AND key_id IS NOT DISTINCT FROM $2 ORDER BY model`, tenant, nullUUID(key))
	if err != nil {
		return nil, nil, fmt.Errorf("store: limits: %w", err)
	}
	lims, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (Limits, error) {
		var l Limits
		return l, r.Scan(&l.TenantID, &l.KeyID, &l.Model, &l.TPM, &l.RPM, &l.Concurrency)
	})
	if err != nil {
		return nil, nil, fmt.Errorf("store: limits: %w", err)
	}
	b, err := scanBudget(s.pool.QueryRow(ctx, `SELECT `+budgetColumns+` FROM budgets WHERE tenant_id = $1 AND key_id IS NOT DISTINCT FROM $2`, tenant, nullUUID(key)))
	if errors.Is(err, pgx.ErrNoRows) {
		return lims, nil, nil
	}
	if err != nil {
		return nil, nil, fmt.Errorf("store: budget: %w", err)
	}
	return lims, &b, nil
}

const budgetColumns = `id, tenant_id, coalesce(key_id, '00000000-0000-0000-0000-000000000000'), coalesce(amount_nanos, 0),
	coalesce(currency, ''), coalesce(tokens, 0), period, starts_at, coalesce(reset_at, starts_at), soft, on_exhausted`

func scanBudget(r pgx.Row) (Budget, error) {
	var b Budget
	err := r.Scan(&b.ID, &b.TenantID, &b.KeyID, &b.AmountNanos, &b.Currency, &b.Tokens, &b.Period, &b.StartsAt, &b.ResetAt, &b.Soft, &b.OnExhausted)
	return b, err
}

// SetLimitsParams set one scope's rate limits: a tenant's (KeyID nil) or a
// key's, for every model (Model "") or one. Zero clears a limit; with all
// three zero the scope has no limits.
type SetLimitsParams struct {
	TenantID    uuid.UUID
	KeyID       uuid.UUID
	Model       string
	TPM, RPM    int64
	Concurrency int64
	Actor       string
}

// SetLimits replaces one scope's limits. It is the one function the CLI
// (and later the admin API) changes limits with.
func (s *Store) SetLimits(ctx context.Context, p *SetLimitsParams) error {
	if p.TPM < 0 || p.RPM < 0 || p.Concurrency < 0 {
		return errors.New("store: limits must not be negative")
	}
	var key any
	if p.KeyID != uuid.Nil {
		key = p.KeyID
	}
	const row = `SELECT tenant_id, key_id, model, tpm, rpm, concurrency FROM limits WHERE tenant_id = $1 AND key_id IS NOT DISTINCT FROM $2 AND model = $3`
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		before, err := rowJSON(ctx, tx, row, p.TenantID, key, p.Model)
		if err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, `DELETE FROM limits WHERE tenant_id = $1 AND key_id IS NOT DISTINCT FROM $2 AND model = $3`, p.TenantID, key, p.Model); err != nil {
			return err
		}
		if p.TPM != 0 || p.RPM != 0 || p.Concurrency != 0 {
			if _, err := tx.Exec(ctx, `INSERT INTO limits (tenant_id, key_id, model, tpm, rpm, concurrency) VALUES ($1, $2, $3, nullif($4::bigint, 0), nullif($5::bigint, 0), nullif($6::integer, 0))`,
				p.TenantID, key, p.Model, p.TPM, p.RPM, p.Concurrency); err != nil {
				return err
			}
		}
		after, err := rowJSON(ctx, tx, row, p.TenantID, key, p.Model)
		if err != nil {
			return err
		}
		if err := audit(ctx, tx, actorOr(p.Actor), "limits.set", limitsTarget(p.KeyID), limitsTargetID(p.TenantID, p.KeyID), p.TenantID, before, after); err != nil {
			return err
		}
		return bumpSettings(ctx, tx)
	})
	if err != nil {
		return fmt.Errorf("store: set limits: %w", err)
	}
	return nil
}

// SetBudgetParams set one scope's budget (tenant: KeyID nil). With neither
// an amount nor tokens, the budget is removed.
type SetBudgetParams struct {
	TenantID    uuid.UUID
	KeyID       uuid.UUID
	AmountNanos int64
	Currency    string
	Tokens      int64
	Period      string
	ResetAt     time.Time
	Soft        float64
	OnExhausted string
	Actor       string
}

// SetBudget replaces one scope's budget. Spend already recorded in the
// current period still counts against the new one.
func (s *Store) SetBudget(ctx context.Context, p *SetBudgetParams) error {
	var key any
	if p.KeyID != uuid.Nil {
		key = p.KeyID
	}
	const row = `SELECT id, tenant_id, key_id, amount_nanos, currency, tokens, period, starts_at, reset_at, soft, on_exhausted
		FROM budgets WHERE tenant_id = $1 AND key_id IS NOT DISTINCT FROM $2`
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		before, err := rowJSON(ctx, tx, row, p.TenantID, key)
		if err != nil {
			return err
		}
		if err := setBudgetTx(ctx, tx, p, key); err != nil {
			return err
		}
		after, err := rowJSON(ctx, tx, row, p.TenantID, key)
		if err != nil {
			return err
		}
		return audit(ctx, tx, actorOr(p.Actor), "budget.set", limitsTarget(p.KeyID), limitsTargetID(p.TenantID, p.KeyID), p.TenantID, before, after)
	})
	if err != nil {
		return fmt.Errorf("store: set budget: %w", err)
	}
	return nil
}

func setBudgetTx(ctx context.Context, tx pgx.Tx, p *SetBudgetParams, key any) error {
	if p.AmountNanos == 0 && p.Tokens == 0 {
		if _, err := tx.Exec(ctx, `DELETE FROM budgets WHERE tenant_id = $1 AND key_id IS NOT DISTINCT FROM $2`, p.TenantID, key); err != nil {
			return err
		}
		return bumpSettings(ctx, tx)
	}
	var resetAt any
	if !p.ResetAt.IsZero() {
		resetAt = p.ResetAt
	}
	var currency any
	if p.AmountNanos != 0 {
		currency = p.Currency
	}
	id, _ := uuid.NewV7()
	// Updating in place keeps the budget's id, and with it the spend
	// of the period under way; a new period or end of a fixed one
	// starts its first period now (SET reads the row as it was).
	tag, err := tx.Exec(ctx, `UPDATE budgets SET amount_nanos = nullif($3::bigint, 0), currency = $4, tokens = nullif($5::bigint, 0), period = $6,
			starts_at = CASE WHEN period IS DISTINCT FROM $6 OR reset_at IS DISTINCT FROM $7::timestamptz THEN now() ELSE starts_at END,
			reset_at = $7, soft = $8, on_exhausted = $9, updated_at = now()
		WHERE tenant_id = $1 AND key_id IS NOT DISTINCT FROM $2`,
		p.TenantID, key, p.AmountNanos, currency, p.Tokens, p.Period, resetAt, p.Soft, p.OnExhausted)
	if err != nil {
		return err
	}
	if tag.RowsAffected() == 0 {
		if _, err := tx.Exec(ctx, `INSERT INTO budgets (id, tenant_id, key_id, amount_nanos, currency, tokens, period, reset_at, soft, on_exhausted)
			VALUES ($1, $2, $3, nullif($4::bigint, 0), $5, nullif($6::bigint, 0), $7, $8, $9, $10)`,
			id, p.TenantID, key, p.AmountNanos, currency, p.Tokens, p.Period, resetAt, p.Soft, p.OnExhausted); err != nil {
			return err
		}
	}
	return bumpSettings(ctx, tx)
}

// limitsTarget and limitsTargetID name what limits and budgets apply to
// in the audit log: a tenant, or one of its keys.
func limitsTarget(key uuid.UUID) string {
	if key == uuid.Nil {
		return "tenant"
	}
	return "key"
}

func limitsTargetID(tenant, key uuid.UUID) string {
	if key == uuid.Nil {
		return tenant.String()
	}
	return key.String()
}

// BudgetSpend is a budget's state in one period.
type BudgetSpend struct {
	SpentNanos, SpentTokens   int64
	LeasedNanos, LeasedTokens int64
}

// LeaseParams ask for a share of a budget's period, to admit calls with.
// Nanos and Tokens are what is wanted now; Chunk* what a process would
// rather hold (so it need not come back for every call), granted while at
// least four chunks remain. Limits of 0 are not checked.
type LeaseParams struct {
	BudgetID                uuid.UUID
	PeriodStart             time.Time
	Nanos, Tokens           int64
	ChunkNanos, ChunkTokens int64
	LimitNanos, LimitTokens int64
}

// Lease is what LeaseBudget granted (OK false: nothing, the call does not
// fit), and what of the period was spent or leased as the statement began:
// a caller refused can tell a budget that is spent from a call too large
// for what is left.
type Lease struct {
	Nanos, Tokens         int64
	OK                    bool
	UsedNanos, UsedTokens int64
	// LeasedNanos and LeasedTokens are the part of Used that is leased
	// (to any process), not spent: it may yet come back.
	LeasedNanos, LeasedTokens int64
}

// LeaseBudget grants a share of a period's budget, exactly: spent plus leased
// never passes the limit. It grants the chunk while plenty is left, else
// just what was wanted, else nothing.
func (s *Store) LeaseBudget(ctx context.Context, p *LeaseParams) (Lease, error) {
	// One statement: the row is created with the lease if the period is
	// new, else the lease is added if it fits; near the end only what is
	// wanted is granted, so no process holds what another one needs. (A
	// data-modifying CTE runs whether or not it is read from.)
	var l Lease
	err := s.pool.QueryRow(ctx, `
		WITH want AS (
			SELECT $3::bigint AS m, $4::bigint AS t, greatest($3::bigint, $5::bigint)::bigint AS cm, greatest($4::bigint, $6::bigint)::bigint AS ct
		), cur AS (
			SELECT coalesce((SELECT spent_nanos + leased_nanos FROM budget_spend WHERE budget_id = $1 AND period_start = $2), 0) AS um,
			       coalesce((SELECT spent_tokens + leased_tokens FROM budget_spend WHERE budget_id = $1 AND period_start = $2), 0) AS ut,
			       coalesce((SELECT leased_nanos FROM budget_spend WHERE budget_id = $1 AND period_start = $2), 0) AS lm,
			       coalesce((SELECT leased_tokens FROM budget_spend WHERE budget_id = $1 AND period_start = $2), 0) AS lt
		), grant_ AS (
			SELECT CASE WHEN ($7::bigint = 0 OR cur.um + 4 * want.cm <= $7::bigint) AND ($8::bigint = 0 OR cur.ut + 4 * want.ct <= $8::bigint) THEN want.cm ELSE want.m END AS m,
			       CASE WHEN ($7::bigint = 0 OR cur.um + 4 * want.cm <= $7::bigint) AND ($8::bigint = 0 OR cur.ut + 4 * want.ct <= $8::bigint) THEN want.ct ELSE want.t END AS t
			FROM want, cur
		), up AS (
			INSERT INTO budget_spend AS s (budget_id, period_start, leased_nanos, leased_tokens)
			SELECT $1, $2, g.m, g.t FROM grant_ g WHERE ($7::bigint = 0 OR g.m <= $7::bigint) AND ($8::bigint = 0 OR g.t <= $8::bigint)
			ON CONFLICT (budget_id, period_start) DO UPDATE SET
				leased_nanos = s.leased_nanos + EXCLUDED.leased_nanos, leased_tokens = s.leased_tokens + EXCLUDED.leased_tokens
			WHERE ($7::bigint = 0 OR s.spent_nanos + s.leased_nanos + EXCLUDED.leased_nanos <= $7::bigint)
			  AND ($8::bigint = 0 OR s.spent_tokens + s.leased_tokens + EXCLUDED.leased_tokens <= $8::bigint)
			RETURNING 1
		)
		SELECT g.m, g.t, EXISTS (SELECT FROM up), cur.um, cur.ut, cur.lm, cur.lt FROM grant_ g, cur`,
		p.BudgetID, p.PeriodStart, p.Nanos, p.Tokens, p.ChunkNanos, p.ChunkTokens, p.LimitNanos, p.LimitTokens).Scan(&l.Nanos, &l.Tokens, &l.OK,
		&l.UsedNanos, &l.UsedTokens, &l.LeasedNanos, &l.LeasedTokens)
	if err != nil {
		return Lease{}, fmt.Errorf("store: lease budget: %w", err)
	}
	if !l.OK {
		l.Nanos, l.Tokens = 0, 0
	}
	return l, nil
}

// SettleParams hand spend back to a budget's period: Spent* is what calls
// cost, Release* the leases they (and any share given back) held.
// Threshold* are the soft limits, crossing which sends
// budget.threshold_reached once a period.
type SettleParams struct {
	BudgetID                    uuid.UUID
	TenantID                    uuid.UUID
	PeriodStart                 time.Time
	SpentNanos, SpentTokens     int64
	ReleaseNanos, ReleaseTokens int64
	ThresholdNanos              int64
	ThresholdTokens             int64
	LimitNanos, LimitTokens     int64
}

// SettleBudget records spend and releases leases, and emits the budget's
// webhook events when it crosses its soft threshold or its limit (each once
// a period, in the same statement, so a crash cannot lose or double one).
func (s *Store) SettleBudget(ctx context.Context, p *SettleParams) error {
	// The crossings are decided in the one upsert that moves the spend
	// (a row may change only once per statement); a crossing made now has
	// its time equal to the transaction's.
	_, err := s.pool.Exec(ctx, `
		WITH b AS (
			INSERT INTO budget_spend AS s (budget_id, period_start, spent_nanos, spent_tokens, threshold_at, exceeded_at)
			SELECT $1, $3, $4::bigint, $5::bigint,
				CASE WHEN ($8::bigint > 0 AND $4::bigint >= $8::bigint) OR ($9::bigint > 0 AND $5::bigint >= $9::bigint) THEN now() END,
				CASE WHEN ($10::bigint > 0 AND $4::bigint >= $10::bigint) OR ($11::bigint > 0 AND $5::bigint >= $11::bigint) THEN now() END
			ON CONFLICT (budget_id, period_start) DO UPDATE SET
				spent_nanos = s.spent_nanos + EXCLUDED.spent_nanos, spent_tokens = s.spent_tokens + EXCLUDED.spent_tokens,
				leased_nanos = greatest(s.leased_nanos - $6::bigint, 0), leased_tokens = greatest(s.leased_tokens - $7::bigint, 0),
				threshold_at = CASE WHEN s.threshold_at IS NULL AND (($8::bigint > 0 AND s.spent_nanos + EXCLUDED.spent_nanos >= $8::bigint)
					OR ($9::bigint > 0 AND s.spent_tokens + EXCLUDED.spent_tokens >= $9::bigint)) THEN now() ELSE s.threshold_at END,
				exceeded_at = CASE WHEN s.exceeded_at IS NULL AND (($10::bigint > 0 AND s.spent_nanos + EXCLUDED.spent_nanos >= $10::bigint)
					OR ($11::bigint > 0 AND s.spent_tokens + EXCLUDED.spent_tokens >= $11::bigint)) THEN now() ELSE s.exceeded_at END
			RETURNING s.spent_nanos, s.spent_tokens, s.threshold_at = now() AS threshold, s.exceeded_at = now() AS exceeded
		), ev AS (
			SELECT 'budget.threshold_reached' AS type, spent_nanos, spent_tokens FROM b WHERE threshold
			UNION ALL SELECT 'budget.exceeded', spent_nanos, spent_tokens FROM b WHERE exceeded
		)`+budgetEventsSQL+`SELECT 1`,
		p.BudgetID, p.TenantID, p.PeriodStart, p.SpentNanos, p.SpentTokens, p.ReleaseNanos, p.ReleaseTokens,
		p.ThresholdNanos, p.ThresholdTokens, p.LimitNanos, p.LimitTokens)
	if err != nil {
		return fmt.Errorf("store: settle budget: %w", err)
	}
	return nil
}

// MarkBudgetExceeded records that a call was refused for the budget's
// period, and sends budget.exceeded if that was not yet done this period.
func (s *Store) MarkBudgetExceeded(ctx context.Context, budgetID, tenantID uuid.UUID, periodStart time.Time) error {
	_, err := s.pool.Exec(ctx, `
		WITH b AS (
			INSERT INTO budget_spend AS s (budget_id, period_start, exceeded_at) VALUES ($1, $3, now())
			ON CONFLICT (budget_id, period_start) DO UPDATE SET exceeded_at = now() WHERE s.exceeded_at IS NULL
			RETURNING s.spent_nanos, s.spent_tokens
		), ev AS (
			SELECT 'budget.exceeded' AS type, spent_nanos, spent_tokens FROM b
		)`+budgetEventsSQL+`SELECT 1`, budgetID, tenantID, periodStart)
	if err != nil {
		return fmt.Errorf("store: budget exceeded: %w", err)
	}
	return nil
}

// budgetEventsSQL turns the rows of CTE ev (type, spent_nanos,
// spent_tokens) into webhook events and deliveries to the tenant's matching
// endpoints; $1 is the budget, $2 its tenant, $3 the period.
const budgetEventsSQL = `, e AS (
	INSERT INTO webhook_events (id, tenant_id, type, data)
	SELECT gen_random_uuid(), $2, ev.type, jsonb_build_object('id', 'budget_' || $1::uuid::text, 'status',
		replace(ev.type, 'budget.', ''), 'period_start', to_char($3::timestamptz AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'),
		'spent', round(ev.spent_nanos::numeric / 1000000000, 9), 'spent_tokens', ev.spent_tokens)
	FROM ev WHERE EXISTS (SELECT 1 FROM webhook_endpoints we WHERE we.tenant_id = $2 AND we.enabled
		AND (cardinality(we.events) = 0 OR ev.type = ANY (we.events)))
	RETURNING id, tenant_id, type
), d AS (
	INSERT INTO webhook_deliveries (id, event_id, tenant_id, endpoint_id, url)
	SELECT gen_random_uuid(), e.id, e.tenant_id, we.id, we.url FROM e JOIN webhook_endpoints we
		ON we.tenant_id = e.tenant_id AND we.enabled AND (cardinality(we.events) = 0 OR e.type = ANY (we.events))
)
`

// GetBudgetSpend reads a budget's spend in one period (zero if none yet).
func (s *Store) GetBudgetSpend(ctx context.Context, budgetID uuid.UUID, periodStart time.Time) (*BudgetSpend, error) {
	b := &BudgetSpend{}
	err := s.pool.QueryRow(ctx, `SELECT spent_nanos, spent_tokens, leased_nanos, leased_tokens FROM budget_spend WHERE budget_id = $1 AND period_start = $2`,
		budgetID, periodStart).Scan(&b.SpentNanos, &b.SpentTokens, &b.LeasedNanos, &b.LeasedTokens)
	if errors.Is(err, pgx.ErrNoRows) {
		return b, nil
	}
	if err != nil {
		return nil, fmt.Errorf("store: budget spend: %w", err)
	}
	return b, nil
}

// BudgetPeriod names one budget's period, to read its spend.
type BudgetPeriod struct {
	Budget uuid.UUID
	Start  time.Time
}

// BudgetSpends reads the spend of many budget periods at once (for
// metrics); a period with no row yet is absent from the map.
func (s *Store) BudgetSpends(ctx context.Context, ps []BudgetPeriod) (map[uuid.UUID]BudgetSpend, error) {
	ids := make([]uuid.UUID, len(ps))
	starts := make([]time.Time, len(ps))
	for i, p := range ps {
		ids[i], starts[i] = p.Budget, p.Start
	}
	rows, err := s.pool.Query(ctx, `SELECT bs.budget_id, bs.spent_nanos, bs.spent_tokens, bs.leased_nanos, bs.leased_tokens
		FROM unnest($1::uuid[], $2::timestamptz[]) AS p(budget_id, period_start)
		JOIN budget_spend bs ON bs.budget_id = p.budget_id AND bs.period_start = p.period_start`, ids, starts)
	if err != nil {
		return nil, fmt.Errorf("store: budget spends: %w", err)
	}
	out := map[uuid.UUID]BudgetSpend{}
	for rows.Next() {
		var id uuid.UUID
		var b BudgetSpend
		if err := rows.Scan(&id, &b.SpentNanos, &b.SpentTokens, &b.LeasedNanos, &b.LeasedTokens); err != nil {
			rows.Close()
			return nil, fmt.Errorf("store: budget spends: %w", err)
		}
		out[id] = b
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("store: budget spends: %w", err)
	}
	return out, nil
}
