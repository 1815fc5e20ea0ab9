# Regate: a small, non-root image whose default command serves a working config.
#
#   /etc/regate/regate.yaml    the config (deploy/container/regate.yaml); paths in it are relative to it
#   /etc/regate/keys.yaml      API-key digests (none shipped: mount your own)
#   /etc/regate/rego/          the policy bundle: Rego modules ...
#   /etc/regate/policies/      ... and their data
#   /var/lib/regate/audit/     the hash-chained audit log, on a volume
#
# Mount over any of them (docker run -v ./my-regate.yaml:/etc/regate/regate.yaml:ro ...).
# tests/test_deploy_image.py reads this file and does what it says (wheel, files,
# user, environment, command) without a Docker engine: keep its instructions to
# the ones that test understands (FROM, ARG, WORKDIR, COPY, RUN, ENV, USER,
# EXPOSE, VOLUME, STOPSIGNAL, HEALTHCHECK, ENTRYPOINT, CMD).

# ---- the real OPA, built from source at a pinned version: for policy.engine: opa, run
# the same image as an OPA server (docker run --entrypoint opa IMAGE run --server ...)
FROM golang:1.26-bookworm AS opa
ARG OPA_VERSION=1.22.4
RUN CGO_ENABLED=0 GOBIN=/out go install github.com/open-policy-agent/opa@v${OPA_VERSION} && /out/opa version

# ---- Regate and its locked, hashed dependencies in a virtualenv
FROM python:3.11-slim-bookworm AS build
RUN python -m venv /opt/regate
COPY requirements.lock /src/requirements.lock
RUN /opt/regate/bin/pip install --no-cache-dir --require-hashes --only-binary=:all: -r /src/requirements.lock
COPY pyproject.toml README.md LICENSE /src/
COPY proxy /src/proxy
RUN /opt/regate/bin/pip install --no-cache-dir --no-deps /src

# ---- the image
FROM python:3.11-slim-bookworm
COPY --from=build /opt/regate /opt/regate
COPY --from=opa /out/opa /usr/local/bin/opa
COPY deploy/container/regate.yaml deploy/container/keys.yaml /etc/regate/
COPY rego /etc/regate/rego
COPY policies /etc/regate/policies
COPY LICENSE /usr/share/doc/regate/LICENSE
# The audit volume belongs to the user Regate runs as (numeric, so Kubernetes'
# runAsNonRoot can check it).
RUN mkdir -p /var/lib/regate/audit && chown -R 10001:10001 /var/lib/regate
ENV PATH=/opt/regate/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    REGATE_AUDIT_DIR=/var/lib/regate/audit
WORKDIR /var/lib/regate
USER 10001:10001
VOLUME /var/lib/regate
# data plane, admin plane (health, metrics, approvals inbox)
EXPOSE 8080 8081
# SIGTERM: stop accepting, let in-flight calls finish within http.shutdown_grace_s
# (8 s in deploy/container/regate.yaml, inside `docker stop`'s default 10 s;
# raise both together: docker stop -t / Kubernetes terminationGracePeriodSeconds).
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["regate", "healthcheck", "-c", "/etc/regate/regate.yaml"]
ENTRYPOINT ["regate"]
CMD ["serve", "-c", "/etc/regate/regate.yaml"]
