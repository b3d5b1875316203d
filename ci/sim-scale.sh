#!/usr/bin/env bash
# The simulator at cluster scale, its netlink path against the ip-exec path it replaced:
# `randport-sim demo` at 16 x 32 pods (512) and 16 x 320 (5,120) with each wiring, one after
# the other in this run (this machine is noisy), and a table of the rates (root).
# Usage: ci/sim-scale.sh [--quick]   (--quick: 512 pods only)
source "$(dirname "$0")/lib.sh"

ensure_packages
if [ "$(id -u)" -ne 0 ]; then
    echo "the scale runs make thousands of network namespaces: run as root" >&2
    exit 1
fi
sizes=(32 320)
if [ "${1:-}" = "--quick" ]; then
    sizes=(32)
fi
step "building randport-sim, randportd and randport (release)"
cargo build --locked --quiet --release -p randport-sim -p randport-plugin
logs=target/sim-scale
mkdir -p "$logs"
rows=()
for pods in "${sizes[@]}"; do
    for wiring in netlink ip; do
        log="$logs/16x$pods-$wiring.log"
        step "randport-sim demo --nodes 16 --pods $pods --wiring $wiring (log: $log)"
        if ! target/release/randport-sim demo --nodes 16 --pods "$pods" --wiring "$wiring" \
            | tee "$log" | grep --line-buffered -E '^==> \[|^checks:'; then
            echo "the $wiring run at 16 x $pods failed; see $log" >&2
            exit 1
        fi
        field() { grep -E "^$1" "$log" | grep -oE '[0-9.]+ pods/s' | head -1; }
        took=$(grep -oE '^==> took [0-9.]+ s' "$log" | grep -oE '[0-9.]+ s')
        add=$(grep -oE 'p50 [0-9.]+ ms' "$log" | head -1)
        rows+=("| $((16 * pods)) | $wiring | $(field 'build \(first 500\)') | $(field 'build \(all\)') | ADD $add | $(field delete) | $(field teardown) | $took |")
    done
done
echo
echo "Machine: $(nproc) cores, $(uname -r); $(date -u +%Y-%m-%d)"
echo
echo "| pods | wiring | build, first 500 | build, all | plugin ADD | delete a tenth | teardown | whole demo |"
echo "|---:|---|---:|---:|---:|---:|---:|---:|"
printf '%s\n' "${rows[@]}"
