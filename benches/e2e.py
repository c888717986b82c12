#!/usr/bin/env python3
"""End-to-end benchmark: cachet against a flat file:// cache served by nginx.

In one run on one machine: builds a realistic closure (and its mass rebuild) with the
project's generator, pushes it with `nix copy --to` to cachet and to file:// caches
(zstd and the xz default) and to nginx discarding every upload (the client's floor),
serves the zstd file:// cache with nginx, fetches the whole
closure from both with the project's client (benches/fetch.rs) with 1 and 4
connections, pushes the rebuild, and prints every figure with its ratio and target.

    benches/e2e.py                    # ~1 GiB closure
    benches/e2e.py --budget-mib 64    # quick form

Installs nix-bin and nginx-light when missing. Not part of the test suite.
"""
import argparse, json, os, shutil, socket, statistics, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NIX_CONFIG = "experimental-features = nix-command\nsandbox = false\nsubstituters =\nbuild-users-group =\n"


def sh(*cmd, env=None, capture=True):
    res = subprocess.run(cmd, env=env, capture_output=capture, text=True)
    if res.returncode != 0:
        sys.exit("failed: %s\n%s" % (" ".join(cmd), (res.stderr or "")[-3000:]))
    return res.stdout if capture else ""


def ensure_tools():
    missing = [pkg for cmd, pkg in (("nix", "nix-bin"), ("nginx", "nginx-light")) if not shutil.which(cmd)]
    if missing:
        sh("apt-get", "update", "-qq")
        sh("apt-get", "install", "-y", "-qq", *missing)


def prepare(name):
    """The tools, the client's config and a release build of the server and the fetch
    client; a fresh work directory for the benchmark `name`."""
    ensure_tools()
    os.environ["NIX_CONFIG"] = NIX_CONFIG
    sh("cargo", "build", "--release", "--quiet", "--manifest-path", os.path.join(ROOT, "Cargo.toml"),
       "--bin", "cachet", "--example", "fetch", capture=False)
    return tempfile.mkdtemp(prefix="cachet-%s-" % name)


def make_closure(work, budget_mib, salt, link=None):
    """The generator's closure of `budget_mib` installed MiB with `salt`, linked in
    `work` as `link` (default: the salt); its top store path."""
    gen = os.path.join(ROOT, "tests/workload/mkclosure.py")
    return sh(sys.executable, gen, "--budget-mib", str(budget_mib), "--salt", salt,
              "--out-link", os.path.join(work, link or salt)).strip()


def closure_paths(work, top):
    """The path infos of the closure of `top`, and a file of their hashes in `work`
    for the fetch client."""
    infos = json.loads(sh("nix", "path-info", "--json", "-r", top))
    hashes_file = os.path.join(work, "hashes")
    with open(hashes_file, "w") as f:
        f.write("\n".join(os.path.basename(p["path"])[:32] for p in infos) + "\n")
    return infos, hashes_file


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_http(url):
    import urllib.request
    for _ in range(300):
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except Exception:
            time.sleep(0.05)
    sys.exit("no answer from " + url)


def cpu_seconds(pid):
    fields = open("/proc/%d/stat" % pid).read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mib(pid):
    for line in open("/proc/%d/status" % pid):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def dir_bytes(path):
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            total += os.path.getsize(os.path.join(root, f))
    return total


class Cachet:
    config = None
    binary = os.path.join(ROOT, "target/release/cachet")

    def __init__(self, work, name):
        self.data = os.path.join(work, name)
        self.port = free_port()
        self.log = open(os.path.join(work, name + ".log"), "w")
        self.proc = subprocess.Popen(
            [Cachet.binary, "--listen", "127.0.0.1:%d" % self.port,
             "--data-dir", self.data, "--log", "warn"] + (["--config", Cachet.config] if Cachet.config else []),
            stdout=self.log, stderr=self.log)
        CHILDREN.append(self.proc)
        self.url = "http://127.0.0.1:%d/main" % self.port
        wait_http(self.url + "/nix-cache-info")
        self.netrc = os.path.join(work, name + ".netrc")
        with open(self.netrc, "w") as f:
            f.write("machine 127.0.0.1 password %s\n" % open(os.path.join(self.data, "admin-token")).read().strip())

    def stop(self):
        self.proc.terminate()
        self.proc.wait()


NGINX = {}


def start_nginx(work, name, root, cache_info, location=""):
    """nginx on a free loopback port serving `root`, where `cache_info` is the path of
    a nix-cache-info file; returns its URL."""
    port = free_port()
    conf = os.path.join(work, "nginx-%s.conf" % name)
    with open(conf, "w") as f:
        # Workers run as the invoking user, so they can read the private work directory.
        f.write("""daemon off; user %s; worker_processes auto; pid %s/nginx-%s.pid; error_log %s/nginx-%s.err;
events { worker_connections 1024; }
http { access_log off; sendfile on; tcp_nopush on; keepalive_requests 100000; client_max_body_size 0;
  types { text/x-nix-narinfo narinfo; } default_type application/octet-stream;
  server { listen 127.0.0.1:%d; root %s; %s } }
""" % (__import__("pwd").getpwuid(os.getuid()).pw_name, work, name, work, name, port, root, location))
    proc = subprocess.Popen(["nginx", "-c", conf, "-p", work])
    CHILDREN.append(proc)
    url = "http://127.0.0.1:%d" % port
    wait_http(url + cache_info)
    NGINX[url] = proc
    return url


def stop(url):
    NGINX[url].terminate()
    NGINX[url].wait()


CLIENT_CPU = {}


def push(work, to, path, netrc=None):
    """Seconds for `nix copy --to`, from a fresh client cache (a fresh CI runner).
    The client's CPU seconds are kept in CLIENT_CPU under the same key."""
    env = dict(os.environ, NIX_CONFIG=NIX_CONFIG + ("netrc-file = %s\n" % netrc if netrc else ""),
               XDG_CACHE_HOME=tempfile.mkdtemp(dir=work))
    import resource
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    sh("nix", "copy", "--to", to, path, env=env)
    elapsed = time.monotonic() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    CLIENT_CPU[to] = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return elapsed


def fetch_once(cache, hashes_file, connections):
    """One run of the fetch client against `cache`: its figures."""
    return json.loads(sh(os.path.join(ROOT, "target/release/examples/fetch"), "--cache", cache,
                         "--hashes", hashes_file, "--connections", str(connections)))


def fetch(caches, hashes_file, connections, runs):
    """Median figures of `runs` runs of the fetch client against each cache, the caches
    taking turns so that drift on a shared machine affects them alike."""
    out = {c: [] for c in caches}
    for _ in range(runs):
        for c in caches:
            out[c].append(fetch_once(c, hashes_file, connections))
    return [{k: statistics.median(r[k] for r in out[c]) for k in ("narinfo_s", "miss_s", "download_s", "bytes")}
            for c in caches]


CHILDREN = []


def run_and_clean(fn):
    """Runs a benchmark's `fn`, then stops every process it started."""
    try:
        fn()
    finally:
        for p in CHILDREN:
            if p.poll() is None:
                p.terminate()
                p.wait()


def admin_api(server, method, path, body=None):
    """A call of a server's admin API with its admin token; the JSON answer."""
    import urllib.request
    token = open(os.path.join(server.data, "admin-token")).read().strip()
    base = server.url.rsplit("/", 1)[0]
    req = urllib.request.Request(base + "/_api/v1/" + path, method=method,
                                 data=None if body is None else json.dumps(body).encode(),
                                 headers={"Authorization": "Bearer " + token, "Content-Type": "application/json"})
    with urllib.request.urlopen(req) as r:
        return json.loads(r.read() or b"null")


def main():
    run_and_clean(run)


def run():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget-mib", type=int, default=1024, help="closure size (installed MiB)")
    ap.add_argument("--xz-budget-mib", type=int, default=128,
                    help="closure size for the xz pushes (the client compresses xz at a few MB/s)")
    ap.add_argument("--runs", type=int, default=9, help="fetch runs per measurement (median)")
    ap.add_argument("--config", help="a cachet config file to run the server with")
    ap.add_argument("--skip-xz", action="store_true", help="leave out the xz pushes")
    ap.add_argument("--server-bin", help="another cachet binary to measure (an A/B of two builds)")
    args = ap.parse_args()
    Cachet.config = args.config and os.path.abspath(args.config)
    if args.server_bin:
        Cachet.binary = os.path.abspath(args.server_bin)
    work = prepare("e2e")
    v1 = make_closure(work, args.budget_mib, "v1")
    v2 = make_closure(work, args.budget_mib, "v2")
    xz_closure = make_closure(work, min(args.xz_budget_mib, args.budget_mib), "v1", "xz")
    infos, hashes_file = closure_paths(work, v1)
    nar_bytes = sum(p["narSize"] for p in infos)

    r = {"paths": len(infos), "nar_mib": nar_bytes / 2**20}
    # Uploads: zstd and xz, each to a fresh cachet and a fresh file:// cache.
    flat_zstd, flat_xz = os.path.join(work, "flat-zstd"), os.path.join(work, "flat-xz")
    main_server = Cachet(work, "cachet-zstd")
    cpu0 = cpu_seconds(main_server.proc.pid)
    r["push_cachet_zstd"] = push(work, main_server.url + "?compression=zstd", v1, main_server.netrc)
    r["push_cachet_zstd_cpu"] = cpu_seconds(main_server.proc.pid) - cpu0
    r["push_cachet_zstd_client_cpu"] = CLIENT_CPU[main_server.url + "?compression=zstd"]
    r["push_file_zstd"] = push(work, "file://%s?compression=zstd" % flat_zstd, v1)
    r["push_file_zstd_client_cpu"] = CLIENT_CPU["file://%s?compression=zstd" % flat_zstd]
    # The client's own floor over HTTP: a server that reads every upload and keeps
    # nothing (nginx discarding request bodies), so no server can push faster.
    sink_root = os.path.join(work, "sink-root")
    os.makedirs(os.path.join(sink_root, "main"))
    with open(os.path.join(sink_root, "main", "nix-cache-info"), "w") as f:
        f.write("StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n")
    sink = start_nginx(work, "sink", sink_root, "/main/nix-cache-info",
                       "location / { if ($request_method = PUT) { return 200; } }")
    r["push_sink_zstd"] = push(work, sink + "/main?compression=zstd", v1)
    stop(sink)
    if not args.skip_xz:
        xz_server = Cachet(work, "cachet-xz")
        cpu0 = cpu_seconds(xz_server.proc.pid)
        r["xz_mib"] = sum(p["narSize"] for p in json.loads(sh("nix", "path-info", "--json", "-r", xz_closure))) / 2**20
        r["push_cachet_xz"] = push(work, xz_server.url, xz_closure, xz_server.netrc)
        r["push_cachet_xz_cpu"] = cpu_seconds(xz_server.proc.pid) - cpu0
        xz_server.stop()
        r["push_file_xz"] = push(work, "file://%s" % flat_xz, xz_closure)

    # Serving: nginx on the zstd file:// cache, sendfile, as a tuned static server.
    nginx_url = start_nginx(work, "static", flat_zstd, "/nix-cache-info")
    for conns in (1, 4):
        r["nginx_%d" % conns], r["cachet_%d" % conns] = fetch([nginx_url, main_server.url], hashes_file, conns, args.runs)
    stop(nginx_url)

    # Storage: the mass rebuild on top.
    store = os.path.join(main_server.data, "store")
    r["stored_v1"] = dir_bytes(store)
    r["push_cachet_zstd_v2"] = push(work, main_server.url + "?compression=zstd", v2, main_server.netrc)
    r["stored_v1_v2"] = dir_bytes(store)
    r["objects_v1_v2"] = sum(len(f) for _, _, f in os.walk(store))
    r["flat_v1"] = dir_bytes(os.path.join(flat_zstd, "nar"))
    push(work, "file://%s?compression=zstd" % flat_zstd, v2)
    r["flat_v1_v2"] = dir_bytes(os.path.join(flat_zstd, "nar"))
    r["flat_objects_v1_v2"] = len(os.listdir(os.path.join(flat_zstd, "nar")))
    r["peak_rss_mib"] = peak_rss_mib(main_server.proc.pid)
    main_server.stop()
    report(r)
    shutil.rmtree(work, ignore_errors=True)


def report(r):
    rows = []

    def row(name, ours, ref, target, unit="s"):
        ratio = ours / ref if ref else float("nan")
        ok = "ok" if target is None or ratio <= target else "MISSED"
        rows.append("| %s | %.3f %s | %.3f %s | %.2f | %s |" % (
            name, ours, unit, ref, unit, ratio, "-" if target is None else "<= %.2f %s" % (target, ok)))

    print("closure: %d paths, %.0f MiB of NARs" % (r["paths"], r["nar_mib"]))
    print("| measure | cachet | reference | ratio | target |")
    print("| --- | --- | --- | --- | --- |")
    for c in (1, 4):
        row("download, %d connection%s (vs nginx)" % (c, "s" if c > 1 else ""),
            r["cachet_%d" % c]["download_s"], r["nginx_%d" % c]["download_s"], 1.25)
    row("all narinfos, sequential (vs nginx)", r["cachet_1"]["narinfo_s"], r["nginx_1"]["narinfo_s"], 1.5)
    row("as many misses (vs cachet hits)", r["cachet_1"]["miss_s"], r["cachet_1"]["narinfo_s"], 1.0)
    row("push zstd (vs file:// zstd)", r["push_cachet_zstd"], r["push_file_zstd"], 1.3)
    row("push zstd to a discarding server (vs file:// zstd)", r["push_sink_zstd"], r["push_file_zstd"], None)
    if "xz_mib" in r:
        row("push xz default, %.0f MiB closure (vs file:// xz)" % r["xz_mib"], r["push_cachet_xz"], r["push_file_xz"], None)
    row("stored v1+v2 (vs v1)", r["stored_v1_v2"] / 2**20, r["stored_v1"] / 2**20, 1.2, "MiB")
    row("flat file cache v1+v2 (vs v1)", r["flat_v1_v2"] / 2**20, r["flat_v1"] / 2**20, None, "MiB")
    print("\n".join(rows))
    print("zstd push, CPU seconds: to cachet, client %.1f + server %.1f in %.1f s; to file://, client %.1f in %.1f s" % (
        r["push_cachet_zstd_client_cpu"], r["push_cachet_zstd_cpu"], r["push_cachet_zstd"],
        r["push_file_zstd_client_cpu"], r["push_file_zstd"]))
    if "xz_mib" in r:
        print("server CPU during the xz push: %.1f s of %.1f s" % (r["push_cachet_xz_cpu"], r["push_cachet_xz"]))
    print("objects stored for v1+v2: cachet %d, flat file cache %d" % (r["objects_v1_v2"], r["flat_objects_v1_v2"]))
    print("bytes downloaded: cachet %d, nginx %d" % (r["cachet_1"]["bytes"], r["nginx_1"]["bytes"]))
    print("peak RSS of cachet over the run: %.0f MiB (target < 256)" % r["peak_rss_mib"])
    print(json.dumps(r))


if __name__ == "__main__":
    main()
