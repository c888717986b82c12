-- The metadata of cachet, format 1 of the PostgreSQL index. Keys that a walk pages
-- through are BYTEA or TEXT in the "C" collation: ordered by their bytes, as the
-- embedded index orders them.

CREATE TABLE meta (
    key TEXT COLLATE "C" PRIMARY KEY,
    value BYTEA NOT NULL
);

CREATE TABLE caches (
    name TEXT COLLATE "C" PRIMARY KEY,
    record TEXT NOT NULL
);

CREATE TABLE cache_stats (
    cache TEXT COLLATE "C" PRIMARY KEY,
    paths BIGINT NOT NULL DEFAULT 0,
    nar_bytes BIGINT NOT NULL DEFAULT 0,
    stored_bytes BIGINT NOT NULL DEFAULT 0,
    pending_bytes BIGINT NOT NULL DEFAULT 0,
    blob_bytes BIGINT NOT NULL DEFAULT 0
);

CREATE TABLE tokens (
    hash BYTEA PRIMARY KEY,
    record TEXT NOT NULL
);

CREATE TABLE chunks (
    id BYTEA PRIMARY KEY,
    location BYTEA NOT NULL
);

CREATE TABLE segments (
    manifest BYTEA NOT NULL,
    idx INTEGER NOT NULL,
    chunks BYTEA NOT NULL,
    PRIMARY KEY (manifest, idx)
);

CREATE TABLE nars (
    hash BYTEA PRIMARY KEY,
    record BYTEA NOT NULL
);

CREATE TABLE uploads (
    cache TEXT COLLATE "C" NOT NULL,
    url TEXT COLLATE "C" NOT NULL,
    record BYTEA NOT NULL,
    PRIMARY KEY (cache, url)
);

CREATE TABLE narinfos (
    cache TEXT COLLATE "C" NOT NULL,
    path BYTEA NOT NULL,
    nar_hash BYTEA NOT NULL,
    nar_size BIGINT NOT NULL,
    file_size BIGINT NOT NULL,
    text BYTEA NOT NULL,
    PRIMARY KEY (cache, path)
);
-- A cache's claims on a NAR: which of its paths name it.
CREATE INDEX narinfos_by_nar ON narinfos (cache, nar_hash);

CREATE TABLE refs (
    cache TEXT COLLATE "C" NOT NULL,
    referenced BYTEA NOT NULL,
    referrer BYTEA NOT NULL,
    PRIMARY KEY (cache, referenced, referrer)
);

CREATE TABLE blobs (
    kind SMALLINT NOT NULL,
    cache TEXT COLLATE "C" NOT NULL,
    key TEXT COLLATE "C" NOT NULL,
    stored BYTEA NOT NULL,
    PRIMARY KEY (kind, cache, key)
);

CREATE TABLE accesses (
    cache TEXT COLLATE "C" NOT NULL,
    path BYTEA NOT NULL,
    at BIGINT NOT NULL,
    PRIMARY KEY (cache, path)
);

CREATE TABLE pins (
    cache TEXT COLLATE "C" NOT NULL,
    name TEXT COLLATE "C" NOT NULL,
    record TEXT NOT NULL,
    PRIMARY KEY (cache, name)
);
