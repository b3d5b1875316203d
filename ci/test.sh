#!/usr/bin/env bash
# Everything that can run on this machine. Root-only tests run when root; under CI=true
# they must run (a skip fails them).
source "$(dirname "$0")/lib.sh"

ensure_packages
ensure_nextest
netns_before=$(ip netns list 2>/dev/null | grep -E '^rp-' | sort || true)
if [ "$(id -u)" -ne 0 ]; then
    echo "note: not root, so the real-kernel tests will skip (CI=true makes them fail instead)" >&2
fi

step "workflow files against GitHub's workflow schema (check-jsonschema)"
ensure_check_jsonschema
check-jsonschema --builtin-schema vendor.github-workflows .github/workflows/*.yml

step "shell scripts (shellcheck)"
ensure_shellcheck
shellcheck -x -P SCRIPTDIR ci/*.sh .ci/run

step "format check"
cargo fmt --all --check

step "clippy (warnings denied)"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "doctests"
cargo test --workspace --doc --locked

step "building the binaries the root tests drive (randportd, randport, randport-sim)"
cargo build --workspace --bins --locked

step "benchmarks compile (cargo bench --no-run; they run in just bench)"
cargo bench --workspace --no-run --locked

step "fuzz smoke run (5 s per target; just fuzz runs longer)"
FUZZ_SECONDS=5 ci/fuzz.sh

step "tests (cargo nextest)"
cargo nextest run --workspace --locked --no-fail-fast

netns_after=$(ip netns list 2>/dev/null | grep -E '^rp-' | sort || true)
leftover=$(comm -13 <(echo "$netns_before") <(echo "$netns_after") | grep . || true)
if [ -n "$leftover" ]; then
    echo "tests left network namespaces behind:" >&2
    echo "$leftover" >&2
    exit 1
fi
