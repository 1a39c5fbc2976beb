"""A benchmark report three ways: the JSON (settings, every request's timings, summaries), a table for
the terminal, and a plot of throughput against latency across the sweep."""

from __future__ import annotations

import json
from pathlib import Path


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.1f}"


def _num(v: float | None, fmt: str = "{:.1f}") -> str:
    return "-" if v is None else fmt.format(v)


def requests_text(num_requests) -> str:
    """`256 requests`, or `8/64/256 requests per point` for a sweep with a count per point."""
    return "/".join(map(str, num_requests)) + " requests" + (" per point" if len(num_requests) > 1 else "")


def _speedup(report: dict, label: str) -> str:
    rows = [b for b in report.get("baseline", []) if b["engine_point"] == label]
    return f"{rows[0]['engine_speedup']:.2f}x" if rows else "-"


def format_table(report: dict) -> str:
    """One row per sweep point (and the HF baseline rows), the numbers a reader compares first."""
    head = ["point", "requests", "req/s", "out tok/s", "total tok/s", "TTFT p50/p99 ms", "ITL p50/p99 ms", "e2e p50/p99 ms",
            "KV max", "seqs max", "failed", "engine vs HF"]
    rows = []
    for p in report["points"]:
        s = p["summary"]
        rows.append([p["label"], str(p["num_requests"]), _num(s["requests_per_s"], "{:.2f}"), _num(s["output_tok_per_s"]),
                     _num(s["total_tok_per_s"]), f"{_ms(s['ttft_p50_s'])}/{_ms(s['ttft_p99_s'])}",
                     f"{_ms(s['itl_p50_s'])}/{_ms(s['itl_p99_s'])}", f"{_ms(s['e2e_p50_s'])}/{_ms(s['e2e_p99_s'])}",
                     _num(s["kv_usage_max"], "{:.0%}"), _num(s["running_max"], "{:.0f}"), str(s["failed"]), _speedup(report, p["label"])])
    for b in report.get("baseline", []):
        rows.append([f"HF generate b={b['batch_size']} ({b['engine_point']})", str(b["completed"]), _num(b["requests_per_s"], "{:.2f}"),
                     _num(b["output_tok_per_s"]), _num(b["total_tok_per_s"]), "-", "-", "-", "-", "-", "-", "-"])
    widths = [max(len(str(r[i])) for r in [head] + rows) for i in range(len(head))]
    lines = ["  ".join(str(c).rjust(w) for c, w in zip(r, widths)) for r in [head] + rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    """Output tok/s against median inter-token latency and p99 TTFT, one labelled marker per sweep point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = report["points"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, name in ((axes[0], "itl_p50_s", "median inter-token latency (ms)"),
                          (axes[1], "ttft_p99_s", "p99 time to first token (ms)")):
        xs = [p["summary"][key] * 1000 if p["summary"][key] is not None else float("nan") for p in points]
        ys = [p["summary"]["output_tok_per_s"] for p in points]
        ax.plot(xs, ys, "o-", label="quantlab engine")
        for x, y, p in zip(xs, ys, points):
            ax.annotate(p["label"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        for b in report.get("baseline", []):
            ax.axhline(b["output_tok_per_s"], ls="--", lw=1, color="grey")
            ax.annotate(f"HF generate b={b['batch_size']}", (0, b["output_tok_per_s"]), xycoords=("axes fraction", "data"),
                        fontsize=8, color="grey", xytext=(4, 2), textcoords="offset points")
        ax.set_xlabel(name)
        ax.set_ylabel("output tokens/s")
        ax.grid(alpha=0.3)
    s = report["settings"]
    fig.suptitle(f"{s['mode']} {s.get('engine_dir') or s.get('url')}: {s['input_len']} in / {s['output_len']} out, "
                 f"{requests_text(s['num_requests'])} ({report['date']}, {report['device']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(report: dict, directory: Path) -> None:
    """results.json, table.txt and throughput_latency.png into `directory` (already a temp dir)."""
    (directory / "results.json").write_text(json.dumps(report, indent=1))
    (directory / "table.txt").write_text(format_table(report) + "\n")
    plot(report, directory / "throughput_latency.png")
