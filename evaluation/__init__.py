"""How much did a checkpoint lose against its original model, and may it be promoted?

``run.run_eval`` / ``run.run_compare`` are the entry points (``quantlab eval``); ``perplexity``,
``tasks`` (lm-eval), ``gates`` and ``report`` each own one step. docs/evaluation.md describes the
metrics, the offline tasks and the exit codes. Nothing is imported here: lm-eval is slow to import.
"""
