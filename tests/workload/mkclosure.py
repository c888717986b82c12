#!/usr/bin/env python3
"""Builds a realistic Nix closure for cachet's tests and benchmarks.

Every Debian package installed on this machine can become one store path holding the
package's files (real ELF binaries, libraries, scripts, data), referring to the store
paths of the packages it depends on. The result has the shape of a nixpkgs closure:
hundreds of paths of very different sizes and a reference graph.

--salt models a mass rebuild: it changes every store path, and inside the files it
rewrites the bytes where real Nix outputs carry store-path hashes (an ELF file's
interpreter/RPATH area and string tables, a script's shebang line). Everything else is
byte-identical between salts, which is what chunk-level deduplication should find.

Usage: mkclosure.py --budget-mib 32 --salt v1 --out-link /tmp/closure
Prints the top-level store path. Needs nix-bin (nix-build) and dpkg; runs as root.
"""
import argparse
import hashlib
import os
import subprocess
import sys
import tempfile

# The builder, run by nix-build for every package with this interpreter.
BUILDER = r'''
import hashlib, os, shutil, subprocess, sys
out, pkg, salt, deps = (os.environ[k] for k in ("out", "pkg", "salt", "deps"))
os.makedirs(out + "/nix-support")
listed = subprocess.run(["/usr/bin/dpkg-query", "-L", pkg], capture_output=True, text=True).stdout.split("\n")
seen = set()
for path in listed:
    if not path.startswith("/") or not (os.path.islink(path) or os.path.isfile(path)):
        continue
    real = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
    if real in seen:
        continue
    seen.add(real)
    dest = out + real
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    try:
        if os.path.islink(real):
            os.symlink(os.readlink(real), dest)
        else:
            shutil.copyfile(real, dest)
            os.chmod(dest, 0o755 if os.access(real, os.X_OK) else 0o644)
    except OSError:
        pass
stamp = hashlib.sha256((salt + "/" + pkg).encode()).hexdigest()[:32].encode()
for root, _, files in os.walk(out):
    for name in files:
        f = os.path.join(root, name)
        if os.path.islink(f):
            continue
        size = os.path.getsize(f)
        with open(f, "r+b") as fh:
            head = fh.read(4)
            if head == b"\x7fELF":
                spots = [1024, size // 2] if size >= 4096 else []
            elif head[:2] == b"#!":
                spots = [2]
            else:
                spots = []
            for at in spots:
                fh.seek(at)
                fh.write(stamp[: max(0, size - at)])
with open(out + "/nix-support/depends", "w") as fh:
    fh.write(deps + "\n")
with open(out + "/nix-support/salt", "w") as fh:
    fh.write(salt + "\n")
'''


def installed_packages():
    fmt = "${Package}\t${Installed-Size}\t${Status}\t${Depends}, ${Pre-Depends}\n"
    out = subprocess.run(["dpkg-query", "-W", "-f", fmt], check=True, capture_output=True, text=True).stdout
    pkgs = {}
    for line in out.splitlines():
        name, size, status, deps = (line.split("\t") + ["", "", ""])[:4]
        if "installed" not in status.split():
            continue
        names = set()
        for dep in deps.split(","):
            dep = dep.split("|")[0].strip()
            if dep:
                names.add(dep.split()[0].split(":")[0])
        pkgs[name] = (int(size or 0), names)
    return pkgs


def choose(pkgs, budget_kib, max_kib):
    """Dependencies before dependents, until the budget is used."""
    order, visiting = [], set()

    def visit(p):
        if p in visiting:
            return
        visiting.add(p)
        for d in sorted(pkgs[p][1]):
            if d in pkgs:
                visit(d)
        order.append(p)

    for p in sorted(pkgs):
        visit(p)
    chosen, total = [], 0
    for p in order:
        size = pkgs[p][0]
        if size > max_kib or total + size > budget_kib:
            continue
        chosen.append(p)
        total += size
    return chosen, total


def expression(chosen, pkgs, salt, python, builder):
    index = {p: i for i, p in enumerate(chosen)}
    out = ["let", "  mk = pkg: deps: derivation {",
           '    name = pkg; inherit pkg deps; salt = "%s";' % salt,
           "    system = builtins.currentSystem;",
           '    builder = "%s";' % python,
           '    args = [ "%s" ];' % builder,
           "  };"]
    for p in chosen:
        deps = " ".join("p%d" % index[d] for d in sorted(pkgs[p][1]) if index.get(d, len(chosen)) < index[p])
        out.append('  p%d = mk "%s" [ %s ];' % (index[p], p, deps))
    out.append("in derivation {")
    out.append('  name = "closure-%s"; system = builtins.currentSystem;' % salt)
    out.append('  builder = "/bin/sh"; members = [ %s ];' % " ".join("p%d" % i for i in range(len(chosen))))
    out.append('  args = [ "-c" "echo $members > $out" ];')
    out.append("}")
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget-mib", type=int, default=64, help="installed size to include (MiB)")
    ap.add_argument("--max-package-mib", type=int, default=100, help="leave out larger packages")
    ap.add_argument("--salt", default="v1", help="changes every store path, as a mass rebuild does")
    ap.add_argument("--out-link", help="keep a GC root here")
    args = ap.parse_args()

    pkgs = installed_packages()
    chosen, total = choose(pkgs, args.budget_mib * 1024, args.max_package_mib * 1024)
    work = tempfile.mkdtemp(prefix="mkclosure-")
    builder = os.path.join(work, "builder.py")
    with open(builder, "w") as f:
        f.write(BUILDER)
    # The builder's own path must not vary between runs, or every derivation changes.
    stable = os.path.join(tempfile.gettempdir(), "mkclosure-builder-%s.py" % hashlib.sha256(BUILDER.encode()).hexdigest()[:12])
    os.replace(builder, stable)
    expr = os.path.join(work, "closure.nix")
    with open(expr, "w") as f:
        f.write(expression(chosen, pkgs, args.salt, sys.executable, stable))

    env = dict(os.environ)
    env["NIX_CONFIG"] = env.get("NIX_CONFIG", "") + (
        "\nexperimental-features = nix-command\nsandbox = false\nsubstituters =\nbuild-users-group =\n")
    cmd = ["nix-build", expr, "--quiet", "--max-jobs", str(os.cpu_count() or 2)]
    cmd += ["--out-link", args.out_link] if args.out_link else ["--no-out-link"]
    print("building %d packages (%d MiB installed)" % (len(chosen), total // 1024), file=sys.stderr)
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        sys.stderr.write(res.stderr[-4000:])
        sys.exit(res.returncode)
    print(res.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
