"""What an algorithm sees of the layer being calibrated. The pipeline builds one per decoder layer and
passes it explicitly to each stage; nothing here is global."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .mappings import Mapping
from .recipe.schema import SchemeGroup


@dataclass
class LayerContext:
    """One decoder layer under calibration.

    Attributes:
        name: the layer's module name, e.g. ``model.layers.3``.
        layer: the layer, on the calibration device.
        targets: Linears to quantize, by name relative to the layer (``self_attn.q_proj``).
        schemes: the scheme of each target.
        mappings: smoothing groups whose Linears are all targets.
        run: runs the layer over every calibration batch (no grad) and returns the outputs; forward hooks
            registered on submodules see every batch. ``run(num_batches=k)`` runs only the first k.
        num_tokens: calibration tokens per pass (all batches).
        fused: groups of targets a serving engine fuses into one Linear (``mappings.fused_shards``).
        max_tokens: cap on tokens kept by ``capture_inputs`` (evenly strided), bounding memory on big models.
    """

    name: str
    layer: nn.Module
    targets: dict[str, nn.Linear]
    schemes: dict[str, SchemeGroup]
    mappings: list[Mapping]
    run: Callable[..., list[torch.Tensor]]
    num_tokens: int
    max_tokens: int = 16384
    fused: list[tuple[str, ...]] = field(default_factory=list)
    _notes: list[str] = field(default_factory=list)

    def capture_inputs(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Inputs of the named submodules over all batches, flattened to float32 [tokens, features].

        Tokens are kept at an even stride chosen so at most ``max_tokens`` survive, and the stride is
        applied per batch, so memory never holds more than that (plus one batch).
        """
        stride = -(-self.num_tokens // self.max_tokens)
        seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        handles = [
            self.layer.get_submodule(n).register_forward_hook(
                lambda _m, args, _out, n=n: seen[n].append(args[0].detach().reshape(-1, args[0].shape[-1])[::stride].float())
            )
            for n in names
        ]
        try:
            self.run()
        finally:
            for h in handles:
                h.remove()
        return {n: torch.cat(chunks) for n, chunks in seen.items()}

    def global_amax(self, name: str) -> torch.Tensor | None:
        """The amax behind target ``name``'s NVFP4 global scale (None for other formats): max|w| over
        the NVFP4 shards of its fused group, so the fused Linear has one global scale, as vLLM needs.
        Read it before any rounder overwrites weights (GPTQ's true-sequential mode does)."""
        fmt = self.schemes[name].weights.format
        if fmt != "nvfp4":
            return None
        group = next((g for g in self.fused if name in g), (name,))
        shards = [n for n in group if self.schemes[n].weights.format == fmt]
        return torch.stack([self.targets[n].weight.detach().abs().max().float() for n in shards]).max()

    def note(self, text: str) -> None:
        """Record a remark for the calibration summary (e.g. GPTQ needed extra damping)."""
        self._notes.append(f"{self.name}: {text}")
