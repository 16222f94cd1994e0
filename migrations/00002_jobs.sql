-- +goose Up
-- A job is one queued call. Its row is the truth about it; the JetStream
-- message only carries its id. Ids are UUIDv7, so they sort by creation.
CREATE TABLE jobs (
    id                uuid PRIMARY KEY,
    tenant_id         uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    key_id            uuid,
    endpoint          text NOT NULL,
    model             text NOT NULL,
    body              bytea NOT NULL,
    body_hash         bytea NOT NULL,
    priority          text NOT NULL CHECK (priority IN ('normal', 'low', 'batch')),
    status            text NOT NULL CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    metadata          jsonb NOT NULL DEFAULT '{}',
    webhook_url       text,
    idempotency_key   text,
    attempts          integer NOT NULL DEFAULT 0,
    deployment        text,
    prompt_tokens     integer,
    completion_tokens integer,
    result_status     integer,
    result_body       bytea,
    error_code        text,
    error_message     text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    started_at        timestamptz,
    finished_at       timestamptz,
    published_at      timestamptz,
    lease_until       timestamptz
);
CREATE UNIQUE INDEX jobs_idempotency ON jobs (tenant_id, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX jobs_tenant ON jobs (tenant_id, id);
CREATE INDEX jobs_open ON jobs (status, published_at) WHERE status IN ('queued', 'running');

-- +goose Down
DROP TABLE jobs;
