-- Claim the pending rows a grouped claim chose (:rowids, a JSON array), in
-- the same transaction that read them. The UPDATE of claim_update.sql
-- follows.
WITH picked AS (SELECT value AS seq FROM json_each(:rowids))
