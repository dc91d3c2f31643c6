"""Thin operators: store (templated) arguments in ``__init__``, make one ``petdet_tasks`` call
in ``execute``, return the small JSON result (URI, fingerprint, cache flag) for XCom.

Heavy libraries (boto3, TensorFlow, ...) are imported inside ``execute`` only, so DAG files
that import this module parse fast and never pull them.
"""

from __future__ import annotations

from typing import Any

from airflow.sdk import BaseOperator


class PetdetOperator(BaseOperator):
    """Base for petdet steps: knows where the store is and how to reach it.

    :param store_root: ``s3://bucket/prefix`` or a local directory every step writes under.
        (templated)
    :param aws_conn_id: Airflow connection for S3 (the Amazon provider's S3Hook builds the
        boto3 client from it: login/password = keys, extra ``endpoint_url`` for a non-AWS
        server). Empty: the standard AWS environment of the worker. (templated)
    """

    template_fields: tuple[str, ...] = ("store_root", "aws_conn_id")
    ui_color = "#e8f1fb"

    def __init__(self, *, store_root: str, aws_conn_id: str | None = "aws_default",
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.store_root = store_root
        self.aws_conn_id = aws_conn_id

    def get_store(self):
        """The step's :class:`petdet_tasks.store.Store` (credentials stay inside the client)."""
        from petdet_tasks.store import open_store

        root = str(self.store_root)
        client = None
        if root.startswith("s3://") and self.aws_conn_id:
            from airflow.providers.amazon.aws.hooks.s3 import S3Hook

            client = S3Hook(aws_conn_id=self.aws_conn_id).get_conn()
        return open_store(root, s3_client=client)


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


class DownloadPetsOperator(PetdetOperator):
    """Fetch, verify and safely extract the Oxford-IIIT Pet archives into
    ``datasets/<fingerprint>/``; a complete dataset already there is a cache hit.

    :param source: base URL or local folder holding ``images.tar.gz`` and
        ``annotations.tar.gz``; the official site's archives are checked against pinned
        digests, others against a ``SHA256SUMS`` beside them. (templated)
    :param force: rebuild even if the dataset prefix is complete. (templated)
    :param cache_dir: local download cache on the worker (resumable partial downloads).
    """

    template_fields = (*PetdetOperator.template_fields, "source", "force")

    def __init__(self, *, source: str, force: bool | str = False, cache_dir: str | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.source = source
        self.force = force
        self.cache_dir = cache_dir

    def execute(self, context) -> dict:
        from petdet_tasks.download import DownloadConfig, download

        cfg = DownloadConfig(source=str(self.source), cache_dir=self.cache_dir,
                             force=_as_bool(self.force))
        result = download(self.get_store(), cfg, run_id=context.get("run_id"))
        self.log.info("%s %s (fingerprint %s)",
                      "cache hit:" if result.cache_hit else "wrote", result.uri,
                      result.fingerprint)
        return result.to_xcom()
