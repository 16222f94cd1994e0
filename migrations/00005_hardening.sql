-- +goose Up
-- The jobs table is the outbox of JetStream: a queued job whose publish is
-- not confirmed (published_at IS NULL) is published by a relay once its
-- publish_claim has passed. The process that accepted a job claims it for
-- a moment and publishes it at once; a relay takes over if that fails (NATS
-- away) or the process dies. (A default of now() is stored once, so adding
-- the column does not rewrite the table.)
ALTER TABLE jobs ADD COLUMN publish_claim timestamptz NOT NULL DEFAULT now();

-- Where an input line's body sits in the line as uploaded, and the model it
-- names: a batch's jobs get the exact bytes of each body that was
-- validated, not Postgres's re-rendering of it (which also refuses
-- \u0000). NULL for files stored before.
ALTER TABLE file_lines ADD COLUMN body_at integer;
ALTER TABLE file_lines ADD COLUMN body_len integer;
ALTER TABLE file_lines ADD COLUMN model text;

-- +goose Down
ALTER TABLE file_lines DROP COLUMN model;
ALTER TABLE file_lines DROP COLUMN body_len;
ALTER TABLE file_lines DROP COLUMN body_at;
ALTER TABLE jobs DROP COLUMN publish_claim;
