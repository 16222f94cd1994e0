-- +goose Up
-- The key that made a batch: its lines' jobs carry it, so the key's limits,
-- budget and usage apply to them as to its other calls.
ALTER TABLE batches ADD COLUMN key_id uuid;

-- +goose Down
ALTER TABLE batches DROP COLUMN key_id;
