# syntax=docker/dockerfile:1
# randport's image: randportd (the agent) and randport (the CNI plugin the agent's init
# container copies to the node). Static musl binaries, so the plugin runs on any node.
#   docker build -t randport:dev .
# The pod needs NET_ADMIN and NET_RAW (deploy/randport.yaml grants exactly those).

FROM rust:1.95-alpine AS build
RUN apk add --no-cache musl-dev gcc
# The workspace's release profile keeps line tables for profiling; the image does not need
# them (the plugin alone is 56 MB with them, 1.5 MB without).
ENV CARGO_PROFILE_RELEASE_DEBUG=false CARGO_PROFILE_RELEASE_STRIP=symbols
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p randport-plugin --bins \
    && cp target/release/randport target/release/randportd /usr/local/bin/

# The release image (`--target release`, one per platform): the static binaries that
# ci/release-build.sh put in dist/<arch>/, nothing compiled here.
#   ci/release-build.sh && docker buildx build --platform linux/amd64,linux/arm64 --target release .
FROM alpine:3.22 AS release
ARG TARGETARCH
RUN apk add --no-cache nftables iptables ip6tables \
    && for t in iptables ip6tables; do for s in "" -save -restore; do \
         ln -sf "$(command -v xtables-nft-multi)" "/usr/sbin/$t$s"; done; done
COPY dist/${TARGETARCH}/randport dist/${TARGETARCH}/randportd /usr/local/bin/
ENTRYPOINT []
CMD ["randportd", "--help"]

# The default target: built from source in the build stage above.
FROM alpine:3.22
# nft for the default backend; iptables for the other one and for removing its leftovers.
# The nf_tables flavour of iptables, like the nodes' (kind, current distributions).
RUN apk add --no-cache nftables iptables ip6tables \
    && for t in iptables ip6tables; do for s in "" -save -restore; do \
         ln -sf "$(command -v xtables-nft-multi)" "/usr/sbin/$t$s"; done; done
COPY --from=build /usr/local/bin/randport /usr/local/bin/randportd /usr/local/bin/
ENTRYPOINT []
CMD ["randportd", "--help"]
