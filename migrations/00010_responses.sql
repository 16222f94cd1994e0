-- +goose Up
-- Where each stored response lives: Azure keeps a response (and the
-- conversation it continues) on the resource that made it, so follow-ups,
-- reads and deletes must go there, and only for the tenant that made it.
CREATE TABLE response_routes (
    id             text PRIMARY KEY,
    tenant_id      uuid NOT NULL,
    deployment     text NOT NULL,
    -- the deployment's own id of it, when Levee's differs (a background
    -- response's id is Levee's, given before the deployment made one)
    upstream_id    text,
    -- what a follow-up carries as input from this conversation so far
    context_tokens integer NOT NULL DEFAULT 0,
    created_at     timestamptz NOT NULL DEFAULT now(),
    expires_at     timestamptz NOT NULL
);
CREATE INDEX response_routes_expiry ON response_routes (expires_at);

-- A background response is a job: its id is Levee's (resp_lv + the job's
-- id), and response_status is the Response's own status once it ended
-- (completed or incomplete: both are a succeeded job).
ALTER TABLE jobs ADD COLUMN background boolean NOT NULL DEFAULT false;
ALTER TABLE jobs ADD COLUMN response_status text;

-- +goose Down
ALTER TABLE jobs DROP COLUMN response_status;
ALTER TABLE jobs DROP COLUMN background;
DROP TABLE response_routes;
