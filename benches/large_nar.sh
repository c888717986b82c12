#!/usr/bin/env bash
# A NAR of --size-mib (default 1024) through cachet and back, with the server's peak
# memory: pushed with `nix copy --to ...?compression=zstd`, downloaded by 16 clients at
# once, and pulled into a fresh store with signatures required. Prints a summary and
# exits non-zero if anything fails or the peak RSS reaches --max-rss-mib (256).
#
#   benches/large_nar.sh [--size-mib 1024] [--max-rss-mib 256]
set -euo pipefail
size_mib=1024
max_rss_mib=256
while [ $# -gt 0 ]; do
  case "$1" in
    --size-mib) size_mib=$2; shift 2 ;;
    --max-rss-mib) max_rss_mib=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done

root=$(cd "$(dirname "$0")/.." && pwd)
command -v nix >/dev/null || { apt-get update -qq && apt-get install -y -qq nix-bin >/dev/null; }
command -v curl >/dev/null || { apt-get update -qq && apt-get install -y -qq curl >/dev/null; }
cargo build --release --quiet --manifest-path "$root/Cargo.toml" --bin cachet
bin="$root/target/release/cachet"

work=$(mktemp -d)
server_pid=
cleanup() { [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
export NIX_CONFIG='experimental-features = nix-command
sandbox = false
substituters =
build-users-group ='

# The payload: random files (incompressible, so nothing is deduplicated or shrunk).
mkdir -p "$work/payload"
files=$(( size_mib / 64 )); [ "$files" -ge 1 ] || files=1
per_file=$(( size_mib / files ))
for i in $(seq 1 "$files"); do
  head -c "$(( per_file * 1024 * 1024 ))" /dev/urandom > "$work/payload/part-$i"
done
path=$(nix-store --add "$work/payload")
nar_size=$(nix path-info --json "$path" | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["narSize"])')

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$bin" --listen "127.0.0.1:$port" --data-dir "$work/data" --log warn > "$work/server.log" 2>&1 &
server_pid=$!
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/main/nix-cache-info" >/dev/null && break; sleep 0.1; done
url="http://127.0.0.1:$port/main"
echo "machine 127.0.0.1 password $(cat "$work/data/admin-token")" > "$work/netrc"
key=$(curl -sf "http://127.0.0.1:$port/_api/v1/caches/main" | python3 -c 'import json,sys; print(json.load(sys.stdin)["public_key"])')
peak() { awk '/VmHWM/ {print int($2/1024)}' "/proc/$server_pid/status"; }
since() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN {printf "%.1f", b - a}'; }

start=$(date +%s.%N)
XDG_CACHE_HOME="$work/push-cache" nix copy --option netrc-file "$work/netrc" --to "$url?compression=zstd" "$path"
push_s=$(since "$start")
rss_push=$(peak)

narinfo=$(curl -sf "$url/$(basename "$path" | cut -c1-32).narinfo")
nar_url=$(echo "$narinfo" | sed -n 's/^URL: //p')
start=$(date +%s.%N)
pids=()
for _ in $(seq 16); do curl -sf -o /dev/null "$url/$nar_url" & pids+=($!); done
for p in "${pids[@]}"; do wait "$p"; done
serve_s=$(since "$start")
rss_serve=$(peak)

start=$(date +%s.%N)
XDG_CACHE_HOME="$work/pull-cache" nix copy --option require-sigs true --option trusted-public-keys "$key" \
  --from "$url" --to "$work/store" "$path"
pull_s=$(since "$start")
got=$(nix path-info --store "$work/store" --json "$path" | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["narHash"])')
want=$(nix path-info --json "$path" | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["narHash"])')
rss=$(peak)
nix-store --delete "$path" >/dev/null 2>&1 || true

printf 'NAR size:            %d MiB\n' $(( nar_size / 1024 / 1024 ))
printf 'push (zstd):         %s s\n' "$push_s"
printf '16 downloads:        %s s\n' "$serve_s"
printf 'pull (verified):     %s s\n' "$pull_s"
printf 'peak RSS:            %d MiB after push, %d MiB after 16 downloads, %d MiB at the end\n' "$rss_push" "$rss_serve" "$rss"
[ "$got" = "$want" ] || { echo "NarHash mismatch: $got != $want" >&2; exit 1; }
echo "NarHash matches: $got"
[ "$rss" -lt "$max_rss_mib" ] || { echo "peak RSS $rss MiB is not under $max_rss_mib MiB" >&2; exit 1; }
