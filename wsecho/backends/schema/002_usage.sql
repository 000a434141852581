-- wsecho storage, schema version 2: bytes stored per object, for the storage quotas.
-- A key counts its UTF-8 bytes, a value its encoded bytes. Triggers keep the sums exact
-- in the same transaction as every write, so reading an object's usage (or the total)
-- never scans its rows.
CREATE TABLE usage (
    object TEXT PRIMARY KEY,
    bytes  INTEGER NOT NULL
) WITHOUT ROWID;

INSERT INTO usage (object, bytes)
    SELECT object, SUM(length(CAST(key AS BLOB)) + length(value)) FROM kv GROUP BY object;

CREATE TRIGGER kv_usage_insert AFTER INSERT ON kv BEGIN
    INSERT INTO usage (object, bytes) VALUES (NEW.object, length(CAST(NEW.key AS BLOB)) + length(NEW.value))
        ON CONFLICT (object) DO UPDATE SET bytes = bytes + excluded.bytes;
END;

CREATE TRIGGER kv_usage_update AFTER UPDATE OF value ON kv BEGIN
    UPDATE usage SET bytes = bytes + length(NEW.value) - length(OLD.value) WHERE object = NEW.object;
END;

CREATE TRIGGER kv_usage_delete AFTER DELETE ON kv BEGIN
    UPDATE usage SET bytes = bytes - length(CAST(OLD.key AS BLOB)) - length(OLD.value) WHERE object = OLD.object;
    DELETE FROM usage WHERE object = OLD.object AND bytes <= 0;
END;
