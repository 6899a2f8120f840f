"""The benchmark's reports: the table, the machine description, the STREAM-like bound read
from a Google Benchmark JSON, the JSON file and the plot."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import re
import statistics
from collections.abc import Sequence
from typing import Any

import numpy as np
from contenders import LABELS, _torch, _usable_cpus

import fastadam

def _fmt_time(s: float) -> str:
    if s < 1e-6:
        return f"{s * 1e9:.0f} ns"
    if s < 1e-3:
        return f"{s * 1e6:.3g} µs" if s < 1e-4 else f"{s * 1e6:.0f} µs"
    if s < 1:
        return f"{s * 1e3:.3g} ms" if s < 1e-1 else f"{s * 1e3:.0f} ms"
    return f"{s:.3g} s"


def format_table(results: Sequence[dict[str, Any]], bound_gbs: float | None = None) -> str:
    """A fixed-width table: median time per step per contender, peer/fastadam ratios, fastadam GB/s."""
    if not results:
        return "(no results)"
    names = list(results[0]["contenders"])
    peers = [n for n in names if n != "fastadam"] if "fastadam" in names else []
    header = ["case", "tensors"] + [LABELS[n] for n in names] + [f"x {LABELS[p]}" for p in peers]
    interleaved = any("bound" in r for r in results)
    if "fastadam" in names:
        header.append("fastadam GB/s")
        if bound_gbs or interleaved:
            header.append("% of bound")
        if interleaved:
            header.append("bound GB/s")
    rows = [header]
    for r in results:
        row = [r["case"], str(r["tensors"])]
        row += [_fmt_time(r["contenders"][n]["median_s"]) for n in names]
        row += [f"{r['ratios'][p]:.2f}" for p in peers]
        if "fastadam" in names:
            row.append(f"{r['fastadam_gbs']:.1f}")
            if "bound" in r and "fastadam_fraction" in r["bound"]:
                row.append(f"{100 * r['bound']['fastadam_fraction']:.0f}%")
            elif bound_gbs:
                row.append(f"{100 * r['fastadam_gbs'] / bound_gbs:.0f}%")
            elif interleaved:
                row.append("")
            if interleaved:
                row.append(f"{r['bound']['median_gbs']:.1f}" if "bound" in r else "")
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = []
    for i, row in enumerate(rows):
        cells = [c.ljust(widths[j]) if j == 0 else c.rjust(widths[j]) for j, c in enumerate(row)]
        lines.append("  ".join(cells).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    notes = ["time = median per step; x peer = peer time / fastadam time (> 1: fastadam faster); GB/s at 28 B/element"]
    if interleaved:
        notes.append("bound GB/s: STREAM-like in-place read-4/write-3 loop run in the same rounds; "
                     "% of bound = median over rounds of fastadam GB/s / bound GB/s")
    if bound_gbs:
        notes.append(f"{'other cases: ' if interleaved else ''}bound = {bound_gbs:.1f} GB/s (STREAM-like in-place read-4/write-3 loop)")
    if peers and len(results[0].get("paired_ratios", {})) == len(peers):
        paired = ", ".join(f"{r['case']}: " + "/".join(f"{r['paired_ratios'][p]:.2f}" for p in peers) for r in results)
        notes.append(f"paired ratios (median over rounds of peer/fastadam, {'/'.join(LABELS[p] for p in peers)}): {paired}")
    return "\n".join(lines + notes)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    wanted = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512dq", "avx512vl")
                    have = set(line.split(":", 1)[1].split())
                    return [w for w in wanted if w in have]
    except OSError:
        pass
    return []


def _mem_total_gib() -> float | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


_PEER_LIBRARIES = (("deepspeed", "deepspeed"), ("optax", "jax"), ("optax", "optax"))  # (contender, library)


def _installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info(threads: int) -> dict[str, Any]:
    """What ran: CPU, cores, memory, library versions, fastadam's ISA, threads, date."""
    torch = _torch()
    return {
        "cpu_model": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": _usable_cpus(),
        "memory_gib": _mem_total_gib(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__ if torch is not None else None,
        **{lib: _installed_version(lib) for _, lib in _PEER_LIBRARIES},
        "fastadam": fastadam.__version__,
        "fastadam_isa": fastadam.get_isa(),
        "fastadam_available_isas": list(fastadam.available_isas()),
        "fastadam_min_elements_per_thread": getattr(getattr(fastadam, "_core", None), "min_elements_per_thread", None),
        "threads": threads,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


_STREAM_NAME = re.compile(r"^stream/(?P<isa>\w+)/threads:(?P<threads>\d+)/n:(?P<n>\d+)")


def read_stream_bound(path: str, threads: int) -> dict[str, Any]:
    """The STREAM-like bound from a Google Benchmark JSON of bench/cpp's fastadam_bench.

    Takes the ``stream/<isa>/threads:<threads>/n:<n>`` benchmarks of the largest n, the
    median over repetitions (an aggregate when present), and the best path. Returns
    ``{"gbs", "benchmark", "elements", "source"}``.
    """
    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    per_name: dict[str, list[float]] = {}
    medians: dict[str, float] = {}
    info: dict[str, tuple[int, str]] = {}
    for b in doc.get("benchmarks", []):
        name = b.get("run_name") or b.get("name", "")
        m = _STREAM_NAME.match(name)
        if not m or int(m["threads"]) != threads or "bytes_per_second" not in b:
            continue
        info[name] = (int(m["n"]), m["isa"])
        if b.get("run_type") == "aggregate":
            if b.get("aggregate_name") == "median":
                medians[name] = float(b["bytes_per_second"])
        else:
            per_name.setdefault(name, []).append(float(b["bytes_per_second"]))
    for name, values in per_name.items():
        medians.setdefault(name, statistics.median(values))
    if not medians:
        raise ValueError(f"{path}: no stream/<isa>/threads:{threads}/n:<n> benchmark with bytes_per_second")
    largest = max(info[n][0] for n in medians)
    best = max((n for n in medians if info[n][0] == largest), key=lambda n: medians[n])
    return {"gbs": medians[best] / 1e9, "benchmark": best, "elements": largest, "source": os.path.abspath(path)}


def write_json(path: str, results: Sequence[dict[str, Any]], machine: dict[str, Any], bound: dict[str, Any] | None = None,
               config: dict[str, Any] | None = None) -> None:
    doc = {"machine": machine, "config": config or {}, "bound": bound, "results": list(results)}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")


def plot(results: Sequence[dict[str, Any]], path: str, bound_gbs: float | None = None, title: str | None = None) -> None:
    """GB/s (at 28 B/element) vs elements per step for each contender, log-log, with the bound as a line.

    Single tensors are joined by lines; multi-tensor cases are separate markers.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    names = list(results[0]["contenders"]) if results else []
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    markers = ["o", "s", "^", "v", "D", "P"]
    multi_markers = ["*", "X", "h", "p"]
    multi_cases = [r for r in results if r["kind"] == "multi"]
    for i, name in enumerate(names):
        single = sorted((r for r in results if r["kind"] == "single"), key=lambda r: r["elements"])
        color = f"C{i}"
        if single:
            ax.plot([r["elements"] for r in single], [r["contenders"][name]["gbs"] for r in single], marker=markers[i % 6],
                    color=color, label=LABELS[name])
        for j, r in enumerate(multi_cases):
            ax.scatter([r["elements"]], [r["contenders"][name]["gbs"]], marker=multi_markers[j % 4], s=90, color=color,
                       edgecolors="black", linewidths=0.5, zorder=3, label=None if single else LABELS[name])
    for j, r in enumerate(multi_cases):
        ax.scatter([], [], marker=multi_markers[j % 4], s=90, color="white", edgecolors="black",
                   label=f"{r['case']} ({r['tensors']} tensors)")
    probed = [r for r in results if "bound" in r]
    if probed:
        ax.scatter([r["elements"] for r in probed], [r["bound"]["median_gbs"] for r in probed], marker="_", s=400, color="black",
                   linewidths=2, zorder=4, label="STREAM-like loop, same rounds")
        if not bound_gbs:
            bound_gbs = statistics.median(r["bound"]["median_gbs"] for r in probed)
    if bound_gbs:
        ax.axhline(bound_gbs, color="black", linestyle="--", linewidth=1, label=f"STREAM-like bound {bound_gbs:.1f} GB/s")
    ax.set_xscale("log")
    ax.set_yscale("log")
    plain = matplotlib.ticker.FuncFormatter(lambda y, _pos: f"{y:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("elements per step (fp32)")
    ax.set_ylabel("effective GB/s (28 B/element)")
    threads = results[0]["threads"] if results else None
    ax.set_title(title or f"Adam step, fp32, {threads} thread(s): effective bandwidth")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
