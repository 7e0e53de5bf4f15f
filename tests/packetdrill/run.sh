#!/bin/sh
# Runs every .pkt script here against subnetstack through the packetdrill adapter
# (the subnetstack-packetdrill crate). packetdrill itself is not part of this repository:
# build it from https://github.com/google/packetdrill (gtests/net/packetdrill:
# ./configure && make) and point PACKETDRILL at the binary.
#
#   PACKETDRILL=/path/to/packetdrill tests/packetdrill/run.sh [script.pkt ...]
#
# Extra packetdrill options can be given in PACKETDRILL_FLAGS (e.g. --verbose), adapter
# flags in SO_FLAGS (e.g. log=1). Exit status 1 if any script fails.
set -u
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
pd=${PACKETDRILL:?set PACKETDRILL to a packetdrill binary}
so="$root/target/release/libsubnetstack_packetdrill.so"

(cd "$root" && cargo build --release -q -p subnetstack-packetdrill) || exit 1

[ $# -gt 0 ] || set -- "$here"/*.pkt
failed=0
for script in "$@"; do
    if out=$("$pd" --so_filename="$so" --so_flags="${SO_FLAGS:-}" \
        --local_ip=198.18.0.1 --remote_ip=198.19.0.1 ${PACKETDRILL_FLAGS:-} "$script" 2>&1); then
        echo "pass  $(basename "$script")"
    else
        echo "FAIL  $(basename "$script")"
        echo "$out" | sed 's/^/      /'
        failed=1
    fi
done
exit $failed
