#!/usr/bin/env bash
# Runs the whole test suite. Installs what the tests drive when it is missing: the real
# Nix client (Debian's nix-bin, used single-user as root) and python3 for the closure
# generator. Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v nix >/dev/null 2>&1 || missing+=(nix-bin)
command -v python3 >/dev/null 2>&1 || missing+=(python3)
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing ${missing[*]}" >&2
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

cargo test "$@"
