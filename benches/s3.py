#!/usr/bin/env python3
"""S3 benchmark: cachet with its packs in Garage, side by side in one run with

- plain GETs of the same closure's flat file:// zstd cache, its files stored as
  objects in the same Garage and served by Garage's own web endpoint (4 connections,
  the project's fetch client, medians). cachet is measured three ways in each run:
  cold (restarted just before, so its cache of packs is empty and every pack comes
  from Garage), warm (the same fetch again, from the cache), and without the cache
  (`cache_mib = 0`: ranged GETs of every frame);
- the same push to cachet on local disk.

    benches/s3.py                    # ~512 MiB closure
    benches/s3.py --budget-mib 128   # quick form
    benches/s3.py --recompress       # downloads also after a gc pass recompresses the packs

Needs `garage` on PATH (scripts/test.sh installs it), nix-bin and curl. Not part of
the test suite.
"""
import argparse, json, os, statistics, subprocess, sys, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import e2e  # noqa: E402  (the helpers of the end-to-end benchmark)
from e2e import sh, free_port, push, cpu_seconds, peak_rss_mib, wait_http  # noqa: E402


class Garage:
    def __init__(self, work, db_engine):
        self.dir = os.path.join(work, "garage")
        os.makedirs(self.dir)
        self.s3, self.web, rpc = free_port(), free_port(), free_port()
        self.conf = os.path.join(self.dir, "garage.toml")
        with open(self.conf, "w") as f:
            f.write("""metadata_dir = "%(d)s/meta"
data_dir = "%(d)s/data"
db_engine = "%(db)s"
replication_factor = 1
# What is stored is zstd already (cachet's frames, the flat cache's .nar.zst files):
# Garage's own compression of blocks would only cost CPU on this machine.
compression_level = "none"
rpc_bind_addr = "127.0.0.1:%(rpc)d"
rpc_public_addr = "127.0.0.1:%(rpc)d"
rpc_secret = "%(secret)s"
[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:%(s3)d"
root_domain = ".s3.garage.localhost"
[s3_web]
bind_addr = "127.0.0.1:%(web)d"
root_domain = ".web.garage.localhost"
index = "index.html"
""" % dict(d=self.dir, db=db_engine, rpc=rpc, s3=self.s3, web=self.web, secret=os.urandom(32).hex()))
        self.proc = subprocess.Popen(["garage", "-c", self.conf, "server"],
                                     stdout=open(os.path.join(self.dir, "log"), "w"), stderr=subprocess.STDOUT)
        e2e.CHILDREN.append(self.proc)
        for _ in range(300):
            if subprocess.run(["garage", "-c", self.conf, "status"], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)
        node = self.cli("node", "id", "-q").strip().split("@")[0]
        self.cli("layout", "assign", "-z", "dc1", "-c", "10G", node)
        self.cli("layout", "apply", "--version", "1")
        self.key, self.secret = "GK" + os.urandom(12).hex(), os.urandom(32).hex()
        self.cli("key", "import", "--yes", "-n", "bench", self.key, self.secret)
        # `cachet` for the server's packs; `localhost` for the flat cache, which the web
        # endpoint serves to anonymous GETs of http://localhost:<port>/.
        for bucket in ("cachet", "localhost"):
            self.cli("bucket", "create", bucket)
            self.cli("bucket", "allow", "--read", "--write", "--owner", bucket, "--key", self.key)
        self.cli("bucket", "website", "--allow", "localhost")

    def cli(self, *args):
        return sh("garage", "-c", self.conf, *args)

    def put_tree(self, root, bucket):
        """Uploads every file under `root` as an object, signed as S3 asks."""
        for d, _, files in os.walk(root):
            for name in files:
                path = os.path.join(d, name)
                key = os.path.relpath(path, root)
                digest = sh("sha256sum", path).split()[0]
                sh("curl", "-sSf", "-o", "/dev/null", "--aws-sigv4", "aws:amz:garage:s3",
                   "--user", "%s:%s" % (self.key, self.secret), "-H", "x-amz-content-sha256: " + digest,
                   "-T", path, "http://127.0.0.1:%d/%s/%s" % (self.s3, bucket, key))

    def storage_toml(self, prefix):
        return """[storage]
type = "s3"
bucket = "cachet"
prefix = "%s"
endpoint = "http://127.0.0.1:%d"
region = "garage"
allow_http = true
access_key_id = "%s"
secret_access_key = "%s"
""" % (prefix, self.s3, self.key, self.secret)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget-mib", type=int, default=512, help="closure size (installed MiB)")
    ap.add_argument("--runs", type=int, default=7, help="fetch runs per measurement (median)")
    ap.add_argument("--pushes", type=int, default=3, help="push pairs, taking turns (median)")
    ap.add_argument("--garage-db", default="lmdb", help="Garage's metadata engine (lmdb, its default, or sqlite)")
    ap.add_argument("--extra-config", default="", help="TOML appended to the S3 server's config")
    ap.add_argument("--recompress", action="store_true",
                    help="then run a gc that recompresses every pack and fetch again")
    args = ap.parse_args()
    work = e2e.prepare("s3")
    v1 = e2e.make_closure(work, args.budget_mib, "v1")
    infos, hashes_file = e2e.closure_paths(work, v1)
    r = {"paths": len(infos), "nar_mib": sum(p["narSize"] for p in infos) / 2**20}

    garage = Garage(work, args.garage_db)
    # The flat cache first: it also reads the closure into the page cache, which the
    # first timed push would otherwise pay for.
    flat = os.path.join(work, "flat")
    push(work, "file://%s?compression=zstd" % flat, v1)
    garage.put_tree(flat, "localhost")
    web = "http://localhost:%d" % garage.web
    wait_http(web + "/nix-cache-info")

    def one(url, connections):
        return e2e.fetch_once(url, hashes_file, connections)

    confs = {}
    for name, storage_extra in (("cached", ""), ("uncached", "cache_mib = 0\n")):
        confs[name] = os.path.join(work, "s3-%s.toml" % name)
        with open(confs[name], "w") as f:
            f.write(garage.storage_toml("push0") + storage_extra + "\n"
                    + args.extra_config.replace("\\n", "\n") + "\n")
            if args.recompress:
                f.write("[gc]\nrecompress_after_secs = 1\n")
    # Pushes to fresh servers (a second push to the same one would find every chunk
    # stored), each from a fresh client cache, taking turns. The first server on
    # Garage is the one downloads are measured on.
    pushes = {"s3": [], "local": []}
    for i in range(args.pushes):
        conf = os.path.join(work, "s3-push%d.toml" % i)
        with open(conf, "w") as f:
            f.write(garage.storage_toml("push%d" % i) + "\n" + args.extra_config.replace("\\n", "\n") + "\n")
        for name in ("s3", "local"):
            e2e.Cachet.config = conf if name == "s3" else None
            server = e2e.Cachet(work, "cachet-%s-%d" % (name, i))
            e2e.Cachet.config = None
            cpu0, g0 = cpu_seconds(server.proc.pid), cpu_seconds(garage.proc.pid)
            took = push(work, server.url + "?compression=zstd", v1, server.netrc)
            pushes[name].append({"s": took, "cpu": cpu_seconds(server.proc.pid) - cpu0,
                                 "garage_cpu": cpu_seconds(garage.proc.pid) - g0})
            if name == "s3" and i == 0:
                # The first download after the push, from the server that took it
                # (the packs the push kept), beside the flat GETs at the same moment.
                time.sleep(1)
                r["after_push_flat_4"] = one(web, 4)
                r["after_push_4"] = one(server.url, 4)
            server.stop()
    for name, runs in pushes.items():
        r["push_" + name] = statistics.median(x["s"] for x in runs)
        r["push_%s_cpu" % name] = statistics.median(x["cpu"] for x in runs)
        r["push_%s_garage_cpu" % name] = statistics.median(x["garage_cpu"] for x in runs)
    r["push_ratios"] = [a["s"] / b["s"] for a, b in zip(pushes["s3"], pushes["local"])]
    state = {}

    def start_s3(name):
        """cachet on Garage (the first push's data directory) with config `name`; a
        start empties its cache of packs."""
        if "server" in state:
            state["server"].stop()
        e2e.Cachet.config = confs[name]
        state["server"] = e2e.Cachet(work, "cachet-s3-0")
        e2e.Cachet.config = None
        return state["server"]


    def downloads(connections, suffix=""):
        """Medians of the runs, each run: the flat GETs, cachet cold, warm, uncached."""
        out = {k: [] for k in ("flat", "cold", "warm", "uncached")}
        for _ in range(args.runs):
            g0 = cpu_seconds(garage.proc.pid)
            out["flat"].append(one(web, connections))
            out["flat"][-1]["garage_cpu"] = cpu_seconds(garage.proc.pid) - g0
            for kind in ("cold", "warm", "uncached"):
                if kind != "warm":
                    server = start_s3("uncached" if kind == "uncached" else "cached")
                c0, g0 = cpu_seconds(server.proc.pid), cpu_seconds(garage.proc.pid)
                out[kind].append(one(server.url, connections))
                out[kind][-1]["cpu"] = cpu_seconds(server.proc.pid) - c0
                out[kind][-1]["garage_cpu"] = cpu_seconds(garage.proc.pid) - g0
                r["peak_rss_mib"] = max(r.get("peak_rss_mib", 0), peak_rss_mib(server.proc.pid))
        for k, runs in out.items():
            r["%s_%d%s" % (k, connections, suffix)] = {
                f: statistics.median(x[f] for x in runs) for f in runs[0]}

    downloads(4)
    downloads(1)
    if args.recompress:
        on_s3 = start_s3("cached")
        job = e2e.admin_api(on_s3, "POST", "gc", {})["id"]
        status = e2e.admin_api(on_s3, "GET", "jobs/%d" % job)
        while not status["done"]:
            time.sleep(1)
            status = e2e.admin_api(on_s3, "GET", "jobs/%d" % job)
        r["gc"] = status["result"] or status["error"]
        downloads(4, "_after")
    state["server"].stop()

    print("closure: %d paths, %.0f MiB of NARs" % (r["paths"], r["nar_mib"]))
    print("| measure | cachet on Garage | reference | ratio | target |")
    print("| --- | --- | --- | --- | --- |")
    rows = []
    for suffix, after in (("", ""), ("_after", ", after a gc pass recompressed the packs")):
        if "flat_4" + suffix not in r:
            continue
        for kind, what in (("cold", "cold (cache of packs empty)"), ("warm", "warm (the same again)"),
                           ("uncached", "without the cache of packs")):
            rows.append(("download, 4 connections, %s%s (vs Garage web GETs of the flat cache)" % (what, after),
                         r["%s_4%s" % (kind, suffix)]["download_s"], r["flat_4" + suffix]["download_s"], 1.25))
    rows.insert(0, ("download, 4 connections, the first after the push, same server (vs the same)",
                    r["after_push_4"]["download_s"], r["after_push_flat_4"]["download_s"], 1.25))
    for kind in ("cold", "warm", "uncached"):
        rows.append(("download, 1 connection, %s (vs the same)" % kind, r[kind + "_1"]["download_s"],
                     r["flat_1"]["download_s"], None))
    rows += [
        ("all narinfos, sequential (vs the same)", r["cold_4"]["narinfo_s"], r["flat_4"]["narinfo_s"], None),
        ("push zstd (vs cachet on local disk)", r["push_s3"], r["push_local"], 1.25),
        ("server CPU of the push (vs local disk)", r["push_s3_cpu"], r["push_local_cpu"], None),
    ]
    for name, ours, ref, target in rows:
        ratio = ours / ref if ref else float("nan")
        verdict = "-" if target is None else "<= %.2f %s" % (target, "ok" if ratio <= target else "MISSED")
        print("| %s | %.3f | %.3f | %.2f | %s |" % (name, ours, ref, ratio, verdict))
    print("bytes downloaded: cachet %d, flat %d%s" % (
        r["cold_4"]["bytes"], r["flat_4"]["bytes"],
        ", cachet after recompression %d" % r["cold_4_after"]["bytes"] if "cold_4_after" in r else ""))
    print("CPU of a 4-connection fetch, flat: Garage %.2f s" % r["flat_4"]["garage_cpu"])
    for kind in ("cold", "warm", "uncached"):
        print("CPU of a 4-connection fetch, %s: cachet %.2f s, Garage %.2f s"
              % (kind, r[kind + "_4"]["cpu"], r[kind + "_4"]["garage_cpu"]))
    print("push ratios, each pair: %s" % " ".join("%.2f" % x for x in r["push_ratios"]))
    print("Garage's CPU during the push to cachet on Garage: %.1f s (cachet's %.1f s)"
          % (r["push_s3_garage_cpu"], r["push_s3_cpu"]))
    print("peak RSS of cachet on Garage: %.0f MiB" % r["peak_rss_mib"])
    print(json.dumps(r))


if __name__ == "__main__":
    e2e.run_and_clean(main)
