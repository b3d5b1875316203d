#!/usr/bin/env bash
# deploy/*.yaml are rendered from the Helm chart (charts/randport), the one source of truth:
#   ci/render-manifests.sh          rewrite them
#   ci/render-manifests.sh --check  fail when they differ from the chart (just test runs this
#                                   through itests/tests/manifests.rs)
# The release workflow renders randport.yaml the same way with the image's digest pinned.
source "$(dirname "$0")/lib.sh"
ensure_helm

out=deploy
check=false
extra=()
while [ $# -gt 0 ]; do
    case "$1" in
        --check) check=true; out=$(mktemp -d); trap 'rm -rf "$out"' EXIT ;;
        --out) out="$2"; shift ;;
        --set) extra+=(--set "$2"); shift ;;
        *) echo "usage: $0 [--check] [--out DIR] [--set key=value]..." >&2; exit 2 ;;
    esac
    shift
done

render() { # file, header, helm args...
    local file="$1" header="$2"
    shift 2
    {
        printf '%s\n' "$header"
        printf '# Rendered from charts/randport by ci/render-manifests.sh: change the chart, not this file.\n'
        "$HELM" template randport charts/randport --namespace kube-system \
            --set plainManifest=true "${extra[@]}" "$@"
    } >"$out/$file"
}

render randport.yaml "# randport: the node agent (DaemonSet), its permissions and its metrics Service. Apply with
#   kubectl apply -f deploy/randport.yaml
# and, on Kubernetes 1.30 or later, the admission policy that fences the agent in:
#   kubectl apply -f deploy/admission-policy.yaml
# Each agent pod first installs the CNI plugin on its node (the install init container:
# /opt/cni/bin/randport and an entry at the end of the node's conflist), then keeps that
# entry in place while it runs. Other distributions' CNI directories: docs/install.md.
# To take randport off the nodes: docs/uninstall.md (deploy/uninstall.yaml)." \
    --skip-tests
render admission-policy.yaml "# The admission policy for Kubernetes 1.30 and later (the chart renders it where the
# API server serves it). Apply after deploy/randport.yaml." \
    --api-versions admissionregistration.k8s.io/v1/ValidatingAdmissionPolicy \
    --show-only templates/admission-policy.yaml
render uninstall.yaml "# Takes randport off every node (docs/uninstall.md). Run it after deleting the agent:
#   kubectl delete -f deploy/admission-policy.yaml -f deploy/randport.yaml
#   kubectl apply -f deploy/uninstall.yaml
#   kubectl -n kube-system rollout status daemonset/randport-uninstall
#   kubectl delete -f deploy/uninstall.yaml" \
    --set uninstall.enabled=true --show-only templates/uninstall.yaml

if $check; then
    status=0
    for f in randport.yaml admission-policy.yaml uninstall.yaml; do
        if ! diff -u "deploy/$f" "$out/$f"; then
            echo "deploy/$f differs from what charts/randport renders: run ci/render-manifests.sh" >&2
            status=1
        fi
    done
    exit $status
fi
echo "rendered deploy/randport.yaml, deploy/admission-policy.yaml, deploy/uninstall.yaml"
