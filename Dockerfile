# The ninelives image: one binary (`ninelives operator`, `agent run`, `worker train`), run as
# the non-root user 65532 the chart and the operator's worker pods expect. For machines with a
# container runtime:
#
#   docker build -t ghcr.io/ninelives/ninelives:0.1.0 .
#
# Without one, scripts/build-image assembles the same layout as an OCI image with umoci.
FROM rust:1-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends protobuf-compiler libprotobuf-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p ninelives \
 && strip target/release/ninelives

FROM debian:bookworm-slim
# coreutils' `sleep` keeps spare worker pods standing by; common-licenses is the text the
# examples train on.
RUN groupadd --gid 65532 ninelives \
 && useradd --uid 65532 --gid 65532 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin ninelives
COPY --from=build /src/target/release/ninelives /usr/local/bin/ninelives
USER 65532:65532
WORKDIR /tmp
ENTRYPOINT ["/usr/local/bin/ninelives"]
