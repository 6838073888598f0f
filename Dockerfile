# syntax=docker/dockerfile:1
# One image holding the three binaries (ai-node, backend, proxy);
# docker-compose.yml picks the command per service.
#
#   docker build -t chatproxy .        (or: docker compose build)
#
# Stage 1 builds with the full Rust toolchain (Pingora's build needs cmake);
# stage 2 is a slim Debian with the binaries, the shipped conf/, and curl for
# the healthchecks. It runs as an unprivileged user.

FROM rust:1-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# The whole workspace (every member's manifest must be there for cargo to
# load it); .dockerignore keeps target/ and .git out of the context.
COPY . .
# The caches keep the registry and the target dir between builds; the binaries
# are copied out of the cached target dir, which the next stage cannot see.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p ai-node -p backend -p proxy \
 && mkdir -p /out \
 && cp target/release/ai-node target/release/backend target/release/proxy /out/

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --create-home --home-dir /app chat
COPY --from=build /out/ /usr/local/bin/
# The shipped configuration; compose also mounts ./conf over it, read-only, so
# an edit needs no rebuild (the proxy re-reads its file on SIGHUP).
COPY conf/ /etc/chatproxy/
WORKDIR /app
USER chat
ENV RUST_LOG=info
# The default command; compose sets one per service.
CMD ["backend", "--config", "/etc/chatproxy/backend.toml"]
