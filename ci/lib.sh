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

ensure_nextest() {
    cargo nextest --version >/dev/null 2>&1 && return 0
    step "installing cargo-nextest"
    cargo install cargo-nextest --locked
}
