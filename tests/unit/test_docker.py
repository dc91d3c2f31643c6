"""The images and the compose stack are checked here, not built (no Docker engine in CI):
hadolint on every Dockerfile, and the facts the stack's safety and the GPU routing rely on."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = sorted((ROOT / "docker").glob("*.Dockerfile"))
HADOLINT = Path(sys.executable).parent / "hadolint"


GPU_LOCK = ROOT / "docker" / "requirements-gpu-worker.txt"


def _pins(lock: Path = ROOT / "requirements.txt") -> dict[str, str]:
    pins = {}
    for line in lock.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==([^\s;]+)", line)
        if m:
            pins[m.group(1).lower().replace("_", "-")] = m.group(2)
    return pins


def test_there_are_an_airflow_and_a_gpu_image():
    assert [p.name for p in DOCKERFILES] == ["airflow.Dockerfile", "gpu-worker.Dockerfile"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_is_clean(dockerfile):
    out = subprocess.run([str(HADOLINT), str(dockerfile)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_install_the_pinned_lock_and_do_not_run_as_root(dockerfile):
    text = dockerfile.read_text()
    if dockerfile.name == "gpu-worker.Dockerfile":
        # its own lock: requirements.txt's pins plus what a Celery worker on CUDA needs
        assert "COPY docker/requirements-gpu-worker.txt ./" in text
        assert re.search(r"pip install -r requirements-gpu-worker\.txt\s*\\\s*&& pip check",
                         text), "the GPU image must install its lock and run pip check"
    else:
        assert "-r requirements.txt" in text
    users = re.findall(r"^USER\s+(\S+)", text, flags=re.M)
    assert users and users[-1] not in ("0", "root"), "the final USER must not be root"
    pins = _pins()
    if "airflow" in dockerfile.name:
        base = re.search(r"^FROM apache/airflow:(\S+?)-python", text, flags=re.M).group(1)
        assert base == pins["apache-airflow"]
    for m in re.finditer(r"tensorflow\[and-cuda\]==([\d.]+)", text):
        assert m.group(1) == pins["tensorflow"]


def test_compose_stack():
    stack = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    services = stack["services"]
    for name in ("postgres", "redis", "seaweedfs", "api-server", "scheduler", "dag-processor",
                 "worker", "gpu-worker"):
        assert name in services, name
    for name, svc in services.items():
        build = svc.get("build")
        if build:
            assert (ROOT / build["dockerfile"]).is_file(), f"{name}: {build['dockerfile']}"
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond localhost"
    gpu = services["gpu-worker"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert "--queues gpu" in (ROOT / "docker" / "gpu-worker.Dockerfile").read_text().replace(
        '", "', " ")


def test_compose_holds_no_literal_secret():
    text = (ROOT / "docker" / "compose.yaml").read_text()
    for key in ("POSTGRES_PASSWORD", "REDIS_PASSWORD", "JWT_SECRET", "SECRET_KEY"):
        for line in text.splitlines():
            if re.search(rf"{key}\w*\s*[:=]", line):
                assert "${" in line, f"literal secret on: {line.strip()}"


def test_gpu_worker_lock_runs_a_celery_worker_of_the_compose_stack():
    """The GPU image runs ``airflow celery worker`` against compose's Redis broker and Postgres
    (metadata DB and result backend) on a CUDA base that has none of the packages for it:
    its lock must bring the Celery provider (the ``celery`` subcommand), celery and the redis
    client, and a Postgres driver, and keep every version the tests run with."""
    gpu = _pins(GPU_LOCK)
    for name in ("apache-airflow-providers-celery", "celery", "kombu", "redis",
                 "psycopg2-binary", "tensorflow", "nvidia-cudnn-cu12"):
        assert name in gpu, f"{name} is not pinned in {GPU_LOCK.name}"
    test_pins = _pins()
    assert len(test_pins) > 100
    differ = {n: (v, gpu.get(n)) for n, v in test_pins.items() if gpu.get(n) != v}
    assert differ == {}, f"the GPU lock does not pin these as requirements.txt does: {differ}"
    # requirements.txt (what `make test` installs) stays without them
    assert "apache-airflow-providers-celery" not in test_pins
    assert "psycopg2-binary" not in test_pins
    cmd = re.search(r"^CMD\s+(\[.*\])", (ROOT / "docker" / "gpu-worker.Dockerfile").read_text(),
                    flags=re.M).group(1)
    assert cmd.startswith('["airflow", "celery", "worker"')
    # the lock is resolved from its .in (make lock) and says how
    src = (ROOT / "docker" / "requirements-gpu-worker.in").read_text()
    assert "-r ../requirements.in" in src and "apache-airflow-providers-celery==" in src
    assert "docker/requirements-gpu-worker.in -c requirements.txt" in \
        (ROOT / "Makefile").read_text()


def _dag_module():
    """dags/petdet_retrain.py as a module (its GPU_POOL is what the train task uses)."""
    import importlib.util

    import airflow.sdk  # noqa: F401  (puts plugins/ on sys.path, as for the DAG processor)

    spec = importlib.util.spec_from_file_location("petdet_retrain_dagfile",
                                                  ROOT / "dags" / "petdet_retrain.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _init_script() -> str:
    """compose's airflow-init command as the shell in the container gets it."""
    stack = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    cmd = stack["services"]["airflow-init"]["command"]
    assert cmd[:2] == ["bash", "-c"], cmd
    return cmd[2].replace("$$", "$")  # compose's escape for a literal $


def test_compose_init_creates_the_pool_the_train_task_uses():
    """Airflow's scheduler never queues a task whose pool does not exist (a warning, nothing
    more): compose's init must create the DAG's GPU pool, and the DAG and the init must read
    the same variable for its name."""
    mod = _dag_module()
    assert mod.dag.get_task("train").pool == mod.GPU_POOL
    script = _init_script()
    assert script.index("airflow db migrate") < script.index("airflow pools set")
    m = re.search(r'airflow pools set "\$\{PETDET_GPU_POOL:-(\w+)\}" '
                  r'"\$\{PETDET_GPU_POOL_SLOTS:-(\d+)\}"', script)
    assert m, script
    assert m.group(1) == mod.GPU_POOL == "gpu" and m.group(2) == "1"
    env = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())["x-airflow"][
        "environment"]
    assert env["PETDET_GPU_POOL"] == "${PETDET_GPU_POOL:-gpu}"
    assert env["PETDET_GPU_POOL_SLOTS"] == "${PETDET_GPU_POOL_SLOTS:-1}"


@pytest.mark.airflow
def test_compose_init_script_creates_the_pool_on_a_fresh_db(tmp_path):
    """The init command itself, run by bash against a fresh metadata DB (SQLite here,
    Postgres in the stack): afterwards the pool is there with one slot."""
    mod = _dag_module()
    bindir = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AIRFLOW", "PETDET_GPU_POOL"))}
    env.update({"PATH": bindir + os.pathsep + env.get("PATH", ""),
                "AIRFLOW_HOME": str(tmp_path / "home"),
                "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{tmp_path}/airflow.db"})
    out = subprocess.run(["bash", "-c", _init_script()], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    got = subprocess.run([f"{bindir}/airflow", "pools", "get", mod.GPU_POOL, "-o", "json"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert got.returncode == 0, got.stderr[-2000:]
    pools = json.loads(got.stdout[got.stdout.index("["):])
    assert [(p["pool"], int(p["slots"])) for p in pools] == [(mod.GPU_POOL, 1)]
