-- The OpenAI-compatible API: uploaded files, batches, and the job each
-- line of a batch became (the same tables as the SQLite queue's).
CREATE TABLE api_files (
    seq        bigserial PRIMARY KEY,
    id         text NOT NULL UNIQUE,
    filename   text NOT NULL,
    purpose    text NOT NULL,
    bytes      bigint NOT NULL,
    lines      bigint NOT NULL,
    created_at double precision NOT NULL,
    path       text NOT NULL
);

CREATE TABLE api_batches (
    seq           bigserial PRIMARY KEY,
    id            text NOT NULL UNIQUE,
    status        text NOT NULL,
    input_file_id text NOT NULL,
    created_at    double precision NOT NULL,
    doc           jsonb NOT NULL
);
CREATE INDEX api_batches_status ON api_batches (status);
CREATE INDEX api_batches_input ON api_batches (input_file_id);

CREATE TABLE api_batch_lines (
    batch_id  text NOT NULL,
    line      bigint NOT NULL,
    custom_id text NOT NULL,
    job_id    bytea NOT NULL,
    PRIMARY KEY (batch_id, line)
);
