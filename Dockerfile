# The one image the Helm chart runs: every Hafen binary, non-root, on a slim Debian with
# only what they call (CA certificates; pg_dump and pg_restore for backups). The client tools
# must be of the PostgreSQL server's major version or newer: PG_CLIENT names the package.
#
#   docker build -t registry.example.com/hafen/hafen:0.1.0 .

ARG RUST_VERSION=1.95
ARG DEBIAN=bookworm

FROM rust:${RUST_VERSION}-${DEBIAN} AS build
WORKDIR /src
# .dockerignore keeps target/, .dev/ and node_modules out.
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
        --bin hafen-auth --bin hafen-messaging --bin hafen-tenant --bin hafen-retention \
        --bin hafen-audit --bin hafen-webchat --bin hafen \
    && mkdir -p /out \
    && cp target/release/hafen-auth target/release/hafen-messaging target/release/hafen-tenant \
        target/release/hafen-retention target/release/hafen-audit target/release/hafen-webchat \
        target/release/hafen /out/

FROM debian:${DEBIAN}-slim
# checkov:skip=CKV_DOCKER_2:Kubernetes ignores HEALTHCHECK; the chart probes grpc.health.v1 on each service's health port
ARG PG_CLIENT=postgresql-client-15
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates "${PG_CLIENT}" \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 hafen \
    && useradd --system --uid 10001 --gid hafen --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin hafen
COPY --from=build /out/ /usr/local/bin/
USER 10001:10001
# The chart names the binary of each container; alone, the image runs the auth service.
ENTRYPOINT []
CMD ["/usr/local/bin/hafen-auth", "--help"]
