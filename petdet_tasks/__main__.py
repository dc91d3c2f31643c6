"""``python -m petdet_tasks STEP ...``: every step without Airflow.

Logs go to stderr; the last stdout line of every step command is one JSON object with at
least ``uri``, ``fingerprint`` and ``cache_hit`` (what the Airflow operator pushes to XCom).

Exit status: 0 done; 1 failed, and a retry may pass (store, network, a killed worker); 2 the
inputs or config are at fault (``petdet_tasks.errors.PermanentError``, or a usage error), so
a retry would fail the same way.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from petdet_tasks import __version__
from petdet_tasks.detector import ARCHS
from petdet_tasks.errors import PermanentError


def _store(root: str):
    from petdet_tasks.store import open_store

    return open_store(root)


def _cmd_sample_data(args) -> dict:
    from petdet_tasks.sample_data import make_sample

    return make_sample(args.out_dir, breeds=args.breeds, per_breed=args.per_breed, seed=args.seed)


def _cmd_download(args) -> dict:
    from petdet_tasks.download import DownloadConfig, download

    cfg = DownloadConfig(source=args.source, cache_dir=args.cache_dir, force=args.force,
                         keep_archives=not args.no_keep_archives)
    return download(_store(args.store), cfg).to_xcom()


def _cmd_tfrecords(args) -> dict:
    from petdet_tasks.tfrecords import TFRecordConfig, build

    cfg = TFRecordConfig(num_shards=args.shards, val_fraction=args.val_fraction,
                         check=args.check, max_quarantine_fraction=args.max_quarantine,
                         classes=args.classes, label_map=args.label_map,
                         extra_data=args.extra_data, force=args.force)
    return build(_store(args.store), args.dataset, cfg, workers=args.workers).to_xcom()


def _cmd_train(args) -> dict:
    from petdet_tasks.train import train
    from petdet_tasks.train_config import TrainConfig, load_train_config

    cfg = load_train_config(args.config) if args.config else TrainConfig()
    overrides = {k: v for k, v in (("num_steps", args.num_steps), ("batch_size", args.batch_size),
                                   ("image_size", args.image_size), ("preset", args.preset))
                 if v is not None}
    if overrides:
        cfg = cfg.replace(**overrides)
    return train(_store(args.store), args.tfrecords, cfg, cache_dir=args.cache_dir,
                 force=args.force).to_xcom()


def _cmd_export(args) -> dict:
    from petdet_tasks.export import ExportConfig, export

    cfg = ExportConfig(score_threshold=args.score_threshold, iou_threshold=args.iou_threshold,
                       max_detections=args.max_detections)
    return export(_store(args.store), args.training, cfg, cache_dir=args.cache_dir,
                  force=args.force).to_xcom()


def _cmd_evaluate(args) -> dict:
    from petdet_tasks.evaluate import EvalConfig, evaluate

    cfg = EvalConfig(split=args.split, batch_size=args.batch_size)
    return evaluate(_store(args.store), args.model, args.tfrecords, cfg,
                    cache_dir=args.cache_dir, force=args.force).to_xcom()


def _cmd_promote(args) -> dict:
    from petdet_tasks.evaluate import promote_evaluated

    return promote_evaluated(_store(args.store), args.evaluation, metric=args.metric,
                             margin=args.margin, run_id=args.run_id, cache_dir=args.cache_dir)


def _cmd_detect(args) -> dict:
    from petdet_tasks.detect import DetectConfig, detect

    cfg = DetectConfig(score_threshold=args.score_threshold, max_boxes=args.max_boxes,
                       batch_size=args.batch_size, num_shards=args.shards,
                       thumbnail_size=args.thumbnail_size)
    result = detect(_store(args.store), args.model, args.images, cfg, cache_dir=args.cache_dir,
                    force=args.force)
    logging.getLogger("petdet").info("gallery: %s/index.html", result.uri)
    return result.to_xcom()


def _cmd_config_from_pipeline(args) -> int:
    from petdet_tasks.pipeline_config import main_from_pipeline

    return main_from_pipeline(args.pipeline_config, args.out)


def _cmd_make_preset(args) -> dict:
    from petdet_tasks.detector import make_preset

    path = make_preset(args.out_dir, num_classes=args.num_classes, image_size=args.image_size,
                       arch=args.arch, train_steps=args.train_steps, seed=args.seed)
    return {"preset": str(path.resolve()), "arch": args.arch, "num_classes": args.num_classes,
            "image_size": args.image_size}


def _int_at_least(text: str, lo: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < lo:
        raise argparse.ArgumentTypeError(f"must be at least {lo}, got {value}")
    return value


def _positive_int(text: str) -> int:
    return _int_at_least(text, 1)


def _non_negative_int(text: str) -> int:
    return _int_at_least(text, 0)


def _image_size(text: str) -> int:
    """A size training accepts (train_config's rule), refused here rather than by the first
    training run on the preset."""
    from petdet_tasks.train_config import image_size_problem

    value = _int_at_least(text, 1)
    problem = image_size_problem(value)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return value


def _cmd_cache(args) -> dict:
    from petdet_tasks.layout import cache_root
    from petdet_tasks.worker_cache import report

    return report(cache_root(args.cache_dir), trim=args.trim, budget=args.max_gb)


def _gb_budget(text: str) -> int:
    from petdet_tasks.worker_cache import gb_to_bytes

    try:
        return gb_to_bytes(text.strip(), "--max-gb")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _cmd_seaweedfs(args) -> int:
    from petdet_tasks.seaweed import serve_forever

    return serve_forever(args.dir, bucket=args.bucket)


def build_parser() -> argparse.ArgumentParser:
    from petdet_tasks.defaults import OFFICIAL_BASE, SAMPLE_BREEDS, SAMPLE_PER_BREED, SAMPLE_SEED

    p = argparse.ArgumentParser(prog="python -m petdet_tasks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"petdet {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("sample-data", help="write a synthetic dataset in the real archives' layout")
    s.add_argument("out_dir")
    s.add_argument("--breeds", type=int, default=SAMPLE_BREEDS, help="number of breeds (1..37)")
    s.add_argument("--per-breed", type=int, default=SAMPLE_PER_BREED, help="images per breed")
    s.add_argument("--seed", type=int, default=SAMPLE_SEED)
    s.set_defaults(func=_cmd_sample_data)

    d = sub.add_parser("download", help="fetch + verify + extract the archives into the store")
    d.add_argument("--store", required=True, help="s3://bucket/prefix or a local directory")
    d.add_argument("--source", default=OFFICIAL_BASE,
                   help="base URL or local folder holding the two archives (default: official)")
    d.add_argument("--cache-dir", default=None, help="download cache (default ~/.cache/petdet)")
    d.add_argument("--force", action="store_true", help="rebuild even if already complete")
    d.add_argument("--no-keep-archives", action="store_true",
                   help="delete the cached archives after a successful run")
    d.set_defaults(func=_cmd_download)

    t = sub.add_parser("tfrecords", help="OD-API TFRecord shards + data report from a dataset")
    t.add_argument("--store", required=True, help="s3://bucket/prefix or a local directory")
    t.add_argument("--dataset", required=True, help="the download step's output URI")
    t.add_argument("--shards", type=int, default=10, help="shards per split")
    t.add_argument("--workers", type=_positive_int, default=None,
                   help="processes (default: CPU count)")
    t.add_argument("--val-fraction", type=float, default=0.3)
    t.add_argument("--check", choices=["header", "full"], default="header",
                   help="image check: header + end marker (cheap) or a full decode")
    t.add_argument("--max-quarantine", type=float, default=0.01,
                   help="fail when a larger fraction of labelled images is quarantined")
    t.add_argument("--classes", choices=["all", "present"], default="all",
                   help="all: every label-map class needs training data; present: keep those "
                   "that have it")
    t.add_argument("--label-map", default=None, help="label map file (default: 37 pets breeds)")
    t.add_argument("--extra-data", default=None,
                   help="prefix in the store with extra labelled images in the dataset layout")
    t.add_argument("--force", action="store_true", help="rebuild even if already complete")
    t.set_defaults(func=_cmd_tfrecords)

    r = sub.add_parser("train", help="fine-tune the detector on a tfrecords output (resumable)")
    r.add_argument("--store", required=True, help="s3://bucket/prefix or a local directory")
    r.add_argument("--tfrecords", required=True, help="the tfrecords step's output URI")
    r.add_argument("--config", default=None, help="training config (JSON or YAML)")
    r.add_argument("--preset", default=None,
                   help="starting point: keras-hub preset name, kaggle:// handle, local "
                   "directory or store prefix (overrides the config)")
    r.add_argument("--num-steps", type=int, default=None)
    r.add_argument("--batch-size", type=int, default=None, help="per replica")
    r.add_argument("--image-size", type=int, default=None)
    r.add_argument("--cache-dir", default=None, help="local cache (default ~/.cache/petdet)")
    r.add_argument("--force", action="store_true", help="retrain even if already complete")
    r.set_defaults(func=_cmd_train)

    e = sub.add_parser("export", help="SavedModel + frozen inference graph from a training")
    e.add_argument("--store", required=True, help="s3://bucket/prefix or a local directory")
    e.add_argument("--training", required=True, help="the train step's output URI")
    e.add_argument("--score-threshold", type=float, default=0.05,
                   help="lowest score the served model returns")
    e.add_argument("--iou-threshold", type=float, default=0.5, help="NMS IoU threshold")
    e.add_argument("--max-detections", type=int, default=100, help="rows per image")
    e.add_argument("--cache-dir", default=None, help="local cache (default ~/.cache/petdet)")
    e.add_argument("--force", action="store_true", help="export again even if complete")
    e.set_defaults(func=_cmd_export)

    v = sub.add_parser("evaluate", help="COCO metrics of an exported model on a split")
    v.add_argument("--store", required=True, help="s3://bucket/prefix or a local directory")
    v.add_argument("--model", required=True, help="the export step's output URI")
    v.add_argument("--tfrecords", required=True, help="the tfrecords step's output URI")
    v.add_argument("--split", default="val")
    v.add_argument("--batch-size", type=int, default=8)
    v.add_argument("--cache-dir", default=None, help="local cache (default ~/.cache/petdet)")
    v.add_argument("--force", action="store_true", help="evaluate again even if complete")
    v.set_defaults(func=_cmd_evaluate)

    o = sub.add_parser("promote", help="make an evaluated model production if it is better")
    o.add_argument("--store", required=True, help="s3://bucket/prefix or a local directory")
    o.add_argument("--evaluation", required=True, help="the evaluate step's output URI")
    o.add_argument("--metric", default="mAP",
                   help="quality metric compared (default mAP; also mAP@.5, mAP@.75, "
                   "recall@100, ...)")
    o.add_argument("--margin", type=float, default=0.0,
                   help="promote only when better than production by at least this much")
    o.add_argument("--run-id", default=None, help="recorded with the decision")
    o.add_argument("--cache-dir", default=None,
                   help="local cache for evaluating production on the candidate's records "
                   "when it was measured on others (default ~/.cache/petdet)")
    o.set_defaults(func=_cmd_promote)

    x = sub.add_parser("detect", help="run a model over images: JSON, annotated JPEGs, gallery")
    x.add_argument("--store", required=True, help="s3://bucket/prefix or a local directory")
    x.add_argument("--model", default=None,
                   help="the export step's output URI (default: the production model)")
    x.add_argument("--images", default=None,
                   help="store prefix or local folder of JPEG/PNG images (default: the test "
                   "split of the dataset the model was trained on)")
    x.add_argument("--score-threshold", type=float, default=0.5)
    x.add_argument("--max-boxes", type=int, default=20, help="per image")
    x.add_argument("--batch-size", type=int, default=8)
    x.add_argument("--shards", type=int, default=4)
    x.add_argument("--thumbnail-size", type=int, default=240, help="gallery thumbnails, px")
    x.add_argument("--cache-dir", default=None, help="local cache (default ~/.cache/petdet)")
    x.add_argument("--force", action="store_true", help="detect again even if complete")
    x.set_defaults(func=_cmd_detect)

    c = sub.add_parser("config", help="training config tools")
    csub = c.add_subparsers(dest="config_command", required=True, metavar="TOOL")
    fp = csub.add_parser("from-pipeline",
                         help="convert an OD API pipeline.config into petdet's config")
    fp.add_argument("pipeline_config")
    fp.add_argument("--out", default=None, help="output JSON file (default: stdout)")
    fp.set_defaults(func=_cmd_config_from_pipeline)

    m = sub.add_parser("make-preset",
                       help="a small RetinaNet preset made offline, to start training from "
                       "(no download; for trying the steps, not for a real model)")
    m.add_argument("out_dir")
    m.add_argument("--arch", choices=ARCHS, default="tiny")
    m.add_argument("--num-classes", type=_positive_int, default=5,
                   help="its class head (training swaps it for the records' label map)")
    m.add_argument("--image-size", type=_image_size, default=128)
    m.add_argument("--train-steps", type=_non_negative_int, default=2,
                   help="steps on random boxes, so its weights are not the initial ones")
    m.add_argument("--seed", type=int, default=0)
    m.set_defaults(func=_cmd_make_preset)

    k = sub.add_parser("cache", help="what this worker's local cache holds; --trim to budget")
    k.add_argument("--cache-dir", default=None,
                   help="default $PETDET_CACHE_DIR, else ~/.cache/petdet")
    k.add_argument("--trim", action="store_true",
                   help="evict least recently used entries not in use, down to the budget")
    k.add_argument("--max-gb", type=_gb_budget, default=None,
                   help="the budget in GB (default $PETDET_CACHE_MAX_GB, else 50)")
    k.set_defaults(func=_cmd_cache)

    w = sub.add_parser("seaweedfs", help="run a local SeaweedFS S3 server (127.0.0.1)")
    w.add_argument("--dir", required=True, help="data directory (kept across restarts)")
    w.add_argument("--bucket", default="petdet")
    w.set_defaults(func=_cmd_seaweedfs)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        for noisy in ("botocore", "boto3", "s3transfer", "urllib3"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        out = args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        logging.getLogger("petdet").error("%s failed: %s", args.command, e,
                                          exc_info=args.verbose)
        # 2: the inputs or config are at fault, a retry would fail again (as for a usage error)
        return 2 if isinstance(e, PermanentError) else 1
    if isinstance(out, int):
        return out
    print(json.dumps(out, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
