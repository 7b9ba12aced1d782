-- gpu_results: result documents kept in the database (results.store =
-- "database", the default with PostgreSQL), so that every host reads every
-- result. A done job's result_path reads `db:<id in hex>`.
CREATE TABLE gpu_results (
    id         bytea PRIMARY KEY CHECK (length(id) = 16),
    -- The result document (JSON, as the file store writes it).
    doc        bytea NOT NULL,
    written_at double precision NOT NULL DEFAULT extract(epoch FROM now())
);
