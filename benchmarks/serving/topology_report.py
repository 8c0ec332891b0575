"""Topology x workload results: the table, the best-split-vs-colocated ratios and a bar-chart PNG.

Everything here reads plain cell dicts (as written to the sweep JSON): topology, workload, status and,
for cells that ran, the `Summary` fields (request_throughput, output_throughput, ttft_ms, tpot_ms, ...).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from benchmarks.serving.report import _fmt, _pyplot

Cell = Mapping[str, object]
COLUMNS = (("req/s", "request_throughput"), ("out tok/s", "output_throughput"),
           ("TTFT p50", "ttft_ms.p50"), ("TTFT p90", "ttft_ms.p90"),
           ("TPOT p50", "tpot_ms.p50"), ("TPOT p90", "tpot_ms.p90"), ("failed", "failed"))
PANELS = (("request_throughput", "requests/s", 1.0, "linear"), ("output_throughput", "output tokens/s", 1.0, "log"),
          ("ttft_ms.p90", "TTFT p90 (s)", 1e-3, "linear"), ("tpot_ms.p90", "TPOT p90 (ms)", 1.0, "linear"))


def value(cell: Cell, dotted: str) -> float | None:
    v: object = cell
    for part in dotted.split("."):
        if not isinstance(v, Mapping) or v.get(part) is None:
            return None
        v = v[part]
    return v if isinstance(v, (int, float)) else None


def _ordered(cells: Sequence[Cell], key: str) -> list[str]:
    return list(dict.fromkeys(str(c[key]) for c in cells))


def table(cells: Sequence[Cell]) -> str:
    """One row per topology x workload; latencies in ms; cells that did not run show their status."""
    t_w = max(8, *(len(str(c["topology"])) for c in cells)) + 2
    w_w = max(8, *(len(str(c["workload"])) for c in cells)) + 2
    head = "topology".ljust(t_w) + "workload".ljust(w_w) + "".join(name.rjust(11) for name, _ in COLUMNS)
    lines = [head, "-" * len(head)]
    for c in cells:
        row = str(c["topology"]).ljust(t_w) + str(c["workload"]).ljust(w_w)
        if c.get("status") in ("ok", "errors"):
            row += "".join(_cell_text(value(c, key)).rjust(11) for _, key in COLUMNS)
        else:
            why = " ".join("; ".join(map(str, c.get("errors") or [])).split())
            row += f"  {c.get('status')}: {why}"[:200]
        lines.append(row)
    lines.append("latencies in ms; TTFT = time to first token, TPOT = time per output token")
    return "\n".join(lines)


def _cell_text(v: float | None) -> str:
    if not isinstance(v, float) or math.isnan(v):
        return _fmt(v)
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def best_vs_colocated(cells: Sequence[Cell], colocated: str = "EPD") -> dict[str, dict]:
    """Per workload: the fastest non-colocated topology against the colocated one, by request throughput.

    Only cells where every request succeeded compete. `ratio` > 1 means splitting the roles won.
    """
    out: dict[str, dict] = {}
    for workload in _ordered(cells, "workload"):
        ok = [c for c in cells if c["workload"] == workload and c.get("status") == "ok"]
        base = next((c for c in ok if c["topology"] == colocated), None)
        others = [c for c in ok if c["topology"] != colocated]
        if base is None or not others:
            out[workload] = {"colocated": colocated, "best": None, "ratio": None,
                             "note": "colocated or every other topology did not complete"}
            continue
        best = max(others, key=lambda c: value(c, "request_throughput") or 0.0)
        b, r = value(best, "request_throughput") or 0.0, value(base, "request_throughput") or 0.0
        out[workload] = {"best": best["topology"], "best_req_s": b, "colocated": colocated, "colocated_req_s": r,
                         "ratio": b / r if r else None,
                         "best_out_tok_s": value(best, "output_throughput"),
                         "colocated_out_tok_s": value(base, "output_throughput")}
    return out


def ratio_lines(ratios: Mapping[str, Mapping]) -> str:
    lines = []
    for workload, d in ratios.items():
        if d.get("ratio") is None:
            lines.append(f"{workload}: no ratio ({d.get('note', 'missing')})")
            continue
        lines.append(f"{workload}: best split {d['best']} {d['best_req_s']:.2f} req/s vs colocated "
                     f"{d['colocated']} {d['colocated_req_s']:.2f} req/s -> {d['ratio']:.2f}x")
    return "\n".join(lines)


def plot(cells: Sequence[Cell], path: Path, title: str = "") -> Path:
    """Grouped bars: one panel per metric, workloads on the x axis, one bar per topology."""
    plt = _pyplot()
    topologies, workloads = _ordered(cells, "topology"), _ordered(cells, "workload")
    by_key = {(c["topology"], c["workload"]): c for c in cells if c.get("status") in ("ok", "errors")}
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 4))
    width = 0.8 / max(1, len(topologies))
    for ax, (key, label, scale, yscale) in zip(axes, PANELS):
        for i, topo in enumerate(topologies):
            ys = [(value(by_key[(topo, w)], key) or 0.0) * scale if (topo, w) in by_key else 0.0 for w in workloads]
            ax.bar([x + (i - (len(topologies) - 1) / 2) * width for x in range(len(workloads))], ys, width,
                   label=topo)
        has_data = any(value(c, key) for c in by_key.values())
        ax.set(ylabel=label, yscale=yscale if has_data else "linear")
        ax.set_xticks(range(len(workloads)), workloads, fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=7, title="topology", title_fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
