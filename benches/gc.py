#!/usr/bin/env python3
"""Benchmark of the garbage collector's compaction with recompression, in one run:

- stored bytes of the benchmark closure, as served (`.nar.zst` frames), against the
  flat file:// zstd cache of the same closure, before and after a recompression pass;
- downloading the closure with 4 connections after it, against nginx serving the
  flat cache;
- a push (a salted rebuild, to another cache) and a full-closure download while the
  pass runs, against the same on the idle server just before.

    benches/gc.py                    # ~1 GiB closure
    benches/gc.py --budget-mib 128   # quick form

The gc scale figures (100,000 paths, 1,000,000 chunks) come from
`cargo run --release --example gc_scale` (see BENCHMARKS.md). Not part of the tests.
"""
import argparse, json, os, sys, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import e2e  # noqa: E402


api = e2e.admin_api


def cache_url(server, name):
    return server.url.rsplit("/", 1)[0] + "/" + name


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget-mib", type=int, default=1024, help="closure size (installed MiB)")
    ap.add_argument("--runs", type=int, default=5, help="fetch runs per measurement (median)")
    args = ap.parse_args()
    work = e2e.prepare("gc")
    closures = {salt: e2e.make_closure(work, args.budget_mib, salt) for salt in ("v1", "v3", "v4")}
    infos, hashes_file = e2e.closure_paths(work, closures["v1"])
    config = os.path.join(work, "cachet.toml")
    with open(config, "w") as f:
        # Every pack older than a second is recompressed by the next collection.
        f.write("[gc]\nrecompress_after_secs = 1\n")
    e2e.Cachet.config = config
    server = e2e.Cachet(work, "cachet")
    r = {"paths": len(infos), "nar_mib": sum(p["narSize"] for p in infos) / 2**20}
    flat = os.path.join(work, "flat-zstd")
    e2e.push(work, server.url + "?compression=zstd", closures["v1"], server.netrc)
    e2e.push(work, "file://%s?compression=zstd" % flat, closures["v1"])
    for c in ("p1", "p2"):
        api(server, "POST", "caches", {"name": c})
    r["flat"] = e2e.dir_bytes(os.path.join(flat, "nar"))
    r["served_before"] = api(server, "GET", "stats?cache=main")["stored_bytes"]
    r["packs_before"] = api(server, "GET", "stats")["stored_bytes"]

    nginx = e2e.start_nginx(work, "static", flat, "/nix-cache-info")
    r["nginx_4_before"], r["cachet_4_idle"] = e2e.fetch([nginx, server.url], hashes_file, 4, args.runs)
    r["push_idle"] = e2e.push(work, cache_url(server, "p1") + "?compression=zstd", closures["v3"], server.netrc)

    time.sleep(1.5)
    started = time.monotonic()
    job = api(server, "POST", "gc", {})["id"]
    busy = e2e.fetch([server.url], hashes_file, 4, args.runs)[0]
    r["push_busy"] = e2e.push(work, cache_url(server, "p2") + "?compression=zstd", closures["v4"], server.netrc)
    status = api(server, "GET", "jobs/%d" % job)
    r["busy_overlapped"] = not status["done"]
    r["cachet_4_busy"] = busy
    while not status["done"]:
        time.sleep(1)
        status = api(server, "GET", "jobs/%d" % job)
    r["gc_s"] = time.monotonic() - started
    r["gc"] = status["result"] or status["error"]
    r["served_after"] = api(server, "GET", "stats?cache=main")["stored_bytes"]
    r["packs_after"] = api(server, "GET", "stats")["stored_bytes"]
    r["nginx_4_after"], r["cachet_4_after"] = e2e.fetch([nginx, server.url], hashes_file, 4, args.runs)
    e2e.stop(nginx)
    r["peak_rss_mib"] = e2e.peak_rss_mib(server.proc.pid)
    server.stop()
    report(r)


def report(r):
    def row(name, ours, ref, target, unit):
        ratio = ours / ref if ref else float("nan")
        ok = "ok" if target is None or ratio <= target else "MISSED"
        print("| %s | %.3f %s | %.3f %s | %.2f | %s |" % (
            name, ours, unit, ref, unit, ratio, "-" if target is None else "<= %.2f %s" % (target, ok)))

    print("closure: %d paths, %.0f MiB of NARs" % (r["paths"], r["nar_mib"]))
    print("| measure | cachet | reference | ratio | target |")
    print("| --- | --- | --- | --- | --- |")
    row("served bytes before recompression (vs flat zstd)", r["served_before"] / 2**20, r["flat"] / 2**20, None, "MiB")
    row("served bytes after recompression (vs flat zstd)", r["served_after"] / 2**20, r["flat"] / 2**20, 1.1, "MiB")
    row("download, 4 connections, before (vs nginx)", r["cachet_4_idle"]["download_s"], r["nginx_4_before"]["download_s"], None, "s")
    row("download, 4 connections, after (vs nginx)", r["cachet_4_after"]["download_s"], r["nginx_4_after"]["download_s"], 1.1, "s")
    row("download during the pass (vs idle)", r["cachet_4_busy"]["download_s"], r["cachet_4_idle"]["download_s"], 1.2, "s")
    row("push of a rebuild during the pass (vs idle)", r["push_busy"], r["push_idle"], 1.2, "s")
    print("measurements made while the pass ran: %s; the pass took %.0f s" % (r["busy_overlapped"], r["gc_s"]))
    print("packs stored: %.1f MiB before, %.1f MiB after (with the two rebuilds pushed meanwhile)" % (
        r["packs_before"] / 2**20, r["packs_after"] / 2**20))
    print("peak RSS of cachet over the run: %.0f MiB" % r["peak_rss_mib"])
    print(json.dumps(r))


if __name__ == "__main__":
    e2e.run_and_clean(main)
