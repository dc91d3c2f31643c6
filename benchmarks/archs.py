"""Training-step cost of the small detector archs, against ``tiny`` measured in the same run.

For each arch (``detector.build_detector``: ``micro``, ``tiny`` by default), in this process:
compile with SGD (momentum 0.9) and one warm-up ``fit`` (the trace); then ``--rounds`` rounds
that each time ``--steps`` steps of ``fit`` of every arch in turn, on one batch held in memory
(random pixels, three random boxes per image: no input cost). Prints the median seconds per
step, images/s, parameters and each arch's speed-up over ``tiny`` (the median of the rounds'
ratios, and their range), then a JSON line. ``--threads 1`` (the default) is what each
``make test`` process runs TensorFlow with; ``--threads 0`` leaves TensorFlow's own default (a
thread per core).

    python benchmarks/archs.py [--size 128] [--batch 8] [--steps 10] [--rounds 5]
                               [--threads 1] [--archs micro tiny]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build(arch: str, size: int, batch: int):
    """(detector compiled with SGD and traced by a warm-up fit, its one-batch dataset)."""
    import keras
    import numpy as np
    import tensorflow as tf

    from petdet_tasks.detector import build_detector

    keras.utils.set_random_seed(0)
    detector = build_detector(6, image_size=size, arch=arch)
    detector.compile(optimizer=keras.optimizers.SGD(0.001, momentum=0.9))
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (batch, size, size, 3)).astype("float32")
    lo = rng.uniform(0, size / 2, (batch, 3, 2))
    hi = lo + rng.uniform(size / 8, size / 2, (batch, 3, 2))
    y = {"boxes": np.concatenate([lo, hi], -1).astype("float32"),
         "labels": rng.integers(0, 6, (batch, 3)).astype("int32")}
    data = tf.data.Dataset.from_tensors((x, y)).repeat()
    detector.fit(data, steps_per_epoch=2, epochs=1, verbose=0)  # the trace
    return detector, data


def step_seconds(detector, data, steps: int) -> float:
    start = time.perf_counter()
    detector.fit(data, steps_per_epoch=steps, epochs=1, verbose=0)
    return (time.perf_counter() - start) / steps


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10, help="steps per round and arch")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--archs", nargs="+", default=["micro", "tiny"])
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    if args.threads:
        os.environ["TF_NUM_INTRAOP_THREADS"] = str(args.threads)
    archs = list(dict.fromkeys(["tiny", *args.archs]))  # tiny first: the baseline
    models = {arch: build(arch, args.size, args.batch) for arch in archs}
    # rounds alternate the archs, so that a burst of load on a shared machine lands on one
    # round of each rather than on one arch; the medians are reported
    times: dict[str, list[float]] = {arch: [] for arch in archs}
    for _ in range(args.rounds):
        for arch in archs:
            times[arch].append(step_seconds(*models[arch], args.steps))
    results = {}
    for arch in archs:
        ratios = [t / s for t, s in zip(times["tiny"], times[arch], strict=True)]
        seconds = statistics.median(times[arch])
        results[arch] = {"s_per_step": round(seconds, 3),
                         "images_per_s": round(args.batch / seconds, 2),
                         "parameters": models[arch][0].count_params(),
                         "speedup_vs_tiny": round(statistics.median(ratios), 2),
                         "speedup_range": [round(min(ratios), 2), round(max(ratios), 2)]}
    print(f"training steps at {args.size} px, batch {args.batch}: {args.rounds} rounds of "
          f"{args.steps} steps, TensorFlow threads: {args.threads or 'default'}")
    for arch in archs:
        r = results[arch]
        print(f"  {arch:9s} {r['s_per_step']:.3f} s/step  {r['images_per_s']:7.2f} images/s  "
              f"{r['parameters']:>10,d} parameters  {r['speedup_vs_tiny']:.2f}x tiny's speed "
              f"(rounds {r['speedup_range'][0]:.2f}x-{r['speedup_range'][1]:.2f}x)")
    print(json.dumps({"size": args.size, "batch": args.batch, "threads": args.threads,
                      "rounds": args.rounds, "steps": args.steps, "archs": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
