# petdet Airflow image: api-server, scheduler, dag-processor and CPU workers.
# Build from the repository root:  docker build -f docker/airflow.Dockerfile -t petdet-airflow .
FROM apache/airflow:3.3.2-python3.11

USER 0
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1=12.2.* \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/*
USER 50000

WORKDIR /opt/petdet
# exact pins (the same lock the tests use)
COPY --chown=airflow:root requirements.txt ./
RUN pip install --no-cache-dir -r requirements.txt

COPY --chown=airflow:root pyproject.toml ./
COPY --chown=airflow:root petdet_tasks ./petdet_tasks
RUN pip install --no-cache-dir --no-deps .

COPY --chown=airflow:root dags /opt/airflow/dags
COPY --chown=airflow:root plugins /opt/airflow/plugins
COPY --chown=airflow:root label_maps /opt/petdet/label_maps

ENV AIRFLOW__CORE__LOAD_EXAMPLES=False \
    PETDET_CACHE_DIR=/opt/airflow/petdet-cache
