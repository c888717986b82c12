-- Every change of a narinfo or a NAR record is announced in the transaction that makes
-- it, so that each server's copies of its hot lookups (`index/lookups.rs`) can be
-- dropped: notices are delivered only if the change commits, in the order of commits.
-- A transaction that changes many at once (a cache's purge) sets `cachet.bulk` and
-- announces `*` instead, which drops every copy.

CREATE FUNCTION cachet_narinfo_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('cachet.bulk', true) = 'on' THEN
        RETURN NULL;
    END IF;
    IF TG_OP <> 'INSERT' THEN
        PERFORM pg_notify('cachet_lookups', 'i ' || encode(OLD.path, 'hex') || ' '
            || encode(OLD.nar_hash, 'hex') || ' ' || OLD.cache);
    END IF;
    IF TG_OP <> 'DELETE' THEN
        PERFORM pg_notify('cachet_lookups', 'i ' || encode(NEW.path, 'hex') || ' '
            || encode(NEW.nar_hash, 'hex') || ' ' || NEW.cache);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER narinfos_changed AFTER INSERT OR UPDATE OR DELETE ON narinfos
    FOR EACH ROW EXECUTE FUNCTION cachet_narinfo_changed();

CREATE FUNCTION cachet_nar_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('cachet.bulk', true) = 'on' THEN
        RETURN NULL;
    END IF;
    IF TG_OP <> 'INSERT' THEN
        PERFORM pg_notify('cachet_lookups', 'n ' || encode(OLD.hash, 'hex'));
    END IF;
    IF TG_OP = 'INSERT' OR (TG_OP = 'UPDATE' AND NEW.hash <> OLD.hash) THEN
        PERFORM pg_notify('cachet_lookups', 'n ' || encode(NEW.hash, 'hex'));
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER nars_changed AFTER INSERT OR UPDATE OR DELETE ON nars
    FOR EACH ROW EXECUTE FUNCTION cachet_nar_changed();
