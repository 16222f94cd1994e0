-- +goose Up
-- Where each stored response lives: Azure keeps a response (and the
-- conversation it continues) on the resource that made it, so follow-ups,
-- reads and deletes must go there, and only for the tenant that made it.
CREATE TABLE response_routes (
    id             text PRIMARY KEY,
    tenant_id      uuid NOT NULL,
    deployment     text NOT NULL,
    -- what a follow-up carries as input from this conversation so far
    context_tokens integer NOT NULL DEFAULT 0,
    created_at     timestamptz NOT NULL DEFAULT now(),
    expires_at     timestamptz NOT NULL
);
CREATE INDEX response_routes_expiry ON response_routes (expires_at);

-- +goose Down
DROP TABLE response_routes;
