#!/usr/bin/env bash
# Fuzzing: each cargo-fuzz target in fuzz/ for a bounded time (FUZZ_SECONDS, default 30).
# cargo-fuzz wants nightly flags; the stable toolchain accepts them with RUSTC_BOOTSTRAP=1.
source "$(dirname "$0")/lib.sh"

seconds="${FUZZ_SECONDS:-30}"
if ! cargo fuzz --version >/dev/null 2>&1; then
    step "installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi
export RUSTC_BOOTSTRAP=1
cd fuzz || exit 1
for target in annotation_decode cni_config agent_request nft_netlink_replies; do
    step "fuzzing $target for ${seconds}s"
    cargo fuzz run "$target" -- -max_total_time="$seconds" -timeout=10
done
