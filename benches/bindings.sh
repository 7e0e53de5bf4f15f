#!/usr/bin/env bash
# Does the number of bindings matter? The connection-close rate (one TCP connection per request,
# wrk -t1 -c64) of subnetstack's `http --in-loop` example over a TAP with 1 binding, and with
# 1 + 1,000,000 bindings (random IPv4 /24 to /32 prefixes on port 80, none
# covering the target: bindings are table entries, no traffic goes to them), RUNS interleaved runs each, medians. Also prints how long the million
# binds took and the server's resident memory.
#
# Needs root and wrk. Everything runs in namespaces this script creates, on 198.18.0.0/15 only;
# it ends only the processes it started.
#
#   sudo benches/bindings.sh            # RUNS=3 DUR=5 EXTRA=1000000
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${RUNS:-3}
DUR=${DUR:-5}
EXTRA=${EXTRA:-1000000}
TARGET=198.18.7.7
for tool in wrk ip; do
    command -v "$tool" >/dev/null || { echo "bindings.sh: $tool is missing" >&2; exit 2; }
done
[ "$(id -u)" = 0 ] || { echo "bindings.sh: needs root (namespaces, TAP)" >&2; exit 2; }

cargo build --release --example http >/dev/null
HTTP=target/release/examples/http
TMP=$(mktemp -d)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    for ns in sst-bind-1 sst-bind-m; do ip netns del "$ns" 2>/dev/null || true; done
    rm -rf "$TMP"
}
trap cleanup EXIT

# One namespace per server: a TAP, its kernel side, the prefix routed via the stack.
serve() {
    local ns=$1 extra=$2
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    ip netns exec "$ns" ip tuntap add mode tap name "$ns"
    ip -n "$ns" link set "$ns" up
    ip -n "$ns" addr add 198.19.255.1/24 dev "$ns"
    ip -n "$ns" route add 198.18.0.0/16 via 198.19.255.2 dev "$ns"
    ip netns exec "$ns" "$HTTP" --in-loop --tap "$ns" --prefix 198.18.0.0/16 \
        --prefix 198.19.255.2/32 --gateway 198.19.255.1 --bind tcp:198.18.0.0/16:80 \
        --fixed-body "hello" --extra-bindings "$extra" >"$TMP/$ns.log" 2>&1 &
    PIDS+=($!)
}
serve sst-bind-1 0
PID_1=${PIDS[-1]}
serve sst-bind-m "$EXTRA"
PID_M=${PIDS[-1]}
for ns in sst-bind-1 sst-bind-m; do
    for _ in $(seq 600); do
        [ "$(ip netns exec "$ns" curl -s --max-time 1 "http://$TARGET/" || true)" = hello ] && break
        sleep 0.2
    done
done

rate() {
    ip netns exec "$1" wrk -t1 -c64 -d"${DUR}s" -H "Connection: close" "http://$TARGET/" |
        awk '/Requests\/sec/ {print $2}'
}
median() { sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
R1="" RM=""
for i in $(seq "$RUNS"); do
    R1+="$(rate sst-bind-1)"$'\n'
    RM+="$(rate sst-bind-m)"$'\n'
done
m1=$(echo -n "$R1" | median)
mm=$(echo -n "$RM" | median)
rss() { awk '/VmRSS/ {print $2 / 1024}' "/proc/$1/status"; }
echo
echo "Bindings vs connection-close rate, $(date -u +%Y-%m-%d), medians of $RUNS interleaved runs of ${DUR}s (wrk -t1 -c64):"
echo
echo "| bindings | connections/s | server RSS (MiB) |"
echo "|---:|---:|---:|"
echo "| 1 | $m1 | $(rss "$PID_1") |"
echo "| $((EXTRA + 1)) | $mm | $(rss "$PID_M") |"
awk -v a="$m1" -v b="$mm" 'BEGIN { printf "\nratio (1M / 1): %.3f (%+.1f %%)\n", b / a, (b / a - 1) * 100 }'
grep -h "extra bindings" "$TMP"/*.log || true
