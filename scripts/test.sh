#!/usr/bin/env bash
# Runs the whole test suite. Installs what the tests drive when it is missing: the real
# Nix client (Debian's nix-bin, used single-user as root), python3 for the closure
# generator, Chromium for the page test, and a current Nix client (Debian 13's
# nix-bin in a chroot, made once by scripts/nix-current.sh and kept in
# $CACHET_NIX_CURRENT, default /var/tmp/cachet-nix-current), and Garage, the S3 store
# the S3 tests start on loopback ports (built once with `cargo install`, about 15
# minutes), and PostgreSQL's server binaries (Debian's postgresql; the tests start their
# own clusters in temporary directories, as the postgres user, and stop them), and nginx
# (the round-robin front of the replica tests, started on a loopback port). Runs as
# root: the tests use Nix single-user, chroots and a small tmpfs.
# Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v nix >/dev/null 2>&1 || missing+=(nix-bin)
command -v python3 >/dev/null 2>&1 || missing+=(python3)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v nginx >/dev/null 2>&1 || missing+=(nginx-light)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing ${missing[*]}" >&2
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
  # Debian's package starts a cluster of its own where it can; the tests run theirs.
  # Nor its web server.
  if command -v systemctl >/dev/null 2>&1; then $sudo systemctl stop nginx 2>/dev/null || true; fi
  if command -v pg_lsclusters >/dev/null 2>&1; then
    pg_lsclusters -h | while read -r version cluster _; do
      $sudo pg_ctlcluster "$version" "$cluster" stop 2>/dev/null || true
    done
  fi
fi

if ! command -v garage >/dev/null 2>&1; then
  echo "installing garage (cargo install garage --locked, about 15 minutes)" >&2
  cargo install garage --version 2.5.0 --locked --quiet
fi

export CACHET_NIX_CURRENT="${CACHET_NIX_CURRENT:-/var/tmp/cachet-nix-current}"
scripts/nix-current.sh "$CACHET_NIX_CURRENT" >/dev/null

cargo test "$@"
