-- +goose NO TRANSACTION
-- The retention sweeper's ways in, built concurrently so a large table keeps
-- taking writes while a rolling upgrade builds them. Each is partial: only
-- rows that can ever be swept are in it.

-- +goose Up
CREATE INDEX CONCURRENTLY IF NOT EXISTS jobs_finished ON jobs (finished_at)
    WHERE batch_id IS NULL AND status IN ('succeeded', 'failed', 'cancelled');
CREATE INDEX CONCURRENTLY IF NOT EXISTS batches_ended ON batches ((coalesce(completed_at, failed_at, expired_at, cancelled_at)))
    WHERE status IN ('completed', 'failed', 'expired', 'cancelled');
CREATE INDEX CONCURRENTLY IF NOT EXISTS files_expiry ON files (expires_at) WHERE expires_at IS NOT NULL;
CREATE INDEX CONCURRENTLY IF NOT EXISTS webhook_deliveries_done ON webhook_deliveries (status, created_at) WHERE status <> 'pending';
CREATE INDEX CONCURRENTLY IF NOT EXISTS webhook_deliveries_event ON webhook_deliveries (event_id);
CREATE INDEX CONCURRENTLY IF NOT EXISTS webhook_events_created ON webhook_events (created_at);
-- A tenant's purge finds its rows in the tables without a tenant index.
CREATE INDEX CONCURRENTLY IF NOT EXISTS webhook_deliveries_tenant ON webhook_deliveries (tenant_id);
CREATE INDEX CONCURRENTLY IF NOT EXISTS webhook_events_tenant ON webhook_events (tenant_id);

-- +goose Down
DROP INDEX IF EXISTS webhook_events_tenant;
DROP INDEX IF EXISTS webhook_deliveries_tenant;
DROP INDEX IF EXISTS webhook_events_created;
DROP INDEX IF EXISTS webhook_deliveries_event;
DROP INDEX IF EXISTS webhook_deliveries_done;
DROP INDEX IF EXISTS files_expiry;
DROP INDEX IF EXISTS batches_ended;
DROP INDEX IF EXISTS jobs_finished;
