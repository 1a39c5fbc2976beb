"""GPU kernels of the engine, each beside the plain PyTorch reference that the CPU and the tests run.

One file per kernel family: the reference first (built from ``quantlab.formats`` calls and plain torch
ops), the Triton kernel second, and a public function that takes the Triton path on CUDA and the reference
elsewhere. Element numerics are never rewritten here: they come from ``quantlab.formats``.

- ``linear``: every linear layer the engine runs (BF16, W4A16 INT4/NVFP4/MXFP4, W8A8 FP8/INT8), with the
  build-time ``pack`` that lays weights out for its kernel, ``tune`` (build time, on the target GPU) and
  the run-time ``apply``. Kernels: ``w4a16`` (layout in ``w4a16_layout``, launch choices in
  ``w4a16_configs``), ``w8a8``, and ``gemv`` (split-K GEMV for 1-4 rows of dense or 8-bit weights, a
  build-time candidate beside cuBLAS); ``splitk`` holds the one-launch split-K sum the W4A16 and GEMV
  kernels share.
- ``attention``: attention over the paged KV cache and the KV-cache write's reference; the Triton decode and prefill
  kernels are ``attention_decode`` and ``attention_prefill``.
- ``rope_kv``: attention's prologue in one kernel, RoPE on q and k plus the KV-cache write (references:
  ``rope.apply_rope_ref`` and ``attention.write_kv_ref``).
- ``norm``, ``activation``: RMSNorm (+ residual), SwiGLU.
- ``timing``: CUDA-graph GPU timing the tuner and bench/kernels.py share.
"""
