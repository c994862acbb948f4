# The mtls-edge image: a Rust build stage, then a small runtime that runs as uid 10001 with no
# shell needed (the entrypoint is the binary), for a read-only root filesystem. The layout it
# expects (README, "Deploying"): the config folder at /etc/mtls-edge/conf, the edge's
# certificates and keys at /etc/mtls-edge/secrets, both mounted read-only.
#   docker build --build-arg MTLS_EDGE_REVISION=$(git rev-parse --short=12 HEAD) -t mtls-edge .
# scripts/image.sh builds the same runtime from the host's release binary (BINARY=host) and a
# Debian base made locally, where no registry can be reached.
ARG BUILDER=docker.io/library/rust:1.95-slim-bookworm
ARG RUNTIME=docker.io/library/debian:12.12-slim
ARG BINARY=build

FROM ${BUILDER} AS build
RUN apt-get update && apt-get install -y --no-install-recommends cmake clang libclang-dev g++ make \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# The git revision for mtls_edge_build_info (the build context has no .git).
ARG MTLS_EDGE_REVISION=unknown
ENV MTLS_EDGE_REVISION=$MTLS_EDGE_REVISION
COPY Cargo.toml Cargo.lock build.rs ./
COPY src ./src
RUN cargo build --release --locked && strip target/release/mtls-edge \
    && install -D target/release/mtls-edge /out/mtls-edge

# The host's build: scripts/image.sh puts the stripped binary at ./mtls-edge in its context.
FROM scratch AS host
COPY mtls-edge /out/mtls-edge

FROM ${BINARY} AS binary

# No system trust store: the edge trusts only the CAs its config names (origins, shields, devices).
FROM ${RUNTIME}
RUN useradd --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin mtls-edge \
    && mkdir -p /etc/mtls-edge/conf /etc/mtls-edge/secrets
COPY --from=binary /out/mtls-edge /usr/local/bin/mtls-edge
USER 10001:10001
# Viewers, the admin listener (/metrics, /healthz).
EXPOSE 8443 9100
# pid_file and upgrade_sock are under /tmp: mount a tmpfs there with a read-only root.
ENTRYPOINT ["/usr/local/bin/mtls-edge"]
CMD ["-c", "/etc/mtls-edge/conf/edge.yaml"]
