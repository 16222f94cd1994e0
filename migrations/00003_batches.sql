-- +goose Up
-- Files hold batch input (uploaded) and batch output/error files (their
-- content is produced from the jobs when read, never stored twice).
CREATE TABLE files (
    id         uuid PRIMARY KEY,
    tenant_id  uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    filename   text NOT NULL,
    purpose    text NOT NULL,
    kind       text NOT NULL CHECK (kind IN ('upload', 'batch_output', 'batch_error')),
    bytes      bigint NOT NULL DEFAULT 0,
    lines      integer NOT NULL DEFAULT 0,
    url        text,
    batch_id   uuid,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX files_tenant ON files (tenant_id, id);

-- Each input line as uploaded, so content streams back byte for byte.
CREATE TABLE file_lines (
    file_id   uuid NOT NULL REFERENCES files (id) ON DELETE CASCADE,
    line      integer NOT NULL,
    custom_id text NOT NULL,
    raw       bytea NOT NULL,
    PRIMARY KEY (file_id, line)
);

CREATE TABLE batches (
    id                uuid PRIMARY KEY,
    tenant_id         uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    input_file_id     uuid NOT NULL,
    endpoint          text NOT NULL,
    completion_window text NOT NULL,
    status            text NOT NULL CHECK (status IN ('validating', 'failed', 'in_progress', 'finalizing', 'completed', 'expired', 'cancelling', 'cancelled')),
    metadata          jsonb,
    errors            jsonb,
    total             integer NOT NULL DEFAULT 0,
    output_file_id    uuid,
    error_file_id     uuid,
    created_at        timestamptz NOT NULL DEFAULT now(),
    in_progress_at    timestamptz,
    expires_at        timestamptz NOT NULL,
    finalizing_at     timestamptz,
    completed_at      timestamptz,
    failed_at         timestamptz,
    expired_at        timestamptz,
    cancelling_at     timestamptz,
    cancelled_at      timestamptz
);
CREATE INDEX batches_tenant ON batches (tenant_id, id);
CREATE INDEX batches_open ON batches (status) WHERE status IN ('validating', 'in_progress', 'finalizing', 'cancelling');

ALTER TABLE jobs ADD COLUMN batch_id uuid;
ALTER TABLE jobs ADD COLUMN custom_id text;
ALTER TABLE jobs ADD COLUMN line integer;
CREATE INDEX jobs_batch ON jobs (batch_id, status) WHERE batch_id IS NOT NULL;

-- +goose Down
DROP INDEX jobs_batch;
ALTER TABLE jobs DROP COLUMN line;
ALTER TABLE jobs DROP COLUMN custom_id;
ALTER TABLE jobs DROP COLUMN batch_id;
DROP TABLE batches;
DROP TABLE file_lines;
DROP TABLE files;
