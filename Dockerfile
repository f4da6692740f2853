# The image every cluster manifest runs (`make image`): this project and its pinned dependencies on a
# CUDA runtime matching torch 2.13.0's CUDA build. No weights inside: jobs read them by path or URL.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    RAY_USAGE_STATS_ENABLED=0 TOKENIZERS_PARALLELISM=false
# Python 3.11 (the project's interpreter); a compiler and ninja for DeepSpeed ops built at first use;
# the shared libraries opencv and dlib load.
RUN apt-get update && apt-get install -y --no-install-recommends \
        python3.11 python3.11-venv python3.11-dev build-essential ninja-build git \
        libgl1 libglib2.0-0 libgomp1 ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /app
# torch first, from its CUDA 12.8 index (the PyPI default would be a different build of the same version)
RUN pip install --upgrade "pip>=24" && pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128
COPY pyproject.toml README.md ./
COPY lipforcing lipforcing
COPY data_jobs data_jobs
COPY pipelines pipelines
COPY cluster cluster
RUN pip install -e .
