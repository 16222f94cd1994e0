-- +goose Up
-- Scoped keys: NULL is no restriction. A rotated key keeps its id (its
-- limits, budget and usage stay attached) and gets a new hash; the old one
-- stays valid until previous_expires_at.
ALTER TABLE api_keys ADD COLUMN models text[];
ALTER TABLE api_keys ADD COLUMN endpoints text[];
ALTER TABLE api_keys ADD COLUMN max_priority text CHECK (max_priority IN ('high', 'normal', 'low'));
ALTER TABLE api_keys ADD COLUMN cidrs text[];
ALTER TABLE api_keys ADD COLUMN expires_at timestamptz;
ALTER TABLE api_keys ADD COLUMN last_used_at timestamptz;
ALTER TABLE api_keys ADD COLUMN previous_hash bytea;
ALTER TABLE api_keys ADD COLUMN previous_expires_at timestamptz;
ALTER TABLE api_keys ADD COLUMN updated_at timestamptz NOT NULL DEFAULT now();
CREATE UNIQUE INDEX api_keys_previous_hash ON api_keys (previous_hash) WHERE previous_hash IS NOT NULL;

-- A deleted tenant keeps its row (and its name: usage and the audit log
-- still name it) but nothing of it authenticates or runs.
ALTER TABLE tenants ADD COLUMN deleted_at timestamptz;

-- Admin keys administer the gateway over /admin/v1/; they are a kind of
-- their own (lva-…), never a tenant's.
CREATE TABLE admin_keys (
    id           uuid PRIMARY KEY,
    hash         bytea NOT NULL UNIQUE,
    prefix       text NOT NULL,
    name         text NOT NULL DEFAULT '',
    created_at   timestamptz NOT NULL DEFAULT now(),
    created_by   text NOT NULL,
    revoked_at   timestamptz,
    last_used_at timestamptz
);

-- Every administrative change: who, what, the state before and after.
-- Ids are UUIDv7: they sort by time, and page the log.
CREATE TABLE audit_log (
    id          uuid PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT now(),
    actor       text NOT NULL,
    action      text NOT NULL,
    target_type text NOT NULL,
    target_id   text NOT NULL,
    tenant_id   uuid,
    before      jsonb,
    after       jsonb
);
CREATE INDEX audit_log_tenant ON audit_log (tenant_id, id);

-- Keys changed (revoked, rotated, rescoped) or tenants deleted: every
-- process reads the last seconds of it each second and forgets what it
-- cached about them.
CREATE TABLE key_events (
    id        bigserial PRIMARY KEY,
    at        timestamptz NOT NULL DEFAULT clock_timestamp(),
    key_id    uuid,
    tenant_id uuid
);
CREATE INDEX key_events_at ON key_events (at);

-- The daily rollup gains the key and the deployment, for the chargeback
-- export (grouped by tenant, key, model or deployment) without reading the
-- raw ledger. Rows written before have neither.
ALTER TABLE usage_daily ADD COLUMN key_id uuid NOT NULL DEFAULT '00000000-0000-0000-0000-000000000000';
ALTER TABLE usage_daily ADD COLUMN deployment text NOT NULL DEFAULT '';
ALTER TABLE usage_daily DROP CONSTRAINT usage_daily_pkey;
ALTER TABLE usage_daily ADD PRIMARY KEY (tenant_id, day, model, key_id, deployment);
CREATE INDEX usage_daily_day ON usage_daily (day);

-- +goose Down
DROP INDEX usage_daily_day;
ALTER TABLE usage_daily DROP CONSTRAINT usage_daily_pkey;
CREATE TABLE usage_daily_down AS
    SELECT tenant_id, day, model, sum(requests) AS requests, sum(errors) AS errors, sum(prompt_tokens) AS prompt_tokens,
           sum(completion_tokens) AS completion_tokens, sum(cost_nanos) AS cost_nanos
    FROM usage_daily GROUP BY tenant_id, day, model;
TRUNCATE usage_daily;
ALTER TABLE usage_daily DROP COLUMN deployment;
ALTER TABLE usage_daily DROP COLUMN key_id;
INSERT INTO usage_daily (tenant_id, day, model, requests, errors, prompt_tokens, completion_tokens, cost_nanos)
    SELECT tenant_id, day, model, requests, errors, prompt_tokens, completion_tokens, cost_nanos FROM usage_daily_down;
DROP TABLE usage_daily_down;
ALTER TABLE usage_daily ADD PRIMARY KEY (tenant_id, day, model);
DROP TABLE key_events;
DROP TABLE audit_log;
DROP TABLE admin_keys;
ALTER TABLE tenants DROP COLUMN deleted_at;
DROP INDEX api_keys_previous_hash;
ALTER TABLE api_keys DROP COLUMN updated_at;
ALTER TABLE api_keys DROP COLUMN previous_expires_at;
ALTER TABLE api_keys DROP COLUMN previous_hash;
ALTER TABLE api_keys DROP COLUMN last_used_at;
ALTER TABLE api_keys DROP COLUMN expires_at;
ALTER TABLE api_keys DROP COLUMN cidrs;
ALTER TABLE api_keys DROP COLUMN max_priority;
ALTER TABLE api_keys DROP COLUMN endpoints;
ALTER TABLE api_keys DROP COLUMN models;
