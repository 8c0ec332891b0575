"""Terminal tables, JSON result files, PNG plots and side-by-side comparison of result files."""
from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

from benchmarks.serving.metrics import RequestResult, Slo, Summary

LAT_KEYS = ("mean", "p50", "p90", "p99")
COMPARE_ROWS = (("request_throughput", "req/s"), ("output_throughput", "out tok/s"),
                ("ttft_ms.p50", "TTFT p50 ms"), ("ttft_ms.p90", "TTFT p90 ms"), ("tpot_ms.p90", "TPOT p90 ms"),
                ("itl_ms.p90", "ITL p90 ms"), ("e2e_ms.p90", "E2E p90 ms"), ("slo_attainment", "SLO attainment"),
                ("goodput", "goodput req/s"), ("client_cpu_s", "client CPU s"))


def _fmt(v: object) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def summary_table(title: str, s: Summary, client_cpu_s: float) -> str:
    rows = [("Successful requests", s.completed), ("Failed requests", s.failed),
            ("Duration (s)", s.duration_s), ("Request throughput (req/s)", s.request_throughput),
            ("Output token throughput (tok/s)", s.output_throughput),
            ("Total token throughput (tok/s)", s.total_token_throughput),
            ("Prompt / output tokens", f"{s.prompt_tokens} / {s.output_tokens}"),
            ("Client CPU time (s)", client_cpu_s)]
    for name, d in (("TTFT", s.ttft_ms), ("TPOT", s.tpot_ms), ("ITL", s.itl_ms), ("E2E", s.e2e_ms)):
        rows += [(f"{name} {k} (ms)", d[k]) for k in LAT_KEYS]
    if s.slo is not None:
        rows += [("SLO", f"TTFT <= {s.slo.ttft_ms:g} ms, p90 TPOT <= {s.slo.tpot_ms:g} ms"),
                 ("SLO attainment", s.slo_attainment)]
    width = max(len(r[0]) for r in rows) + 2
    bar = "=" * (width + 20)
    return "\n".join([bar, title.center(width + 20), bar, *(f"{k:<{width}}{_fmt(v):>20}" for k, v in rows), bar])


def clean(obj: object) -> object:
    """NaN/inf to None so that the files are strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    return obj


def write_json(path: Path, payload: Mapping) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(clean(payload), indent=1, allow_nan=False))
    return path


def run_payload(label: str, config: Mapping, rate: float, s: Summary, results: Sequence[RequestResult],
                client_cpu_s: float) -> dict:
    return {"kind": "run", "label": label, "request_rate": rate, "config": dict(config), **asdict(s),
            "client_cpu_s": client_cpu_s, "requests": [asdict(r) for r in results]}


def sweep_payload(label: str, config: Mapping, slo: Slo, points: Sequence[dict], goodput: float) -> dict:
    return {"kind": "sweep", "label": label, "config": dict(config), "slo": asdict(slo),
            "points": list(points), "goodput": goodput}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_cdfs(runs: Mapping[str, Sequence[RequestResult]], path: Path) -> Path:
    """Empirical CDFs of TTFT, TPOT and E2E, one line per run."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    getters = (("TTFT (ms)", lambda r: r.ttft), ("TPOT (ms)", lambda r: r.tpot), ("E2E (ms)", lambda r: r.e2e))
    for ax, (name, get) in zip(axes, getters):
        for label, results in runs.items():
            xs = sorted(1000 * v for r in results if r.success and (v := get(r)) is not None)
            if xs:
                ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post", label=label)
        ax.set(xlabel=name, ylabel="fraction of requests", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_attainment(sweeps: Mapping[str, Sequence[tuple[float, float]]], slo: Slo | None, path: Path) -> Path:
    """SLO attainment against request rate, one line per system/topology, with the 90% line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, pts in sweeps.items():
        xs, ys = zip(*sorted(pts))
        ax.plot(xs, [100 * y for y in ys], marker="o", label=label)
    ax.axhline(90, color="grey", linestyle="--", linewidth=1)
    title = "" if slo is None else f"SLO: TTFT <= {slo.ttft_ms:g} ms, p90 TPOT <= {slo.tpot_ms:g} ms"
    ax.set(xlabel="request rate (req/s)", ylabel="SLO attainment (%)", ylim=(0, 102), title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _lookup(d: Mapping, dotted: str) -> object:
    for part in dotted.split("."):
        if not isinstance(d, Mapping) or part not in d:
            return None
        d = d[part]
    return d


def compare_table(files: Sequence[Path]) -> str:
    """Each metric side by side, with the ratio of every file to the first."""
    docs = [json.loads(Path(f).read_text()) for f in files]
    names = [f"{d.get('label', '?')}@{d.get('request_rate')}" if d.get("kind") == "run"
             else f"{d.get('label', '?')} (sweep)" for d in docs]
    col = max(14, *(len(n) + 2 for n in names))
    lines = ["metric".ljust(16) + "".join(n.rjust(col) for n in names) + "   ratios vs first"]
    for key, title in COMPARE_ROWS:
        vals = [_lookup(d, key) for d in docs]
        if all(v is None for v in vals):
            continue
        base = vals[0]
        ratios = [f"{v / base:.2f}x" if isinstance(v, (int, float)) and isinstance(base, (int, float)) and base
                  else "-" for v in vals[1:]]
        lines.append(title.ljust(16) + "".join(_fmt(v).rjust(col) for v in vals) + "   " + " ".join(ratios))
    return "\n".join(lines)


def sweep_points(files: Sequence[Path]) -> dict[str, list[tuple[float, float]]]:
    out: dict[str, list[tuple[float, float]]] = {}
    for f in files:
        d = json.loads(Path(f).read_text())
        if d.get("kind") == "sweep":
            out[d["label"]] = [(p["rate"], p["attainment"]) for p in d["points"]]
    return out
