"""``make demo``: run petdet_retrain end to end on the embedded defaults, offline.

1. writes a synthetic sample in the real archives' layout (``python -m petdet_tasks
   sample-data``) and a small starting preset — no network needed;
2. initialises a SQLite Airflow metadata DB under the work dir;
3. runs the real DAG in-process with ``dag.test()`` (the Airflow way to run a DAG on one
   machine), with the sample folder as the source and a local directory (default) or a local
   SeaweedFS (``--store seaweedfs``) as storage;
4. prints what each task produced and where. A second run reports cache hits.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=str(ROOT / ".demo"))
    ap.add_argument("--store", choices=["local", "seaweedfs"], default="local")
    ap.add_argument("--breeds", type=int, default=6)
    ap.add_argument("--per-breed", type=int, default=30)
    ap.add_argument("--train-steps", type=int, default=300)
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--force", action="store_true", help="recompute every step")
    args = ap.parse_args()

    work = Path(args.workdir).resolve()
    home = work / "airflow"
    home.mkdir(parents=True, exist_ok=True)
    os.environ.update({
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db",
        "PETDET_CACHE_DIR": str(work / "cache"),
    })

    from petdet_tasks.sample_data import make_sample

    sample_dir = work / "sample"
    summary = make_sample(sample_dir, breeds=args.breeds, per_breed=args.per_breed)
    print(f"[demo] sample dataset: {summary['images']} images of {len(summary['breeds'])} "
          f"breeds ({summary['trainval']} trainval / {summary['test']} test) in {sample_dir}",
          flush=True)

    airflow = str(Path(sys.executable).parent / "airflow")
    subprocess.run([airflow, "db", "migrate"], check=True, stdout=subprocess.DEVNULL)
    subprocess.run([airflow, "pools", "set", "gpu", "1", "GPU slots (training)"], check=True,
                   stdout=subprocess.DEVNULL)
    print(f"[demo] Airflow metadata DB: {home / 'airflow.db'}", flush=True)

    # the starting point: a preset made here (no download), used as a COCO preset would be
    preset_dir = work / "preset"
    if not (preset_dir / "config.json").exists():
        from petdet_tasks.detector import make_preset

        make_preset(preset_dir, num_classes=5, image_size=args.image_size, train_steps=2)
    print(f"[demo] starting preset: {preset_dir} (a tiny RetinaNet made locally)", flush=True)

    server = None
    # the sample carries the real dataset's defects on purpose (one truncated JPEG in ~36
    # labelled images) and only a few of the 37 breeds: allow for both
    conf = {"source": str(sample_dir), "force": args.force, "classes": "present",
            "max_quarantine_fraction": 0.05, "shards": 2, "shard_tasks": 2,
            # a short CPU training run (see README for what it reaches)
            "preset": str(preset_dir), "num_steps": args.train_steps, "batch_size": 8,
            "image_size": args.image_size, "optimizer": "sgd", "learning_rate": 0.004,
            "checkpoint_every_n": 100}
    if args.store == "local":
        conf.update(store_root=str(work / "store"), aws_conn_id="")
    else:
        from petdet_tasks.seaweed import SeaweedServer

        server = SeaweedServer(work / "seaweed" / "data", bucket="petdet").start()
        os.environ["AIRFLOW_CONN_PETDET_DEMO_S3"] = json.dumps({
            "conn_type": "aws", "login": server.access_key, "password": server.secret_key,
            "extra": {"endpoint_url": server.endpoint, "region_name": "us-east-1"}})
        conf.update(store_root="s3://petdet/demo", aws_conn_id="petdet_demo_s3")
        print(f"[demo] SeaweedFS S3 at {server.endpoint} (data in {work / 'seaweed'})", flush=True)

    try:
        return _run_dag(conf)
    finally:
        if server is not None:
            server.stop()


def _run_dag(conf: dict) -> int:
    from airflow.dag_processing.dagbag import DagBag
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    bag = DagBag(dag_folder=str(ROOT / "dags"))
    if bag.import_errors:
        for path, err in bag.import_errors.items():
            print(f"[demo] import error in {path}:\n{err}", file=sys.stderr)
        return 1
    dag = bag.dags["petdet_retrain"]
    print(f"[demo] running {dag.dag_id} with {json.dumps(conf)}", flush=True)
    run = dag.test(run_conf=conf)

    with create_session() as session:
        rows = session.query(XComModel).filter_by(dag_id=dag.dag_id, run_id=run.run_id,
                                                  key="return_value").all()
        results: dict[str, list] = {}
        for r in sorted(rows, key=lambda r: r.map_index):
            value = json.loads(r.value) if isinstance(r.value, str) else r.value
            results.setdefault(r.task_id, []).append(value)
    print(f"\n[demo] run {run.run_id}: {run.state}")
    for task_id in dag.task_ids:
        outs = results.get(task_id)
        if not outs:
            print(f"  {task_id:<19} no result (see the log above)")
            continue
        out = outs[0]
        if not isinstance(out, dict):  # the plan returns shard groups for the mapped task
            print(f"  {task_id:<19} {len(out)} shard groups")
            continue
        if "promoted" in out or not out.get("uri"):  # a decision, or nothing to evaluate
            print(f"  {task_id:<19} {out.get('reason', json.dumps(out, sort_keys=True))}")
            continue
        verb = "cache hit " if out.get("cache_hit") else "wrote     "
        mapped = f" ({len(outs)} mapped tasks)" if len(outs) > 1 else ""
        extra = {k: v for k, v in out.items()
                 if k not in ("step", "uri", "fingerprint", "cache_hit", "archives", "shards")}
        print(f"  {task_id:<19} {verb}{out['uri']}{mapped}")
        if extra and not mapped:
            print(f"  {'':<19} {json.dumps(extra, sort_keys=True)}")
    gallery = (results.get("detect_gather") or [{}])[0].get("uri")
    if gallery:
        print(f"\n[demo] gallery: {_local_gallery(gallery, conf)}")
    return 0 if run.state == "success" else 1


def _local_gallery(uri: str, conf: dict) -> str:
    """The gallery's path on this machine (an S3 output is copied next to the work dir)."""
    if not uri.startswith("s3://"):
        return str(Path(uri) / "index.html")
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

    from petdet_tasks.store import open_store

    store = open_store(conf["store_root"],
                       s3_client=S3Hook(aws_conn_id=conf["aws_conn_id"]).get_conn())
    prefix = uri[len(store.root.rstrip("/")) + 1:].rstrip("/") + "/"
    dest = Path(os.environ["PETDET_CACHE_DIR"]).parent / "gallery" / prefix.split("/")[-2]
    for obj in store.list(prefix):
        rel = obj.key[len(prefix):]
        if rel.endswith((".html", ".jpg", ".json")) and not rel.startswith("_"):
            store.download_file(obj.key, dest / rel)
    return f"{dest / 'index.html'} (copied from {uri}/index.html)"


if __name__ == "__main__":
    sys.exit(main())
