# Regate in a slim Python image, with the static OPA binary beside it so the
# container can also run OPA as a sidecar process for `policy.engine: opa`.
# (No Docker engine runs on the machines this was written on: this file is
# kept correct by reading, not by building.)
FROM openpolicyagent/opa:1.20.0-static AS opa

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim
RUN useradd --system --uid 10001 --home /srv/regate regate
COPY --from=build /install /usr/local
COPY --from=opa /opa /usr/local/bin/opa
WORKDIR /srv/regate
COPY rego ./rego
COPY policies ./policies
COPY examples/regate.yaml ./regate.yaml
RUN mkdir -p audit && chown regate audit
USER regate
EXPOSE 8080 8081
# SIGTERM drains in-flight calls (http.shutdown_grace_s) before exiting.
STOPSIGNAL SIGTERM
ENTRYPOINT ["regate"]
CMD ["serve", "-c", "regate.yaml"]
