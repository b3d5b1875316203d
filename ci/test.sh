#!/usr/bin/env bash
# Everything that can run on this machine. Root-only tests run when root; under CI=true
# they must run (a skip fails them). The end-to-end tests run on a real local node
# (ci/e2e-local.sh) wherever the Kubernetes binaries are: RANDPORT_K8S_ASSETS, else
# ../shared/k8s; under CI=true with ../shared/k8s present they must run.
source "$(dirname "$0")/lib.sh"

ensure_packages
ensure_rust_components
ensure_nextest
netns_before=$(ip netns list 2>/dev/null | grep -E '^rp-' | sort || true)
if [ "$(id -u)" -ne 0 ]; then
    echo "note: not root, so the real-kernel tests will skip (CI=true makes them fail instead)" >&2
fi

step "workflow files against GitHub's workflow schema (check-jsonschema)"
ensure_check_jsonschema
check-jsonschema --builtin-schema vendor.github-workflows .github/workflows/*.yml

step "helm (the chart's tests: lint, every preset rendered, deploy/ rendered from it)"
ensure_helm
"$HELM" version --short

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

# The e2e tests run against a real node below when the Kubernetes binaries are here;
# elsewhere they run in this step and skip, saying why.
source ci/local-cluster.sh
local_assets=""
if [ "$(id -u)" -eq 0 ]; then
    local_assets=$(local_cluster_assets || true)
fi

step "tests (cargo nextest)"
if [ -n "$local_assets" ]; then
    cargo nextest run --workspace --locked --no-fail-fast -E 'not (package(randport-itests) & binary(e2e))'
else
    cargo nextest run --workspace --locked --no-fail-fast
fi

if [ -n "$local_assets" ]; then
    step "end-to-end tests on a real local node (ci/e2e-local.sh, binaries from $local_assets)"
    RANDPORT_K8S_ASSETS="$local_assets" ci/e2e-local.sh
elif [ "${CI:-}" = true ] && [ -d ../shared/k8s ]; then
    echo "CI: ../shared/k8s is here but the real-node e2e tests cannot run (not root?)" >&2
    exit 1
else
    echo "note: no Kubernetes binaries (RANDPORT_K8S_ASSETS or ../shared/k8s), or not root: the real-node e2e tests did not run" >&2
fi

netns_after=$(ip netns list 2>/dev/null | grep -E '^rp-' | sort || true)
leftover=$(comm -13 <(echo "$netns_before") <(echo "$netns_after") | grep . || true)
if [ -n "$leftover" ]; then
    echo "tests left network namespaces behind:" >&2
    echo "$leftover" >&2
    exit 1
fi
