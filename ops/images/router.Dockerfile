# beacon-router from a binary built on the host, on the base from ops/make-base-image.sh
# (the context is a folder holding `beacon-router`). Used by ops/compose.yaml.
ARG BASE_IMAGE=beacon-base:bookworm
FROM ${BASE_IMAGE}
RUN (getent group beacon >/dev/null || groupadd --system --gid 10001 beacon) \
 && (getent passwd beacon >/dev/null || useradd --system --uid 10001 --gid beacon \
      --home-dir /var/lib/beacon-router --shell /usr/sbin/nologin beacon) \
 && mkdir -p /var/lib/beacon-router && chown beacon:beacon /var/lib/beacon-router
COPY beacon-router /usr/local/bin/beacon-router
ENV BEACON_ROUTER_DATA_DIR=/var/lib/beacon-router \
    BEACON_ROUTER_LISTEN=0.0.0.0:8080
VOLUME ["/var/lib/beacon-router"]
# 8080: the router's HTTP API; 4001: libp2p.
EXPOSE 8080/tcp 4001/tcp 4001/udp
USER beacon
WORKDIR /var/lib/beacon-router
ENTRYPOINT ["beacon-router"]
CMD ["serve"]
