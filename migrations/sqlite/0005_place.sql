-- Fragment places: where a fragment sits in its parent, as its own column
-- instead of inside the payload, so that fan-in reads a typed value:
--   {"tokens": [start, end]}                       a window of a text
--   {"tile": {"row", "col", "x", "y", "width", "height"}}   a tile of an image
-- NULL for jobs that are not fragments (and for fragments inserted by other
-- programs that do not say; their answers are joined in fragment order).
ALTER TABLE gpu_jobs ADD COLUMN place TEXT CHECK (place IS NULL OR json_valid(place));

-- Fragments written before this version carried their place in the payload
-- (`chunk.token_start`/`token_end`, or `tile`): it moves to the column.
UPDATE gpu_jobs
   SET place = json_object('tokens', json_array(
                   json_extract(payload_inline, '$.chunk.token_start'),
                   json_extract(payload_inline, '$.chunk.token_end')))
 WHERE parent_id IS NOT NULL AND place IS NULL
   AND json_valid(payload_inline)
   AND json_type(payload_inline, '$.chunk.token_start') = 'integer'
   AND json_type(payload_inline, '$.chunk.token_end') = 'integer';
UPDATE gpu_jobs
   SET place = json_object('tile', json(json_extract(payload_inline, '$.tile')))
 WHERE parent_id IS NOT NULL AND place IS NULL
   AND json_valid(payload_inline)
   AND json_type(payload_inline, '$.tile') = 'object';

-- Mark: this file records that it was applied, so that a database built by
-- running the files through the sqlite3 CLI is known to be at this version
-- (schema_migrations itself is made by 0001_gpu_jobs.sql).
INSERT OR IGNORE INTO schema_migrations (version, name, applied_at)
VALUES (5, 'place', (julianday('now') - 2440587.5) * 86400.0);
