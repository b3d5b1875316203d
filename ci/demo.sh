#!/usr/bin/env bash
# The demo: builds the simulator and runs `randport-sim demo`.
source "$(dirname "$0")/lib.sh"

ensure_packages
step "building"
cargo build --locked --quiet -p randport-sim
step "randport-sim demo $*"
exec target/debug/randport-sim demo "$@"
