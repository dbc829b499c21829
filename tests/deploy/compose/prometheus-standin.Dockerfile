# Stand-in for prom/prometheus when no container registry can be reached: Debian's `prometheus` package
# on the local Debian base (../shared/tools/docker-offline-bases.sh), laid out like the official image
# (binary as the entrypoint, working and data directory /prometheus owned by `nobody`, port 9090) so that
# docker-compose.yml's command, volumes and ports apply unchanged. Built by tests/deploy/composestack.py.
ARG BASE=local/debian:bookworm
FROM ${BASE}
RUN apt-get update -qq \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /prometheus /etc/prometheus \
    && chown nobody:nogroup /prometheus
USER nobody
WORKDIR /prometheus
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
