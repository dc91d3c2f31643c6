# petdet GPU worker: a Celery worker listening on the "gpu" queue, with CUDA for TensorFlow.
# Its packages: docker/requirements-gpu-worker.txt (re-resolved by `make lock`).
# Build from the repository root:  docker build -f docker/gpu-worker.Dockerfile -t petdet-gpu .
# Run with the NVIDIA container toolkit (--gpus all); training uses MirroredStrategy over
# every visible GPU.
FROM nvidia/cuda:12.5.1-cudnn-runtime-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    AIRFLOW_HOME=/opt/airflow \
    AIRFLOW__CORE__LOAD_EXAMPLES=False \
    PETDET_CACHE_DIR=/opt/airflow/petdet-cache \
    PATH=/opt/venv/bin:$PATH

RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        software-properties-common=0.99.22.* gpg-agent=2.2.27-* \
    && add-apt-repository -y ppa:deadsnakes/ppa \
    && apt-get update \
    && apt-get install -y --no-install-recommends \
        python3.11=3.11.* python3.11-venv=3.11.* libgomp1=12.3.* tini=0.19.* \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/*

RUN python3.11 -m venv /opt/venv \
    && useradd --create-home --uid 50000 --gid 0 airflow

WORKDIR /opt/petdet
# The worker's own lock (make lock): requirements.txt's pins plus tensorflow[and-cuda]==2.21.0
# (the CUDA/cuDNN wheels matching TF 2.21, same TF pin as the CPU image), the Celery provider
# (the `airflow celery` command, celery, the redis client) and psycopg2 for the compose stack's
# Postgres metadata DB and result backend. The CUDA base has none of them; apache/airflow has.
COPY docker/requirements-gpu-worker.txt ./
RUN pip install -r requirements-gpu-worker.txt \
    && pip check

COPY pyproject.toml ./
COPY petdet_tasks ./petdet_tasks
RUN pip install --no-deps .

COPY --chown=airflow:root dags /opt/airflow/dags
COPY --chown=airflow:root plugins /opt/airflow/plugins
COPY --chown=airflow:root label_maps /opt/petdet/label_maps

USER 50000
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["airflow", "celery", "worker", "--queues", "gpu", "--concurrency", "1"]
