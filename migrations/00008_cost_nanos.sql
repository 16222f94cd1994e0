-- +goose Up
-- Money in billionths of the currency: in millionths a call cheaper than
-- one (24 tokens of an embedding at $0.02 per million) rounded to nothing.
ALTER TABLE usage_events RENAME COLUMN cost_micros TO cost_nanos;
UPDATE usage_events SET cost_nanos = cost_nanos * 1000 WHERE cost_nanos <> 0;
ALTER TABLE usage_daily RENAME COLUMN cost_micros TO cost_nanos;
UPDATE usage_daily SET cost_nanos = cost_nanos * 1000 WHERE cost_nanos <> 0;
ALTER TABLE jobs RENAME COLUMN cost_micros TO cost_nanos;
UPDATE jobs SET cost_nanos = cost_nanos * 1000 WHERE cost_nanos <> 0;
ALTER TABLE budgets RENAME COLUMN amount_micros TO amount_nanos;
UPDATE budgets SET amount_nanos = amount_nanos * 1000 WHERE amount_nanos IS NOT NULL;
ALTER TABLE budget_spend RENAME COLUMN spent_micros TO spent_nanos;
ALTER TABLE budget_spend RENAME COLUMN leased_micros TO leased_nanos;
UPDATE budget_spend SET spent_nanos = spent_nanos * 1000, leased_nanos = leased_nanos * 1000 WHERE spent_nanos <> 0 OR leased_nanos <> 0;

-- +goose Down
UPDATE budget_spend SET spent_nanos = spent_nanos / 1000, leased_nanos = leased_nanos / 1000;
ALTER TABLE budget_spend RENAME COLUMN leased_nanos TO leased_micros;
ALTER TABLE budget_spend RENAME COLUMN spent_nanos TO spent_micros;
UPDATE budgets SET amount_nanos = amount_nanos / 1000 WHERE amount_nanos IS NOT NULL;
ALTER TABLE budgets RENAME COLUMN amount_nanos TO amount_micros;
UPDATE jobs SET cost_nanos = cost_nanos / 1000 WHERE cost_nanos <> 0;
ALTER TABLE jobs RENAME COLUMN cost_nanos TO cost_micros;
UPDATE usage_daily SET cost_nanos = cost_nanos / 1000 WHERE cost_nanos <> 0;
ALTER TABLE usage_daily RENAME COLUMN cost_nanos TO cost_micros;
UPDATE usage_events SET cost_nanos = cost_nanos / 1000 WHERE cost_nanos <> 0;
ALTER TABLE usage_events RENAME COLUMN cost_nanos TO cost_micros;
