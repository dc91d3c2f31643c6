"""Thin operators: store (templated) arguments in ``__init__``, make one ``petdet_tasks`` call
in ``execute_step``, return the small JSON result (URI, fingerprint, cache flag) for XCom.

A failure a retry cannot mend (``petdet_tasks.errors.PermanentError``) fails the task at once
(``AirflowFailException``); any other failure is retried as the DAG says. Heavy libraries
(boto3, TensorFlow, ...) are imported when a task runs, never at import, so DAG files that
import this module parse fast and never pull them.
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
        server). Empty (``None``, ``""`` or ``"None"``): the standard AWS environment of the
        worker. (templated)
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
        conn_id = _none_if_empty(self.aws_conn_id)
        if root.startswith("s3://") and conn_id:
            from airflow.providers.amazon.aws.hooks.s3 import S3Hook

            client = S3Hook(aws_conn_id=conn_id).get_conn()
        return open_store(root, s3_client=client)

    def execute(self, context) -> Any:
        """Run :meth:`execute_step`; a failure that a retry cannot mend (a
        :class:`petdet_tasks.errors.PermanentError`: bad config, data that fails the quality
        gate, diverged training, ...) fails the task at once instead of using up its retries."""
        from petdet_tasks.errors import PermanentError

        try:
            return self.execute_step(context)
        except PermanentError as e:
            from airflow.sdk.exceptions import AirflowFailException

            raise AirflowFailException(
                f"{type(e).__name__}: {e} (not retried: the same inputs and config would fail "
                "again; change them and rerun)") from e

    def execute_step(self, context) -> Any:
        """The step itself (each operator's own)."""
        raise NotImplementedError


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

    def execute_step(self, context) -> dict:
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
    :param plan_fingerprint: for the shard and gather tasks, the plan task's fingerprint (its
        XCom ``plan``): they run the plan it recorded instead of planning again, so that
        images arriving in the extra-data prefix meanwhile cannot give them another
        fingerprint. Empty: plan here (the inputs must not change in between). (templated)
    """

    template_fields = (*PetdetOperator.template_fields, "dataset_uri", "config",
                       "plan_fingerprint")
    template_fields_renderers = {"config": "json"}

    def __init__(self, *, dataset_uri: str, config: dict | None = None,
                 plan_fingerprint: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.dataset_uri = dataset_uri
        self.config = config or {}
        self.plan_fingerprint = plan_fingerprint

    def _plan(self):
        from petdet_tasks.tfrecords import TFRecordConfig, load_plan, plan

        cfg = TFRecordConfig.from_dict(dict(self.config))
        store = self.get_store()
        recorded = _none_if_empty(self.plan_fingerprint)
        if recorded is not None:
            return store, cfg, load_plan(store, recorded, force=cfg.force)
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

    def execute_step(self, context) -> list:
        from petdet_tasks.tfrecords import save_plan

        store, _, p = self._plan()
        if not p.cache_hit:  # the shard tasks and the gather run this very plan
            self.log.info("plan recorded at %s", store.uri(save_plan(store, p)))
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

    def execute_step(self, context) -> dict:
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

    def execute_step(self, context) -> dict:
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
        dicts for ``learning_rate``/``augmentation``); empty values (``None``, ``""``,
        ``"None"``) are not set, so the config file's value (else TrainConfig's default)
        applies. (templated)
    :param config_file: a training config file on the worker (JSON/YAML, or an OD API
        pipeline.config, converted); the overrides apply on top. Empty: none. (templated)
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

    def resolved_config(self):
        """The :class:`~petdet_tasks.train_config.TrainConfig` the task trains with: the config
        file (or the defaults), then the non-empty overrides on top."""
        from petdet_tasks.train_config import TrainConfig, load_train_config

        path = _none_if_empty(self.config_file)
        base = load_train_config(path) if path else TrainConfig()
        overrides = _drop_empty(dict(self.config))
        for k, v in overrides.items():
            # JSON Schema's "integer" (the form's, the REST API's) admits 8.0; TrainConfig,
            # strict about its files, would refuse it only once the run reaches train
            default = getattr(base, k, None)
            if (isinstance(default, int) and not isinstance(default, bool)
                    and isinstance(v, float) and v.is_integer()):
                overrides[k] = int(v)
        return base.merged(overrides)

    def execute_step(self, context) -> dict:
        from petdet_tasks.fetch import redact_url
        from petdet_tasks.train import train

        cfg = self.resolved_config()
        shown = cfg.to_dict()
        shown["preset"] = redact_url(shown["preset"])  # a URL may carry user:password@
        self.log.info("training config: %s", shown)
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


class ExportModelOperator(PetdetOperator):
    """Export a training output as a SavedModel (``serving_default`` on uint8 images,
    ``encoded_image_string_tensor`` on JPEG/PNG bytes) and a TF1 ``frozen_inference_graph.pb``;
    every artefact is checked against the Keras model before the manifest is written.

    :param training_uri: the train step's output URI. (templated)
    :param config: :class:`petdet_tasks.export.ExportConfig` fields (``score_threshold``,
        ``iou_threshold``, ``max_detections``); empty values are ignored. (templated)
    :param force: export again even if the output is complete. (templated)
    """

    template_fields = (*PetdetOperator.template_fields, "training_uri", "config", "force")
    template_fields_renderers = {"config": "json"}

    def __init__(self, *, training_uri: str, config: dict | None = None,
                 force: bool | str = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.training_uri = training_uri
        self.config = config or {}
        self.force = force

    def execute_step(self, context) -> dict:
        from petdet_tasks.export import ExportConfig, export

        cfg = ExportConfig.from_dict(_drop_empty(dict(self.config)))
        result = export(self.get_store(), str(self.training_uri), cfg,
                        run_id=context.get("run_id"), force=_as_bool(self.force))
        self.log.info("%s %s", "cache hit:" if result.cache_hit else "exported", result.uri)
        return result.to_xcom()


class EvaluateModelOperator(PetdetOperator):
    """COCO metrics (mAP@[.5:.95], mAP@.5, mAP@.75, per-class AP, recall@100) of an exported
    model on a split of the records, measured through its serving signature.

    :param model_uri: the export step's output URI. (templated)
    :param tfrecords_uri: the tfrecords step's output URI. (templated)
    :param split: the split evaluated (default ``val``). (templated)
    :param force: evaluate again even if the output is complete. (templated)
    """

    template_fields = (*PetdetOperator.template_fields, "model_uri", "tfrecords_uri", "split",
                       "force")

    def __init__(self, *, model_uri: str, tfrecords_uri: str, split: str = "val",
                 force: bool | str = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.model_uri = model_uri
        self.tfrecords_uri = tfrecords_uri
        self.split = split
        self.force = force

    def execute_step(self, context) -> dict:
        from petdet_tasks.evaluate import EvalConfig, evaluate

        result = evaluate(self.get_store(), str(self.model_uri), str(self.tfrecords_uri),
                          EvalConfig(split=str(self.split)), run_id=context.get("run_id"),
                          force=_as_bool(self.force))
        return result.to_xcom()


class EvaluateProductionOperator(PetdetOperator):
    """The production model's evaluation on these records' split, run beside the candidate's:
    a promotion compares the two on the same images, and then finds this one cached. Returns
    the evaluation's result (a cache hit when production was already measured on this set),
    or ``{"uri": None, "reason": ...}`` when there is no production model yet.

    :param tfrecords_uri: the tfrecords step's output URI (this run's records). (templated)
    :param split: the split evaluated (default ``val``, as the candidate's). (templated)
    :param force: evaluate again even if the output is complete. (templated)
    """

    template_fields = (*PetdetOperator.template_fields, "tfrecords_uri", "split", "force")

    def __init__(self, *, tfrecords_uri: str, split: str = "val", force: bool | str = False,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.tfrecords_uri = tfrecords_uri
        self.split = split
        self.force = force

    def execute_step(self, context) -> dict:
        from petdet_tasks.evaluate import EvalConfig, evaluate_production

        result = evaluate_production(self.get_store(), str(self.tfrecords_uri),
                                     EvalConfig(split=str(self.split)),
                                     run_id=context.get("run_id"), force=_as_bool(self.force))
        if result is None:
            return {"uri": None, "reason": "no production model yet: nothing to compare with"}
        return result.to_xcom()


class PromoteModelOperator(PetdetOperator):
    """Make the evaluated model production (``registry/production.json``) when its ``metric``
    beats production's by at least ``margin`` (the first model always), both measured on the
    same records and split (production is evaluated on the candidate's set first when it was
    promoted on another: :class:`EvaluateProductionOperator` does that ahead). The pointer is
    replaced by compare-and-swap: two runs promoting at once end with one winner. The decision
    with both numbers is logged, returned (XCom) and recorded beside the evaluation.

    :param evaluation_uri: the evaluate step's output URI. (templated)
    :param metric: metric compared, one of ``petdet_tasks.evaluate.QUALITY_METRICS``
        (``mAP``, ``mAP@.5``, ``mAP@.75``, ``recall@100``, ...). (templated)
    :param margin: required improvement over production. (templated)
    :param skip_downstream_if_not_promoted: when the model is not promoted, mark this task
        skipped so the tasks after it (detection) are skipped too; the decision is still
        pushed to XCom (key ``decision``) and recorded. (templated)
    """

    template_fields = (*PetdetOperator.template_fields, "evaluation_uri", "metric", "margin",
                       "skip_downstream_if_not_promoted")
    ui_color = "#fff4d6"

    def __init__(self, *, evaluation_uri: str, metric: str = "mAP", margin: float | str = 0.0,
                 skip_downstream_if_not_promoted: bool | str = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.evaluation_uri = evaluation_uri
        self.metric = metric
        self.margin = margin
        self.skip_downstream_if_not_promoted = skip_downstream_if_not_promoted

    def execute_step(self, context) -> dict:
        from airflow.sdk.exceptions import AirflowSkipException

        from petdet_tasks.evaluate import promote_evaluated

        decision = promote_evaluated(self.get_store(), str(self.evaluation_uri),
                                     metric=str(self.metric), margin=float(self.margin),
                                     run_id=context.get("run_id"))
        self.log.info("%s", decision["reason"])
        context["ti"].xcom_push(key="decision", value=decision)
        if not decision["promoted"] and _as_bool(self.skip_downstream_if_not_promoted):
            raise AirflowSkipException(f"not promoted, downstream skipped as asked: "
                                       f"{decision['reason']}")
        return decision


class _DetectOperator(PetdetOperator):
    """Shared arguments of the three detection operators.

    :param model_uri: an export output URI; empty: the production model of the registry.
        (templated)
    :param images: store prefix/URI or worker-local folder of images; empty: the test split
        of the dataset the model was trained on. (templated)
    :param config: :class:`petdet_tasks.detect.DetectConfig` fields (``score_threshold``,
        ``max_boxes``, ``batch_size``, ``num_shards``, ``thumbnail_size``). (templated)
    :param force: recompute even if the output is complete: the plan is no cache hit, every
        shard is detected again and the gather rewrites the output. (templated)
    :param plan_fingerprint: for the shard and gather tasks, the plan task's fingerprint (its
        XCom ``plan``): they run the listing it recorded instead of listing again, so that
        images arriving in the input prefix meanwhile cannot give them another fingerprint.
        Empty: plan here (the listing must not change in between). (templated)
    """

    template_fields = (*PetdetOperator.template_fields, "model_uri", "images", "config",
                       "force", "plan_fingerprint")
    template_fields_renderers = {"config": "json"}

    def __init__(self, *, model_uri: str | None = None, images: str | None = None,
                 config: dict | None = None, force: bool | str = False,
                 plan_fingerprint: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.model_uri = model_uri
        self.images = images
        self.config = config or {}
        self.force = force
        self.plan_fingerprint = plan_fingerprint

    def _plan(self):
        from petdet_tasks.detect import DetectConfig, load_plan, plan

        cfg = DetectConfig.from_dict(_drop_empty(dict(self.config)))
        store = self.get_store()
        recorded = _none_if_empty(self.plan_fingerprint)
        if recorded is not None:
            return store, cfg, load_plan(store, recorded, force=_as_bool(self.force))
        model = _none_if_empty(self.model_uri)
        return store, cfg, plan(store, model, _none_if_empty(self.images), cfg,
                                force=_as_bool(self.force))


def _none_if_empty(value: Any) -> str | None:
    if value is None or (isinstance(value, str) and value.strip() in ("", "None")):
        return None
    return str(value)


class DetectPlanOperator(_DetectOperator):
    """List the input images, fix the fingerprint and split them into shards. Returns the
    shard groups the mapped :class:`DetectShardsOperator` expands over; the plan's URI,
    model and counts go to XCom key ``plan``.

    :param shard_tasks: how many mapped detection tasks to spread the shards over.
        (templated)
    """

    template_fields = (*_DetectOperator.template_fields, "shard_tasks")

    def __init__(self, *, shard_tasks: int | str = 4, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.shard_tasks = shard_tasks

    def execute_step(self, context) -> list:
        from petdet_tasks.detect import save_plan

        store, _, p = self._plan()
        if not p.cache_hit:  # the shard tasks and the gather run this very listing
            self.log.info("plan recorded at %s", store.uri(save_plan(store, p)))
        groups = p.groups(int(self.shard_tasks))
        context["ti"].xcom_push(key="plan", value={
            "uri": p.uri, "fingerprint": p.fingerprint, "cache_hit": p.cache_hit,
            "model_uri": p.model_uri, "images": len(p.items), "shards": len(p.units)})
        self.log.info("%s: %d images in %d shards over %d tasks, model %s%s", p.uri,
                      len(p.items), len(p.units), len(groups), p.model_uri,
                      " (cache hit)" if p.cache_hit else "")
        return groups


class DetectShardsOperator(_DetectOperator):
    """Detect on a group of shards (one mapped task per group); finished shards are skipped,
    so a retry never duplicates output.

    :param units: shard indices, one element of the plan's groups.
    """

    template_fields = (*_DetectOperator.template_fields, "units")

    def __init__(self, *, units: list, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.units = units

    def execute_step(self, context) -> dict:
        from petdet_tasks.detect import run_shards

        store, cfg, p = self._plan()
        reports = run_shards(store, p, [int(u) for u in self.units], cfg)
        return {"uri": p.uri, "fingerprint": p.fingerprint, "cache_hit": p.cache_hit,
                "shards": [int(u) for u in self.units],
                "images": sum(len(r.get("records", [])) for r in reports),
                "failed": sum(1 for r in reports for rec in r.get("records", [])
                              if "error" in rec)}


class DetectGatherOperator(_DetectOperator):
    """Merge the shards: ``detections.jsonl``, ``detections.csv``, ``summary.json`` and the
    ``index.html`` gallery, then commit the manifest."""

    def execute_step(self, context) -> dict:
        from petdet_tasks.detect import gather

        store, cfg, p = self._plan()
        result = gather(store, p, cfg, run_id=context.get("run_id"))
        self.log.info("%s %s — gallery: %s", "cache hit:" if result.cache_hit else "committed",
                      result.uri, result.uri + "/index.html")
        return result.to_xcom()
