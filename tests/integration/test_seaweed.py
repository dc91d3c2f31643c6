"""The SeaweedFS launcher: a port taken between choosing it and weed binding it is survived.

The test suite runs in several processes (pytest-xdist), each starting its own server on ports
found free a moment before: two starts at once can pick the same port.
"""

from __future__ import annotations

import logging
import socket

import pytest

from petdet_tasks import seaweed as sw

pytestmark = pytest.mark.s3


def _taking(port: int, times: int):
    """A ``_free_ports`` that hands out ``port`` (in use) as the master port ``times`` times."""
    real = sw._free_ports
    handed = []

    def free_ports(n):
        ports = real(n)
        if len(handed) < times:
            ports[sw._PORT_FLAGS.index("master.port")] = port
            handed.append(port)
        return ports

    return free_ports, handed


@pytest.fixture
def busy_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_a_port_taken_before_weed_binds_it_is_retried_on_other_ports(tmp_path, busy_port,
                                                                     monkeypatch, caplog):
    free_ports, handed = _taking(busy_port, times=1)
    monkeypatch.setattr(sw, "_free_ports", free_ports)
    with caplog.at_level(logging.WARNING, logger=sw.log.name), \
            sw.SeaweedServer(tmp_path / "data") as server:
        client = server.client()
        client.put_object(Bucket=server.bucket, Key="k", Body=b"v")
        assert client.get_object(Bucket=server.bucket, Key="k")["Body"].read() == b"v"
    assert handed == [busy_port]
    assert f"port {busy_port}" in caplog.text and "attempt 1 of 5" in caplog.text


def test_ports_taken_every_time_give_up_with_the_reason(tmp_path, busy_port, monkeypatch):
    free_ports, handed = _taking(busy_port, times=99)
    monkeypatch.setattr(sw, "_free_ports", free_ports)
    server = sw.SeaweedServer(tmp_path / "data")
    with pytest.raises(RuntimeError, match=f"in 2 attempts: .*port {busy_port}"):
        server.start(attempts=2)
    assert len(handed) == 2 and server._proc is None


def test_another_failure_to_start_is_not_retried(tmp_path, monkeypatch):
    calls = []
    real = sw.SeaweedServer._start_once

    def counted(self, logdir):
        calls.append(1)
        return real(self, logdir)

    monkeypatch.setattr(sw.SeaweedServer, "_start_once", counted)
    monkeypatch.setattr(sw, "weed_binary", lambda: "false")  # exits 1, saying nothing
    with pytest.raises(RuntimeError, match="weed exited with code 1 while starting"):
        sw.SeaweedServer(tmp_path / "data").start()
    assert len(calls) == 1
