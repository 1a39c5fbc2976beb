"""quantlab.engine: the engine builder and serving runtime (the next milestone; nothing here yet).

It will read checkpoints only through ``quantlab.checkpoint.schema`` and ``quantlab.checkpoint.reader``
(docs/checkpoint.md is the contract) and never import the calibration pipeline or the algorithms.
"""
