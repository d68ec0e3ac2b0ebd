"""Ratios from a pytest-benchmark JSON file: for every (op, device, shape,
mode), each implementation's median time over the fused op's.

    python benchmarks/report.py RESULTS.json [RESULTS2.json ...]
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict


def rows(paths: list[str]):
    for path in paths:
        with open(path) as fh:
            data = json.load(fh)
        machine = data.get("machine_info", {})
        for b in data["benchmarks"]:
            info = b.get("extra_info", {})
            if "impl" not in info:
                continue
            yield {
                "op": info.get("op", b.get("group")),
                "device": info["device"],
                "device_name": info.get("device_name") or machine.get("cpu", {}).get("brand_raw", "?"),
                "torch": info.get("torch", "?"),
                "shape": info["shape"],
                "mode": info["mode"],
                "impl": info["impl"],
                "median_ms": b["stats"]["median"] * 1e3,
                "peak_mem_bytes": info.get("peak_mem_bytes"),
            }


def table(paths: list[str]) -> str:
    groups: dict[tuple, dict[str, dict]] = defaultdict(dict)
    names = {}
    for r in rows(paths):
        key = (r["op"], r["device"], r["shape"], r["mode"])
        groups[key][r["impl"]] = r
        names[r["device"]] = (r["device_name"], r["torch"])
    lines = []
    for device, (name, torch_version) in sorted(names.items()):
        lines.append(f"{device}: {name}, torch {torch_version}")
    lines.append("")
    lines.append("| op | device | shape | mode | fused ms | impl: time / fused |")
    lines.append("| --- | --- | --- | --- | ---: | --- |")
    for (op, device, shape, mode), impls in sorted(groups.items()):
        fused = impls.get("fused")
        if fused is None:
            continue
        others = ", ".join(
            f"{impl} {r['median_ms'] / fused['median_ms']:.2f}x"
            for impl, r in sorted(impls.items())
            if impl != "fused"
        )
        lines.append(f"| {op} | {device} | {shape} | {mode} | {fused['median_ms']:.3f} | {others} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python benchmarks/report.py RESULTS.json [...]")
    print(table(sys.argv[1:]))
