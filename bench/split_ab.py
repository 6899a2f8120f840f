"""A/B of the AVX-512 float loop's divider/FMA split (docs/design.md, docs/performance.md).

Builds bench/cpp's fastadam_bench once per split (-DFASTADAM_DIVIDER_VECTORS=d
-DFASTADAM_FMA_VECTORS=f; needs Google Benchmark, cmake and ninja), then runs the
builds interleaved, ``--rounds`` times, and prints the median time of each case per
split, the others as their speed against the first split.

    python bench/split_ab.py 21,30,20,11,31 --rounds 5 --build-root /tmp/splits
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FILTER = "^adam/avx512/threads:(1|2)/n:(10000|100000|1000000)/real_time$|^adam_multi/avx512/threads:2"


def build(split: str, root: Path) -> Path:
    binary = root / f"b_{split}" / "bench" / "cpp" / "fastadam_bench"
    if not binary.exists():
        flags = f"-DFASTADAM_DIVIDER_VECTORS={split[0]} -DFASTADAM_FMA_VECTORS={split[1]}"
        subprocess.run(["cmake", "-S", str(ROOT), "-B", str(root / f"b_{split}"), "-G", "Ninja",
                        "-DFASTADAM_BUILD_BENCHMARKS=ON", "-DCMAKE_BUILD_TYPE=Release", f"-DCMAKE_CXX_FLAGS={flags}"],
                       check=True, stdout=subprocess.DEVNULL)
        subprocess.run(["cmake", "--build", str(root / f"b_{split}")], check=True, stdout=subprocess.DEVNULL)
    return binary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("splits", help="comma list of two-digit splits, divider then FMA vectors: 21,30,20")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--build-root", type=Path, default=Path("build/splits"))
    args = ap.parse_args(argv)
    splits = args.splits.split(",")
    if any(len(s) != 2 or not s.isdigit() for s in splits):
        ap.error("each split is two digits: divider vectors, FMA vectors (e.g. 21)")
    binaries = {s: build(s, args.build_root) for s in splits}
    times: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
    for _ in range(args.rounds):
        for split, binary in binaries.items():
            out = subprocess.run([str(binary), f"--benchmark_filter={FILTER}", "--layout=numpy", "--benchmark_min_time=0.05",
                                  "--benchmark_repetitions=3", "--benchmark_format=json"],
                                 capture_output=True, text=True, check=True).stdout
            for bm in json.loads(out)["benchmarks"]:
                if bm.get("run_type") == "iteration":
                    times[(bm["run_name"], split)].append(bm["real_time"] / 1e3)
    print("| case | " + " | ".join(f"{s[0]}:{s[1]}" for s in splits) + " |")
    print("|---|" + "---|" * len(splits))
    for case in sorted({name for name, _ in times}):
        first = statistics.median(times[(case, splits[0])])
        cells = [f"{first:.1f} us"] + [f"{first / statistics.median(times[(case, s)]):.2f}x" for s in splits[1:]]
        print(f"| {case} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
