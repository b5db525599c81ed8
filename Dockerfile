# The worker image: `docker compose up --scale worker=4`. Entrypoint: hpo-worker.
# No `# syntax=` line: the build needs no BuildKit frontend image, so it works offline and
# behind a registry mirror, with BuildKit or the legacy builder.
FROM python:3.11-slim

# CPU PyTorch by default; for CUDA: --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# The experiment's own packages, e.g. --build-arg EXTRA_PACKAGES="scikit-learn==1.5.2 lightgbm"
ARG EXTRA_PACKAGES=""

# HPO_CHECKPOINT_KEY_FILE: the key of checkpoints' MACs, made on first use in the volume that
# every worker sharing /checkpoints mounts, so they read each other's checkpoints (Security).
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HPO_CHECKPOINT_KEY_FILE=/checkpoints/.hpo-checkpoint-key \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies in their own layers, before the source: editing code never reinstalls them.
# They are read from pyproject.toml, so no half-built copy of the project is ever installed.
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
COPY pyproject.toml ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
extras = p['optional-dependencies']; \
print('\n'.join(p['dependencies'] + extras['samplers'] + extras['dashboard']))" >/tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt
RUN if [ -n "${EXTRA_PACKAGES}" ]; then pip install ${EXTRA_PACKAGES}; fi

COPY README.md ./
COPY hpo_framework ./hpo_framework
COPY workers ./workers
COPY experiments ./experiments
COPY config.yaml run_experiment.py ./
RUN pip install --no-deps . \
 && rm -rf build *.egg-info \
 && useradd --create-home --uid 10001 hpo \
 && install -d -o hpo -g hpo /checkpoints

# /checkpoints: the compose volume that `checkpoints: {dir: /checkpoints}` shares among workers
# (a new named volume takes this directory's owner, so the non-root user can write it).
# experiments/ and config.yaml may be mounted read-only over these copies for development;
# sessions are imported from the working directory first.
USER hpo
# Healthy while a worker in the container says it is alive (it rewrites its health file every
# few seconds, also during a long trial); the tools that share this image turn it off.
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 CMD ["hpo-worker", "--check"]
ENTRYPOINT ["hpo-worker"]
