-- +goose Up
-- What a tenant, or one of its keys, may use: rate limits (optionally for one
-- model) and a budget per period. Every Levee process reloads them when
-- settings_version moves, which every change to them does.
CREATE TABLE limits (
    tenant_id   uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    key_id      uuid REFERENCES api_keys (id) ON DELETE CASCADE,
    model       text NOT NULL DEFAULT '',
    tpm         bigint CHECK (tpm > 0),
    rpm         bigint CHECK (rpm > 0),
    concurrency integer CHECK (concurrency > 0),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX limits_scope ON limits (tenant_id, coalesce(key_id, '00000000-0000-0000-0000-000000000000'::uuid), model);

CREATE TABLE budgets (
    id            uuid PRIMARY KEY,
    tenant_id     uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    key_id        uuid REFERENCES api_keys (id) ON DELETE CASCADE,
    -- in millionths of the currency's unit
    amount_micros bigint CHECK (amount_micros > 0),
    currency      text,
    tokens        bigint CHECK (tokens > 0),
    period        text NOT NULL CHECK (period IN ('day', 'month', 'fixed')),
    starts_at     timestamptz NOT NULL DEFAULT now(),
    reset_at      timestamptz,
    soft          double precision NOT NULL DEFAULT 0.8 CHECK (soft > 0 AND soft <= 1),
    on_exhausted  text NOT NULL DEFAULT 'wait' CHECK (on_exhausted IN ('wait', 'fail')),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    CHECK (amount_micros IS NOT NULL OR tokens IS NOT NULL),
    CHECK ((amount_micros IS NULL) = (currency IS NULL)),
    CHECK (period <> 'fixed' OR reset_at > starts_at)
);
CREATE UNIQUE INDEX budgets_scope ON budgets (tenant_id, coalesce(key_id, '00000000-0000-0000-0000-000000000000'::uuid));

-- A budget's spend per period: what the processes have settled, and what
-- they hold leased so each can admit calls without a round trip per call.
-- spent + leased never exceeds the budget (a lease is refused instead).
CREATE TABLE budget_spend (
    budget_id     uuid NOT NULL REFERENCES budgets (id) ON DELETE CASCADE,
    period_start  timestamptz NOT NULL,
    spent_micros  bigint NOT NULL DEFAULT 0,
    spent_tokens  bigint NOT NULL DEFAULT 0,
    leased_micros bigint NOT NULL DEFAULT 0,
    leased_tokens bigint NOT NULL DEFAULT 0,
    threshold_at  timestamptz,
    exceeded_at   timestamptz,
    PRIMARY KEY (budget_id, period_start)
);

CREATE TABLE settings_version (
    id      boolean PRIMARY KEY DEFAULT true CHECK (id),
    version bigint NOT NULL
);
INSERT INTO settings_version (id, version) VALUES (true, 1);

-- Cost, in millionths of the configured currency, beside tokens.
ALTER TABLE usage_events ADD COLUMN cost_micros bigint NOT NULL DEFAULT 0;
ALTER TABLE usage_daily ADD COLUMN cost_micros bigint NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN cost_micros bigint;

-- +goose Down
ALTER TABLE jobs DROP COLUMN cost_micros;
ALTER TABLE usage_daily DROP COLUMN cost_micros;
ALTER TABLE usage_events DROP COLUMN cost_micros;
DROP TABLE settings_version;
DROP TABLE budget_spend;
DROP TABLE budgets;
DROP TABLE limits;
