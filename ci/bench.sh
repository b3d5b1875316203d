#!/usr/bin/env bash
# Benchmarks (root): randport against the CNI portmap plugin on simulated nodes
# (randport-sim bench, results as markdown in target/bench-results.md), then the criterion
# micro-benchmarks of randport-core. `just bench --quick` runs a small version of the
# first part only; other arguments go to criterion.
source "$(dirname "$0")/lib.sh"

ensure_packages
if [ ! -x /usr/lib/cni/portmap ]; then
    step "installing containernetworking-plugins (the reference portmap plugin)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends containernetworking-plugins >/dev/null
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "just bench makes network namespaces: run it as root" >&2
    exit 1
fi
step "building (release)"
cargo build --release --locked --quiet -p randport-sim -p randport-plugin
mkdir -p target
quick=""
if [ "${1:-}" = "--quick" ]; then quick="--quick"; shift; fi
step "randport-sim bench $quick (machine: $(nproc) cores, $(uname -r))"
target/release/randport-sim bench $quick --out target/bench-results.md
[ -n "$quick" ] && exit 0
step "criterion benches (randport-core)"
cargo bench --locked -p randport-core --bench core -- "$@"
