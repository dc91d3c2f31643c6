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


class _TFRecordsOperator(PetdetOperator):
    """Shared arguments of the three TFRecord operators.

    :param dataset_uri: the download step's output URI. (templated)
    :param config: :class:`petdet_tasks.tfrecords.TFRecordConfig` fields (``num_shards``,
        ``val_fraction``, ``check``, ``max_quarantine_fraction``, ``classes``, ``label_map``,
        ``extra_data``, ``force``); values may be templates. (templated)
    """

    template_fields = (*PetdetOperator.template_fields, "dataset_uri", "config")
    template_fields_renderers = {"config": "json"}

    def __init__(self, *, dataset_uri: str, config: dict | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.dataset_uri = dataset_uri
        self.config = config or {}

    def _plan(self):
        from petdet_tasks.tfrecords import TFRecordConfig, plan

        cfg = TFRecordConfig.from_dict(dict(self.config))
        store = self.get_store()
        return store, cfg, plan(store, str(self.dataset_uri), cfg)


class TFRecordsPlanOperator(_TFRecordsOperator):
    """Assign images to splits and shards. Returns the shard groups (``[[[split, index], ...],
    ...]``) that the mapped :class:`TFRecordsShardsOperator` expands over (Airflow maps over
    return values only); the plan's URI, fingerprint and counts go to XCom key ``plan``.

    :param shard_tasks: how many mapped shard tasks to spread the shards over. (templated)
    """

    template_fields = (*_TFRecordsOperator.template_fields, "shard_tasks")

    def __init__(self, *, shard_tasks: int | str = 4, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.shard_tasks = shard_tasks

    def execute(self, context) -> list:
        _, _, p = self._plan()
        groups = p.groups(int(self.shard_tasks))
        context["ti"].xcom_push(key="plan", value={
            "uri": p.uri, "fingerprint": p.fingerprint, "cache_hit": p.cache_hit,
            "examples": len(p.examples), "shards": len(p.units)})
        self.log.info("%s: %d examples in %d shards over %d tasks%s", p.uri, len(p.examples),
                      len(p.units), len(groups), " (cache hit)" if p.cache_hit else "")
        return groups


class TFRecordsShardsOperator(_TFRecordsOperator):
    """Write a group of shards (one mapped task per group); finished shards are skipped.

    :param units: ``[[split, index], ...]`` — one element of the plan's ``shard_groups``.
    """

    template_fields = (*_TFRecordsOperator.template_fields, "units")

    def __init__(self, *, units: list, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.units = units

    def execute(self, context) -> dict:
        from petdet_tasks.tfrecords import write_shards

        store, cfg, p = self._plan()
        reports = write_shards(store, p, [tuple(u) for u in self.units], cfg)
        return {"uri": p.uri, "fingerprint": p.fingerprint, "cache_hit": p.cache_hit,
                "shards": [r["file"]["name"] for r in reports],
                "examples": sum(r["examples"] for r in reports),
                "quarantined": sum(len(r["quarantined"]) for r in reports)}


class TFRecordsGatherOperator(_TFRecordsOperator):
    """Check every shard is there, write ``data_report.json`` + ``label_map.pbtxt``, apply the
    quality gate (fails the task with the reason) and commit the manifest."""

    def execute(self, context) -> dict:
        from petdet_tasks.tfrecords import gather

        store, cfg, p = self._plan()
        result = gather(store, p, cfg, run_id=context.get("run_id"))
        self.log.info("%s %s", "cache hit:" if result.cache_hit else "committed", result.uri)
        return result.to_xcom()


class TrainDetectorOperator(PetdetOperator):
    """Fine-tune the RetinaNet on a tfrecords output (resumable: a retry continues from the
    newest checkpoint in the store). Put it in the GPU pool/queue.

    :param tfrecords_uri: the tfrecords step's output URI. (templated)
    :param config: overrides of :class:`petdet_tasks.train_config.TrainConfig` fields (nested
        dicts for ``learning_rate``/``augmentation``); empty values are ignored. (templated)
    :param config_file: a training config file on the worker (JSON/YAML, or an OD API
        pipeline.config, converted); the overrides apply on top. (templated)
    :param force: retrain even if the output is complete. (templated)
    """

    template_fields = (*PetdetOperator.template_fields, "tfrecords_uri", "config",
                       "config_file", "force")
    template_fields_renderers = {"config": "json"}

    def __init__(self, *, tfrecords_uri: str, config: dict | None = None,
                 config_file: str | None = None, force: bool | str = False,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.tfrecords_uri = tfrecords_uri
        self.config = config or {}
        self.config_file = config_file
        self.force = force

    def execute(self, context) -> dict:
        from petdet_tasks.train import train
        from petdet_tasks.train_config import TrainConfig, load_train_config

        base = load_train_config(self.config_file) if self.config_file else TrainConfig()
        cfg = base.merged(_drop_empty(dict(self.config)))
        self.log.info("training config: %s", cfg.to_dict())
        result = train(self.get_store(), str(self.tfrecords_uri), cfg,
                       run_id=context.get("run_id"), force=_as_bool(self.force))
        return result.to_xcom()


def _drop_empty(values: dict) -> dict:
    out = {}
    for k, v in values.items():
        if isinstance(v, dict):
            v = _drop_empty(v)
            if v:
                out[k] = v
        elif v is not None and not (isinstance(v, str) and v.strip() in ("", "None")):
            out[k] = v
    return out
