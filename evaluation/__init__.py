"""How much did a checkpoint lose against its original model, and may it be promoted?

``run.run_eval`` / ``compare.run_compare`` are the entry points (``quantlab eval``); ``text``,
``perplexity``, ``reference`` (the original's cached results), ``tasks`` (lm-eval), ``gates``,
``progress`` and ``report`` each own one step, and ``report.read_verdict`` gives a promotion check the
checkpoint digest and verdict. docs/evaluation.md describes the metrics, the offline tasks, the report
and the exit codes. Nothing is imported here: lm-eval is slow to import.
"""
