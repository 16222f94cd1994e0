-- +goose NO TRANSACTION
-- Built concurrently, so a large jobs table keeps taking writes while a
-- rolling upgrade migrates it.

-- +goose Up
-- Unpublished queued jobs, for the outbox relays.
CREATE INDEX CONCURRENTLY IF NOT EXISTS jobs_unpublished ON jobs (publish_claim) WHERE status = 'queued' AND published_at IS NULL;
-- Batch output is read in line order a page at a time (no connection is
-- held while a client reads), so each page must be an index range.
CREATE INDEX CONCURRENTLY IF NOT EXISTS jobs_batch_line ON jobs (batch_id, line) WHERE batch_id IS NOT NULL;

-- +goose Down
DROP INDEX CONCURRENTLY IF EXISTS jobs_batch_line;
DROP INDEX CONCURRENTLY IF EXISTS jobs_unpublished;
