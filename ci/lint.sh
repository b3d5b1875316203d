#!/usr/bin/env bash
source "$(dirname "$0")/lib.sh"
cargo clippy --workspace --all-targets --locked -- -D warnings
