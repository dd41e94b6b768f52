# Container image for the user-login pipeline (SQS -> mask PII -> PostgreSQL).
#
#   docker build -t login-pipeline .
#   docker run --rm login-pipeline keygen       # print a fresh masking key
#   docker run --rm -e PIPELINE_POSTGRES__DSN=... login-pipeline migrate
#
# The image runs the external-services mode only: the [embedded] extra (pgserver,
# moto) is not installed, so PIPELINE_SQS__QUEUE_URL, PIPELINE_SQS__DLQ_URL,
# PIPELINE_POSTGRES__DSN and PIPELINE_MASKING__KEY must be provided at run time.

ARG PYTHON_IMAGE=python:3.11-slim

# --------------------------------------------------------------------------- builder
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

# A self-contained virtualenv that is copied verbatim into the runtime stage. Both
# stages use the same base image, so the venv's interpreter symlink stays valid.
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
COPY . .
# Build a wheel first (no editable/source install ends up in the image), then
# install it with its runtime dependencies only (no [embedded], no [test]).
RUN pip wheel --no-deps --wheel-dir /wheels . \
 && pip install /wheels/*.whl \
 && python -m compileall -q /opt/venv

# --------------------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="login-pipeline" \
      org.opencontainers.image.description="SQS user-login events -> PII masking (AES-SIV) -> PostgreSQL user_logins"

# Fixed numeric UID/GID so Kubernetes can verify runAsNonRoot.
RUN groupadd --system --gid 10001 pipeline \
 && useradd --system --uid 10001 --gid pipeline --no-create-home \
            --home-dir /nonexistent --shell /usr/sbin/nologin pipeline

COPY --from=builder /opt/venv /opt/venv

WORKDIR /app
COPY config.toml /app/config.toml

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIPELINE_CONFIG=/app/config.toml \
    PIPELINE_PIPELINE__STATE_DIR=/tmp/pipeline \
    PIPELINE_HTTP__PORT=8080

USER 10001:10001

EXPOSE 8080

# /healthz is liveness-style (process + event loop alive). slim has no curl, so use
# the interpreter; urlopen raises on connection errors and non-2xx -> exit 1.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PIPELINE_HTTP__PORT', '8080'), timeout=3)"]

# SIGTERM starts a graceful drain bounded by PIPELINE_PIPELINE__GRACE_SECONDS
# (default 10 s); give the container runtime a longer stop timeout than that.
STOPSIGNAL SIGTERM

ENTRYPOINT ["python", "-m", "pipeline"]
CMD ["run"]
