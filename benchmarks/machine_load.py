"""What else the machine is doing while a benchmark times something (a shared 2-core machine):
the other processes' load is what makes a parallel pipeline look sequential, so the
benchmarks report it beside every figure and can wait for a quiet machine first."""

from __future__ import annotations

import os
import resource
import time


class Meter:
    """Wall time, this process's CPU time, and the CPU time of everything else on the machine
    (from /proc/stat), in cores (``others`` is None where /proc/stat cannot be read)."""

    def __enter__(self) -> Meter:
        self._t, self._own, self._busy = time.perf_counter(), _own_cpu(), _machine_busy()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self._t
        self.own = _own_cpu() - self._own
        busy = _machine_busy()
        self.others = (max(0.0, (busy - self._busy - self.own) / self.wall)
                       if busy is not None and self._busy is not None else None)


def _own_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _machine_busy() -> float | None:
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return None
    return sum(fields[i] for i in (0, 1, 2, 5, 6, 7) if i < len(fields)) / os.sysconf(
        "SC_CLK_TCK")


def wait_quiet(max_wait: float, threshold: float = 0.2) -> float | None:
    """Wait (up to ``max_wait`` s) until other processes use under ``threshold`` cores over a
    2 s window; returns the last load seen."""
    deadline = time.monotonic() + max_wait
    while True:
        with Meter() as m:
            time.sleep(2.0)
        if m.others is None or m.others < threshold or time.monotonic() >= deadline:
            return m.others
        time.sleep(3.0)


def fmt_load(cores: float | None) -> str:
    return "n/a" if cores is None else f"{cores:.2f} cores"
