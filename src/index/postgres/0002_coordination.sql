-- What the servers sharing this database agree on (see `coord/postgres.rs`).

-- Every live server, and the last barrier generation it has drained: none of its
-- downloads and uploads from before that barrier still runs. A server whose `seen` is
-- older than the lease time is dead; no barrier waits for it.
CREATE TABLE coord_servers (
    id BIGSERIAL PRIMARY KEY,
    name TEXT NOT NULL,
    seen TIMESTAMPTZ NOT NULL DEFAULT now(),
    drained BIGINT NOT NULL
);

-- The barriers' counter: a garbage collection takes the next generation, and waits
-- until every live server has drained it.
CREATE TABLE coord_barrier (
    one BOOLEAN PRIMARY KEY DEFAULT true CHECK (one),
    generation BIGINT NOT NULL
);
INSERT INTO coord_barrier VALUES (true, 0);

-- The maintenance jobs, the running one kept alive by its server's progress reports.
CREATE TABLE coord_jobs (
    id BIGSERIAL PRIMARY KEY,
    kind TEXT NOT NULL,
    started BIGINT NOT NULL,
    server TEXT NOT NULL,
    seen TIMESTAMPTZ NOT NULL DEFAULT now(),
    phase TEXT NOT NULL DEFAULT '',
    items BIGINT NOT NULL DEFAULT 0,
    bytes BIGINT NOT NULL DEFAULT 0,
    done BOOLEAN NOT NULL DEFAULT false,
    result TEXT,
    error TEXT
);
-- One job at a time, across every server.
CREATE UNIQUE INDEX coord_one_job ON coord_jobs ((true)) WHERE NOT done;
