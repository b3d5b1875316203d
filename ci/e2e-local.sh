#!/usr/bin/env bash
# End-to-end tests on a real one-node cluster made here without Docker (ci/local-cluster.sh):
# real kube-apiserver, kubelet and containerd, randport installed as an operator would, the
# e2e tests (itests/tests/e2e.rs) run from a client namespace outside the node. Needs root
# and the Kubernetes binaries (RANDPORT_K8S_ASSETS, else ../shared/k8s).
#   KEEP_CLUSTER=1   leave the cluster up at the end (it prints how to reach and remove it)
#   ci/e2e-local.sh down DIR   take down a cluster kept that way
#   E2E_FILTER=...   run only the e2e tests whose names contain this
# Logs are kept in target/local-cluster-logs when something fails.
source "$(dirname "$0")/lib.sh"
source ci/local-cluster.sh

[ "$(id -u)" -eq 0 ] || { echo "ci/e2e-local.sh needs root (network namespaces, containerd, kubelet)" >&2; exit 1; }
if [ "${1:-}" = down ]; then
    [ -n "${2:-}" ] || { echo "usage: ci/e2e-local.sh down DIR" >&2; exit 2; }
    load_cluster_env "$2"
    cluster_down
    rm -rf --one-file-system "$LC_DIR"
    exit 0
fi
LC_ASSETS=$(local_cluster_assets) || {
    echo "no Kubernetes binaries: set RANDPORT_K8S_ASSETS to a directory with kube-apiserver, kubelet, kubectl (or .xz) and images/{pause,busybox}.tar" >&2
    exit 1
}
ensure_packages
ensure_cluster_packages
ensure_nextest

step "unpacking the Kubernetes binaries from $LC_ASSETS"
unpack_k8s_binaries "$LC_ASSETS"
"$LC_BIN/kubelet" --version

step "building randport and the e2e tests"
cargo build --locked -p randport-plugin --bins
cargo nextest run --locked -p randport-itests --test e2e --no-run

LOGS=target/local-cluster-logs
finish() {
    local rc=$?
    trap - EXIT INT TERM
    if [ "$rc" -ne 0 ] && [ -n "${LC_DIR:-}" ]; then
        step "failed (exit $rc): keeping logs in $LOGS"
        rm -rf "$LOGS" && mkdir -p "$LOGS"
        kubectl_admin get pods -A -o wide >"$LOGS/pods.txt" 2>&1 || true
        kubectl_admin get events -A --sort-by=.lastTimestamp >"$LOGS/events.txt" 2>&1 || true
        in_node nft list ruleset >"$LOGS/node-ruleset.txt" 2>&1 || true
        cp "$LC_DIR"/cni/net.d/* "$LOGS/" 2>/dev/null || true
        cp "$LC_DIR"/logs/*.log "$LOGS/" 2>/dev/null || true
        tail -n 30 "$LOGS/randportd.log" 2>/dev/null || true
    fi
    if [ -n "${KEEP_CLUSTER:-}" ] && [ "$rc" -eq 0 ]; then
        echo "cluster kept: KUBECONFIG=$LC_DIR/admin.kubeconfig (reach it from: ip netns exec $LC_CLIENT_NS ...)"
        echo "take it down with: ci/e2e-local.sh down $LC_DIR"
        exit 0
    fi
    step "taking the cluster down"
    cluster_down
    local left
    left=$(cluster_leftovers)
    if [ -n "$left" ]; then
        echo "the cluster's cleanup left these behind:" >&2
        echo "$left" >&2
        [ "$rc" -ne 0 ] || rc=1
    fi
    rm -rf --one-file-system "$LC_DIR"
    if [ -f target/e2e-startup-latency.txt ] && [ "$rc" -eq 0 ]; then
        step "startup latency on the real node (target/e2e-startup-latency.txt)"
        cat target/e2e-startup-latency.txt
    fi
    exit "$rc"
}
trap finish EXIT
trap 'exit 130' INT TERM

# One local cluster at a time on a machine: the kubelet's kernel sysctls are global, and a
# second run would record the first one's values as the ones to put back.
exec 9>/tmp/randport-local-cluster.lock
if ! flock -n 9; then
    echo "    another local cluster run holds /tmp/randport-local-cluster.lock; waiting (up to 15 min)"
    flock -w 900 9 || { echo "gave up waiting for the other local cluster run" >&2; exit 1; }
fi

ensure_helm
step "starting the local cluster"
start=$SECONDS
cluster_up
echo "    cluster up in $((SECONDS - start)) s"

rm -f target/e2e-startup-latency.txt
step "end-to-end tests (from the client namespace $LC_CLIENT_NS)"
ip netns exec "$LC_CLIENT_NS" env \
    KUBECONFIG="$LC_DIR/admin.kubeconfig" RANDPORT_E2E=1 RANDPORT_E2E_LOCAL="$LC_DIR" \
    RANDPORT_E2E_KUBECTL="$LC_BIN/kubectl" HELM="$HELM" \
    cargo nextest run --locked -p randport-itests --test e2e --test-threads 1 --no-fail-fast \
    ${E2E_FILTER:+-E "test(/$E2E_FILTER/)"}
step "local e2e passed"
