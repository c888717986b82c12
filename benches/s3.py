#!/usr/bin/env python3
"""S3 benchmark: cachet with its packs in Garage, side by side in one run with

- plain GETs of the same closure's flat file:// zstd cache, its files stored as
  objects in the same Garage and served by Garage's own web endpoint (4 connections,
  the project's fetch client, medians);
- the same push to cachet on local disk.

    benches/s3.py                    # ~512 MiB closure
    benches/s3.py --budget-mib 128   # quick form
    benches/s3.py --recompress       # downloads also after a gc pass recompresses the packs

Needs `garage` on PATH (scripts/test.sh installs it), nix-bin and curl. Not part of
the test suite.
"""
import argparse, json, os, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import e2e  # noqa: E402  (the helpers of the end-to-end benchmark)
from e2e import ROOT, sh, free_port, push, fetch, cpu_seconds, peak_rss_mib, wait_http  # noqa: E402


class Garage:
    def __init__(self, work):
        self.dir = os.path.join(work, "garage")
        os.makedirs(self.dir)
        self.s3, self.web, rpc = free_port(), free_port(), free_port()
        self.conf = os.path.join(self.dir, "garage.toml")
        with open(self.conf, "w") as f:
            f.write("""metadata_dir = "%(d)s/meta"
data_dir = "%(d)s/data"
db_engine = "sqlite"
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
""" % dict(d=self.dir, rpc=rpc, s3=self.s3, web=self.web, secret=os.urandom(32).hex()))
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

    def storage_toml(self):
        return """[storage]
type = "s3"
bucket = "cachet"
endpoint = "http://127.0.0.1:%d"
region = "garage"
allow_http = true
access_key_id = "%s"
secret_access_key = "%s"
""" % (self.s3, self.key, self.secret)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget-mib", type=int, default=512, help="closure size (installed MiB)")
    ap.add_argument("--runs", type=int, default=7, help="fetch runs per measurement (median)")
    ap.add_argument("--extra-config", default="", help="TOML appended to the S3 server's config")
    ap.add_argument("--recompress", action="store_true",
                    help="then run a gc that recompresses every pack and fetch again")
    args = ap.parse_args()
    e2e.ensure_tools()
    os.environ["NIX_CONFIG"] = e2e.NIX_CONFIG
    sh("cargo", "build", "--release", "--quiet", "--manifest-path", os.path.join(ROOT, "Cargo.toml"),
       "--bin", "cachet", "--example", "fetch", capture=False)
    work = tempfile.mkdtemp(prefix="cachet-s3-")
    gen = os.path.join(ROOT, "tests/workload/mkclosure.py")
    v1 = sh(sys.executable, gen, "--budget-mib", str(args.budget_mib), "--salt", "v1",
            "--out-link", os.path.join(work, "v1")).strip()
    infos = json.loads(sh("nix", "path-info", "--json", "-r", v1))
    hashes_file = os.path.join(work, "hashes")
    with open(hashes_file, "w") as f:
        f.write("\n".join(os.path.basename(p["path"])[:32] for p in infos) + "\n")
    r = {"paths": len(infos), "nar_mib": sum(p["narSize"] for p in infos) / 2**20}

    garage = Garage(work)
    conf = os.path.join(work, "s3.toml")
    with open(conf, "w") as f:
        f.write(garage.storage_toml() + "\n" + args.extra_config.replace("\\n", "\n") + "\n")
        if args.recompress:
            f.write("[gc]\nrecompress_after_secs = 1\n")
    e2e.Cachet.config = conf
    on_s3 = e2e.Cachet(work, "cachet-s3")
    e2e.Cachet.config = None
    on_disk = e2e.Cachet(work, "cachet-local")
    # One push each, to a fresh server (a second push to the same one would find
    # every chunk stored), each from a fresh client cache.
    for name, server in (("s3", on_s3), ("local", on_disk)):
        cpu0, g0 = cpu_seconds(server.proc.pid), cpu_seconds(garage.proc.pid)
        r["push_" + name] = push(work, server.url + "?compression=zstd", v1, server.netrc)
        r["push_%s_cpu" % name] = cpu_seconds(server.proc.pid) - cpu0
        r["push_%s_garage_cpu" % name] = cpu_seconds(garage.proc.pid) - g0
    on_disk.stop()

    flat = os.path.join(work, "flat")
    push(work, "file://%s?compression=zstd" % flat, v1)
    garage.put_tree(flat, "localhost")
    web = "http://localhost:%d" % garage.web
    wait_http(web + "/nix-cache-info")
    g0 = cpu_seconds(garage.proc.pid)
    r["flat_4"], r["s3_4"] = fetch([web, on_s3.url], hashes_file, 4, args.runs)
    r["fetch_4_garage_cpu"] = cpu_seconds(garage.proc.pid) - g0
    r["flat_1"], r["s3_1"] = fetch([web, on_s3.url], hashes_file, 1, args.runs)
    if args.recompress:
        job = e2e.admin_api(on_s3, "POST", "gc", {})["id"]
        status = e2e.admin_api(on_s3, "GET", "jobs/%d" % job)
        while not status["done"]:
            time.sleep(1)
            status = e2e.admin_api(on_s3, "GET", "jobs/%d" % job)
        r["gc"] = status["result"] or status["error"]
        r["flat_4_after"], r["s3_4_after"] = fetch([web, on_s3.url], hashes_file, 4, args.runs)
    r["peak_rss_mib"] = peak_rss_mib(on_s3.proc.pid)
    on_s3.stop()

    print("closure: %d paths, %.0f MiB of NARs" % (r["paths"], r["nar_mib"]))
    print("| measure | cachet on Garage | reference | ratio | target |")
    print("| --- | --- | --- | --- | --- |")
    for name, ours, ref, target in (
        ("download, 4 connections (vs Garage web GETs of the flat cache)", r["s3_4"]["download_s"],
         r["flat_4"]["download_s"], 1.25),
        ("download, 1 connection (vs the same)", r["s3_1"]["download_s"], r["flat_1"]["download_s"], None),
        ("all narinfos, sequential (vs the same)", r["s3_4"]["narinfo_s"], r["flat_4"]["narinfo_s"], None),
        ("push zstd (vs cachet on local disk)", r["push_s3"], r["push_local"], 1.25),
        ("server CPU of the push (vs local disk)", r["push_s3_cpu"], r["push_local_cpu"], None),
    ):
        ratio = ours / ref if ref else float("nan")
        verdict = "-" if target is None else "<= %.2f %s" % (target, "ok" if ratio <= target else "MISSED")
        print("| %s | %.3f | %.3f | %.2f | %s |" % (name, ours, ref, ratio, verdict))
    if args.recompress:
        ours, ref = r["s3_4_after"]["download_s"], r["flat_4_after"]["download_s"]
        print("| download, 4 connections, after a gc pass recompressed the packs (vs the same) | %.3f | %.3f | %.2f | "
              "<= 1.25 %s |" % (ours, ref, ours / ref, "ok" if ours / ref <= 1.25 else "MISSED"))
        print("bytes downloaded after: cachet %d" % r["s3_4_after"]["bytes"])
    print("bytes downloaded: cachet %d, flat %d" % (r["s3_4"]["bytes"], r["flat_4"]["bytes"]))
    print("Garage's CPU during the push to cachet on Garage: %.1f s (cachet's %.1f s)"
          % (r["push_s3_garage_cpu"], r["push_s3_cpu"]))
    print("peak RSS of cachet on Garage: %.0f MiB" % r["peak_rss_mib"])
    print(json.dumps(r))


if __name__ == "__main__":
    e2e.run_and_clean(main)
