#!/usr/bin/env bash
# Builds the fuzz targets with libFuzzer's coverage instrumentation on the stable toolchain and
# runs each for SECONDS (default 60) on a copy of its checked-in seed corpus.
#
#   fuzz/run.sh [SECONDS] [TARGET...]     # targets: demux_ops stack_frames tcp_conversation
#
# RUSTC_BOOTSTRAP=1 unlocks the unstable flags cargo-fuzz would pass (no nightly toolchain
# needed, no cargo-fuzz either); FUZZ_ASAN=1 adds AddressSanitizer. A crash leaves its input in
# fuzz/artifacts/TARGET/ and fails the script: add the input to fuzz/corpus/TARGET/ (the test
# suite replays every corpus file) and a test for the fix.
set -euo pipefail
cd "$(dirname "$0")"

secs=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(demux_ops stack_frames tcp_conversation)
triple=$(rustc -vV | awk '/^host:/ {print $2}')

flags="--cfg fuzzing -Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4"
flags+=" -Cllvm-args=-sanitizer-coverage-inline-8bit-counters"
flags+=" -Cllvm-args=-sanitizer-coverage-pc-table -Cllvm-args=-sanitizer-coverage-trace-compares"
flags+=" -Cdebug-assertions -Coverflow-checks -Ctarget-cpu=x86-64-v2"
[ -n "${FUZZ_ASAN:-}" ] && flags+=" -Zsanitizer=address"
export RUSTC_BOOTSTRAP=1 RUSTFLAGS="$flags"
# --target keeps build scripts and proc macros uninstrumented.
cargo build --release --target "$triple" --bins

status=0
for t in "${targets[@]}"; do
    work=$(mktemp -d)
    cp "corpus/$t"/* "$work"/
    mkdir -p "artifacts/$t"
    echo "== fuzz $t for ${secs}s (seed corpus: $(ls "corpus/$t" | wc -l) inputs)"
    # A fixed seed (FUZZ_SEED, default 1) so that CI explores the same way each run; set
    # another to explore elsewhere.
    if ! "target/$triple/release/$t" -seed="${FUZZ_SEED:-1}" -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 \
        -artifact_prefix="artifacts/$t/" -print_final_stats=1 "$work" >"$work.log" 2>&1; then
        status=1
        echo "!! $t failed; its input is in fuzz/artifacts/$t/:"
        tail -n 40 "$work.log"
    else
        grep -E "^#[0-9]+.*DONE|stat::number_of_executed_units|cov:" "$work.log" | tail -n 2
    fi
    rm -rf "$work" "$work.log"
done
exit "$status"
