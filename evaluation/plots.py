"""The report's figures, drawn with matplotlib's Agg backend (no display needed), one function each."""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
    """Which (size, loss) points no other point dominates (smaller or equal in both, smaller in one)."""
    return [
        not any(s2 <= s and l2 <= l and (s2, l2) != (s, l) for s2, l2 in points)
        for s, l in points
    ]


def plot_layer_errors(layers: list[dict], path: Path) -> bool:
    """Relative MSE of each layer's quantized output along depth (log scale), from quantlab.json's
    ``layers`` entries (``name``, ``rel_mse``). Returns False, drawing nothing, when there are none."""
    rows = [(str(r["name"]), float(r["rel_mse"])) for r in layers if "name" in r and "rel_mse" in r]
    if not rows:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.25 * len(rows)), 3.5))
    ax.plot(range(len(rows)), [r for _, r in rows], marker="o", markersize=3)
    if all(r > 0 for _, r in rows):
        ax.set_yscale("log")
    step = max(1, len(rows) // 16)
    ax.set_xticks(range(0, len(rows), step))
    ax.set_xticklabels([n.rsplit(".", 1)[-1] if n.rsplit(".", 1)[-1].isdigit() else n for n, _ in rows][::step],
                       rotation=90 if step == 1 and len(rows) > 16 else 0, fontsize=7)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("relative MSE of layer output")
    ax.set_title("Per-layer quantization error (calibration data)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_pareto(names: list[str], sizes_bytes: list[int], losses: list[float], loss_label: str,
                baseline: float | None, path: Path) -> None:
    """Loss (perplexity or KL) against checkpoint size; Pareto-optimal checkpoints are filled and joined."""
    plt = _pyplot()
    front = pareto_front(list(zip(sizes_bytes, losses)))
    mib = [s / 2**20 for s in sizes_bytes]
    fig, ax = plt.subplots(figsize=(6.5, 4.0))
    for x, y, name, on in zip(mib, losses, names, front):
        ax.scatter([x], [y], s=40, facecolors="C0" if on else "none", edgecolors="C0", zorder=3)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    on_front = sorted((x, y) for x, y, on in zip(mib, losses, front) if on)
    ax.plot([x for x, _ in on_front], [y for _, y in on_front], color="C0", alpha=0.6, label="Pareto front")
    if baseline is not None:
        ax.axhline(baseline, color="gray", linestyle="--", linewidth=1, label="original model")
    ax.set_xlabel("checkpoint size (MiB of safetensors)")
    ax.set_ylabel(loss_label)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
