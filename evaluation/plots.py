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


def plot_nll_diff(diff: list[list[float | None]], path: Path) -> bool:
    """Per-token NLL of the quantized model minus the original's along the evaluation text (documents
    one after another, boundaries dotted when there are few), with a running mean over 64 scored tokens:
    where the quantized model got worse (above zero) or better. False, drawing nothing, without tokens."""
    import numpy as np

    values = np.array([np.nan if x is None else x for doc in diff for x in doc], dtype=float)
    scored = ~np.isnan(values)
    if not scored.any():
        return False
    x = np.arange(len(values))[scored]
    y = values[scored]
    k = min(64, len(y))
    running = np.convolve(y, np.ones(k) / k, mode="valid")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9.0, 3.5))
    ax.plot(x, y, linewidth=0.4, color="C0", alpha=0.45, label="per token")
    ax.plot(x[k - 1:], running, color="C3", linewidth=1.4, label=f"running mean ({k} tokens)")
    ax.axhline(0, color="gray", linewidth=0.8)
    if 1 < len(diff) <= 20:
        edge = 0
        for doc in diff[:-1]:
            edge += len(doc)
            ax.axvline(edge, color="gray", linestyle=":", linewidth=0.8)
    ax.set_xlabel("token position in the evaluation text" + (" (documents in order)" if len(diff) > 1 else ""))
    ax.set_ylabel("NLL quantized − original (nats)")
    ax.set_title("Where the quantized model loses (above 0) or gains (below 0) likelihood")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_kl_windows(window_kl: list[float], mean_kl: float, path: Path) -> bool:
    """Histogram of the mean KL(P_orig || P_quant) of each evaluation window, with the mean over all
    scored tokens (the gated value) marked: even damage gives a narrow peak, damage concentrated in a
    few passages a long tail. False when there are no windows."""
    if not window_kl:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    ax.hist(window_kl, bins=max(5, min(40, len(window_kl))), color="C0", alpha=0.8)
    ax.axvline(mean_kl, color="C3", linestyle="--", linewidth=1, label=f"mean over all tokens {mean_kl:.4g}")
    ax.set_xlabel("KL(P_original ‖ P_quantized) per window (nats/token)")
    ax.set_ylabel("windows")
    ax.set_title(f"Per-window KL over {len(window_kl)} windows")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


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
    ax.set_title("Calibration: per-layer quantization error (from quantlab calibrate, not evaluation)")
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
