#!/usr/bin/env bash
# Scaling from one poll thread (shard) to two: subnetstack's `http` example (a thread per
# connection over the runtime's handles; the in-loop server needs a single shard) on a TAP with
# 1 and with 2 queues, keep-alive and connection-close, wrk -t2 -c64, RUNS interleaved runs,
# medians, with the server's CPU per request.
#
# On a 2-core machine the client (wrk) and the kernel's TAP work share the same two cores, so
# the second shard can only show what it costs or saves, not a doubling.
#
# Needs root and wrk. Everything runs in namespaces this script creates, on 198.18.0.0/15 only;
# it ends only the processes it started.
#
#   sudo benches/shards.sh            # RUNS=3 DUR=5
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${RUNS:-3}
DUR=${DUR:-5}
TARGET=198.18.7.7
for tool in wrk ip; do
    command -v "$tool" >/dev/null || { echo "shards.sh: $tool is missing" >&2; exit 2; }
done
[ "$(id -u)" = 0 ] || { echo "shards.sh: needs root (namespaces, TAP)" >&2; exit 2; }

cargo build --release --example http >/dev/null
HTTP=target/release/examples/http
TMP=$(mktemp -d)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    for ns in sst-shard-1 sst-shard-2; do ip netns del "$ns" 2>/dev/null || true; done
    rm -rf "$TMP"
}
trap cleanup EXIT

serve() {
    local ns=$1 queues=$2
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    if [ "$queues" -gt 1 ]; then
        ip netns exec "$ns" ip tuntap add mode tap name "$ns" multi_queue
    else
        ip netns exec "$ns" ip tuntap add mode tap name "$ns"
    fi
    ip -n "$ns" link set "$ns" up
    ip -n "$ns" addr add 198.19.255.1/24 dev "$ns"
    ip -n "$ns" route add 198.18.0.0/16 via 198.19.255.2 dev "$ns"
    ip netns exec "$ns" "$HTTP" --queues "$queues" --tap "$ns" --prefix 198.18.0.0/16 \
        --prefix 198.19.255.2/32 --gateway 198.19.255.1 --bind tcp:198.18.0.0/16:80 \
        --fixed-body "hello" >"$TMP/$ns.log" 2>&1 &
    PIDS+=($!)
}
serve sst-shard-1 1
PID_1=${PIDS[-1]}
serve sst-shard-2 2
PID_2=${PIDS[-1]}
for ns in sst-shard-1 sst-shard-2; do
    for _ in $(seq 100); do
        [ "$(ip netns exec "$ns" curl -s --max-time 1 "http://$TARGET/" || true)" = hello ] && break
        sleep 0.1
    done
done

ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
HZ=$(getconf CLK_TCK)
# One run: "req/s server_us_per_req".
run() {
    local ns=$1 pid=$2 close=$3 hdr=() t0 t1 out
    [ "$close" = 1 ] && hdr=(-H "Connection: close")
    t0=$(ticks "$pid")
    out=$(ip netns exec "$ns" wrk -t2 -c64 -d"${DUR}s" "${hdr[@]}" "http://$TARGET/")
    t1=$(ticks "$pid")
    echo "$out" | awk -v t=$((t1 - t0)) -v hz="$HZ" '
        /requests in/ { n = $1 } /Requests\/sec/ { r = $2 }
        END { printf "%.0f %.2f\n", r, t * 1e6 / hz / n }'
}
median() { sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
declare -A RES
for close in 0 1; do
    for i in $(seq "$RUNS"); do
        RES[1,$close]+="$(run sst-shard-1 "$PID_1" "$close")"$'\n'
        RES[2,$close]+="$(run sst-shard-2 "$PID_2" "$close")"$'\n'
    done
done
col() { echo -n "${RES[$1,$2]}" | awk -v c="$3" 'NF {print $c}' | median; }
echo
echo "Shards, $(date -u +%Y-%m-%d), medians of $RUNS interleaved runs of ${DUR}s, wrk -t2 -c64:"
echo
echo "| test | shards (TAP queues) | req/s | server CPU µs/req |"
echo "|---|---:|---:|---:|"
for close in 0 1; do
    name=$([ "$close" = 0 ] && echo keep-alive || echo "connection close")
    for q in 1 2; do
        echo "| $name | $q | $(col "$q" "$close" 1) | $(col "$q" "$close" 2) |"
    done
done
