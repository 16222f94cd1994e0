-- +goose Up
CREATE TABLE tenants (
    id               uuid PRIMARY KEY,
    name             text NOT NULL UNIQUE,
    default_priority text NOT NULL DEFAULT 'high' CHECK (default_priority IN ('high', 'normal', 'low')),
    created_at       timestamptz NOT NULL DEFAULT now()
);

-- Keys are stored as SHA-256 of the secret: the secret is 256 random bits, so
-- a slow hash adds nothing, and lookup by hash needs no scan.
CREATE TABLE api_keys (
    id               uuid PRIMARY KEY,
    tenant_id        uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    hash             bytea NOT NULL UNIQUE,
    prefix           text NOT NULL,
    name             text NOT NULL DEFAULT '',
    default_priority text CHECK (default_priority IN ('high', 'normal', 'low')),
    created_at       timestamptz NOT NULL DEFAULT now(),
    revoked_at       timestamptz
);
CREATE INDEX api_keys_tenant ON api_keys (tenant_id);

-- The raw ledger: one row per call, partitioned by month so old months can be
-- detached or dropped without touching the rest. Nothing on a request path
-- reads it; /v1/usage reads usage_daily.
CREATE TABLE usage_events (
    created_at        timestamptz NOT NULL,
    request_id        text NOT NULL,
    tenant_id         uuid NOT NULL,
    key_id            uuid,
    deployment        text NOT NULL,
    model             text NOT NULL,
    operation         text NOT NULL,
    status            integer NOT NULL,
    prompt_tokens     integer NOT NULL,
    completion_tokens integer NOT NULL,
    latency_us        bigint NOT NULL,
    priority          text NOT NULL,
    attempts          integer NOT NULL DEFAULT 1
) PARTITION BY RANGE (created_at);
CREATE TABLE usage_events_default PARTITION OF usage_events DEFAULT;
CREATE INDEX usage_events_tenant_time ON usage_events (tenant_id, created_at);

CREATE TABLE usage_daily (
    tenant_id         uuid NOT NULL,
    day               date NOT NULL,
    model             text NOT NULL,
    requests          bigint NOT NULL DEFAULT 0,
    errors            bigint NOT NULL DEFAULT 0,
    prompt_tokens     bigint NOT NULL DEFAULT 0,
    completion_tokens bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant_id, day, model)
);

-- +goose Down
DROP TABLE usage_daily;
DROP TABLE usage_events;
DROP TABLE api_keys;
DROP TABLE tenants;
