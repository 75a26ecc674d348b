"""Shared by the benchmark scripts: peak-memory probes, timing, CSV and table output."""

from __future__ import annotations

import csv
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


# glibc keeps freed buffers resident in its heap and reuses them without moving the RSS
# high-water mark, which hides the memory a run really needs. With these variables every
# allocation over 64 KiB is an mmap returned to the kernel on free, so the high-water mark is
# exact; the page faults slow everything down, so memory is measured in a separate process.
EXACT_RSS_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> None:
    """Reset the kernel's RSS high-water mark to the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmHWM not found in /proc/self/status")


def median_time(fn: Callable[[], object], reps: int, sync: Callable[[], None]) -> float:
    """Median wall time of `fn` in seconds over `reps` runs (after the caller's warm-up)."""
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def machine() -> str:
    return f"{platform.machine()} {os.cpu_count()} cpus"


def write_csv(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def print_table(rows: list[dict], columns: list[str]) -> None:
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)))


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(bundle: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    """`recsys-ccl serve` on a free loopback port, returned once it logs that it serves; its
    log is drained from then on so that a full pipe never blocks it. (process, target)."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "recsys_ccl.cli", "serve", "--bundle",
                               str(bundle), "--port", str(port), *extra],
                              stderr=subprocess.PIPE, text=True)
    while True:
        line = server.stderr.readline()
        if not line:
            raise RuntimeError("the server exited before serving")
        if '"event": "serving"' in line:
            break
    threading.Thread(target=lambda: [None for _ in server.stderr], daemon=True).start()
    return server, f"127.0.0.1:{port}"
