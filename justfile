# randport: every recipe calls a script in ci/, the same scripts CI runs (.ci/run).

# List the recipes.
default:
    @just --list

# Simulated cluster in network namespaces (root): real agents and plugin, every mapping checked with traffic.
demo *ARGS:
    ci/demo.sh {{ARGS}}

# The simulator at cluster scale (root): 512 and 5,120 pods, netlink wiring against the ip-exec path, a table of rates.
sim-scale *ARGS:
    ci/sim-scale.sh {{ARGS}}

# Everything that can run here: workflow schema, shellcheck, fmt, clippy -D warnings, doctests, fuzz smoke, nextest, and the e2e tests on a real local node where the Kubernetes binaries are.
test:
    ci/test.sh

# Benchmarks (criterion micro-benchmarks of the core).
bench *ARGS:
    ci/bench.sh {{ARGS}}

# Format the code.
fmt:
    ci/fmt.sh

# Clippy with warnings denied.
lint:
    ci/lint.sh

# Fuzz the annotation decoder, the CNI config parser and the agent's request decoder (bounded).
fuzz:
    ci/fuzz.sh

# End-to-end on a kind cluster (needs Docker, kind, kubectl): install, e2e tests, uninstall.
kind-e2e:
    ci/kind-e2e.sh

# End-to-end on a real one-node cluster made here without Docker (root; Kubernetes binaries
# from RANDPORT_K8S_ASSETS or ../shared/k8s): kube-apiserver, kubelet, containerd, randport.
e2e-local *ARGS:
    ci/e2e-local.sh {{ARGS}}

# Static musl release binaries for amd64 and arm64 (cargo-zigbuild; zig from PyPI) into dist/.
release-build:
    ci/release-build.sh

# Render deploy/*.yaml from the Helm chart (charts/randport); --check fails on drift.
render-manifests *ARGS:
    ci/render-manifests.sh {{ARGS}}
