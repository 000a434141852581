-- wsecho storage on PostgreSQL, schema version 1: the same data as SQLite's schema 1 and 2.
--
-- Keys are bytea (their UTF-8 bytes), not text: bytea compares bytewise, exactly as SQLite
-- compares its TEXT keys (memcmp of UTF-8), whatever the database's collation; and a key may
-- hold U+0000, which a PostgreSQL text value cannot. Object names are namespace:hex, compared
-- with COLLATE "C" (bytewise) for the same reason.
--
-- slot: wsecho.core.placement.slot_of() of the object's id (NULL for rows that are no
-- object's, such as the storage probe's), filled on every write so that a slot's rows (and
-- later its owner's fencing check) can be found without parsing names.
CREATE TABLE kv (
    object text COLLATE "C" NOT NULL,   -- "<namespace>:<64 hex digit id>"
    key    bytea NOT NULL,              -- UTF-8
    value  bytea NOT NULL,              -- a wsecho.api.codec encoding
    slot   integer,
    PRIMARY KEY (object, key)
);
CREATE INDEX kv_slot ON kv (slot);

-- At most one alarm per object, with what is needed to find the object again.
CREATE TABLE alarms (
    object    text COLLATE "C" PRIMARY KEY,
    namespace text NOT NULL,
    id        text NOT NULL,
    name      bytea,                    -- the id_from_name() name in UTF-8 (it may hold U+0000)
    at_ms     bigint NOT NULL,
    slot      integer
);
CREATE INDEX alarms_slot ON alarms (slot);

-- Bytes stored per object, for the storage quotas: a key counts its UTF-8 bytes, a value its
-- encoded bytes. The trigger keeps the sums exact in the same transaction as every write, so
-- reading an object's usage (or the total) never scans its rows.
CREATE TABLE usage (
    object text COLLATE "C" PRIMARY KEY,
    bytes  bigint NOT NULL
);

CREATE FUNCTION wsecho_kv_usage() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO usage (object, bytes) VALUES (NEW.object, octet_length(NEW.key) + octet_length(NEW.value))
            ON CONFLICT (object) DO UPDATE SET bytes = usage.bytes + excluded.bytes;
    ELSIF TG_OP = 'UPDATE' THEN
        UPDATE usage SET bytes = bytes + octet_length(NEW.value) - octet_length(OLD.value)
            WHERE object = NEW.object;
    ELSE
        UPDATE usage SET bytes = bytes - octet_length(OLD.key) - octet_length(OLD.value)
            WHERE object = OLD.object;
        DELETE FROM usage WHERE object = OLD.object AND bytes <= 0;
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER kv_usage AFTER INSERT OR DELETE OR UPDATE OF value ON kv
    FOR EACH ROW EXECUTE FUNCTION wsecho_kv_usage();
