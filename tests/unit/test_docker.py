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


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
        if m:
            pins[m.group(1).lower()] = m.group(2)
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
