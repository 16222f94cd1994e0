-- +goose Up
-- Batch output is read in line order a page at a time (no connection is
-- held while a client reads), so each page must be an index range.
CREATE INDEX jobs_batch_line ON jobs (batch_id, line) WHERE batch_id IS NOT NULL;

-- The jobs table is the outbox of JetStream: a queued job whose publish is
-- not confirmed (published_at IS NULL) is published by a relay once its
-- publish_claim has passed. The process that accepted a job claims it for
-- a moment and publishes it at once; a relay takes over if that fails (NATS
-- away) or the process dies.
ALTER TABLE jobs ADD COLUMN publish_claim timestamptz NOT NULL DEFAULT now();
CREATE INDEX jobs_unpublished ON jobs (publish_claim) WHERE status = 'queued' AND published_at IS NULL;

-- An input line's body and model are kept apart from the line as uploaded,
-- so a batch's jobs get the exact bytes of each body that was validated
-- (not Postgres's re-rendering of it, which also refuses \u0000).
ALTER TABLE file_lines ADD COLUMN body bytea;
ALTER TABLE file_lines ADD COLUMN model text;

-- +goose Down
ALTER TABLE file_lines DROP COLUMN model;
ALTER TABLE file_lines DROP COLUMN body;
DROP INDEX jobs_unpublished;
ALTER TABLE jobs DROP COLUMN publish_claim;
DROP INDEX jobs_batch_line;
