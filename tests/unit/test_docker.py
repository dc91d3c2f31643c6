"""The images and the compose stack are checked here, not built (no Docker engine in CI):
hadolint on every Dockerfile, and the facts the stack's safety and the GPU routing rely on."""

from __future__ import annotations

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
