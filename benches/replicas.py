#!/usr/bin/env python3
"""Benchmark of the metadata on PostgreSQL: one server on PostgreSQL against one on
sled, on the same closure (push, narinfo lookups, download), and three replicas over
one PostgreSQL behind nginx against one replica, under a many-client pull.

In one run on one machine: a PostgreSQL cluster of its own in the work directory (run
as the postgres user), packs on local disk (the replicas share one directory, so the
figures are the metadata's and the coordination's, not a store's). The servers take
turns in every measurement, so that drift on a shared machine affects them alike.

    benches/replicas.py                   # 256 MiB closure
    benches/replicas.py --budget-mib 64   # quick form

Needs Debian's postgresql (scripts/test.sh installs it), nix-bin and nginx.
Not part of the test suite.
"""
import argparse, glob, os, shutil, statistics, subprocess, sys, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import e2e  # noqa: E402


def pg_bin():
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if not found:
        sys.exit("PostgreSQL is not installed (apt-get install -y postgresql)")
    return os.path.dirname(found[-1])


class Postgres:
    """A cluster in `work/pg` on a free port, as the postgres user when run as root."""

    def __init__(self, work):
        self.bin = pg_bin()
        self.dir = os.path.join(work, "pg")
        self.port = e2e.free_port()
        os.makedirs(self.dir)
        self.as_user = []
        if os.getuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
            os.chmod(work, 0o755)
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self.run("initdb", "-D", self.dir, "-U", "cachet", "--auth=trust", "-E", "UTF8")
        self.run("pg_ctl", "-D", self.dir, "-l", os.path.join(self.dir, "log"), "-w", "-o",
                 "-p %d -k %s -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
                 % (self.port, self.dir), "start")
        self.run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "cachet", "cachet")

    def run(self, tool, *args):
        e2e.sh(*(self.as_user + [os.path.join(self.bin, tool)] + list(args)))

    def url(self, database="cachet"):
        return "postgres://cachet@127.0.0.1:%d/%s" % (self.port, database)

    def stop(self):
        self.run("pg_ctl", "-D", self.dir, "-m", "fast", "stop")


def config(work, name, text):
    path = os.path.join(work, name + ".toml")
    with open(path, "w") as f:
        f.write(text)
    return path


def server(work, name, config_path, data=None):
    e2e.Cachet.config = config_path
    s = e2e.Cachet(work, name) if data is None else replica(work, name, data)
    return s


def replica(work, name, admin_token_from):
    """A server whose data directory is given the admin token of `admin_token_from`
    (the first replica writes it) before it starts."""
    data = os.path.join(work, name)
    os.makedirs(data, mode=0o700)
    shutil.copy(os.path.join(admin_token_from.data, "admin-token"), os.path.join(data, "admin-token"))
    return e2e.Cachet(work, name)


def front(work, ports):
    """nginx spreading requests round-robin over `ports`; its URL of the main cache."""
    port = e2e.free_port()
    conf = os.path.join(work, "front-%d.conf" % port)
    upstreams = "".join("server 127.0.0.1:%d; " % p for p in ports)
    with open(conf, "w") as f:
        f.write("""daemon off; user root; worker_processes 1; pid %(w)s/front-%(p)d.pid; error_log %(w)s/front-%(p)d.err;
events { worker_connections 4096; }
http { access_log off; client_max_body_size 0;
  upstream cachet { %(u)s keepalive 64; }
  server { listen 127.0.0.1:%(p)d;
    location / { proxy_pass http://cachet; proxy_http_version 1.1; proxy_set_header Connection "";
                 proxy_buffering off; proxy_request_buffering off; } } }
""" % {"w": work, "p": port, "u": upstreams})
    proc = subprocess.Popen(["nginx", "-c", conf, "-p", work])
    e2e.CHILDREN.append(proc)
    url = "http://127.0.0.1:%d/main" % port
    e2e.wait_http(url + "/nix-cache-info")
    return url


def run():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget-mib", type=int, default=256, help="closure size (installed MiB)")
    ap.add_argument("--runs", type=int, default=5, help="fetch runs per measurement (median)")
    ap.add_argument("--push-runs", type=int, default=5,
                    help="pushes to fresh servers of each kind (median)")
    ap.add_argument("--clients", type=int, default=16, help="connections of the many-client pull")
    args = ap.parse_args()
    work = e2e.prepare("replicas")
    pg = Postgres(work)
    try:
        measure(args, work, pg)
    finally:
        # Started by pg_ctl, not a child: stopped here whatever happened.
        pg.stop()
    shutil.rmtree(work, ignore_errors=True)


def measure(args, work, pg):
    top = e2e.make_closure(work, args.budget_mib, "replicas")
    infos, hashes = e2e.closure_paths(work, top)
    r = {"paths": len(infos), "nar_mib": sum(p["narSize"] for p in infos) / 2**20}

    # The closure read once before the first measured push, so that neither server's
    # push pays for a cold page cache.
    e2e.push(work, "file://%s?compression=zstd" % os.path.join(work, "warm"), top)
    # A small closure of its own that each server takes before the measured push, as a
    # running server has: a fresh pool's first statements on each of its connections
    # (the database's catalog caches, plans) are not what a push costs.
    warmup = e2e.make_closure(work, 8, "replicas-warmup")
    # Each push to a fresh pair of servers (a database of its own), taking turns in
    # which goes first; the last pair is fetched from.
    pushes = {"sled": [], "pg": []}
    for n in range(args.push_runs):
        if n:
            sled.stop()
            on_pg.stop()
        database = "push%d" % n
        pg.run("createdb", "-h", "127.0.0.1", "-p", str(pg.port), "-U", "cachet", database)
        sled = server(work, "sled-%d" % n, None)
        pg_config = "[index]\ntype = \"postgres\"\nurl = \"%s\"\n" % pg.url(database)
        on_pg = server(work, "pg-%d" % n, config(work, "pg-%d" % n, pg_config))
        pair = [(sled, "sled"), (on_pg, "pg")]
        for s, _ in pair:
            e2e.push(work, s.url + "?compression=zstd", warmup, s.netrc)
        for s, name in pair if n % 2 == 0 else pair[::-1]:
            pushes[name].append(e2e.push(work, s.url + "?compression=zstd", top, s.netrc))
    r["pushes"] = pushes
    for name, times in pushes.items():
        r["push_" + name] = statistics.median(times)
    # What autovacuum would do after the pushes' inserts, done before the clock runs
    # rather than during it; and one unmeasured pass over both servers.
    pg.run("vacuumdb", "-h", "127.0.0.1", "-p", str(pg.port), "-U", "cachet", "--analyze",
           "push%d" % (args.push_runs - 1))
    e2e.fetch([on_pg.url, sled.url], hashes, 1, 1)
    r["pg_1"], r["sled_1"] = e2e.fetch([on_pg.url, sled.url], hashes, 1, args.runs)
    r["pg_4"], r["sled_4"] = e2e.fetch([on_pg.url, sled.url], hashes, 4, args.runs)
    sled.stop()
    on_pg.stop()

    # Three replicas over one database and one packs directory, against one of them.
    shared = "[index]\ntype = \"postgres\"\nurl = \"%s\"\n[storage]\npath = \"%s\"\n" % (
        pg.url("replicas"), os.path.join(work, "packs"))
    pg.run("createdb", "-h", "127.0.0.1", "-p", str(pg.port), "-U", "cachet", "replicas")
    path = config(work, "replica", shared)
    first = server(work, "replica-1", path)
    others = [server(work, "replica-%d" % n, path, data=first) for n in (2, 3)]
    e2e.push(work, first.url + "?compression=zstd", top, first.netrc)
    one = front(work, [first.port])
    three = front(work, [first.port] + [o.port for o in others])
    r["one_many"], r["three_many"] = e2e.fetch([one, three], hashes, args.clients, args.runs)
    r["direct_many"], = e2e.fetch([first.url], hashes, args.clients, args.runs)
    for s in [first] + others:
        s.stop()
    report(r, args.clients)


def report(r, clients):
    rows = []

    def row(name, ours, ref, target):
        ratio = ours / ref if ref else float("nan")
        ok = "ok" if target is None or ratio <= target else "MISSED"
        rows.append("| %s | %.3f s | %.3f s | %.2f | %s |" % (
            name, ours, ref, ratio, "-" if target is None else "<= %.2f %s" % (target, ok)))

    print("closure: %d paths, %.0f MiB of NARs" % (r["paths"], r["nar_mib"]))
    print("| measure | measured | reference | ratio | target |")
    print("| --- | --- | --- | --- | --- |")
    row("push zstd, PostgreSQL (vs sled), median of %d" % len(r["pushes"]["pg"]),
        r["push_pg"], r["push_sled"], 1.15)
    for c in (1, 4):
        row("download, %d connection%s, PostgreSQL (vs sled)" % (c, "s" if c > 1 else ""),
            r["pg_%d" % c]["download_s"], r["sled_%d" % c]["download_s"], 1.15)
    row("all narinfos, sequential, PostgreSQL (vs sled)", r["pg_1"]["narinfo_s"], r["sled_1"]["narinfo_s"], 1.5)
    row("as many misses, PostgreSQL (vs sled)", r["pg_1"]["miss_s"], r["sled_1"]["miss_s"], 1.5)
    row("narinfos, %d clients, three replicas (vs one, both behind nginx)" % clients,
        r["three_many"]["narinfo_s"], r["one_many"]["narinfo_s"], None)
    row("download, %d clients, three replicas (vs one, both behind nginx)" % clients,
        r["three_many"]["download_s"], r["one_many"]["download_s"], None)
    row("download, %d clients, one replica behind nginx (vs direct)" % clients,
        r["one_many"]["download_s"], r["direct_many"]["download_s"], None)
    print("\n".join(rows))
    print(__import__("json").dumps(r))


def main():
    e2e.run_and_clean(run)


if __name__ == "__main__":
    main()
