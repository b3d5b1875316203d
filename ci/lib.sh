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
