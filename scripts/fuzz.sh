#!/usr/bin/env bash
# Runs every fuzz target for a bounded time (default 60 s each; `scripts/fuzz.sh 600`
# for ten minutes each, or name targets after the time). Installs cargo-fuzz when it is
# missing; builds with the machine's stable toolchain (RUSTC_BOOTSTRAP=1 lets it take
# the sanitizer flags). Each target starts from seeds made of the golden files and of
# small valid inputs, in a corpus kept under target/fuzz-corpus between runs. A crash
# is saved under fuzz/artifacts/<target>/ and makes the script fail: add it to a
# regression test, then fix it.
set -euo pipefail
cd "$(dirname "$0")/.."

secs="${1:-60}"
shift || true
targets=("$@")
[ "${#targets[@]}" -gt 0 ] || targets=(nar narinfo names decoder admin_json)

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz" >&2
  cargo install cargo-fuzz --locked --quiet
fi
export RUSTC_BOOTSTRAP=1

corpus_root="$PWD/target/fuzz-corpus"
golden="$PWD/tests/fixtures/golden"
seed() {
  local target="$1" dir="$corpus_root/$1"
  mkdir -p "$dir"
  case "$target" in
    nar)
      for f in "$golden"/*.nar.xz; do xz -dc "$f" > "$dir/$(basename "$f" .xz)"; done ;;
    narinfo)
      cp "$golden"/*.narinfo "$dir/" ;;
    names)
      for f in "$golden"/*; do printf '%s' "$(basename "$f")" > "$dir/name-$(basename "$f")"; done
      printf '/nix/store/amhfscnw2qd9i5di3h12m34ryr5zf403-hello-2.12' > "$dir/full"
      printf 'sha256:%064d!out.doi' 0 > "$dir/realisation"
      printf 'amhfscnw2qd9i5di3h12m34ryr5zf403-hello.drv/out.doi' > "$dir/trace" ;;
    decoder)
      for f in "$golden"/*.nar.xz; do { printf '\001'; cat "$f"; } > "$dir/xz-$(basename "$f")"; done
      for f in "$golden"/*.nar.xz; do { printf '\002'; xz -dc "$f" | zstd -q -c; } > "$dir/zst-$(basename "$f")"; done
      for f in "$golden"/*.nar.xz; do { printf '\003'; xz -dc "$f" | bzip2 -c; } > "$dir/bz2-$(basename "$f")"; done ;;
    admin_json)
      printf '\000{"name":"team-x","public":false,"quota_bytes":1073741824}' > "$dir/create"
      printf '\001{"quota_bytes":null,"max_age_secs":86400}' > "$dir/change"
      printf '\002{"name":"ci","permissions":["push"],"caches":["team-*"],"expires_in_secs":60}' > "$dir/token"
      printf '\003{"paths":["/nix/store/amhfscnw2qd9i5di3h12m34ryr5zf403-hello"],"with_referrers":true}' > "$dir/delete"
      printf '\004{"cache":"main","dry_run":true,"compact":true}' > "$dir/gc" ;;
  esac
}

failed=()
for t in "${targets[@]}"; do
  seed "$t"
  echo "fuzzing $t for ${secs}s" >&2
  if ! cargo fuzz run --fuzz-dir fuzz "$t" "$corpus_root/$t" -- \
      -max_total_time="$secs" -rss_limit_mb=2048 -max_len=1048576 -print_final_stats=1 \
      2> "target/fuzz-$t.log"; then
    failed+=("$t")
    tail -40 "target/fuzz-$t.log" >&2
  fi
  grep -E "^(stat::number_of_executed_units|stat::peak_rss_mb)" "target/fuzz-$t.log" \
    | sed "s/^/$t: /" >&2 || true
done
if [ "${#failed[@]}" -gt 0 ]; then
  echo "crashes in: ${failed[*]} (inputs under fuzz/artifacts/)" >&2
  exit 1
fi
echo "no crash in ${targets[*]} (${secs}s each)" >&2
