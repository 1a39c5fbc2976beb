"""report.md: the evaluation for people, as GitHub-flavoured markdown (pipe tables, the plots embedded
by relative path so the report renders on a code-hosting site). Every number shown comes from
report.json's content, which is the only input."""

from __future__ import annotations


def fmt(x: float | None, digits: int = 4) -> str:
    return "—" if x is None else f"{x:.{digits}g}"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def gates_md(gates: list[dict]) -> list[str]:
    if not gates:
        return ["No gates are set in the recipe, so nothing blocks promotion."]
    rows = [[g["name"], f"{'≤' if g['name'].startswith('max_') else '≥'} {g['threshold']:g}", fmt(g["value"]),
             "—" if g["margin"] is None else f"{g['margin']:+.4g}", "pass" if g["passed"] else "**FAIL**",
             g.get("detail", "")] for g in gates]
    return table(["gate", "limit", "value", "margin", "result", "detail"], rows)


def _tasks_md(tasks: dict) -> list[str]:
    rows = []
    for task, base in tasks["original"].items():
        for metric, value in base.items():
            if metric.endswith("_stderr"):
                continue
            q = tasks["quantized"].get(task, {})
            rec = tasks["recovery_pct"].get(task) if metric == tasks["primary"].get(task) else None
            rows.append([task, metric + (" (primary)" if rec is not None else ""),
                         f"{fmt(value)} ± {fmt(base.get(metric + '_stderr'), 2)}",
                         f"{fmt(q.get(metric))} ± {fmt(q.get(metric + '_stderr'), 2)}", fmt(rec)])
    return table(["task", "metric", "original", "quantized", "recovery %"], rows)


def _spread_row(label: str, s: dict) -> list[str]:
    return [label, fmt(s["min"]), fmt(s["median"]), fmt(s["max"]), fmt(s["std"], 2)]


def _perplexity_md(d: dict) -> list[str]:
    ppl, s, data = d["perplexity"], d["settings"], d["data"]
    base, quant = ppl["original"]["perplexity"], ppl["quantized"]["perplexity"]
    out = [f"`{s['dataset']}`: {data['num_docs']} document{'s' if data['num_docs'] > 1 else ''}, "
           f"{data['num_tokens']} tokens, {data['num_scored']} scored in {data['num_windows']} windows of up to "
           f"{s['context_len']} tokens every {s['stride']} (token sha256 `{data['token_sha256'][:16]}`).", "",
           *table(["model", "perplexity", "mean NLL (nats)"],
                  [[name, fmt(m["perplexity"], 5), fmt(m["nll"], 5)] for name, m in ppl.items()]),
           "", f"Change: **{100 * (quant / base - 1):+.2f} %**.", ""]
    if d["documents"]:
        out += ["### Per document", "",
                *table(["document", "tokens", "original", "quantized", "change %"],
                       [[f"`{r['name']}`", str(r["tokens"]), fmt(r["original"], 5), fmt(r["quantized"], 5),
                         f"{r['change_pct']:+.2f}"] for r in d["documents"]]), "",
                "Spread of the per-document perplexities:", "",
                *table(["model", "min", "median", "max", "std"],
                       [_spread_row(n, m["doc_spread"]) for n, m in ppl.items()]), ""]
    out += ["### Distribution: KL and top-1 agreement", "",
            f"Mean KL(P_original ‖ P_quantized) **{d['kl']:.4g}** nats/token; top-1 agreement "
            f"**{d['top1_agreement']:.4f}** (the fraction of scored tokens where both models' most likely next "
            "token is the same). Their spread over the windows:", "",
            *table(["per window", "min", "median", "max", "std"],
                   [_spread_row("KL (nats/token)", d["kl_windows"]), _spread_row("top-1 agreement", d["top1_windows"])]),
            ""]
    if d.get("plots", {}).get("nll_diff"):
        out += ["![per-token NLL difference along the text](nll_diff.png)", ""]
    if d.get("plots", {}).get("kl_windows"):
        out += ["![per-window KL](kl_windows.png)", ""]
    return out


def render_eval_md(d: dict) -> str:
    """report.md of one checkpoint."""
    s = d["settings"]
    verdict = "PASS" if d["passed"] else "FAIL"
    out = [f"# Evaluation of `{d['checkpoint']['path']}`", "",
           f"**{verdict}** (exit code {d['exit_code']}) against `{d['original']['name']}`.", "",
           *table(["", ""], [
               ["checkpoint digest", f"`{d['checkpoint_digest']}`"],
               ["recipe", f"{d['recipe']['source']} (sha256 `{d['recipe']['sha256'][:12]}`)"],
               ["command", f"`{d['command']}`" if d.get("command") else "—"],
               ["date", d["date"]], ["device", d["device"]],
               ["time", f"{d['seconds']:.1f} s"]]), "",
           "## Gates", "", *gates_md(d["gates"]), "",
           "## Held-out perplexity", "", *_perplexity_md(d)]
    if d["tasks"]["original"]:
        out += ["## Tasks (lm-eval, zero-shot)", "",
                f"limit {s['limit'] if s['limit'] is not None else 'none'} per task, seed {s['seed']}; "
                "± is lm-eval's standard error. Recovery = 100 × quantized / original on the primary metric.", "",
                *_tasks_md(d["tasks"]), ""]
    out += ["## Calibration: per-layer quantization error", "",
            "Measured by `quantlab calibrate` on the calibration data (not an evaluation result), from quantlab.json.", ""]
    out += (["![per-layer error](layer_error.png)", ""] if d.get("plots", {}).get("layer_error") else
            ["quantlab.json holds no per-layer statistics.", ""])
    cache = d.get("cache", {})
    out += ["## Provenance", "", *table(["item", "value"], [
        ["checkpoint bytes (safetensors)", str(d["checkpoint"]["bytes"])],
        ["original path", f"`{d['original']['path']}`"],
        ["recipe", f"`{d['recipe']['path']}`"],
        ["original's log-probs / task scores", " / ".join("from the cache" if cache.get(k) else "computed"
                                                         for k in ("original_log_probs", "original_tasks"))],
        *[[f"{k} version", str(v)] for k, v in d["versions"].items()],
        *[[f"phase: {p['phase']}", f"{p['seconds']:.1f} s"] for p in d.get("phases", [])]]), ""]
    return "\n".join(out)


def render_compare_md(d: dict) -> str:
    """report.md of several checkpoints against one original."""
    s = d["settings"]
    out = [f"# Comparison against `{d['original']['name']}`", "",
           f"`{s['dataset']}`: {d['data']['num_scored']} scored tokens (token sha256 `{d['data']['token_sha256'][:16]}`); "
           f"original perplexity {d['original']['perplexity']:.5g}. Sorted by size; ★ = on the Pareto front of "
           "size vs perplexity (no other checkpoint is both smaller and better).", ""]
    tasks = sorted({t for c in d["checkpoints"] for t in c["task_recovery_pct"]})
    rows = [[("★ " if c["pareto"] else "") + f"`{c['name']}`", f"{c['bytes'] / 2**20:.1f}", fmt(c["perplexity"], 5),
             fmt(c["kl"]), f"{c['top1_agreement']:.4f}", *[fmt(c["task_recovery_pct"].get(t)) for t in tasks],
             "pass" if c["passed"] else "**FAIL**"] for c in d["checkpoints"]]
    out += table(["checkpoint", "MiB", "perplexity", "KL", "top-1", *[f"{t} recovery %" for t in tasks], "gates"], rows)
    out += ["", "![size vs perplexity](pareto.png)", ""]
    for c in d["checkpoints"]:
        out += [f"## `{c['name']}`", "", f"path `{c['path']}`, recipe sha256 `{c['recipe_sha256'][:12]}`", "",
                *gates_md(c["gates"]), ""]
    return "\n".join(out)
