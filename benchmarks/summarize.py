"""Print a pytest-benchmark JSON of benchmarks/test_kernels.py as a table.

    python benchmarks/summarize.py benchmarks/results/kernels-cpu.json

Per case: median time, achieved GB/s (or TFLOP/s for top-k), the speed-up over the reference
backend of the same group, and on CUDA the fraction of the measured copy bandwidth.
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict


def main(path: str) -> None:
    data = json.load(open(path))
    machine = data.get("machine_info", {})
    print(f"{path}: {machine.get('node', '?')} {machine.get('cpu', {}).get('brand_raw', '')} "
          f"python {machine.get('python_version', '?')}  {data.get('datetime', '')}")
    groups = defaultdict(list)
    for bench in data["benchmarks"]:
        groups[bench["group"]].append(bench)
    ceiling = {b["name"].split("[")[-1].rstrip("]"): b["extra_info"]["gb_per_s"]
               for b in groups.get("copy ceiling", [])}
    print(f"{'case':<64}{'median ms':>11}{'GB/s':>9}{'TFLOP/s':>9}{'vs ref':>8}{'of copy':>9}")
    for group, benches in groups.items():
        reference = next((b["stats"]["median"] for b in benches if "reference" in b["name"]), None)
        for bench in benches:
            info, median = bench["extra_info"], bench["stats"]["median"]
            dtype = next((d for d in ceiling if d in bench["name"]), None)
            measured = dtype and "gb_per_s" in info and group != "copy ceiling"
            fraction = f"{info['gb_per_s'] / ceiling[dtype]:.0%}" if measured else ""
            print(f"{bench['name']:<64}{median * 1e3:>11.3f}"
                  f"{info.get('gb_per_s', float('nan')):>9.1f}{info.get('tflops', float('nan')):>9.2f}"
                  f"{(reference / median if reference else float('nan')):>7.1f}x{fraction:>9}")


if __name__ == "__main__":
    main(sys.argv[1])
