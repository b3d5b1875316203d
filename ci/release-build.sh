#!/usr/bin/env bash
# Static musl binaries of randport, randportd and kubectl-randport for amd64 and arm64, as
# the release ships them, into dist/<arch>/ (with SHA256SUMS). Cross-compiled with
# cargo-zigbuild, zig from PyPI (ziglang); the Rust targets come from rustup.
#   ci/release-build.sh            both architectures
#   ARCHES=arm64 ci/release-build.sh
source "$(dirname "$0")/lib.sh"

declare -A triple=([amd64]=x86_64-unknown-linux-musl [arm64]=aarch64-unknown-linux-musl)
declare -A machine=([amd64]=62 [arm64]=183) # ELF e_machine: EM_X86_64, EM_AARCH64
arches=${ARCHES:-amd64 arm64}
bins=(randport randportd kubectl-randport)

for arch in $arches; do
    t=${triple[$arch]:?unknown arch $arch (amd64, arm64)}
    if ! rustup target list --installed | grep -qx "$t"; then
        step "adding the Rust target $t (rustup)"
        rustup target add "$t"
    fi
done
if ! python3 -c 'import ziglang' 2>/dev/null; then
    step "installing zig (pip: ziglang)"
    python3 -m pip install --quiet --disable-pip-version-check ziglang 2>/dev/null \
        || python3 -m pip install --quiet --disable-pip-version-check --break-system-packages ziglang
fi
if ! cargo zigbuild --version >/dev/null 2>&1; then
    step "installing cargo-zigbuild (cargo install)"
    cargo install --locked cargo-zigbuild
fi

# No line tables in what ships: the workspace keeps them for profiling.
export CARGO_PROFILE_RELEASE_DEBUG=false CARGO_PROFILE_RELEASE_STRIP=symbols
for arch in $arches; do
    t=${triple[$arch]}
    step "building for $arch ($t)"
    start=$SECONDS
    cargo zigbuild --release --locked -p randport-plugin --bins --target "$t"
    mkdir -p "dist/$arch"
    for b in "${bins[@]}"; do
        cp "target/$t/release/$b" "dist/$arch/$b"
        # An ELF of the right machine, and static: no program interpreter.
        m=$(od -An -tu2 -j18 -N2 "dist/$arch/$b" | tr -d ' ')
        [ "$m" = "${machine[$arch]}" ] || { echo "dist/$arch/$b: ELF machine $m, expected ${machine[$arch]}" >&2; exit 1; }
        if readelf -l "dist/$arch/$b" 2>/dev/null | grep -q 'Requesting program interpreter'; then
            echo "dist/$arch/$b is dynamically linked" >&2
            exit 1
        fi
    done
    (cd "dist/$arch" && sha256sum "${bins[@]}" >SHA256SUMS)
    echo "    built in $((SECONDS - start)) s"
done

# The arm64 binaries run here under qemu-user when it is installed (apt: qemu-user-static).
if [[ " $arches " == *" arm64 "* ]] && command -v qemu-aarch64-static >/dev/null; then
    step "running the arm64 binaries under qemu-aarch64-static"
    for b in randportd randport kubectl-randport; do
        case $b in
            randport) out=$(CNI_COMMAND=VERSION qemu-aarch64-static "dist/arm64/$b" </dev/null) ;;
            *) out=$(qemu-aarch64-static "dist/arm64/$b" --version) ;;
        esac
        echo "    arm64 $b: $out"
    done
fi

step "sizes (bytes; stripped, static)"
for arch in $arches; do
    for b in "${bins[@]}"; do
        printf '%-6s %-18s %10d\n' "$arch" "$b" "$(stat -c %s "dist/$arch/$b")"
    done
done
