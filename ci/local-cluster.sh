# shellcheck shell=bash
# A real one-node Kubernetes cluster without Docker, for the end-to-end tests (the way
# envtest runs a real API server, but with a kubelet, containerd and a pod network too).
# Source it after lib.sh; ci/e2e-local.sh drives it. Functions:
#   cluster_up     start etcd, kube-apiserver, containerd and a kubelet for one node, install
#                  randport on it as an operator would, and start its agent
#   cluster_down   take everything down again (also after a failure or Ctrl-C)
#   agent_start / agent_stop   (re)start or SIGKILL the node's agent
#
# Layout (RUN is a per-run id, the same prefix the simulator uses):
#   netns rp-RUN-node     the node: etcd, the API server, containerd, the kubelet, the agent,
#                         the pod bridge, the pods' veths, portmap's and randport's rules
#   netns rp-RUN-client   a host outside the node, joined to it by a veth; the tests run here
#   203.0.113.1           the node's address (--node-ip, the API server's advertise address)
#   203.0.113.2           the client's address
#   198.18.0.0/24         pods (bridge + host-local)
# Nothing of this touches the root namespace's network, firewall or network sysctls. The
# kubelet sets three kernel sysctls at start (vm.overcommit_memory, kernel.panic,
# kernel.panic_on_oops): they are recorded and put back. Its cgroups live under /rp-RUN in
# every cgroup hierarchy and are removed; its mounts under the run's directory are unmounted.
#
# Binaries: RANDPORT_K8S_ASSETS names a directory with kube-apiserver, kubelet and kubectl
# (each plain or .xz) and images/{pause,busybox}.tar; etcd, containerd, runc and the CNI
# plugins come from Debian packages (installed when missing).

LC_NODE_IP=203.0.113.1
LC_CLIENT_IP=203.0.113.2
LC_POD_SUBNET=198.18.0.0/24
LC_NODE_NAME=rp-node
LC_KERNEL_SYSCTLS=(vm.overcommit_memory kernel.panic kernel.panic_on_oops)

# Where the assets are: RANDPORT_K8S_ASSETS, else ../shared/k8s beside the checkout.
local_cluster_assets() {
    local dir="${RANDPORT_K8S_ASSETS:-}"
    if [ -z "$dir" ] && [ -d ../shared/k8s ]; then
        dir="$(cd ../shared/k8s && pwd)"
    fi
    [ -n "$dir" ] || return 1
    for b in kube-apiserver kubelet kubectl; do
        [ -e "$dir/$b" ] || [ -e "$dir/bin/$b" ] || [ -e "$dir/bin/$b.xz" ] || [ -e "$dir/$b.xz" ] || return 1
    done
    echo "$dir"
}

# The Debian packages the node needs, when missing.
ensure_cluster_packages() {
    local missing=()
    command -v etcd >/dev/null || missing+=(etcd-server)
    command -v containerd >/dev/null || missing+=(containerd)
    command -v runc >/dev/null || missing+=(runc)
    [ -x /usr/lib/cni/bridge ] || missing+=(containernetworking-plugins)
    command -v openssl >/dev/null || missing+=(openssl)
    command -v setpriv >/dev/null || missing+=(util-linux)
    command -v xz >/dev/null || missing+=(xz-utils)
    [ ${#missing[@]} -eq 0 ] && return 0
    step "installing ${missing[*]} (apt)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# Unpacks the Kubernetes binaries once into target/k8s-bin (kept between runs).
unpack_k8s_binaries() {
    local assets="$1" out=target/k8s-bin
    mkdir -p "$out"
    for b in kube-apiserver kubelet kubectl; do
        [ -x "$out/$b" ] && continue
        local src
        for src in "$assets/bin/$b" "$assets/$b" "$assets/bin/$b.xz" "$assets/$b.xz"; do
            [ -e "$src" ] && break
        done
        echo "    unpacking $src"
        case "$src" in
            *.xz) xz -dc "$src" >"$out/$b.tmp" ;;
            *) cp "$src" "$out/$b.tmp" ;;
        esac
        chmod +x "$out/$b.tmp"
        mv "$out/$b.tmp" "$out/$b"
    done
    LC_BIN="$(cd "$out" && pwd)"
}

in_node() { nsenter --net="/run/netns/$LC_NODE_NS" "$@"; }

# Starts a long-running process in the node's network namespace, in the background, with
# its log appended to $LC_DIR/logs/NAME.log and its pid in $LC_DIR/NAME.pid. Only the
# network namespace is entered: the kubelet's volume mounts must be seen by containerd.
start_in_node() {
    local name="$1"
    shift
    setsid nsenter --net="/run/netns/$LC_NODE_NS" "$@" >>"$LC_DIR/logs/$name.log" 2>&1 </dev/null &
    disown
    echo $! >"$LC_DIR/$name.pid"
}

# Waits up to $2 seconds for command $3... to succeed; names $1 in the failure.
wait_for() {
    local what="$1" seconds="$2"
    shift 2
    local deadline=$((SECONDS + seconds))
    until "$@" >/dev/null 2>&1; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            echo "timed out after ${seconds}s waiting for $what" >&2
            return 1
        fi
        sleep 0.2
    done
}

kubectl_admin() { in_node "$LC_BIN/kubectl" --kubeconfig "$LC_DIR/admin.kubeconfig" "$@"; }

write_certificates() {
    local pki="$LC_DIR/pki"
    mkdir -p "$pki"
    (
        cd "$pki" || exit 1
        openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=randport-local-ca" \
            -keyout ca.key -out ca.crt 2>/dev/null
        # name CN O [SANs]
        sign() {
            openssl req -newkey rsa:2048 -nodes -subj "/CN=$2${3:+/O=$3}" \
                -keyout "$1.key" -out "$1.csr" 2>/dev/null
            if [ -n "${4:-}" ]; then
                printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth,clientAuth\n' "$4" >"$1.ext"
            else
                printf 'extendedKeyUsage=clientAuth\n' >"$1.ext"
            fi
            openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 \
                -extfile "$1.ext" -out "$1.crt" 2>/dev/null
        }
        sign apiserver kube-apiserver "" \
            "IP:127.0.0.1,IP:::1,IP:$LC_NODE_IP,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
        sign admin admin system:masters
        sign node "system:node:$LC_NODE_NAME" system:nodes
        sign apiserver-kubelet-client kube-apiserver-kubelet-client system:masters
        openssl genrsa -out sa.key 2048 2>/dev/null
        openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
    )
}

# kubeconfig NAME [client cert name | token]
write_kubeconfig() {
    local file="$LC_DIR/$1.kubeconfig" user
    if [ -f "$LC_DIR/pki/$2.crt" ]; then
        user="    client-certificate: $LC_DIR/pki/$2.crt
    client-key: $LC_DIR/pki/$2.key"
    else
        user="    token: $2"
    fi
    cat >"$file" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: local
  cluster:
    server: https://$LC_NODE_IP:6443
    certificate-authority: $LC_DIR/pki/ca.crt
users:
- name: $1
  user:
$user
contexts:
- name: local
  context: {cluster: local, user: $1}
current-context: local
EOF
}

setup_network() {
    ip netns add "$LC_NODE_NS"
    ip netns add "$LC_CLIENT_NS"
    ip -n "$LC_NODE_NS" link set lo up
    ip -n "$LC_CLIENT_NS" link set lo up
    ip -n "$LC_NODE_NS" link add eth0 type veth peer name eth0 netns "$LC_CLIENT_NS"
    ip -n "$LC_NODE_NS" addr add "$LC_NODE_IP/24" dev eth0
    ip -n "$LC_CLIENT_NS" addr add "$LC_CLIENT_IP/24" dev eth0
    ip -n "$LC_NODE_NS" link set eth0 up
    ip -n "$LC_CLIENT_NS" link set eth0 up
    # The kubelet wants a default route to pick its addresses; it points at the client, and
    # the client has no way out, so nothing leaves the lab.
    ip -n "$LC_NODE_NS" route add default via "$LC_CLIENT_IP"
}

start_control_plane() {
    mkdir -p "$LC_DIR/etcd"
    start_in_node etcd etcd --name rp-local --data-dir "$LC_DIR/etcd" \
        --listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
        --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
        --initial-cluster rp-local=http://127.0.0.1:2380 --unsafe-no-fsync
    local pki="$LC_DIR/pki"
    start_in_node kube-apiserver "$LC_BIN/kube-apiserver" \
        --etcd-servers=http://127.0.0.1:2379 \
        --bind-address=0.0.0.0 --secure-port=6443 --advertise-address="$LC_NODE_IP" \
        --tls-cert-file="$pki/apiserver.crt" --tls-private-key-file="$pki/apiserver.key" \
        --client-ca-file="$pki/ca.crt" \
        --authorization-mode=Node,RBAC \
        --service-account-issuer=https://kubernetes.default.svc.cluster.local \
        --service-account-key-file="$pki/sa.pub" \
        --service-account-signing-key-file="$pki/sa.key" \
        --service-cluster-ip-range=10.96.0.0/16 \
        --endpoint-reconciler-type=none \
        --allow-privileged=true \
        --disable-admission-plugins=ServiceAccount \
        --kubelet-client-certificate="$pki/apiserver-kubelet-client.crt" \
        --kubelet-client-key="$pki/apiserver-kubelet-client.key" \
        --kubelet-preferred-address-types=InternalIP
    wait_for "the API server (log: $LC_DIR/logs/kube-apiserver.log)" 60 \
        kubectl_admin get --raw /readyz
}

start_node() {
    local conf="$LC_DIR/cni/net.d" bin="$LC_DIR/cni/bin"
    mkdir -p "$conf" "$bin" "$LC_DIR/containerd/root" "$LC_DIR/containerd/state"
    for plugin in bridge host-local loopback portmap; do
        cp "/usr/lib/cni/$plugin" "$bin/"
    done
    # The bridge network as a distribution writes it, with portmap chained (as kindnet,
    # Calico and Flannel have); randportd install appends randport after it.
    cat >"$conf/10-bridge.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "rp-local",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "cni0",
      "isGateway": true,
      "hairpinMode": true,
      "ipMasq": false,
      "ipam": {
        "type": "host-local",
        "dataDir": "$LC_DIR/cni/ipam",
        "ranges": [[{"subnet": "$LC_POD_SUBNET"}]],
        "routes": [{"dst": "198.18.0.0/16"}, {"dst": "203.0.113.0/24"}]
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
EOF
    cat >"$LC_DIR/containerd/config.toml" <<EOF
version = 2
root = "$LC_DIR/containerd/root"
state = "$LC_DIR/containerd/state"
[grpc]
  address = "$LC_DIR/containerd/containerd.sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "local.test/pause:3.9"
  restrict_oom_score_adj = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "$bin"
    conf_dir = "$conf"
    max_conf_num = 1
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
EOF
    start_in_node containerd containerd --config "$LC_DIR/containerd/config.toml"
    wait_for "containerd (log: $LC_DIR/logs/containerd.log)" 30 \
        ctr --address "$LC_DIR/containerd/containerd.sock" version

    step "importing the images"
    local image
    for image in "$LC_ASSETS/images/pause.tar" "$LC_ASSETS/images/busybox.tar" "$LC_DIR/echo-image.tar" \
        "$LC_DIR/randport-image.tar"; do
        ctr --address "$LC_DIR/containerd/containerd.sock" -n k8s.io images import \
            --no-unpack=false "$image" >/dev/null
    done

    # The kubelet's cgroups go under one root of ours in every hierarchy.
    local hierarchy
    for hierarchy in /sys/fs/cgroup/*/; do
        [ -w "$hierarchy" ] && mkdir -p "$hierarchy$LC_RUN_NAME"
    done
    mkdir -p "$LC_DIR/kubelet"
    cat >"$LC_DIR/kubelet/config.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
cgroupDriver: cgroupfs
cgroupRoot: /$LC_RUN_NAME
failSwapOn: false
containerRuntimeEndpoint: unix://$LC_DIR/containerd/containerd.sock
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: false}
  x509: {clientCAFile: $LC_DIR/pki/ca.crt}
authorization: {mode: AlwaysAllow}
resolvConf: ""
makeIPTablesUtilChains: false
evictionHard: {memory.available: "1Mi", nodefs.available: "1%", imagefs.available: "1%"}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
syncFrequency: 5s
fileCheckFrequency: 5s
serializeImagePulls: false
EOF
    local sysctl
    : >"$LC_DIR/sysctls"
    for sysctl in "${LC_KERNEL_SYSCTLS[@]}"; do
        echo "$sysctl=$(sysctl -n "$sysctl")" >>"$LC_DIR/sysctls"
    done
    start_in_node kubelet "$LC_BIN/kubelet" \
        --config="$LC_DIR/kubelet/config.yaml" \
        --kubeconfig="$LC_DIR/node.kubeconfig" \
        --root-dir="$LC_DIR/kubelet/root" --cert-dir="$LC_DIR/kubelet/pki" \
        --hostname-override="$LC_NODE_NAME" --node-ip="$LC_NODE_IP" \
        --pod-infra-container-image=local.test/pause:3.9
    wait_for "node $LC_NODE_NAME to be Ready (log: $LC_DIR/logs/kubelet.log)" 90 \
        kubectl_admin wait --for=condition=Ready "node/$LC_NODE_NAME" --timeout=2s
}

# Packs directory $1 (a root filesystem) as a one-layer OCI image archive $4 named $2
# (local.test/NAME:TAG), with entrypoint JSON $3.
pack_oci_image() {
    local rootfs="$1" name="$2" entrypoint="$3" out="$4"
    local work
    work=$(mktemp -d "$LC_DIR/oci.XXXXXX")
    mkdir -p "$work/oci/blobs/sha256"
    tar --owner=0 --group=0 --numeric-owner -cf "$work/layer.tar" -C "$rootfs" .
    local layer layer_size config config_size manifest manifest_size
    layer=$(sha256sum "$work/layer.tar" | cut -d' ' -f1)
    layer_size=$(stat -c %s "$work/layer.tar")
    mv "$work/layer.tar" "$work/oci/blobs/sha256/$layer"
    printf '{"architecture":"amd64","os":"linux","config":{"Entrypoint":%s},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]}}' \
        "$entrypoint" "$layer" >"$work/config.json"
    config=$(sha256sum "$work/config.json" | cut -d' ' -f1)
    config_size=$(stat -c %s "$work/config.json")
    mv "$work/config.json" "$work/oci/blobs/sha256/$config"
    printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:%s","size":%s}]}' \
        "$config" "$config_size" "$layer" "$layer_size" >"$work/manifest.json"
    manifest=$(sha256sum "$work/manifest.json" | cut -d' ' -f1)
    manifest_size=$(stat -c %s "$work/manifest.json")
    mv "$work/manifest.json" "$work/oci/blobs/sha256/$manifest"
    printf '{"imageLayoutVersion":"1.0.0"}' >"$work/oci/oci-layout"
    printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"annotations":{"io.containerd.image.name":"%s","org.opencontainers.image.ref.name":"%s"},"platform":{"architecture":"amd64","os":"linux"}}]}' \
        "$manifest" "$manifest_size" "$name" "${name##*:}" >"$work/oci/index.json"
    tar -cf "$out" -C "$work/oci" .
    rm -rf "$work"
}

# The workload image: a static echo server (itests/workload/echo.rs) in an OCI archive.
build_echo_image() {
    local rootfs="$LC_DIR/echo-image"
    mkdir -p "$rootfs"
    rustc --edition 2021 -O -C target-feature=+crt-static -C strip=symbols \
        -o "$rootfs/echo" itests/workload/echo.rs
    pack_oci_image "$rootfs" local.test/randport-echo:1 '["/echo"]' "$LC_DIR/echo-image.tar"
}

# randport's own image, as the Dockerfile's but from this machine's files (no registry
# here): the workspace's randportd and randport (stripped), nft and iptables (the nf_tables
# flavour, as in the Dockerfile), and the shared libraries they load. The chart's DaemonSet
# pods run it (itests/tests/e2e.rs, the chart-on-the-node test).
LC_RANDPORT_IMAGE=local.test/randport:dev
build_randport_image() {
    local rootfs="$LC_DIR/randport-image"
    mkdir -p "$rootfs/usr/local/bin" "$rootfs/usr/sbin" "$rootfs/tmp" "$rootfs/run" "$rootfs/etc"
    strip -o "$rootfs/usr/local/bin/randportd" target/debug/randportd
    strip -o "$rootfs/usr/local/bin/randport" target/debug/randport
    cp /usr/sbin/nft /usr/sbin/xtables-nft-multi "$rootfs/usr/sbin/"
    local t s
    for t in iptables ip6tables; do
        for s in "" -save -restore; do ln -sf xtables-nft-multi "$rootfs/usr/sbin/$t$s"; done
    done
    local xt=/usr/lib/x86_64-linux-gnu/xtables
    mkdir -p "$rootfs$xt"
    cp -a "$xt/." "$rootfs$xt/"
    local lib
    # ldd's "NAME => /path (addr)" lines, and the loader's "/lib64/ld-linux... (addr)".
    for lib in $(ldd "$rootfs/usr/local/bin/randportd" "$rootfs/usr/sbin/nft" \
        "$rootfs/usr/sbin/xtables-nft-multi" "$rootfs$xt"/*.so 2>/dev/null \
        | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\/.*ld-linux/ {print $1}' | sort -u); do
        mkdir -p "$rootfs$(dirname "$lib")"
        cp -L "$lib" "$rootfs$lib"
    done
    chmod 1777 "$rootfs/tmp"
    pack_oci_image "$rootfs" "$LC_RANDPORT_IMAGE" '[]' "$LC_DIR/randport-image.tar"
    rm -rf "$rootfs"
}

# randport as an operator installs it: the manifests' RBAC applied, `randportd install`
# into the node's conflist, and the agent with the ServiceAccount's token and the
# DaemonSet's capabilities (read from deploy/randport.yaml).
install_randport() {
    # The DaemonSet in it gets no pods here (no controller manager, no image registry):
    # the agent below is what it would run.
    kubectl_admin apply -f deploy/randport.yaml >/dev/null
    # The admission policy where the API serves its kind (1.30+; discovery, as kind-e2e.sh).
    if grep -q '"validatingadmissionpolicies"' <<<"$(kubectl_admin get --raw /apis/admissionregistration.k8s.io/v1)"; then
        kubectl_admin apply -f deploy/admission-policy.yaml >/dev/null
    else
        echo "    this API server does not serve ValidatingAdmissionPolicy v1: the policy is skipped"
    fi
    LC_CAPS=$(kubectl_admin -n kube-system get daemonset randport -o \
        jsonpath='{.spec.template.spec.containers[?(@.name=="agent")].securityContext.capabilities.add}' |
        tr -d '[]" ' | tr '[:upper:]' '[:lower:]')
    [ -n "$LC_CAPS" ] || { echo "deploy/randport.yaml: no capabilities for the agent container" >&2; return 1; }
    echo "    agent capabilities (deploy/randport.yaml): $LC_CAPS"
    local token
    token=$(kubectl_admin -n kube-system create token randport --duration=48h)
    write_kubeconfig agent "$token"
    agent_install
    agent_start
}

# `randportd install` on the node for the agent below (what the DaemonSet's init container
# does); again after a test has run the chart's own pods and uninstalled them.
agent_install() {
    local conf="$LC_DIR/cni/net.d" bin="$LC_DIR/cni/bin"
    in_node target/debug/randportd install --binary target/debug/randport \
        --cni-bin-dir "$bin" --cni-conf-dir "$conf" --socket "$LC_DIR/randport/randportd.sock" \
        --state-dir "$LC_DIR/randport/state"
    grep -q '"type": "randport"' "$conf/10-bridge.conflist" \
        || { echo "randport is not in $conf/10-bridge.conflist after install" >&2; return 1; }
}

# The agent, with exactly the DaemonSet's capabilities as its bounding set.
agent_start() {
    mkdir -p "$LC_DIR/randport"
    local bounding="-all" cap
    for cap in ${LC_CAPS//,/ }; do bounding="$bounding,+$cap"; done
    start_in_node randportd env RANDPORT_NODE_NAME="$LC_NODE_NAME" RANDPORT_PODS=kube \
        KUBECONFIG="$LC_DIR/agent.kubeconfig" RANDPORT_CNI_CONF_DIR="$LC_DIR/cni/net.d" \
        RANDPORT_SOCKET="$LC_DIR/randport/randportd.sock" RANDPORT_STATE_DIR="$LC_DIR/randport/state" \
        RANDPORT_METRICS_ADDR=127.0.0.1:9740 \
        setpriv --bounding-set="$bounding" -- "$PWD/target/debug/randportd"
    local pid deadline=$((SECONDS + 60))
    pid=$(cat "$LC_DIR/randportd.pid")
    until in_node target/debug/randportd list --socket "$LC_DIR/randport/randportd.sock" >/dev/null 2>&1; do
        if ! kill -0 "$pid" 2>/dev/null || [ "$SECONDS" -ge "$deadline" ]; then
            echo "the randport agent did not become ready; its log ($LC_DIR/logs/randportd.log) ends:" >&2
            tail -n 20 "$LC_DIR/logs/randportd.log" >&2
            return 1
        fi
        sleep 0.1
    done
}

agent_stop() {
    local pid
    pid=$(cat "$LC_DIR/randportd.pid" 2>/dev/null) || return 0
    kill -KILL "$pid" 2>/dev/null || true
    # (not our child when a test's control script stops it: wait by polling)
    while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
    rm -f "$LC_DIR/randportd.pid"
}

# What a later shell needs to act on this cluster (the agent control script, `down`).
write_cluster_env() {
    declare -p LC_RUN_NAME LC_NODE_NS LC_CLIENT_NS LC_DIR LC_BIN LC_CAPS LC_ASSETS | sed 's/^declare -- //' >"$LC_DIR/env"
}

# Loads a cluster's env file (DIR/env) into this shell.
load_cluster_env() {
    [ -f "$1/env" ] || { echo "$1: not a local cluster's directory (no env file)" >&2; return 1; }
    # shellcheck disable=SC1091
    source "$1/env"
}

# A small control script the tests call to stop, start or ask the agent, or to list
# randport's nft table (they run in the client namespace and cannot reach the node's socket
# or firewall otherwise).
write_agent_control() {
    cat >"$LC_DIR/agent" <<EOF
#!/usr/bin/env bash
# Generated by ci/local-cluster.sh: controls the local node's randport agent.
set -euo pipefail
cd "$PWD"
source ci/lib.sh
source ci/local-cluster.sh
load_cluster_env "$LC_DIR"
case "\${1:-}" in
    stop) agent_stop ;;
    start) agent_start ;;
    install) agent_install ;;
    list) in_node target/debug/randportd list --json --socket "\$LC_DIR/randport/randportd.sock" ;;
    table) in_node nft list table inet randport ;;
    *) echo "usage: \$0 stop|start|install|list|table" >&2; exit 2 ;;
esac
EOF
    chmod +x "$LC_DIR/agent"
}

cluster_up() {
    LC_RUN_NAME="rp-$(printf '%04x%04x' $$ $RANDOM)"
    LC_NODE_NS="$LC_RUN_NAME-node"
    LC_CLIENT_NS="$LC_RUN_NAME-client"
    LC_DIR="${RANDPORT_LOCAL_DIR:-/tmp}/$LC_RUN_NAME"
    mkdir -p "$LC_DIR/logs"
    echo "    run $LC_RUN_NAME, files in $LC_DIR"
    step "network: node $LC_NODE_NS ($LC_NODE_IP), client $LC_CLIENT_NS ($LC_CLIENT_IP)"
    setup_network
    step "certificates, etcd and kube-apiserver"
    write_certificates
    write_kubeconfig admin admin
    write_kubeconfig node node
    start_control_plane
    step "building the images: the workload (itests/workload/echo.rs) and randport's"
    build_echo_image
    build_randport_image
    step "containerd and the kubelet for node $LC_NODE_NAME"
    start_node
    step "installing randport (deploy/randport.yaml RBAC, randportd install, the agent)"
    install_randport
    write_cluster_env
    write_agent_control
}

# Stops pid file $1's process (TERM, then KILL after $2 seconds).
stop_pidfile() {
    local pid
    pid=$(cat "$1" 2>/dev/null) || return 0
    kill -TERM "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + $2))
    while kill -0 "$pid" 2>/dev/null; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            kill -KILL "$pid" 2>/dev/null || true
        fi
        sleep 0.2
    done
    rm -f "$1"
}

cluster_down() {
    [ -n "${LC_DIR:-}" ] || return 0
    # Pods first, through the kubelet, so each sandbox gets its CNI DEL while the agent runs.
    if [ -f "$LC_DIR/kubelet.pid" ] && kubectl_admin get --raw /readyz >/dev/null 2>&1; then
        kubectl_admin delete pods --all-namespaces --all --wait=false >/dev/null 2>&1 || true
        local deadline=$((SECONDS + 60))
        while [ -n "$(kubectl_admin get pods -A -o name 2>/dev/null)" ] && [ "$SECONDS" -lt "$deadline" ]; do
            sleep 0.5
        done
    fi
    stop_pidfile "$LC_DIR/kubelet.pid" 10
    # Whatever sandboxes remain are stopped through containerd (no CNI DEL for those); the
    # network namespaces they were given are noted first, to be removed below.
    local pod_netns=()
    if [ -f "$LC_DIR/containerd.pid" ]; then
        local sock="$LC_DIR/containerd/containerd.sock" id
        for id in $(ctr --address "$sock" -n k8s.io containers list -q 2>/dev/null); do
            mapfile -t -O "${#pod_netns[@]}" pod_netns < <(ctr --address "$sock" -n k8s.io containers info "$id" 2>/dev/null |
                grep -o '"/var/run/netns/cni-[0-9a-f-]*"' | tr -d '"' | sed 's#^/var##')
        done
        for id in $(ctr --address "$sock" -n k8s.io tasks list -q 2>/dev/null); do
            ctr --address "$sock" -n k8s.io tasks kill -s KILL "$id" >/dev/null 2>&1 || true
        done
    fi
    stop_pidfile "$LC_DIR/randportd.pid" 5
    stop_pidfile "$LC_DIR/containerd.pid" 10
    stop_pidfile "$LC_DIR/kube-apiserver.pid" 10
    stop_pidfile "$LC_DIR/etcd.pid" 10
    # containerd-shim processes of our containerd (their command line names our socket).
    local pid
    for pid in $(pgrep -f "containerd-shim.*$LC_DIR" 2>/dev/null); do
        kill -KILL "$pid" 2>/dev/null || true
    done
    # Mounts under the run's directory, deepest first.
    local mount
    while read -r mount; do
        umount -l "$mount" 2>/dev/null || true
    done < <(awk -v dir="$LC_DIR" 'index($2, dir) == 1 { print $2 }' /proc/self/mounts | sort -r)
    local netns
    for netns in "${pod_netns[@]}"; do
        [ -e "$netns" ] || continue
        umount "$netns" 2>/dev/null || true
        rm -f "$netns"
    done
    if [ -f "$LC_DIR/sysctls" ]; then
        local line
        while read -r line; do sysctl -q -w "$line" >/dev/null || true; done <"$LC_DIR/sysctls"
    fi
    local hierarchy
    for hierarchy in /sys/fs/cgroup/*/; do
        [ -d "$hierarchy${LC_RUN_NAME:-none}" ] || continue
        find "$hierarchy$LC_RUN_NAME" -depth -type d -exec rmdir {} + 2>/dev/null || true
    done
    ip netns delete "$LC_CLIENT_NS" 2>/dev/null || true
    ip netns delete "$LC_NODE_NS" 2>/dev/null || true
}

# Prints whatever of this run is still on the machine after cluster_down (nothing, when
# the cleanup worked): namespaces, mounts, processes, cgroups, changed sysctls.
cluster_leftovers() {
    ip netns list 2>/dev/null | grep -F "$LC_RUN_NAME" | sed 's/^/network namespace: /' || true
    awk -v dir="$LC_DIR" 'index($2, dir) == 1 { print "mount: " $2 }' /proc/self/mounts
    pgrep -af -- "$LC_DIR" 2>/dev/null | grep -v -e pgrep -e cluster_leftovers | sed 's/^/process: /' || true
    local hierarchy
    for hierarchy in /sys/fs/cgroup/*/; do
        [ -d "$hierarchy$LC_RUN_NAME" ] && echo "cgroup: $hierarchy$LC_RUN_NAME"
    done
    if [ -f "$LC_DIR/sysctls" ]; then
        local line
        while read -r line; do
            [ "$(sysctl -n "${line%%=*}")" = "${line#*=}" ] || echo "sysctl: ${line%%=*} is $(sysctl -n "${line%%=*}"), was ${line#*=}"
        done <"$LC_DIR/sysctls"
    fi
    return 0
}
