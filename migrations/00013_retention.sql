-- +goose Up
-- When an uploaded file goes (OpenAI's expires_after; NULL: never).
ALTER TABLE files ADD COLUMN expires_at timestamptz;

-- +goose Down
ALTER TABLE files DROP COLUMN expires_at;
