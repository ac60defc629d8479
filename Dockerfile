# syntax=docker/dockerfile:1
# One image for every service: `huitou serve <ingest|lifecycle|campaigns|notifier>`, and
# `huitou migrate` (database migrations and Kafka topics) once before them.
# Built in two stages: the first installs Huitou and its dependencies into a virtualenv
# (every dependency ships manylinux wheels, so no compiler is needed even there); the
# final stage copies that virtualenv onto the same pinned slim base and runs as an
# unprivileged user with no build tools and no package manager cache.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/huitou
COPY pyproject.toml README.md ./
COPY libs ./libs
COPY services ./services
RUN /opt/huitou/bin/pip install --no-compile . \
    && /opt/huitou/bin/python -m compileall -q /opt/huitou/lib

FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 huitou \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/huitou --create-home huitou
COPY --from=build /opt/huitou /opt/huitou
ENV PATH=/opt/huitou/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HUITOU_HOST=0.0.0.0 \
    HUITOU_PORT=8000 \
    HUITOU_DATA_DIR=/var/lib/huitou
WORKDIR /var/lib/huitou
USER 10001:10001
EXPOSE 8000
# Liveness of the process (readiness, /readyz, also checks the database and the bus).
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('HUITOU_PORT', '8000'), timeout=2)"]
# SIGTERM stops it gracefully (HUITOU_SHUTDOWN_GRACE_S for requests, then each consumer's batch).
STOPSIGNAL SIGTERM
CMD ["huitou", "serve", "ingest"]
