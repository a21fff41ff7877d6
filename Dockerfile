# token-scaler: one image for every component.
#
#   docker run IMAGE serve     the KEDA external scaler (gRPC 9090, HTTP 9091)
#   docker run IMAGE sidecar   the token-metering proxy (proxy 8080, admin 9100)
#   docker run IMAGE gateway   the entry point that holds requests at zero (8080, admin 9100)
#
# The runtime stage holds the base image, tini and a venv with the project and its
# dependencies: no compiler, no pip, no source tree. It runs as uid/gid 65532 and
# writes nothing outside /tmp, so it works with readOnlyRootFilesystem (mount an
# emptyDir on /tmp). tini is PID 1: it forwards SIGTERM to token-scaler, which then
# drains (scaler: health NOT_SERVING, then stop; sidecar and gateway: readiness 503, drain).
#
# BASE_IMAGE: any Debian-like image with Python >= 3.11 and `python3 -m venv`
# (python:3.11-slim-bookworm and newer; scripts/build-image makes one with debootstrap
# where no image can be pulled). tini is taken from the base when present, else
# installed with apt. Both stages must use the same base: the venv points at its python3.
#
# BuildKit (DOCKER_BUILDKIT=1 or docker buildx) is required for the cache and secret
# mounts. Behind a TLS-inspecting proxy, pass its CA bundle to pip only in the build
# stage: --secret id=ca,src=/etc/ssl/certs/ca-certificates.crt (never baked in).
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_INPUT=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
RUN python3 -m venv /opt/token-scaler

# Dependencies first, from pyproject.toml alone: a change of source code reuses this layer.
# The tracing extra is in: OpenTelemetry stays off until OTEL_* variables turn it on.
COPY pyproject.toml ./
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=secret,id=ca \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi; \
    python3 -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; print("\n".join(p["dependencies"] + p["optional-dependencies"]["tracing"]))' \
      > /tmp/requirements.txt \
    && /opt/token-scaler/bin/pip install -r /tmp/requirements.txt

# The project as a wheel (what a release would publish), installed without dependencies.
# Plain Python: setup.py compiles only the simulator's modules and the scaler's series with
# mypyc, which needs a C compiler this stage does not have, and the image's services spend
# their CPU on HTTP, gRPC and Redis, not there (docs/development.md, "Compiled modules").
COPY . .
ENV TOKEN_SCALER_COMPILE=0
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=secret,id=ca \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi; \
    /opt/token-scaler/bin/pip wheel --no-deps --wheel-dir /wheels . \
    && /opt/token-scaler/bin/pip install --no-deps /wheels/token_scaler-*.whl \
    && /opt/token-scaler/bin/pip check \
    && /opt/token-scaler/bin/pip uninstall -y -q pip setuptools \
    && /opt/token-scaler/bin/token-scaler --help >/dev/null

FROM ${BASE_IMAGE}
RUN set -eu; \
    if ! command -v tini >/dev/null 2>&1; then \
      apt-get update \
      && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends tini \
      && rm -rf /var/lib/apt/lists/*; \
    fi; \
    ln -sf "$(command -v tini)" /usr/local/bin/tini-init; \
    groupadd --system --gid 65532 nonroot; \
    useradd --system --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin nonroot
COPY --from=build /opt/token-scaler /opt/token-scaler
ENV PATH=/opt/token-scaler/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    TMPDIR=/tmp
LABEL org.opencontainers.image.title="token-scaler" \
      org.opencontainers.image.description="Token-rate autoscaling for LLM inference: KEDA external scaler and token-metering sidecar" \
      org.opencontainers.image.licenses="Apache-2.0"
USER 65532:65532
WORKDIR /tmp
EXPOSE 8080 9100 9090 9091
ENTRYPOINT ["/usr/local/bin/tini-init", "--", "token-scaler"]
CMD ["--help"]
