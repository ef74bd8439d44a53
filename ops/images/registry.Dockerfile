# An OCI registry (Debian's docker-registry, copied from the host) on the base from
# ops/make-base-image.sh; the context holds `docker-registry`. Used by ops/compose.yaml.
ARG BASE_IMAGE=beacon-base:bookworm
FROM ${BASE_IMAGE}
COPY docker-registry /usr/local/bin/docker-registry
RUN mkdir -p /etc/docker-registry /var/lib/registry \
 && printf 'version: 0.1\nlog: {level: warn}\nstorage: {filesystem: {rootdirectory: /var/lib/registry}, delete: {enabled: true}}\nhttp: {addr: 0.0.0.0:5000}\n' \
      > /etc/docker-registry/config.yml
VOLUME ["/var/lib/registry"]
EXPOSE 5000/tcp
ENTRYPOINT ["docker-registry", "serve", "/etc/docker-registry/config.yml"]
