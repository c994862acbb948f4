# Multi-stage build: a Rust builder with BoringSSL's build tools, then a small non-root runtime.
# Mount the config and PKI from outside:
#   docker build -t mtls-edge .
#   docker run --rm -p 8443:8443 -p 9100:9100 -v $PWD/conf:/etc/mtls-edge:ro mtls-edge
FROM rust:1-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends cmake clang libclang-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# The git revision for mtls_edge_build_info (the build context has no .git):
#   docker build --build-arg MTLS_EDGE_REVISION=$(git rev-parse --short=12 HEAD) -t mtls-edge .
ARG MTLS_EDGE_REVISION=unknown
ENV MTLS_EDGE_REVISION=$MTLS_EDGE_REVISION
COPY Cargo.toml Cargo.lock build.rs ./
COPY src ./src
RUN cargo build --release --locked && strip target/release/mtls-edge

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin mtls-edge
COPY --from=build /src/target/release/mtls-edge /usr/local/bin/mtls-edge
USER 10001
EXPOSE 8443 9100
# pid_file and upgrade_sock default to /tmp, which the non-root user can write.
ENTRYPOINT ["/usr/local/bin/mtls-edge"]
CMD ["-c", "/etc/mtls-edge/edge.yaml"]
