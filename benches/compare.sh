#!/usr/bin/env bash
# Side by side: the same HTTP client runs against
#   (a) subnetstack's `http` example over a TAP (a fixed 13-byte body),
#   (x) the same over AF_XDP on a veth pair (native XDP, copy mode: veth has no zero-copy),
#   (s) smoltcp 0.14 over a TAP (benches/smoltcp_http.rs: the same answers, one poll thread), and
#   (b) the Linux kernel: nginx, one worker, the same 13-byte body, bound to 0.0.0.0:80 with
#       AnyIP (`ip route add local 198.18.0.0/16 dev lo`), reached from a client namespace over
#       a veth pair.
# Keep-alive (`wrk -t1 -c64`), connection-close (the same with `Connection: close`) and a 1 GiB
# download (curl), RUNS runs each, interleaved, medians; server CPU per request from /proc/PID/stat, whole-machine CPU
# per request from /proc/stat (the client shares the 2 cores: CPU per request is the fair figure).
#
# Needs root, wrk, nginx and ethtool (`apt-get install wrk nginx-light ethtool`). Everything runs inside network
# namespaces this script creates, on 198.18.0.0/15 only; it ends only the processes it started.
#
#   sudo benches/compare.sh            # RUNS=3 DUR=5 by default
#   RUNS=5 DUR=10 sudo -E benches/compare.sh
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${RUNS:-3}
DUR=${DUR:-5}
BODY='hello, world
'  # 13 bytes
TARGET=198.18.7.7
for tool in wrk nginx ip ethtool; do
    command -v "$tool" >/dev/null || { echo "compare.sh: $tool is missing" >&2; exit 2; }
done
[ "$(id -u)" = 0 ] || { echo "compare.sh: needs root (namespaces, TAP)" >&2; exit 2; }

cargo build --release --example http >/dev/null
HTTP=target/release/examples/http
SMOLTCP=$(cargo build --release --bench smoltcp_http --message-format=json 2>/dev/null |
    grep -o '"executable":"[^"]*smoltcp_http[^"]*"' | tail -1 | cut -d'"' -f4)
[ -x "$SMOLTCP" ] || { echo "compare.sh: could not build benches/smoltcp_http.rs" >&2; exit 1; }
TMP=$(mktemp -d)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    for ns in sst-cmp-a sst-cmp-x sst-cmp-s sst-cmp-t sst-cmp-k sst-cmp-c; do ip netns del "$ns" 2>/dev/null || true; done
    rm -rf "$TMP"
}
trap cleanup EXIT

# (a) subnetstack: the client namespace holds the TAP's kernel side.
ip netns add sst-cmp-a
ip -n sst-cmp-a link set lo up
ip netns exec sst-cmp-a ip tuntap add mode tap name sst-cmp0
ip -n sst-cmp-a link set sst-cmp0 up
ip -n sst-cmp-a addr add 198.19.255.1/24 dev sst-cmp0
ip -n sst-cmp-a route add 198.18.0.0/16 via 198.19.255.2 dev sst-cmp0
ip netns exec sst-cmp-a "$HTTP" --in-loop ${POLL:+--poll $POLL} --tap sst-cmp0 --prefix 198.18.0.0/16 --prefix 198.19.255.2/32 \
    --gateway 198.19.255.1 --bind tcp:198.18.0.0/16:80 --fixed-body "$BODY" \
    >"$TMP/http.log" 2>&1 &
PIDS+=($!)
PID_A=$!

# (x) subnetstack on AF_XDP: both ends of a veth in one namespace, like the TAP above; the
# kernel's end sends finished checksums and no GSO (AF_XDP hands frames over as they are).
ip netns add sst-cmp-x
ip -n sst-cmp-x link set lo up
ip -n sst-cmp-x link add sst-cmpx1 type veth peer name sst-cmpx0
ip netns exec sst-cmp-x ethtool -K sst-cmpx0 tx off gso off >/dev/null
ip -n sst-cmp-x link set sst-cmpx0 up
ip -n sst-cmp-x link set sst-cmpx1 up
ip -n sst-cmp-x addr add 198.19.253.1/24 dev sst-cmpx0
ip -n sst-cmp-x route add 198.18.0.0/16 via 198.19.253.2 dev sst-cmpx0
ip netns exec sst-cmp-x "$HTTP" --in-loop ${POLL:+--poll $POLL} --xdp sst-cmpx1 --prefix 198.18.0.0/16 --prefix 198.19.253.2/32 \
    --gateway 198.19.253.1 --bind tcp:198.18.0.0/16:80 --fixed-body "$BODY" \
    >"$TMP/http-xdp.log" 2>&1 &
PIDS+=($!)
PID_X=$!

# (s) smoltcp on a TAP, set up as (a). Its socket pool must hold every concurrent connection,
# and every poll walks the whole pool: 512 sockets for the tests with up to 400 connections,
# a second instance (t) with 10,240 for the 10,000-connection test.
smoltcp_ns() {
    local ns=$1 sockets=$2
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    ip netns exec "$ns" ip tuntap add mode tap name "${ns}0"
    ip -n "$ns" link set "${ns}0" up
    ip -n "$ns" link set "${ns}0" txqueuelen 65536
    ip -n "$ns" addr add 198.19.252.1/24 dev "${ns}0"
    ip -n "$ns" route add 198.18.0.0/16 via 198.19.252.2 dev "${ns}0"
    ip netns exec "$ns" "$SMOLTCP" --tap "${ns}0" --addr 198.19.252.2/24 --gateway 198.19.252.1 \
        --serve 198.18.0.0/16 --sockets "$sockets" --body "$BODY" >"$TMP/$ns.log" 2>&1 &
    PIDS+=($!)
}
smoltcp_ns sst-cmp-s 512
PID_S=${PIDS[-1]}
smoltcp_ns sst-cmp-t 10240
PID_T=${PIDS[-1]}

# (b) the kernel: nginx in its namespace, the client in another, a veth between.
ip netns add sst-cmp-k
ip netns add sst-cmp-c
ip link add sst-cmpv0 netns sst-cmp-c type veth peer name sst-cmpv1 netns sst-cmp-k
ip -n sst-cmp-c link set lo up
ip -n sst-cmp-k link set lo up
ip -n sst-cmp-c addr add 198.19.254.1/24 dev sst-cmpv0
ip -n sst-cmp-k addr add 198.19.254.2/24 dev sst-cmpv1
ip -n sst-cmp-c link set sst-cmpv0 up
ip -n sst-cmp-k link set sst-cmpv1 up
ip -n sst-cmp-k route add local 198.18.0.0/16 dev lo
ip -n sst-cmp-c route add 198.18.0.0/16 via 198.19.254.2
truncate -s 1G "$TMP/big"
chmod 755 "$TMP"; chmod 644 "$TMP/big"  # nginx's worker runs unprivileged
cat >"$TMP/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $TMP/nginx.pid;
error_log $TMP/nginx.err;
worker_rlimit_nofile 16384;
events { worker_connections 16384; }
http {
    access_log off;
    keepalive_requests 1000000;
    server {
        listen 80 backlog=4096;
        location = / { default_type text/plain; return 200 "hello, world\n"; }
        location = /big { alias $TMP/big; }
    }
}
EOF
ip netns exec sst-cmp-k nginx -c "$TMP/nginx.conf" -p "$TMP" &
PIDS+=($!)
PID_K=$!

# Wait until both answer.
for _ in $(seq 100); do
    a=$(ip netns exec sst-cmp-a curl -s --max-time 1 "http://$TARGET/" || true)
    x=$(ip netns exec sst-cmp-x curl -s --max-time 1 "http://$TARGET/" || true)
    s=$(ip netns exec sst-cmp-s curl -s --max-time 1 "http://$TARGET/" || true)
    [ "$(ip netns exec sst-cmp-t curl -s --max-time 1 "http://$TARGET/" || true)" = "hello, world" ] || s=""
    k=$(ip netns exec sst-cmp-c curl -s --max-time 1 "http://$TARGET/" || true)
    [ "$a" = "hello, world" ] && [ "$x" = "hello, world" ] && [ "$s" = "hello, world" ] &&
        [ "$k" = "hello, world" ] && break
    sleep 0.1
done
[ "$a" = "hello, world" ] && [ "$x" = "hello, world" ] && [ "$s" = "hello, world" ] &&
    [ "$k" = "hello, world" ] ||
    { echo "compare.sh: servers did not come up" >&2; tail -3 "$TMP"/http*.log >&2; exit 1; }

# CPU ticks (user + system) of a process with its threads and children (nginx's worker), and
# of the whole machine.
# `proc_ticks PID` is user + system; `proc_ticks PID 14` user only. On a TAP, system time
# includes the kernel's own TCP work for the client's packets (a TAP write delivers the frame
# into the kernel stack in the writer's context), which the server merely triggers.
proc_ticks() {
    local t=0 p
    for p in "$1" $(pgrep -P "$1" || true); do
        t=$((t + $(awk -v f="${2:-0}" '{print f ? $f : $14 + $15}' "/proc/$p/stat")))
    done
    echo "$t"
}
machine_busy() { awk '/^cpu / {print $2 + $3 + $4 + $7 + $8}' /proc/stat; }
HZ=$(getconf CLK_TCK)

# One wrk run: prints "requests req/s server_us_per_req machine_us_per_req errors
# server_user_us_per_req".
run() {
    local ns=$1 pid=$2 close=$3 conns=${4:-64}
    local hdr=()
    [ "$close" = 1 ] && hdr=(-H "Connection: close")
    local p0 m0 p1 m1 u0 u1 out
    p0=$(proc_ticks "$pid"); u0=$(proc_ticks "$pid" 14); m0=$(machine_busy)
    out=$(ip netns exec "$ns" wrk -t1 -c"$conns" -d"${DUR}s" "${hdr[@]}" "http://$TARGET/")
    p1=$(proc_ticks "$pid"); u1=$(proc_ticks "$pid" 14); m1=$(machine_busy)
    [ -n "${VERBOSE:-}" ] && echo "$ns close=$close: $out" >&2
    local reqs rps errs
    reqs=$(echo "$out" | awk '/requests in/ {print $1}')
    rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
    errs=$(echo "$out" | awk '/Socket errors/ {gsub(",", ""); print $4 + $6 + $8 + $10}')
    errs=${errs:-0}
    awk -v r="$reqs" -v s="$rps" -v p=$((p1 - p0)) -v m=$((m1 - m0)) -v hz="$HZ" -v e="$errs" \
        -v u=$((u1 - u0)) \
        'BEGIN { printf "%d %.0f %.2f %.2f %d %.2f\n", r, s, p * 1e6 / hz / r, m * 1e6 / hz / r, e, u * 1e6 / hz / r }'
}

median() { sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

declare -A RES
# Tests: keep-alive (64 connections), connection close (64), keep-alive with 400 and with
# 10,000 connections (wrk opens them all; errors count).
ulimit -n "$(ulimit -Hn)"  # wrk needs one descriptor per connection
TESTS=${TESTS:-"ka close c400 c10000"}
args_of() {
    case $1 in
        ka) echo "0 64" ;;
        close) echo "1 64" ;;
        c*) echo "0 ${1#c}" ;;
    esac
}
for t in $TESTS; do
    for i in $(seq "$RUNS"); do
        RES[a,$t]+="$(run sst-cmp-a "$PID_A" $(args_of "$t"))"$'\n'
        RES[x,$t]+="$(run sst-cmp-x "$PID_X" $(args_of "$t"))"$'\n'
        if [ "$t" = c10000 ]; then
            RES[s,$t]+="$(run sst-cmp-t "$PID_T" $(args_of "$t"))"$'\n'
        else
            RES[s,$t]+="$(run sst-cmp-s "$PID_S" $(args_of "$t"))"$'\n'
        fi
        RES[k,$t]+="$(run sst-cmp-c "$PID_K" $(args_of "$t"))"$'\n'
    done
done

# A 1 GiB download with curl: Gbit/s.
bulk() {
    local ns=$1 url=$2
    ip netns exec "$ns" curl -s -o /dev/null -w '%{speed_download}' "$url" |
        awk '{ printf "%.2f\n", $1 * 8 / 1e9 }'
}
for i in $(seq "$RUNS"); do
    RES[a,bulk]+="$(bulk sst-cmp-a "http://$TARGET/big?bytes=1073741824")"$'\n'
    RES[x,bulk]+="$(bulk sst-cmp-x "http://$TARGET/big?bytes=1073741824")"$'\n'
    RES[s,bulk]+="$(bulk sst-cmp-s "http://$TARGET/big?bytes=1073741824")"$'\n'
    RES[k,bulk]+="$(bulk sst-cmp-c "http://$TARGET/big")"$'\n'
done

col() { echo -n "${RES[$1,$2]}" | awk -v c="$3" 'NF {print $c}' | median; }
echo
echo "Side by side, $(date -u +%Y-%m-%d), medians of $RUNS interleaved runs of ${DUR}s, wrk -t1, one server thread/worker:"
echo
echo "| test | system | req/s | server CPU µs/req | of which user | machine CPU µs/req | errors |"
echo "|---|---|---:|---:|---:|---:|---:|"
for close in $TESTS; do
    case $close in
        ka) name="keep-alive, 64 connections" ;;
        close) name="connection close, 64 at a time" ;;
        c*) name="keep-alive, ${close#c} connections" ;;
    esac
    for sys in a x s k; do
        case $sys in
            a) label="subnetstack (TAP)" ;;
            x) label="subnetstack (AF_XDP, veth)" ;;
            s) label="smoltcp 0.14 (TAP, $([ "$close" = c10000 ] && echo 10,240 || echo 512) sockets)" ;;
            k) label="Linux + nginx (veth)" ;;
        esac
        echo "| $name | $label | $(col "$sys" "$close" 2) | $(col "$sys" "$close" 3) | $(col "$sys" "$close" 6) | $(col "$sys" "$close" 4) | $(col "$sys" "$close" 5) |"
    done
done
echo
echo "| 1 GiB download (curl) | subnetstack (TAP) | $(col a bulk 1) Gbit/s |"
echo "| 1 GiB download (curl) | subnetstack (AF_XDP, veth) | $(col x bulk 1) Gbit/s |"
echo "| 1 GiB download (curl) | smoltcp 0.14 (TAP) | $(col s bulk 1) Gbit/s |"
echo "| 1 GiB download (curl) | Linux + nginx (veth) | $(col k bulk 1) Gbit/s |"
echo
echo "subnetstack's drops by reason after the runs:"
ip netns exec sst-cmp-a curl -s "http://$TARGET/metrics" | grep -E '^subnetstack_(drops_total|tcp_time_wait|tcp_connections)' || true
