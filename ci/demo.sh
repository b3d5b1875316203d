#!/usr/bin/env bash
# The demo: builds the simulator, the agent and the plugin, and runs `randport-sim demo`
# (a simulated cluster in network namespaces; root).
source "$(dirname "$0")/lib.sh"

ensure_packages
if [ "$(id -u)" -ne 0 ]; then
    echo "just demo makes network namespaces: run it as root (sudo -E just demo)" >&2
    exit 1
fi
step "building randport-sim, randportd and randport"
cargo build --locked --quiet -p randport-sim -p randport-plugin
exec target/debug/randport-sim demo "$@"
