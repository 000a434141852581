-- wsecho storage, schema version 1.
-- One row per stored key of each object; values are wsecho.codec encodings.
CREATE TABLE kv (
    object TEXT NOT NULL,   -- "<namespace>:<64 hex digit id>"
    key    TEXT NOT NULL,
    value  BLOB NOT NULL,
    PRIMARY KEY (object, key)
) WITHOUT ROWID;

-- At most one alarm per object, with what is needed to find the object again.
CREATE TABLE alarms (
    object    TEXT PRIMARY KEY,
    namespace TEXT NOT NULL,
    id        TEXT NOT NULL,
    name      TEXT,
    at_ms     INTEGER NOT NULL
) WITHOUT ROWID;
