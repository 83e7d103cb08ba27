# syntax=docker/dockerfile:1
# RADAR router image: `radar serve`, configured by RADAR_* environment variables (README).
#   CPU (default):  docker build -t radar-router .
#   CUDA:           docker build --build-arg TORCH_VARIANT=cu128 -t radar-router:cuda .
# TORCH_VARIANT names a PyTorch wheel index (cpu, or a CUDA variant published for
# TORCH_VERSION). The CUDA wheels carry their own CUDA libraries, so one slim base serves both;
# a GPU host needs only the NVIDIA driver and container toolkit.
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_VARIANT=cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /build
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, pinned, from the variant's own index: left to PyPI, the resolver would pull the
# default multi-GB CUDA build even for a CPU image.
RUN pip install --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}" \
    "torch==${TORCH_VERSION}"
# Dependencies before the code, so that editing app/ rebuilds only the last layers. A stub
# package lets pip resolve pyproject.toml's dependencies without the source; the versions are
# bounded there, not repeated here. `int8`: the ONNX Runtime the int8 store
# (model_store/proxy-int8) is served with; it pulls no torch.
COPY pyproject.toml README.md ./
# hadolint ignore=DL3013
RUN mkdir app && touch app/__init__.py \
    && pip install ".[encoders,int8]" \
    && pip uninstall --yes radar-router
COPY app ./app
# Then the tiny random router (1 MB) for smoke runs and the compose demo; never the default
# below, so an image without a mounted model fails loudly instead of routing at random.
# safetensors writes its files 0600: open them to the unprivileged runtime user.
RUN pip install --no-deps . \
    && radar make-tiny-model /opt/radar/tiny \
    && chmod -R a+rX /opt/radar/tiny

FROM python:${PYTHON_VERSION}-slim AS runtime
LABEL org.opencontainers.image.title="radar-router" \
      org.opencontainers.image.description="RADAR risk-aware router for content moderation"
# A fixed numeric uid: Kubernetes' runAsNonRoot can only verify a numeric USER, and the
# manifests in deploy/k8s/ run as this uid.
RUN groupadd --gid 10001 radar \
    && useradd --uid 10001 --gid radar --no-create-home --shell /usr/sbin/nologin radar
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/radar/tiny /opt/radar/tiny
# HF_HOME under /tmp: with a read-only root filesystem, /tmp is the one writable mount, and
# the offline flags make any accidental hub lookup fail at once instead of hanging.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/tmp/hf \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    RADAR_HOST=0.0.0.0 \
    RADAR_PORT=8000 \
    RADAR_MODEL_DIR=/srv/radar/model_store/default \
    RADAR_THRESHOLDS_PATH=/srv/radar/thresholds/default.yaml \
    RADAR_DECISION_LOG_PATH=/srv/radar/data/decision_log.sqlite3
WORKDIR /srv/radar
# Mount points: checkpoints live outside the image (mounted read-only), and thresholds are a
# mounted directory so the service sees a file renamed over the active one (a single-file
# bind mount would keep the old inode and never see the edit). data/ holds the decision log
# (SQLite): a volume, so verdicts survive a new container.
RUN mkdir -p /srv/radar/model_store /srv/radar/thresholds /srv/radar/data \
    && chown -R 10001:10001 /srv/radar
VOLUME ["/srv/radar/model_store", "/srv/radar/thresholds", "/srv/radar/data"]
USER 10001:10001
EXPOSE 8000
# Liveness only: the port opens once the model is loaded and warm (readiness is /readyz), so
# the start period covers loading a real checkpoint. The port follows RADAR_PORT.
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('RADAR_PORT', '8000'), timeout=2)"]
# uvicorn inside `radar serve` is PID 1 (exec form), so SIGTERM reaches it and it drains for
# up to 30 s; `docker run IMAGE make-tiny-model DIR` runs the other commands.
ENTRYPOINT ["radar"]
CMD ["serve"]
