"""
### petdet_retrain — the Oxford-IIIT Pet detector, retrained every week

`download` fetches the Oxford-IIIT Pet archives (or a mirror / local copy given as **source**),
checks their sha256 (pinned for the official site, `SHA256SUMS` for other sources), extracts
them safely and stores the dataset under `datasets/<fingerprint>/` in **store_root**.

Every step is idempotent: its output prefix is a fingerprint of its inputs and config, and
`_MANIFEST.json` is written last. A run whose inputs did not change is a chain of cache hits;
**force** recomputes. XCom carries only the output URI, fingerprint and a few counts.

Storage: `s3://bucket/prefix` through the Airflow connection **aws_conn_id** (Amazon
provider; `endpoint_url` in its extra for SeaweedFS/MinIO), or a local directory.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta

from airflow.sdk import DAG, Param
from petdet_airflow.operators import DownloadPetsOperator

OFFICIAL_SOURCE = "https://thor.robots.ox.ac.uk/~vgg/data/pets/"

with DAG(
    dag_id="petdet_retrain",
    description="Oxford-IIIT Pet: download → TFRecords → fine-tune → export → evaluate → detect",
    doc_md=__doc__,
    schedule="@weekly",
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    tags=["petdet", "ml", "object-detection"],
    render_template_as_native_obj=True,
    default_args={
        "owner": "petdet",
        "retries": 2,
        "retry_delay": timedelta(minutes=2),
        "retry_exponential_backoff": True,
    },
    params={
        "source": Param(
            os.environ.get("PETDET_SOURCE", OFFICIAL_SOURCE),
            type="string",
            minLength=1,
            title="Dataset source",
            description="Base URL or local folder holding images.tar.gz and annotations.tar.gz "
            "(official site by default; other sources are verified by a SHA256SUMS beside them).",
        ),
        "store_root": Param(
            os.environ.get("PETDET_STORE_ROOT", "s3://petdet/petdet"),
            type="string",
            pattern=r"^(s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?|/.+|file:///.+)$",
            title="Storage root",
            description="s3://bucket/prefix, or an absolute local path, that every step "
            "writes under.",
        ),
        "aws_conn_id": Param(
            os.environ.get("PETDET_AWS_CONN_ID", "aws_default"),
            type="string",
            title="AWS connection",
            description="Airflow connection used for s3:// roots (ignored for local roots). "
            "Empty: the workers' standard AWS environment.",
        ),
        "force": Param(
            False,
            type="boolean",
            title="Force recompute",
            description="Rebuild every step even if its output is already complete.",
        ),
    },
) as dag:
    download = DownloadPetsOperator(
        task_id="download",
        source="{{ params.source }}",
        store_root="{{ params.store_root }}",
        aws_conn_id="{{ params.aws_conn_id }}",
        force="{{ params.force }}",
        execution_timeout=timedelta(hours=2),
        doc_md="Fetch + verify + safely extract the archives into `datasets/<fingerprint>/`.",
    )
