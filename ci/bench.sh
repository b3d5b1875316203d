#!/usr/bin/env bash
# Benchmarks: criterion micro-benchmarks of randport-core. Extra arguments go to
# criterion (e.g. `just bench allocate` to run only the allocator benches).
source "$(dirname "$0")/lib.sh"

step "criterion benches (randport-core); machine: $(nproc) cores, $(uname -r)"
cargo bench --locked -p randport-core --bench core -- "$@"
