-- +goose Up
-- A streamed background response's events, as its worker relays them, so
-- a client can follow it live and reconnect from where it left off
-- (starting_after). Kept until the response has ended plus
-- responses.stream_retention.
CREATE TABLE response_events (
    job_id uuid NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    seq    integer NOT NULL,
    type   text NOT NULL,
    data   bytea NOT NULL,
    PRIMARY KEY (job_id, seq)
);

-- +goose Down
DROP TABLE response_events;
