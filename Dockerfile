# syntax=docker/dockerfile:1
# One image for every PulseCal program; the container's command picks the program:
#   pulsecal-service (default, :3001), pulsecal-sidecar (:9464), pulsecal-worker (:3002),
#   pulsecal-analysis (:8000), pulsecal-admin
# Build: docker build -t pulsecal:dev .      Run: docker run --rm pulsecal:dev pulsecal-sidecar
# It runs as uid 10001 with a read-only root filesystem: LOG_DIR and /tmp must be writable
# volumes (the Kubernetes manifests mount emptyDirs there).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# Build: the tools venv (pip, setuptools, wheel, exactly as requirements-tools.txt locks them)
# builds the project's wheel and installs it, with exactly requirements.txt, into the
# runtime venv, which never gets pip. Wheels only for dependencies: every one ships manylinux
# wheels, so no compiler. Byte-compiled ahead of time: the root filesystem is read-only at run time.
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ONLY_BINARY=:all:
WORKDIR /src
COPY requirements-tools.txt requirements.txt ./
RUN python -m venv /opt/tools \
    && /opt/tools/bin/pip install --require-hashes --no-deps -r requirements-tools.txt \
    && python -m venv --without-pip /opt/pulsecal \
    && /opt/tools/bin/pip --python /opt/pulsecal/bin/python install --require-hashes --no-deps \
        -r requirements.txt
COPY pyproject.toml setup.cfg README.md ./
# One package per process and shared/; devtools/ (simulator, local stack) stays out.
COPY shared ./shared
COPY service ./service
COPY worker ./worker
COPY analysis ./analysis
COPY admin ./admin
COPY sidecar ./sidecar
RUN /opt/tools/bin/pip wheel --no-deps --no-build-isolation --no-binary=pulsecal -w /tmp/dist . \
    && /opt/tools/bin/pip --python /opt/pulsecal/bin/python install --no-deps /tmp/dist/pulsecal-*.whl \
    && /opt/tools/bin/pip --python /opt/pulsecal/bin/python check \
    && /opt/pulsecal/bin/python -m compileall -q /opt/pulsecal/lib

# Run: the virtualenv alone on the same base, no pip, no build context, no root.
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="pulsecal" \
      org.opencontainers.image.description="PulseCal PPG ingestion: service, sidecar, worker, analysis"
RUN groupadd --system --gid 10001 pulsecal \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin pulsecal \
    && mkdir -p /var/log/pulsecal \
    && chown 10001:10001 /var/log/pulsecal \
    && python -m pip uninstall -y -q pip setuptools wheel
COPY --from=build /opt/pulsecal /opt/pulsecal
ENV PATH=/opt/pulsecal/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    LOG_DIR=/var/log/pulsecal
WORKDIR /opt/pulsecal
USER 10001:10001
EXPOSE 3001 9464 3002 8000
# The programs handle SIGTERM themselves (drain, final checkpoint) and start no children,
# so they run as PID 1 without an init.
CMD ["pulsecal-service"]
