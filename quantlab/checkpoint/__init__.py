"""Checkpoints in the compressed-tensors format that vLLM reads (docs/checkpoint.md is the contract).

``schema`` translates quantlab schemes and tensors to and from compressed-tensors' config and tensor
names, ``files`` checks a directory's files (JSON, shards, safetensors headers, shard SHA-256) before any
tensor is trusted, ``writer`` writes a calibrated model atomically, ``stream`` reads one module's tensors
at a time (the engine builder's view), ``reader`` loads a checkpoint back as a fake-quant model,
``digest`` hashes files, and ``inspect`` reports bytes and compression ratios. Nothing is imported here,
and no module of this package imports the pipeline, the models or the data (tests/test_imports.py).
"""
