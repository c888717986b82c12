#!/usr/bin/env bash
# Usage: scripts/nix-current.sh ROOT
#
# Makes (once) a Debian 13 (trixie) chroot at ROOT with Debian's nix-bin (Nix 2.26.x),
# so tests can drive a current Nix client against a server on loopback (a chroot shares
# the host's network). Prints ROOT on stdout. Idempotent: a complete chroot is marked by
# ROOT/.nix-current-complete, written last; an unfinished one (marked by
# ROOT/.nix-current-incomplete, written first) is wiped and redone. Concurrent callers
# are serialised by a lock on ROOT.lock; the setup log goes to ROOT.log.
#
# Must run as root. The whole setup runs in a private mount namespace, so the /proc,
# /sys and /dev mounts debootstrap makes go away with it, even if it is killed:
# nothing stays mounted. Needs network access to the Debian mirror (NIX_CURRENT_MIRROR,
# default http://deb.debian.org/debian) for the first setup only.
#
# Running Nix in it, from the host (checked with Nix 2.26.3): /dev needs nothing
# (debootstrap makes real device nodes), /etc/resolv.conf is not needed for 127.0.0.1
# (the chroot has no /etc/hosts: use 127.0.0.1, not localhost), HOME is not needed.
# Nix 2.26 does need /proc (it reads /proc/self/exe). Mount it, and this test's own /nix
# (HOST/nix) and scratch dir (HOST at /mnt), in a throw-away mount namespace per command,
# so nothing is left mounted even if the test is killed:
#   unshare --mount --propagation private sh -ec '
#     root=$1 host=$2; shift 2; mkdir -p "$host/nix"
#     mount -t proc proc "$root/proc"
#     mount --bind "$host/nix" "$root/nix"
#     mount --bind "$host" "$root/mnt"
#     exec chroot "$root" "$@"' sh "$ROOT" "$HOST" \
#     env -i PATH=/usr/bin:/bin HOME=/mnt/home XDG_CACHE_HOME=/mnt/cache \
#       NIX_CONFIG="$CONFIG" nix ...
set -euo pipefail

die() { echo "nix-current.sh: $*" >&2; exit 1; }

[ "$#" -eq 1 ] || die "usage: $0 ROOT"
[ "$(id -u)" = 0 ] || die "must run as root"
case "$1" in
  /*) ROOT="$1" ;;
  *) ROOT="$PWD/$1" ;;
esac
ROOT="${ROOT%/}"
[ -n "$ROOT" ] && [ "$ROOT" != / ] || die "refusing ROOT=/"

DONE="$ROOT/.nix-current-complete"
PARTIAL="$ROOT/.nix-current-incomplete"
if [ -f "$DONE" ]; then
  echo "$ROOT"
  exit 0
fi

if [ -z "${NIX_CURRENT_IN_NS:-}" ]; then
  self="$(readlink -f "${BASH_SOURCE[0]}")"
  NIX_CURRENT_IN_NS=1 exec unshare --mount --propagation private bash "$self" "$ROOT"
fi

mkdir -p "$(dirname "$ROOT")"
exec 9>"$ROOT.lock"
flock 9
if [ -f "$DONE" ]; then # another caller finished it while we waited
  echo "$ROOT"
  exit 0
fi

LOG="$ROOT.log"
: >"$LOG"
trap 'rc=$?; if [ "$rc" != 0 ]; then echo "nix-current.sh: setup failed (rc=$rc), end of $LOG:" >&2; tail -n 40 "$LOG" >&2; fi' EXIT

if [ -e "$ROOT" ] && [ -n "$(ls -A "$ROOT")" ]; then
  [ -f "$PARTIAL" ] || die "$ROOT is not empty and not an unfinished setup; remove it yourself"
  # Anything mounted below ROOT is only unmounted in this private namespace, so the
  # rm cannot reach through a bind mount into the host's files.
  findmnt -rn -o TARGET | awk -v p="$ROOT/" 'index($0, p) == 1' | sort -r |
    while read -r m; do umount -l "$m"; done
  if findmnt -rn -o TARGET | awk -v p="$ROOT/" 'index($0, p) == 1' | grep -q .; then
    die "could not unmount everything below $ROOT"
  fi
  find "$ROOT" -mindepth 1 -maxdepth 1 -exec rm -rf --one-file-system {} +
fi
mkdir -p "$ROOT"
touch "$PARTIAL"

if ! command -v debootstrap >/dev/null 2>&1; then
  { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y debootstrap; } >>"$LOG" 2>&1
fi

debootstrap --variant=minbase trixie "$ROOT" "${NIX_CURRENT_MIRROR:-http://deb.debian.org/debian}" >>"$LOG" 2>&1

in_root() {
  chroot "$ROOT" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
    DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8 "$@"
}
in_root apt-get install -y --no-install-recommends nix-bin >>"$LOG" 2>&1
in_root apt-get clean >>"$LOG" 2>&1
mount -t proc proc "$ROOT/proc" # Nix reads /proc/self/exe; gone with this namespace
version="$(in_root nix --version)"
case "$version" in
  "nix (Nix) 2."*) ;;
  *) die "unexpected nix --version in chroot: $version" ;;
esac

mkdir -p "$ROOT/nix" # a mount point for a per-test /nix (see above)
rm -f "$PARTIAL"
echo "$version" >"$DONE"
echo "$ROOT"
