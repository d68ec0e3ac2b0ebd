"""Ratio tables and sweep plots from pytest-benchmark JSON files.

    python benchmarks/report.py RESULTS.json [RESULTS2.json ...] [--plots DIR | --no-plots]

Prints, per group (``perturbed_gru``, ``tr_attention``, ``scla_loss``,
``train_step``, ``*_sweep``), a Markdown table with one row per (device,
shape, mode): the fused op's median time and peak memory, and for every
other implementation its median time over the fused one's (``2.50x`` = 2.5
times slower than fused) and its peak memory. The header names each device
and the torch version it ran with.

Writes one PNG per sweep (group ``*_sweep``, device, mode): median time per
call against the swept value, log-log, one line per implementation, with the
interquartile range as error bars and the fitted growth exponent in the
legend (``reference (~M^2.00)``: time grows as M squared). Default directory: ``<stem>_plots/`` next
to the first JSON file; files are written atomically (temporary name, then
``os.replace``). No directory is created when the results hold no sweep.

Reads the files of older runs too (no ``group``/``sweep``/``peak_mem_bytes``
in ``extra_info``): the group then comes from pytest-benchmark's own
``group`` field.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

IMPL_ORDER = ["fused", "reference", "torch", "compiled"]


# ----------------------------------------------------------------- reading
def rows(paths: list[str]):
    """One dict per benchmark that carries our ``extra_info`` (an ``impl``)."""
    for path in paths:
        with open(path) as fh:
            data = json.load(fh)
        machine = data.get("machine_info", {})
        for b in data.get("benchmarks", []):
            info = b.get("extra_info", {})
            if "impl" not in info or not b.get("stats"):
                continue
            stats = b["stats"]
            sweep = info.get("sweep") or None
            yield {
                "file": path,
                "group": info.get("group") or b.get("group") or info.get("op", "?"),
                "op": info.get("op", b.get("group")),
                "device": info["device"],
                "device_name": info.get("device_name") or machine.get("cpu", {}).get("brand_raw", "?"),
                "torch": info.get("torch", "?"),
                "shape": info["shape"],
                "mode": info["mode"],
                "impl": info["impl"],
                "median_ms": stats["median"] * 1e3,
                "q1_ms": stats.get("q1", stats["median"]) * 1e3,
                "q3_ms": stats.get("q3", stats["median"]) * 1e3,
                "rounds": stats.get("rounds"),
                "peak_mem_bytes": info.get("peak_mem_bytes"),
                "peak_mem_method": info.get("peak_mem_method"),
                "sweep": sweep,
            }


class Results:
    """Benchmarks keyed by (group, run, shape, mode) -> impl -> row, where a
    run is one (device, device name, torch version)."""

    def __init__(self, paths: list[str]):
        self.paths = paths
        self.runs: dict[tuple, str] = {}  # (device, device_name, torch) -> label
        self.cells: dict[tuple, dict[str, dict]] = defaultdict(dict)
        self.overridden = 0
        rows_ = list(rows(paths))
        per_device = defaultdict(list)
        for r in rows_:
            run = (r["device"], r["device_name"], r["torch"])
            if run not in per_device[r["device"]]:
                per_device[r["device"]].append(run)
        for device, runs in per_device.items():
            for i, run in enumerate(runs):
                self.runs[run] = device if len(runs) == 1 else f"{device}#{i + 1}"
        self.order: dict[tuple, int] = {}
        for r in rows_:
            label = self.runs[(r["device"], r["device_name"], r["torch"])]
            key = (r["group"], label, r["shape"], r["mode"])
            self.order.setdefault(key, len(self.order))
            if r["impl"] in self.cells[key]:
                self.overridden += 1  # the same measurement in a later file wins
            self.cells[key][r["impl"]] = r

    def groups(self) -> list[str]:
        first = {}
        for key in self.order:
            first.setdefault(key[0], self.order[key])
        return sorted(first, key=lambda g: (g.endswith("_sweep"), first[g]))

    def keys(self, group: str) -> list[tuple]:
        shape_order, mode_order = {}, {}
        for key in sorted(self.order, key=self.order.get):
            shape_order.setdefault((key[0], key[1], key[2]), len(shape_order))
            mode_order.setdefault(key[3], len(mode_order))

        def sort_key(key):
            impls = self.cells[key]
            sweep = next((r["sweep"] for r in impls.values() if r["sweep"]), None)
            value = sweep["value"] if sweep and "value" in sweep else 0
            return (key[1], value, shape_order[key[:3]], mode_order[key[3]])

        return sorted((k for k in self.cells if k[0] == group), key=sort_key)


# ------------------------------------------------------------------ tables
def fmt_bytes(n) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def fmt_ms(ms: float) -> str:
    return f"{ms:.3g}" if ms < 10 else f"{ms:.1f}"


def impl_order(impls) -> list[str]:
    known = [i for i in IMPL_ORDER if i in impls]
    return known + sorted(set(impls) - set(known))


def header(res: Results) -> list[str]:
    lines = ["Results: " + ", ".join(res.paths)]
    methods = defaultdict(set)
    for cell in res.cells.values():
        for r in cell.values():
            method = r["peak_mem_method"]
            if method is None and r["peak_mem_bytes"] is not None and r["device"] == "cuda":
                method = "torch.cuda.max_memory_allocated"  # runs from before peak_mem_method
            if method:
                methods[r["device"]].add(method)
    for (device, name, torch_version), label in sorted(res.runs.items(), key=lambda kv: kv[1]):
        mem = ", ".join(sorted(methods.get(device, ()))) or "not recorded"
        lines.append(f"- {label}: {name}, torch {torch_version} (peak memory: {mem})")
    if res.overridden:
        lines.append(f"({res.overridden} measurements appear in more than one file: the last file's are shown)")
    return lines


def table(paths_or_results) -> str:
    res = paths_or_results if isinstance(paths_or_results, Results) else Results(list(paths_or_results))
    lines = header(res)
    for group in res.groups():
        keys = res.keys(group)
        impls = impl_order({i for k in keys for i in res.cells[k]})
        others = [i for i in impls if i != "fused"]
        lines += ["", f"### {group}", ""]
        cols = ["device", "shape", "mode", "fused ms", "fused peak"]
        for i in others:
            cols += [f"{i} / fused", f"{i} peak"]
        lines.append("| " + " | ".join(cols) + " |")
        lines.append("| " + " | ".join(["---"] * 3 + ["---:"] * (len(cols) - 3)) + " |")
        for key in keys:
            _, label, shape, mode = key
            cell = res.cells[key]
            fused = cell.get("fused")
            row = [label, shape, mode]
            row += [fmt_ms(fused["median_ms"]), fmt_bytes(fused["peak_mem_bytes"])] if fused else ["-", "-"]
            for i in others:
                r = cell.get(i)
                if r is None:
                    row += ["-", "-"]
                elif fused:
                    row += [f"{r['median_ms'] / fused['median_ms']:.2f}x", fmt_bytes(r["peak_mem_bytes"])]
                else:
                    row += [f"{fmt_ms(r['median_ms'])} ms", fmt_bytes(r["peak_mem_bytes"])]
            lines.append("| " + " | ".join(row) + " |")
    if not res.cells:
        lines.append("(no benchmarks with extra_info['impl'] in these files)")
    return "\n".join(lines)


# ------------------------------------------------------------------- plots
def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "x"


def _atomic_savefig(fig, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes it 0600
        with os.fdopen(fd, "wb") as fh:
            fig.savefig(fh, format="png", dpi=120)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def sweeps(res: Results) -> dict[tuple, dict[str, list[dict]]]:
    """(group, run label, mode, param) -> impl -> rows sorted by the swept value."""
    out: dict[tuple, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for (group, label, _shape, mode), cell in res.cells.items():
        for impl, r in cell.items():
            if r["sweep"] and "param" in r["sweep"] and "value" in r["sweep"]:
                out[(group, label, mode, r["sweep"]["param"])][impl].append(r)
    for series in out.values():
        for impl_rows in series.values():
            impl_rows.sort(key=lambda r: r["sweep"]["value"])
    return out


def loglog_slope(x: list[float], y: list[float]) -> float | None:
    """Least-squares slope of log y against log x (the growth exponent)."""
    pts = [(math.log(a), math.log(b)) for a, b in zip(x, y) if a > 0 and b > 0]
    if len(pts) < 2:
        return None
    mx = sum(a for a, _ in pts) / len(pts)
    my = sum(b for _, b in pts) / len(pts)
    var = sum((a - mx) ** 2 for a, _ in pts)
    return None if var == 0 else sum((a - mx) * (b - my) for a, b in pts) / var


def plot_sweeps(res: Results, out_dir: Path) -> list[Path]:
    found = sweeps(res)
    if not found:
        return []
    try:
        import matplotlib
    except ImportError:
        print(f"\n(matplotlib is not installed: no plots of the {len(found)} sweeps)")
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullLocator

    out_dir.mkdir(parents=True, exist_ok=True)
    names = {label: (name, torch_version) for (_, name, torch_version), label in res.runs.items()}
    written = []
    for (group, label, mode, param), series in sorted(found.items()):
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        for impl in impl_order(series):
            pts = series[impl]
            x = [r["sweep"]["value"] for r in pts]
            y = [r["median_ms"] for r in pts]
            err = [[max(0.0, r["median_ms"] - r["q1_ms"]) for r in pts],
                   [max(0.0, r["q3_ms"] - r["median_ms"]) for r in pts]]
            slope = loglog_slope(x, y)
            legend = impl if slope is None else f"{impl} (~{param}^{slope:.2f})"
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=legend)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        values = sorted({r["sweep"]["value"] for pts in series.values() for r in pts})
        ax.set_xticks(values)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel(param)
        ax.set_ylabel("time per call (ms): median, IQR bars")
        name, torch_version = names.get(label, ("?", "?"))
        ax.set_title(f"{group} ({mode}) on {label}\n{name}, torch {torch_version}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out_dir / f"{_slug(group)}_{_slug(label)}_{_slug(mode)}.png"
        _atomic_savefig(fig, path)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", help="pytest-benchmark JSON files (--benchmark-json)")
    parser.add_argument("--plots", metavar="DIR", help="where to write the sweep PNGs "
                        "(default: <stem of the first file>_plots/ next to it)")
    parser.add_argument("--no-plots", action="store_true", help="print the tables only")
    args = parser.parse_args(argv)
    for path in args.results:
        if not os.path.isfile(path):
            parser.error(f"{path}: no such file")
    res = Results(args.results)
    try:
        print(table(res), flush=True)
    except BrokenPipeError:  # e.g. piped into head
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    if not args.no_plots:
        first = Path(args.results[0])
        out_dir = Path(args.plots) if args.plots else first.with_name(f"{first.stem}_plots")
        written = plot_sweeps(res, out_dir)
        if written:
            print("\nSweep plots:")
            for p in written:
                print(f"- {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
