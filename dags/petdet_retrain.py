"""
### petdet_retrain — the Oxford-IIIT Pet detector, retrained every week

1. `download` fetches the Oxford-IIIT Pet archives (or a mirror / local copy given as **source**),
checks their sha256 (pinned for the official site, `SHA256SUMS` for other sources), extracts
them safely and stores the dataset under `datasets/<fingerprint>/` in **store_root**.
2. `tfrecords_plan` assigns trainval images to train/val (stable hash of the name) and to
   **shards**; `tfrecords_shards` (mapped over **shard_tasks** groups) checks every image
   (repairs format lies, CMYK and alpha; quarantines truncated/undecodable ones), clips boxes
   and writes OD-API tf.Example shards; `tfrecords_gather` writes `data_report.json` and
   `label_map.pbtxt`, applies the quality gate (**max_quarantine_fraction**, empty splits,
   classes without training data) and commits `tfrecords/<fingerprint>/`.
3. `train` fine-tunes a keras-hub RetinaNet from **preset** (GPU pool/queue; a retry resumes
   from the newest checkpoint in `training/<fingerprint>/`).
4. `export` writes `models/<fingerprint>/`: a SavedModel (uint8 images and encoded JPEG/PNG
   signatures, the OD API outputs) and a TF1 `frozen_inference_graph.pb`, each checked against
   the Keras model before commit.
5. `evaluate` measures the served model on the val split with COCO metrics
   (`evaluations/<fingerprint>/metrics.json`); `evaluate_production`, beside it, measures the
   production model on the same records (a cache hit when they did not change), so that the
   two are compared on the same images.
6. `promote` makes it production (`registry/production.json`, compare-and-swap) when its
   **promotion_metric** beats production by **promotion_margin**; with
   **skip_detection_if_not_promoted** a model that is not better ends the run there.
7. `detect_plan` lists **detect_images** (default: the dataset's test split) into shards,
   `detect_shards` (mapped) runs the model (**detect_with**: the production model or this
   run's) and writes per-image JSON and annotated JPEGs, `detect_gather` writes
   `detections.jsonl`, `detections.csv`, `summary.json` and the `index.html` gallery.

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
from petdet_airflow.operators import (
    DetectGatherOperator,
    DetectPlanOperator,
    DetectShardsOperator,
    DownloadPetsOperator,
    EvaluateModelOperator,
    EvaluateProductionOperator,
    ExportModelOperator,
    PromoteModelOperator,
    TFRecordsGatherOperator,
    TFRecordsPlanOperator,
    TFRecordsShardsOperator,
    TrainDetectorOperator,
)

OFFICIAL_SOURCE = "https://thor.robots.ox.ac.uk/~vgg/data/pets/"
# where training runs: a pool with as many slots as GPUs, and the queue GPU workers listen on
GPU_POOL = os.environ.get("PETDET_GPU_POOL", "gpu")
GPU_QUEUE = os.environ.get("PETDET_GPU_QUEUE", "gpu")
TRAIN_TIMEOUT = timedelta(hours=float(os.environ.get("PETDET_TRAIN_TIMEOUT_HOURS", "24")))
# a run still going after this fails (its waiting tasks skipped), so that with one active run
# at a time a run stuck for good (e.g. train waiting on a GPU pool nobody created) does not
# hold back every later weekly run; longer than train's three tries, shorter than a week
DAGRUN_TIMEOUT = timedelta(hours=float(os.environ.get("PETDET_DAGRUN_TIMEOUT_HOURS", "144")))
# a text param's pattern, after its "^": no space or newline at either end (a pasted
# "s3://petdet/petdet " would name another store; JSON Schema's "$" also matches before a
# final newline, hence the look-ahead)
TRIMMED = r"(?!\s)(?![\s\S]*\s$)"


def verbatim(value):
    """Filter for a text template (``{{ params.extra_data | verbatim }}``): its ``repr``, which
    native rendering (``render_template_as_native_obj``, below: numbers and nulls reach the
    operators typed) evaluates back to the very same text. Rendered bare, a text that reads
    as a Python literal would become one: ``2024.10`` → 2024.1, ``2024_06_01`` → 20240601,
    ``1e3`` → 1000.0, ``True`` → True, and a fingerprint of decimal digits an int."""
    return repr(value)

with DAG(
    dag_id="petdet_retrain",
    description="Oxford-IIIT Pet: download → TFRecords → fine-tune → export → evaluate → detect",
    doc_md=__doc__,
    schedule="@weekly",
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    dagrun_timeout=DAGRUN_TIMEOUT,
    tags=["petdet", "ml", "object-detection"],
    render_template_as_native_obj=True,
    user_defined_filters={"verbatim": verbatim},
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
            pattern="^" + TRIMMED + ".+$",
            title="Dataset source",
            description="Base URL or local folder holding images.tar.gz and annotations.tar.gz "
            "(official site by default; other sources are verified by a SHA256SUMS beside them).",
        ),
        "store_root": Param(
            os.environ.get("PETDET_STORE_ROOT", "s3://petdet/petdet"),
            type="string",
            pattern="^" + TRIMMED + r"(s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?|/.+|file:///.+)$",
            title="Storage root",
            description="s3://bucket/prefix, or an absolute local path, that every step "
            "writes under.",
        ),
        # optional texts are nullable: the trigger form sends null for a cleared text field
        "aws_conn_id": Param(
            os.environ.get("PETDET_AWS_CONN_ID", "aws_default"),
            type=["null", "string"],
            title="AWS connection",
            description="Airflow connection used for s3:// roots (ignored for local roots). "
            "Empty: the workers' standard AWS environment.",
        ),
        "shards": Param(10, type="integer", minimum=1, maximum=1000, title="TFRecord shards",
                        description="Shards per split (train-00000-of-000NN.tfrecord)."),
        "shard_tasks": Param(4, type="integer", minimum=1, maximum=256,
                             title="Parallel shard tasks",
                             description="Mapped tasks the shards are spread over."),
        "val_fraction": Param(0.3, type="number", exclusiveMinimum=0, exclusiveMaximum=1,
                              title="Validation fraction",
                              description="Share of trainval images held out for validation "
                              "(stable by image name: adding images never moves others)."),
        "image_check": Param("header", type="string", enum=["header", "full"],
                             title="Image check",
                             description="header: format + end-of-image marker (cheap, catches "
                             "truncation); full: decode every image's pixels."),
        "max_quarantine_fraction": Param(
            0.01, type="number", minimum=0, maximum=1, title="Quarantine threshold",
            description="Fail the run when a larger share of labelled images is unusable."),
        "classes": Param("all", type="string", enum=["all", "present"], title="Classes",
                         description="all: every label-map breed needs training images; "
                         "present: train on the breeds the data has."),
        "extra_data": Param(None, type=["null", "string"], title="Extra labelled data",
                            description="Optional prefix in the store laid out like the "
                            "dataset (images/, annotations/xmls/, annotations/trainval.txt); "
                            "new content changes the fingerprint and triggers a rebuild."),
        # The training fields are empty by default: a value set here overrides the training
        # config file; left empty, the file's value applies, or without one (or if the file
        # does not set it) TrainConfig's default (petdet_tasks/train_config.py), given in
        # each description.
        "preset": Param(
            os.environ.get("PETDET_PRESET"), type=["null", "string"],
            title="Starting preset",
            description="keras-hub preset name, kaggle:// handle, worker-local directory, or a "
            "prefix in the store (synced first). Empty: the config file's, else "
            "retinanet_resnet50_fpn_coco."),
        "num_steps": Param(None, type=["null", "integer"], minimum=1, title="Training steps",
                           description="Empty: the config file's, else 2000."),
        "batch_size": Param(None, type=["null", "integer"], minimum=1,
                            title="Batch size per replica",
                            description="Empty: the config file's, else 8."),
        # 64 or a multiple of 128 (train_config.valid_image_size: keras-hub's P6/P7 anchors
        # sit on the feature grid only there): a drop-down of every size training accepts
        "image_size": Param(None, type=["null", "integer"],
                            enum=[None, 64, *range(128, 1537, 128)],
                            title="Model input size (px)",
                            description="Empty: the config file's, else 384."),
        "optimizer": Param(None, type=["null", "string"], enum=[None, "sgd", "adam"],
                           title="Optimizer", description="Empty: the config file's, else sgd."),
        "learning_rate": Param(None, type=["null", "number"], exclusiveMinimum=0,
                               title="Initial learning rate",
                               description="Empty: the config file's, else 0.01 (cosine decay "
                               "by default; the schedule's kind and warm-up come from the "
                               "file)."),
        "checkpoint_every_n": Param(None, type=["null", "integer"], minimum=1,
                                    title="Checkpoint every N steps",
                                    description="Empty: the config file's, else 200."),
        "train_config_file": Param(None, type=["null", "string"], title="Training config file",
                                   description="Optional JSON/YAML or OD API pipeline.config "
                                   "on the workers; the fields above, where set, override "
                                   "it."),
        "promotion_metric": Param("mAP", type="string",
                                  enum=["mAP", "mAP@.5", "mAP@.75", "recall@100"],
                                  title="Promotion metric",
                                  description="COCO metric on the val split that decides "
                                  "whether the new model replaces production."),
        "promotion_margin": Param(0.0, type="number", minimum=0, title="Promotion margin",
                                  description="Required improvement over production (the "
                                  "first model is always promoted)."),
        "skip_detection_if_not_promoted": Param(
            False, type="boolean", title="Skip detection if not promoted",
            description="End the run after promote when the new model is not better."),
        "detect_with": Param("production", type="string", enum=["production", "candidate"],
                             title="Detect with",
                             description="production: the registry's model (this run's if "
                             "it was promoted); candidate: this run's model, promoted or not "
                             "(unless skip_detection_if_not_promoted ends the run first)."),
        "detect_images": Param(None, type=["null", "string"], title="Images to detect on",
                               description="Store prefix or worker-local folder of JPEG/PNG "
                               "images; empty: the dataset's test split."),
        "detection_score_threshold": Param(0.5, type="number", minimum=0, maximum=1,
                                           title="Detection score threshold"),
        "detection_max_boxes": Param(20, type="integer", minimum=1, maximum=100,
                                     title="Boxes per image (max)"),
        "detect_shards": Param(4, type="integer", minimum=1, maximum=1000,
                               title="Detection shards"),
        "detect_tasks": Param(2, type="integer", minimum=1, maximum=256,
                              title="Parallel detection tasks"),
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
        source="{{ params.source | verbatim }}",
        store_root="{{ params.store_root | verbatim }}",
        aws_conn_id="{{ params.aws_conn_id | verbatim }}",
        force="{{ params.force }}",
        execution_timeout=timedelta(hours=2),
        doc_md="Fetch + verify + safely extract the archives into `datasets/<fingerprint>/`.",
    )

    # free texts and whatever comes from XCom go through `verbatim`; numbers, booleans and
    # enums need not
    store_args = {
        "store_root": "{{ params.store_root | verbatim }}",
        "aws_conn_id": "{{ params.aws_conn_id | verbatim }}",
    }
    dataset_uri = "{{ ti.xcom_pull(task_ids='download')['uri'] | verbatim }}"
    tfrecord_config = {
        "num_shards": "{{ params.shards }}",
        "val_fraction": "{{ params.val_fraction }}",
        "check": "{{ params.image_check }}",
        "max_quarantine_fraction": "{{ params.max_quarantine_fraction }}",
        "classes": "{{ params.classes }}",
        "extra_data": "{{ params.extra_data | verbatim }}",
        "force": "{{ params.force }}",
    }
    plan = TFRecordsPlanOperator(
        task_id="tfrecords_plan",
        dataset_uri=dataset_uri,
        config=tfrecord_config,
        shard_tasks="{{ params.shard_tasks }}",
        execution_timeout=timedelta(minutes=10),
        **store_args,
    )
    # the shards and the gather run the plan the plan task recorded (not a plan of their own:
    # the extra-data prefix may gain images meanwhile)
    planned_records = ("{{ ti.xcom_pull(task_ids='tfrecords_plan', key='plan')['fingerprint'] "
                       "| verbatim }}")
    shards = TFRecordsShardsOperator.partial(
        task_id="tfrecords_shards",
        dataset_uri=dataset_uri,
        config=tfrecord_config,
        plan_fingerprint=planned_records,
        execution_timeout=timedelta(hours=1),
        **store_args,
    ).expand(units=plan.output)
    gather = TFRecordsGatherOperator(
        task_id="tfrecords_gather",
        dataset_uri=dataset_uri,
        config=tfrecord_config,
        plan_fingerprint=planned_records,
        execution_timeout=timedelta(minutes=15),
        **store_args,
    )

    train = TrainDetectorOperator(
        task_id="train",
        tfrecords_uri="{{ ti.xcom_pull(task_ids='tfrecords_gather')['uri'] | verbatim }}",
        config_file="{{ params.train_config_file | verbatim }}",
        config={
            "preset": "{{ params.preset | verbatim }}",
            "num_steps": "{{ params.num_steps }}",
            "batch_size": "{{ params.batch_size }}",
            "image_size": "{{ params.image_size }}",
            "optimizer": "{{ params.optimizer }}",
            "checkpoint_every_n": "{{ params.checkpoint_every_n }}",
            "learning_rate": {"initial_learning_rate": "{{ params.learning_rate }}"},
        },
        force="{{ params.force }}",
        pool=GPU_POOL,
        queue=GPU_QUEUE,
        execution_timeout=TRAIN_TIMEOUT,
        doc_md="Fine-tune the RetinaNet (resumes from the newest checkpoint on retry).",
        **store_args,
    )

    export = ExportModelOperator(
        task_id="export",
        training_uri="{{ ti.xcom_pull(task_ids='train')['uri'] | verbatim }}",
        force="{{ params.force }}",
        execution_timeout=timedelta(hours=1),
        **store_args,
    )
    evaluate = EvaluateModelOperator(
        task_id="evaluate",
        model_uri="{{ ti.xcom_pull(task_ids='export')['uri'] | verbatim }}",
        tfrecords_uri="{{ ti.xcom_pull(task_ids='tfrecords_gather')['uri'] | verbatim }}",
        force="{{ params.force }}",
        execution_timeout=timedelta(hours=2),
        **store_args,
    )
    evaluate_production = EvaluateProductionOperator(
        task_id="evaluate_production",
        tfrecords_uri="{{ ti.xcom_pull(task_ids='tfrecords_gather')['uri'] | verbatim }}",
        force="{{ params.force }}",
        execution_timeout=timedelta(hours=2),
        doc_md="The production model on this run's records and split (what promote compares "
               "the candidate with); nothing to do before the first promotion.",
        **store_args,
    )
    promote = PromoteModelOperator(
        task_id="promote",
        evaluation_uri="{{ ti.xcom_pull(task_ids='evaluate')['uri'] | verbatim }}",
        metric="{{ params.promotion_metric }}",
        margin="{{ params.promotion_margin }}",
        skip_downstream_if_not_promoted="{{ params.skip_detection_if_not_promoted }}",
        # production changed since evaluate_production: promote measures the new one itself
        execution_timeout=timedelta(hours=2),
        **store_args,
    )

    detect_args = {
        # empty = the registry's production model (read when the plan runs)
        "model_uri": "{{ (ti.xcom_pull(task_ids='export')['uri'] "
                     "if params.detect_with == 'candidate' else '') | verbatim }}",
        "images": "{{ params.detect_images | verbatim }}",
        "config": {
            "score_threshold": "{{ params.detection_score_threshold }}",
            "max_boxes": "{{ params.detection_max_boxes }}",
            "num_shards": "{{ params.detect_shards }}",
        },
        "force": "{{ params.force }}",
        **store_args,
    }
    detect_plan = DetectPlanOperator(
        task_id="detect_plan",
        shard_tasks="{{ params.detect_tasks }}",
        execution_timeout=timedelta(minutes=10),
        **detect_args,
    )
    # the shards and the gather run the model the plan chose, even if production changes
    planned = {**detect_args,
               "model_uri": "{{ ti.xcom_pull(task_ids='detect_plan', key='plan')['model_uri'] "
                            "| verbatim }}",
               # ... and its recorded listing, not a new one (the input prefix may gain images)
               "plan_fingerprint":
                   "{{ ti.xcom_pull(task_ids='detect_plan', key='plan')['fingerprint'] "
                   "| verbatim }}"}
    detect_shards = DetectShardsOperator.partial(
        task_id="detect_shards",
        execution_timeout=timedelta(hours=2),
        **planned,
    ).expand(units=detect_plan.output)
    detect_gather = DetectGatherOperator(
        task_id="detect_gather",
        execution_timeout=timedelta(minutes=30),
        doc_md="Merge the shards; the gallery is `index.html` in the output prefix.",
        **planned,
    )

    download >> plan >> shards >> gather >> train >> export >> evaluate >> promote
    gather >> evaluate_production >> promote
    promote >> detect_plan >> detect_shards >> detect_gather
