"""Checkpoints in the compressed-tensors format that vLLM reads (docs/checkpoint.md is the contract).

``schema`` translates quantlab schemes and tensors to and from compressed-tensors' config and tensor
names, ``writer`` writes a calibrated model atomically, ``reader`` loads one back as a fake-quant model,
and ``inspect`` reports bytes and compression ratios. Nothing is imported here, so the engine can read
checkpoints through ``schema`` and ``reader`` without pulling in the calibration pipeline.
"""
