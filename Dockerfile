# cachet in a container: `docker build -t cachet .` then
# `docker run -p 8080:8080 -v cachet-data:/var/lib/cachet cachet`.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY benches benches
RUN cargo build --release --locked --bins

FROM debian:bookworm-slim
RUN useradd --system --home-dir /var/lib/cachet --create-home cachet
COPY --from=build /src/target/release/cachet /src/target/release/cache-admin /usr/local/bin/
USER cachet
VOLUME /var/lib/cachet
EXPOSE 8080
ENV CACHET_LISTEN=0.0.0.0:8080 CACHET_DATA_DIR=/var/lib/cachet
ENTRYPOINT ["cachet"]
