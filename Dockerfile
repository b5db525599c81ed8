# syntax=docker/dockerfile:1
# The worker image: `docker compose up --scale worker=4`. Entrypoint: hpo-worker.
FROM python:3.11-slim

# CPU PyTorch by default; for CUDA: --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies in their own layers, before the source: editing code never reinstalls them.
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
COPY pyproject.toml README.md ./
RUN mkdir -p hpo_framework workers experiments \
 && touch hpo_framework/__init__.py workers/__init__.py experiments/__init__.py \
 && pip install ".[samplers,dashboard]" \
 && pip uninstall -y hpo \
 && rm -rf hpo_framework workers experiments

COPY hpo_framework ./hpo_framework
COPY workers ./workers
COPY experiments ./experiments
COPY config.yaml run_experiment.py ./
RUN pip install --no-deps . \
 && useradd --create-home --uid 10001 hpo

# experiments/ and config.yaml may be mounted read-only over these copies for development;
# sessions are imported from the working directory first.
USER hpo
ENTRYPOINT ["hpo-worker"]
