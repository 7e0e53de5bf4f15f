#!/usr/bin/env bash
# Frames per request: how many frames the `http --in-loop` example over a TAP receives and sends
# per keep-alive request and per `Connection: close` request (wrk -t1 -c64, DUR seconds each),
# from the stack's counters (its /metrics page). Over a TAP every frame is one read or write
# system call and one pass through the kernel's own TCP for the client, so this is what the
# server's CPU per request mostly follows.
#
# Needs root and wrk. Runs in a network namespace it creates, on 198.18.0.0/15 only; ends only
# the server it started.
#
#   sudo benches/frames.sh        # DUR=3 by default
set -euo pipefail
cd "$(dirname "$0")/.."
DUR=${DUR:-3}
command -v wrk >/dev/null || { echo "frames.sh: wrk is missing" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "frames.sh: needs root (namespace, TAP)" >&2; exit 2; }
cargo build --release --example http >/dev/null 2>&1
HTTP=target/release/examples/http
NS=sst-frames
TARGET=198.18.7.7
PID=
cleanup() {
    [ -n "$PID" ] && kill "$PID" 2>/dev/null && wait "$PID" 2>/dev/null
    ip netns del "$NS" 2>/dev/null || true
}
trap cleanup EXIT
ip netns add "$NS"
ip -n "$NS" link set lo up
ip netns exec "$NS" ip tuntap add mode tap name sst-fr0
ip -n "$NS" link set sst-fr0 up
ip -n "$NS" addr add 198.19.255.1/24 dev sst-fr0
ip -n "$NS" route add 198.18.0.0/16 via 198.19.255.2 dev sst-fr0
ip netns exec "$NS" "$HTTP" --in-loop --tap sst-fr0 --prefix 198.18.0.0/16 --prefix 198.19.255.2/32 \
    --gateway 198.19.255.1 --bind tcp:198.18.0.0/16:80 --fixed-body 'hello, world
' >/dev/null 2>&1 &
PID=$!
for _ in $(seq 50); do
    ip netns exec "$NS" curl -s -o /dev/null "http://$TARGET/" && break
    sleep 0.1
done
frames() {
    ip netns exec "$NS" curl -s "http://$TARGET/metrics" |
        awk '/^subnetstack_rx_frames_total/ {r = $2} /^subnetstack_tx_frames_total/ {t = $2} END {print r, t}'
}
echo "| requests | frames in per request | frames out per request |"
echo "|---|---:|---:|"
for mode in keep-alive close; do
    hdr=()
    [ "$mode" = close ] && hdr=(-H "Connection: close")
    read -r r0 t0 < <(frames)
    n=$(ip netns exec "$NS" wrk -t1 -c64 -d"${DUR}s" "${hdr[@]}" "http://$TARGET/" | awk '/requests in/ {print $1}')
    read -r r1 t1 < <(frames)
    # The two metrics requests themselves are a few frames: negligible against n.
    awk -v m="$mode" -v n="$n" -v r=$((r1 - r0)) -v t=$((t1 - t0)) \
        'BEGIN { printf "| %s | %.2f | %.2f |\n", m, r / n, t / n }'
done
