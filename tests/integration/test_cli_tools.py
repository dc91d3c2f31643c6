"""The CLI's helper commands: ``make-preset`` (an offline starting point for ``train``) and
``seaweedfs`` (a local S3 server that stops with weed on Ctrl+C and on SIGTERM)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from petdet_tasks.__main__ import main


def test_make_preset_writes_a_preset_training_can_start_from(tmp_path, capsys):
    from petdet_tasks.detector import load_for_finetune
    from petdet_tasks.store import LocalStore
    from petdet_tasks.train import preset_identity, resolve_preset

    out = tmp_path / "preset"
    assert main(["make-preset", str(out), "--image-size", "64", "--num-classes", "3",
                 "--train-steps", "1"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary == {"preset": str(out.resolve()), "arch": "tiny", "num_classes": 3,
                       "image_size": 64}
    assert (out / "config.json").is_file() and (out / "metadata.json").is_file()
    store = LocalStore(tmp_path / "store")
    assert preset_identity(store, str(out)).startswith("dir:")
    detector = load_for_finetune(resolve_preset(store, str(out), tmp_path / "cache"), 6,
                                 image_size=64)
    assert detector.num_classes == 6  # the class head swapped for the records' label map


def test_make_preset_refuses_what_training_would_refuse(tmp_path, capsys):
    """An image size training cannot use, or negative steps, wrote a preset and exited 0."""
    import pytest

    for args, words in ((["--image-size", "17"], "expected 64 or a multiple of 128 in [64, "
                                                 "1536] (keras-hub's anchor grid matches the "
                                                 "P6/P7 feature maps (strides 64, 128) only at "
                                                 "64 px or multiples of 128), got 17"),
                        (["--image-size", "100"], "expected 64 or a multiple of 128"),
                        (["--image-size", "96"], "anchor grid"),  # a multiple of 32, not 128
                        (["--image-size", "320"], "got 320"),
                        (["--image-size", "2048"], "expected 64 or a multiple of 128"),
                        (["--train-steps", "-3"], "must be at least 0, got -3")):
        with pytest.raises(SystemExit) as e:
            main(["make-preset", str(tmp_path / "preset"), *args])
        assert e.value.code == 2, args
        assert words in capsys.readouterr().err, args
    assert not (tmp_path / "preset").exists()


def _weed_pids(data_dir: Path) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if "weed" in cmdline and str(data_dir) in cmdline and state != "Z":
            pids.append(int(proc.name))
    return pids


def test_seaweedfs_command_stops_weed_on_sigterm(tmp_path):
    """A service manager (or `kill`) stops the wrapper with SIGTERM: weed must not be left
    running with the ports and the data directory (a restart on it failed)."""
    data = tmp_path / "weed-data"
    proc = subprocess.Popen([sys.executable, "-m", "petdet_tasks", "seaweedfs", "--dir",
                             str(data)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        first = proc.stdout.readline()  # printed once a put+get round trip succeeded
        assert "SeaweedFS S3 at http://127.0.0.1:" in first, proc.stderr.read()[-2000:]
        assert _weed_pids(data), "weed is running"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    deadline = time.monotonic() + 10
    while _weed_pids(data) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _weed_pids(data) == []
    assert "SeaweedFS stopped" in proc.stderr.read()
