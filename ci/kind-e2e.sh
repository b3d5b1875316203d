#!/usr/bin/env bash
# End-to-end on a kind cluster: create it (kind-configs/cluster.yaml), build and load the
# image, install randport with its Helm chart (the kind preset), run the e2e tests, take it
# off with the chart's uninstall mode and helm uninstall, collect logs on failure, delete
# the cluster. Needs Docker, kind and kubectl (helm is fetched, ci/lib.sh ensure_helm).
#   KIND_NODE_IMAGE=kindest/node:v1.28.15   another Kubernetes version
#   KEEP_CLUSTER=1                           leave the cluster up afterwards
source "$(dirname "$0")/lib.sh"

for tool in docker kind kubectl; do
    command -v "$tool" >/dev/null || { echo "ci/kind-e2e.sh needs $tool" >&2; exit 1; }
done
ensure_nextest
ensure_helm

CLUSTER="${RANDPORT_KIND_CLUSTER:-randport-e2e}"
IMAGE="randport:e2e"
LOGS="target/kind-logs"
KUBECONFIG="$PWD/target/kind-kubeconfig"
export KUBECONFIG

finish() {
    local rc=$?
    if [ "$rc" -ne 0 ]; then
        step "failed (exit $rc): collecting logs into $LOGS"
        mkdir -p "$LOGS"
        kubectl get pods -A -o wide >"$LOGS/pods.txt" 2>&1 || true
        kubectl get events -A --sort-by=.lastTimestamp >"$LOGS/events.txt" 2>&1 || true
        kubectl -n kube-system describe daemonset randport >"$LOGS/daemonset.txt" 2>&1 || true
        kubectl -n kube-system logs -l app.kubernetes.io/name=randport --all-containers \
            --prefix --tail=-1 >"$LOGS/agents.log" 2>&1 || true
        for node in $(kind get nodes --name "$CLUSTER" 2>/dev/null); do
            docker exec "$node" sh -c 'cat /etc/cni/net.d/*.conflist; nft list table inet randport' \
                >"$LOGS/$node.txt" 2>&1 || true
        done
        kind export logs "$LOGS/kind" --name "$CLUSTER" >/dev/null 2>&1 || true
        tail -n 50 "$LOGS/agents.log" || true
    fi
    if [ -z "${KEEP_CLUSTER:-}" ]; then
        kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true
    fi
    exit "$rc"
}
trap finish EXIT

step "creating kind cluster $CLUSTER ${KIND_NODE_IMAGE:+($KIND_NODE_IMAGE)}"
kind create cluster --name "$CLUSTER" --config kind-configs/cluster.yaml \
    ${KIND_NODE_IMAGE:+--image "$KIND_NODE_IMAGE"} --kubeconfig "$KUBECONFIG" --wait 180s

step "building $IMAGE and loading it into the nodes"
docker build -t "$IMAGE" .
size_mb=$(( $(docker image inspect -f '{{.Size}}' "$IMAGE") / 1000000 ))
echo "image $IMAGE: $size_mb MB"
if [ "$size_mb" -gt 64 ]; then
    echo "the image is $size_mb MB; it should be well under 64 MB (are the binaries stripped?)" >&2
    exit 1
fi
kind load docker-image "$IMAGE" --name "$CLUSTER"

step "installing randport (helm, kind preset)"
chart_args=(-n kube-system -f charts/randport/presets/kind.yaml
    --set image.repository="${IMAGE%:*}" --set image.tag="${IMAGE##*:}")
"$HELM" install randport charts/randport "${chart_args[@]}" --wait --timeout 180s
kubectl -n kube-system rollout status daemonset/randport --timeout=180s
# The chart renders the policy where the API serves its kind in v1 (discovery).
if kubectl get validatingadmissionpolicy randport-agent-writes >/dev/null 2>&1; then
    export RANDPORT_E2E_POLICY=1
    sleep 2 # the policy reaches the API server's admission a moment later
else
    echo "this API server does not serve ValidatingAdmissionPolicy v1: the chart left the policy out (and its test skips)"
fi
for node in $(kind get nodes --name "$CLUSTER"); do
    docker exec "$node" grep -q '"type": "randport"' /etc/cni/net.d/10-kindnet.conflist \
        || { echo "node $node: randport is not in its conflist" >&2; exit 1; }
    docker exec "$node" test -x /opt/cni/bin/randport
done

step "end-to-end tests"
cargo build --locked -p randport-plugin --bins # kubectl-randport for its e2e test
RANDPORT_E2E=1 HELM="$HELM" cargo nextest run -p randport-itests --test e2e --test-threads 1 --no-fail-fast

step "uninstall (the chart's uninstall mode, then helm uninstall)"
"$HELM" upgrade randport charts/randport "${chart_args[@]}" --reuse-values \
    --set uninstall.enabled=true --wait --timeout 120s
kubectl -n kube-system wait --for=delete pod -l app.kubernetes.io/name=randport --timeout=60s
kubectl -n kube-system rollout status daemonset/randport-uninstall --timeout=120s
for node in $(kind get nodes --name "$CLUSTER"); do
    if docker exec "$node" grep -q randport /etc/cni/net.d/10-kindnet.conflist; then
        echo "node $node: randport is still in its conflist" >&2; exit 1
    fi
    docker exec "$node" test ! -e /opt/cni/bin/randport
    if docker exec "$node" nft list table inet randport >/dev/null 2>&1; then
        echo "node $node: the randport table is still there" >&2; exit 1
    fi
done
"$HELM" uninstall randport -n kube-system --wait
# The cluster still works without randport: a pod starts.
kubectl run rp-after-uninstall --image=registry.k8s.io/e2e-test-images/agnhost:2.53 \
    --restart=Never -- serve-hostname
kubectl wait --for=condition=Ready pod/rp-after-uninstall --timeout=120s
step "kind e2e passed"
