"""What an algorithm sees of the layer being calibrated. The pipeline builds one per decoder layer and
passes it explicitly to each stage; nothing here is global."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from .mappings import Mapping
from .recipe.schema import SchemeGroup


class _Reached(Exception):
    """Raised by ``LayerContext.run``'s hooks to end a batch's forward early."""


def to_device(obj, device: torch.device):
    """``obj`` with every tensor in it (also inside tuples and dicts) moved to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


@contextlib.contextmanager
def forward_hooks(hooks: Iterable[tuple[nn.Module, Callable]], pre: bool = False):
    """Within the block, each ``(module, fn)`` pair's ``fn`` runs as a forward hook of its module (a
    forward pre-hook with keyword arguments when ``pre``); every hook is removed on exit, also on error."""
    handles = [m.register_forward_pre_hook(fn, with_kwargs=True) if pre else m.register_forward_hook(fn)
               for m, fn in hooks]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class LayerContext:
    """One decoder layer under calibration, with the calibration batches it reads.

    Attributes:
        name: the layer's module name, e.g. ``model.layers.3``.
        layer: the layer, on ``device``.
        targets: Linears to quantize, by name relative to the layer (``self_attn.q_proj``).
        schemes: the scheme of each target.
        mappings: smoothing groups whose Linears are all targets.
        inputs: the layer's input hidden states, one tensor per batch, on ``keep_on``.
        kwargs: the other arguments of the layer's forward per batch (masks, rotary embeddings).
        device: where the layer runs.
        keep_on: where inputs and outputs wait between passes (``device`` or the CPU).
        fused: groups of targets a serving engine fuses into one Linear (``mappings.fused_shards``).
        max_tokens: cap on tokens kept by ``capture_inputs`` (evenly strided), bounding memory on big models.
        stages: the targets grouped by shared input (q/k/v; gate/up) in the order the layer runs them, set
            by ``run_and_trace``; empty before.
    """

    name: str
    layer: nn.Module
    targets: dict[str, nn.Linear]
    schemes: dict[str, SchemeGroup]
    mappings: list[Mapping]
    inputs: list[torch.Tensor]
    kwargs: list[dict]
    device: torch.device = torch.device("cpu")
    keep_on: torch.device = torch.device("cpu")
    fused: list[tuple[str, ...]] = field(default_factory=list)
    max_tokens: int = 16384
    stages: list[list[str]] = field(default_factory=list)
    _notes: list[str] = field(default_factory=list)
    _pinned_global_amax: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        """Calibration tokens per pass (all batches)."""
        return sum(h.shape[:-1].numel() for h in self.inputs)

    def run(self, num_batches: int | None = None, until: Collection[str] = ()) -> list[torch.Tensor]:
        """Run the layer over the calibration batches (no grad); forward hooks registered on submodules
        see every batch.

        Args:
            num_batches: run only the first ``num_batches`` batches (default: all).
            until: submodule names. When given, each batch's forward stops as soon as all of them have
                run (after their forward hooks), which saves the rest of the layer for passes that only
                collect those submodules' inputs, and no outputs are returned.

        Returns:
            The layer's outputs per batch, on ``keep_on`` (empty when ``until`` is given).
        """
        waiting: set[str] = set()

        def reached(name: str) -> None:
            waiting.discard(name)
            if not waiting:
                raise _Reached

        # Registered after any caller's hooks, so those see the input before the forward ends.
        outs = []
        with forward_hooks((self.layer.get_submodule(n), lambda _m, _a, _o, n=n: reached(n)) for n in until), torch.no_grad():
            for h, kw in zip(self.inputs[:num_batches], self.kwargs[:num_batches]):
                waiting.update(until)
                try:
                    out = self.layer(h.to(self.device), **to_device(kw, self.device))
                except _Reached:
                    continue
                if not until:
                    outs.append((out[0] if isinstance(out, tuple) else out).to(self.keep_on))
        return outs

    def run_and_trace(self, num_batches: int | None = None) -> list[torch.Tensor]:
        """``run(num_batches)``, also recording ``stages`` from the first batch: targets reading the same input tensor
        form one stage. Watched rather than taken from a per-architecture list, so any layer the pipeline
        can run is covered; a target the batch never reached still gets a stage, last."""
        first_input: dict[str, torch.Tensor] = {}

        def watch(name: str, x: torch.Tensor) -> None:  # a forward hook's return value would replace the output
            first_input.setdefault(name, x)

        with forward_hooks((lin, lambda _m, args, _o, n=name: watch(n, args[0])) for name, lin in self.targets.items()):
            outs = self.run(num_batches)
        stages: list[list[str]] = []
        for name, x in first_input.items():  # dict order = call order
            stage = next((s for s in stages if first_input[s[0]] is x), None)
            if stage is None:
                stages.append([name])
            else:
                stage.append(name)
        self.stages = stages + [[n] for n in self.targets if n not in first_input]
        return outs

    def capture_inputs(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Inputs of the named submodules over all batches, flattened to float32 [tokens, features].

        Tokens are kept at an even stride chosen so at most ``max_tokens`` survive, and the stride is
        applied per batch, so memory never holds more than that (plus one batch).
        """
        stride = -(-self.num_tokens // self.max_tokens)
        seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        def keep(name: str, x: torch.Tensor) -> None:
            seen[name].append(x.detach().reshape(-1, x.shape[-1])[::stride].float())

        with forward_hooks((self.layer.get_submodule(n), lambda _m, args, _out, n=n: keep(n, args[0])) for n in names):
            self.run(until=names)
        return {n: torch.cat(chunks) for n, chunks in seen.items()}

    def global_amax(self, name: str) -> torch.Tensor | None:
        """The amax behind target ``name``'s NVFP4 global scale (None for other formats): max|w| over
        the NVFP4 shards of its fused group, so the fused Linear has one global scale, as vLLM needs.
        Read it before any rounder overwrites weights (GPTQ's true-sequential mode does); after
        ``pin_global_amaxes`` it is the value pinned then."""
        fmt = self.schemes[name].weights.format
        if fmt != "nvfp4":
            return None
        if name in self._pinned_global_amax:
            return self._pinned_global_amax[name]
        group = next((g for g in self.fused if name in g), (name,))
        shards = [n for n in group if self.schemes[n].weights.format == fmt]
        return torch.stack([self.targets[n].weight.detach().abs().max().float() for n in shards]).max()

    def pin_global_amaxes(self) -> None:
        """Freeze ``global_amax`` of every target at the current weights, so that a transform which then
        clips them (AWQ) leaves the global scales where its search assumed them."""
        self._pinned_global_amax = {n: a for n in self.targets if (a := self.global_amax(n)) is not None}

    def note(self, text: str) -> None:
        """Record a remark for the calibration summary (e.g. GPTQ needed extra damping)."""
        self._notes.append(f"{self.name}: {text}")
