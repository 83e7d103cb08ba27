# syntax=docker/dockerfile:1
# RADAR router. TORCH_SPEC picks the torch wheel: the CPU build by default; for CUDA, e.g.
#   docker build --build-arg TORCH_SPEC="torch==2.13.0" --build-arg TORCH_INDEX=<cuda index> .
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS build
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX="https://download.pytorch.org/whl/cpu"
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# Dependencies before the code, for layer caching.
RUN pip install --index-url "${TORCH_INDEX}" --extra-index-url https://pypi.org/simple ${TORCH_SPEC}
COPY pyproject.toml README.md ./
RUN mkdir app && touch app/__init__.py && pip install '.[encoders]' && pip uninstall -y radar-router
COPY app ./app
RUN pip install --no-deps .

FROM python:${PYTHON_VERSION}-slim
RUN useradd --create-home --uid 10001 radar
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    HF_HUB_OFFLINE=1 \
    RADAR_HOST=0.0.0.0 \
    RADAR_PORT=8000 \
    RADAR_MODEL_DIR=/srv/radar/model_store/default \
    RADAR_THRESHOLDS_PATH=/srv/radar/thresholds/default.yaml
WORKDIR /srv/radar
COPY --chown=radar:radar thresholds ./thresholds
# model_store/ and thresholds/ are meant to be mounted (real checkpoints live outside the image).
VOLUME ["/srv/radar/model_store", "/srv/radar/thresholds"]
USER radar
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status == 200 else 1)"]
ENTRYPOINT ["radar", "serve"]
