"""Benchmark of the evaluation's COCO scoring: memory and time, against one pycocotools run
over every class.

The evaluate step keeps every image's ground truth and detections, then scores them with
:func:`petdet_tasks.coco_eval.coco_metrics`. That scores one class at a time (one COCOeval
per class); the baseline is how it scored before, and how the OD API's evaluator calls
pycocotools: one COCOeval over every class, holding a result annotation dict per detection and
pycocotools' per-image state (a dict per image, class and area range) for all classes at once.
Both score the same inputs in a fresh process each, and must give the same metrics.

Inputs: ``--images`` synthetic val images of Oxford-like sizes, 37 classes, one ground-truth
box each (the pets' head boxes; every 10th image two), and what a served model returns at the
export's defaults: ``--detections`` (100) boxes per image above score 0.05, a few near the true
box, the rest anywhere. Prints, at ``--images`` and half as many, each way's peak RSS (the
whole process: Python, numpy, pycocotools, the inputs, which both share) and seconds, and the
ratios: the goal is a peak that grows far less than the baseline's with the images.

    python benchmarks/evaluate.py [--images 2000] [--detections 100]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CLASSES = 37


def make_inputs(n_images: int, per_image: int, seed: int = 0) -> tuple[list, list, dict]:
    import numpy as np

    rng = np.random.default_rng(seed)
    classes = {c: f"breed{c}" for c in range(1, CLASSES + 1)}
    groundtruth, detections = [], []
    for i in range(n_images):
        key = f"img-{i:06d}"
        n_gt = 2 if i % 10 == 0 else 1
        y0 = rng.uniform(0, 0.6, (n_gt, 2))
        boxes = np.concatenate([y0, y0 + rng.uniform(0.1, 0.4, (n_gt, 2))], axis=1)
        labels = rng.integers(1, CLASSES + 1, n_gt)
        groundtruth.append({"image_id": key, "width": 500, "height": 375,
                            "boxes": boxes[:, [0, 1, 2, 3]], "labels": labels})
        near = min(per_image, 5)
        d = np.empty((per_image, 4))
        d[:near] = np.clip(boxes[np.arange(near) % n_gt] + rng.normal(0, 0.03, (near, 4)), 0, 1)
        a = rng.uniform(0, 0.8, (per_image - near, 2))
        d[near:] = np.concatenate([a, a + rng.uniform(0.02, 0.2, (per_image - near, 2))], 1)
        d[:, 2:] = np.maximum(d[:, 2:], d[:, :2])
        cls = rng.integers(1, CLASSES + 1, per_image)
        cls[: near // 2 + 1] = labels[np.arange(near // 2 + 1) % n_gt]
        detections.append({"image_id": key, "boxes": d, "scores": rng.uniform(0.05, 1, per_image),
                           "classes": cls.astype(np.float32)})
    return groundtruth, detections, classes


def score_all_classes_at_once(groundtruth, detections, classes) -> dict:
    """The baseline: one COCOeval over every class, from the same validated inputs."""
    import contextlib
    import io

    from pycocotools.cocoeval import COCOeval

    from petdet_tasks import coco_eval as ce

    label_map = ce._check_classes(classes)
    images = ce._read_groundtruth(groundtruth, label_map)
    kept = ce._read_detections(detections, images, label_map, 100)
    coco_images = [{"id": im.coco_id, "width": im.width, "height": im.height}
                   for im in images.values()]
    categories = [{"id": i, "name": n} for i, n in label_map.items()]
    gts = [{"id": n, "image_id": im.coco_id, "category_id": label, "bbox": [float(v) for v in box],
            "area": float(box[2] * box[3]), "iscrowd": 0}
           for n, (im, box, label) in enumerate(
               ((im, b, lab) for im in images.values()
                for b, lab in zip(im.boxes, im.labels, strict=True)), 1)]
    dts = [a for c in label_map for a in kept.annotations(c)]
    for n, a in enumerate(dts, 1):
        a["id"] = n
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(ce._coco(coco_images, categories, gts),
                      ce._coco(coco_images, categories, dts), iouType="bbox")
        ev.params.imgIds = [im["id"] for im in coco_images]
        ev.params.catIds = list(label_map)
        ev.evaluate()
        ev.accumulate()
    precision = ev.eval["precision"]
    return {"mAP": ce._mean(precision[:, :, :, 0, 2]),
            "mAP@.5": ce._mean(precision[0, :, :, 0, 2]),
            "recall@100": ce._mean(ev.eval["recall"][:, :, 0, 2])}


def _one(mode: str, n_images: int, per_image: int) -> dict:
    """In this (fresh) process: make the inputs, score them one way; peak RSS and seconds."""
    groundtruth, detections, classes = make_inputs(n_images, per_image)
    inputs_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t = time.perf_counter()
    if mode == "petdet":
        from petdet_tasks.coco_eval import coco_metrics

        m = coco_metrics(groundtruth, detections, classes)
        metrics = {k: m[k] for k in ("mAP", "mAP@.5", "recall@100")}
    else:
        metrics = score_all_classes_at_once(groundtruth, detections, classes)
    seconds = time.perf_counter() - t
    return {"mode": mode, "images": n_images, "seconds": seconds, "inputs_rss_mb": inputs_rss,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "metrics": metrics}


def run(mode: str, n_images: int, per_image: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--one", mode, "--images", str(n_images),
                          "--detections", str(per_image)], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--detections", type=int, default=100, help="per image")
    ap.add_argument("--one", choices=["petdet", "baseline"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(_one(args.one, args.images, args.detections)))
        return 0
    sizes = (args.images // 2, args.images)
    results = {(mode, n): run(mode, n, args.detections)
               for n in sizes for mode in ("baseline", "petdet")}
    print(f"{CLASSES} classes, {args.detections} detections per image; each way in a fresh "
          "process\n")
    print(f"{'images':>7}  {'way':<34}{'peak RSS MB':>12}{'of it inputs':>14}{'seconds':>9}")
    for (mode, n), r in results.items():
        way = ("(a) petdet, one COCOeval per class" if mode == "petdet"
               else "(b) one COCOeval over every class")
        print(f"{n:>7}  {way:<34}{r['peak_rss_mb']:>12.0f}{r['inputs_rss_mb']:>14.0f}"
              f"{r['seconds']:>9.1f}")
    for n in sizes:
        a, b = results["petdet", n], results["baseline", n]
        if a["metrics"] != b["metrics"]:
            print(f"MISMATCH at {n} images: {a['metrics']} != {b['metrics']}")
            return 1
    small, large = sizes
    grow = {m: results[m, large]["peak_rss_mb"] - results[m, small]["peak_rss_mb"]
            for m in ("petdet", "baseline")}
    a, b = results["petdet", large], results["baseline", large]
    print(f"\nsame metrics both ways at both sizes (mAP {a['metrics']['mAP']:.4f} at {large})")
    print(f"at {large} images: peak RSS (a)/(b) = {a['peak_rss_mb'] / b['peak_rss_mb']:.2f}x, "
          f"time (a)/(b) = {a['seconds'] / b['seconds']:.2f}x")
    print(f"peak RSS growth from {small} to {large} images: (a) +{grow['petdet']:.0f} MB, "
          f"(b) +{grow['baseline']:.0f} MB ({grow['petdet'] / grow['baseline']:.2f}x)")
    print(json.dumps({"images": large, "peak_rss_mb": {m: round(results[m, large]["peak_rss_mb"])
                                                       for m in ("petdet", "baseline")},
                      "seconds": {m: round(results[m, large]["seconds"], 1)
                                  for m in ("petdet", "baseline")},
                      "rss_growth_mb": {m: round(v) for m, v in grow.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
