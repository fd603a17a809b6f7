"""Timing and reporting helpers shared by bench/ scripts and `hsr demo`."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from contextlib import contextmanager
from typing import Callable

import torch


def median_ms_cpu(fn: Callable[[], object], *, warmup: int = 2, iters: int = 7, cold: bool = False) -> float:
    """Median wall time of fn() in milliseconds. cold: the CPU caches are flushed before every
    iteration (flush_cpu_caches), as a decode step finds them in a model of many layers."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if cold:
            flush_cpu_caches()
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def largest_cpu_cache_bytes() -> int:
    """The largest CPU cache sysfs lists (the last level), 32 MiB when it lists none."""
    sizes = []
    root = "/sys/devices/system/cpu/cpu0/cache"
    for entry in os.listdir(root) if os.path.isdir(root) else []:
        try:
            with open(os.path.join(root, entry, "size")) as f:
                text = f.read().strip()
        except OSError:
            continue
        unit = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        digits = text[:-1] if text[-1:] in "KMG" else text
        if digits.isdigit():
            sizes.append(int(digits) * unit)
    return max(sizes, default=32 * 2**20)


_CPU_FLUSH: list = []


def flush_cpu_caches() -> None:
    """Reads a buffer four times the size of the last-level cache, so that the next timed
    call finds its data in memory, not in a cache warmed by the previous iteration. (Read,
    not written: evicted lines are clean, so the timed call pays no write-backs.)"""
    if not _CPU_FLUSH:
        # One float32 element (4 bytes) per byte of the cache: four times its size.
        _CPU_FLUSH.append(torch.ones(largest_cpu_cache_bytes(), dtype=torch.float32))
    _CPU_FLUSH[0].sum()


_L2_FLUSH: dict = {}


def _flush_l2(device: torch.device) -> None:
    buf = _L2_FLUSH.get(device)
    if buf is None:
        # Larger than any current L2 (H100: 50 MB, H200: 60 MB).
        buf = _L2_FLUSH[device] = torch.empty(256 * 1024 * 1024, dtype=torch.uint8, device=device)
    buf.zero_()


def median_ms_cuda(
    fn: Callable[[], object], *, warmup: int = 3, iters: int = 20, flush_l2: bool = True, use_graph: bool = True
) -> float:
    """Median GPU time of fn() in milliseconds, measured with CUDA events around a CUDA-graph
    replay of fn (so launch overhead is what a captured decode step would pay), with L2
    flushed before every iteration."""
    device = torch.device("cuda", torch.cuda.current_device())
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    run = fn
    if use_graph:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        run = graph.replay
    times = []
    for _ in range(iters):
        if flush_l2:
            _flush_l2(device)
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str) -> dict:
    """What a benchmark result was measured on."""
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "os_cpu_count": os.cpu_count(),
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        env.update(gpu=props.name, sm_count=props.multi_processor_count,
                   gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    return env


def write_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")


def command_line() -> str:
    """The command that ran this benchmark script, as the results JSON records it
    ("python bench/<script> <its arguments>")."""
    return " ".join(["python", f"bench/{os.path.basename(sys.argv[0])}"] + sys.argv[1:])


def write_results(path: str, benchmark: str, rows: list, *, device: str = "cpu", **extra) -> None:
    """A benchmark's results JSON: what it measured, on what (environment), the command that
    ran it, any extra fields, then its rows."""
    write_json(path, {"benchmark": benchmark, "environment": environment(device), "command": command_line(), **extra,
                      "rows": rows})


def print_row(row: dict, file=None) -> None:
    """A benchmark row as it is measured (floats to 4 places), flushed at once: the progress of
    a long run."""
    print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, file=file, flush=True)


def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Plain-text table. columns: (key, header, format spec)."""
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        cells.append([format(r[k], f) if r.get(k) is not None else "-" for k, _, f in columns])
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


@contextmanager
def figure(path: str, *, dpi: int = 120, **subplots):
    """A matplotlib figure (Agg backend, no display needed) for a results plot: yields (fig,
    axes) as plt.subplots(**subplots) returns them (figsize 6 x 4 unless given), then lays it
    out and writes it to path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    subplots.setdefault("figsize", (6, 4))
    fig, axes = plt.subplots(**subplots)
    yield fig, axes
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
