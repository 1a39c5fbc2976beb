"""quantlab: an LLM quantization workbench."""

__version__ = "0.1.0"
