"""Layer-by-layer calibration.

Embed the calibration batches, then for each decoder layer in turn: move it to the calibration device,
run the recipe's transforms (SmoothQuant, AWQ), observe static activation ranges and KV-cache ranges,
round its Linears (RTN or GPTQ), swap them for ``QuantLinear``s, and feed the *quantized* layer's outputs
to the next layer, so each layer is calibrated on the inputs it will really see. Only one layer and the
activations live on the device at a time; the rest of the model stays on the CPU.
"""

from __future__ import annotations

import logging
import re
import resource
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from . import algorithms
from .algorithms import awq, gptq, rtn, smoothquant
from .context import LayerContext, forward_hooks, to_device
from .data import CalibrationSet
from .errors import CalibrationError, QuantlabError
from .fake_quant import KVCacheQuant, QuantLinear, activation_scales, decoded_weights, enable_kv_quant
from .mappings import fused_shards, layer_mappings
from .models import decoder_layers
from .observers import activation_amax, quantize_weight
from .recipe.schema import Recipe, SchemeGroup
from .result import CalibrationResult, LayerStats

log = logging.getLogger(__name__)

# Recipe algorithm name -> the adapter that runs it on a LayerContext.
TRANSFORM_FNS = {"smoothquant": smoothquant.apply, "awq": awq.apply}
ROUNDER_FNS = {"rtn": rtn.apply, "gptq": gptq.apply}
BATCH_SIZE = 8


class _StopForward(Exception):
    pass


def match_scheme(name: str, module: nn.Module, recipe: Recipe) -> SchemeGroup | None:
    """The first scheme group whose targets match a module, or None if ignored or unmatched.

    A target is a class name (``Linear``) or ``re:<regex>`` full-matched against the module name; a
    name in ``ignore`` is matched the same way (or by its last component, so ``lm_head`` ignores it).
    """

    def hit(pattern: str) -> bool:
        if pattern.startswith("re:"):
            return re.fullmatch(pattern[3:], name) is not None
        return pattern in (type(module).__name__, name, name.rsplit(".", 1)[-1])

    if not isinstance(module, nn.Linear) or any(hit(p) for p in recipe.ignore):
        return None
    return next((g for g in recipe.schemes if any(hit(t) for t in g.targets)), None)


def _peak_mem_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _capture_layer0_inputs(model: nn.Module, layers: nn.ModuleList, ids: torch.Tensor):
    """Run the model up to its first decoder layer for each batch; return hidden states and kwargs."""
    hidden, kwargs = [], []

    def catch(_module, args, kw):
        hidden.append(args[0] if args else kw.pop("hidden_states"))
        kwargs.append({k: v for k, v in kw.items() if k != "hidden_states"})
        raise _StopForward

    with forward_hooks([(layers[0], catch)], pre=True), torch.no_grad():
        for batch in ids.split(BATCH_SIZE):
            try:
                model(input_ids=batch, use_cache=False)
            except _StopForward:
                pass
    return hidden, kwargs


def _activation_device(hidden: list[torch.Tensor], device: torch.device) -> torch.device:
    """Where a layer's inputs and outputs wait between passes: on the calibration GPU when three times
    the inputs (inputs and quantized outputs alive at once, with room to spare) fit in half its free
    memory, else in host memory. Copying them across PCIe on every pass would otherwise dominate
    calibration time."""
    if device.type != "cuda":
        return torch.device("cpu")
    need = 3 * sum(h.numel() * h.element_size() for h in hidden)
    free, _ = torch.cuda.mem_get_info(device)
    return device if need < free // 2 else torch.device("cpu")


def _check_finite(name: str, what: str, tensors) -> None:
    for t in tensors:
        if not torch.isfinite(t).all():
            raise CalibrationError(f"calibration stopped at {name}: its {what} contain NaN or inf")


def _observe_activations(ctx: LayerContext, static: list[str]) -> dict[str, torch.Tensor]:
    """Calibrated |x| ranges of the inputs of Linears with static ranges (per-tensor or nvfp4 global):
    the maximum over batches of each batch's range by the scheme's observer (``observers.activation_amax``)."""
    amax: dict[str, torch.Tensor] = {}

    def hook(name: str, x: torch.Tensor) -> None:
        a = activation_amax(x, ctx.schemes[name].activations).cpu()
        amax[name] = a if name not in amax else torch.maximum(amax[name], a)

    with forward_hooks((ctx.layer.get_submodule(n), lambda _m, args, _o, n=n: hook(n, args[0])) for n in static):
        ctx.run()
    return amax


def _needs_input_amax(group: SchemeGroup) -> bool:
    act = group.activations
    return act is not None and (not act.dynamic or act.format == "nvfp4")


def calibrate(model: nn.Module, recipe: Recipe, calib: CalibrationSet, device: torch.device,
              progress: bool = True) -> CalibrationResult:
    """Quantize ``model`` in place, layer by layer, as ``recipe`` says.

    Args:
        model: a Llama-family causal LM on the CPU, in its calibration dtype.
        recipe: the validated recipe.
        calib: calibration token windows.
        device: where each layer is calibrated (CPU or CUDA).
        progress: show a progress bar over layers.

    Returns:
        Per-layer stats and KV-cache states; the model's targeted Linears are now ``QuantLinear``s.
        The per-layer stats come from the first calibration batch (``LayerStats``).

    Raises:
        CalibrationError: NaN/inf in a layer's weights or activations (naming the layer).
    """
    start = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    layers = decoder_layers(model)
    dtype = next(model.parameters()).dtype
    kv_states = enable_kv_quant(model, recipe.kv_cache) if recipe.kv_cache else []
    transforms = [s for s in recipe.stages if s.algorithm in algorithms.TRANSFORMS]
    rounder = next(s for s in recipe.stages if s.algorithm in algorithms.ROUNDERS)
    # RTN with nothing calibrated (no transform, no static range, no KV cache) needs no data: the
    # passes then only measure each layer's output error, which one batch estimates well enough.
    data_free = (rounder.algorithm == "rtn" and not transforms and not recipe.kv_cache
                 and not any(_needs_input_amax(g) for g in recipe.schemes))
    ids = calib.input_ids[:BATCH_SIZE] if data_free else calib.input_ids
    hidden, kwargs = _capture_layer0_inputs(model, layers, ids)
    keep_on = _activation_device(hidden, device)
    hidden, kwargs = [h.to(keep_on) for h in hidden], [to_device(kw, keep_on) for kw in kwargs]
    layer_prefix = next(n for n, m in model.named_modules() if m is layers)

    stats, notes, assigned = [], [], {}
    bar = tqdm(list(enumerate(layers)), desc="calibrating", unit="layer", disable=not progress)
    for index, layer in bar:
        t0 = time.perf_counter()
        name = f"{layer_prefix}.{index}"
        layer.to(device)
        _check_finite(name, "weights", (p for p in layer.parameters()))
        schemes = {}
        for local, module in layer.named_modules():
            group = match_scheme(f"{name}.{local}", module, recipe)
            if group is not None:
                schemes[local] = group
        ctx = LayerContext(
            name=name, layer=layer, targets={n: layer.get_submodule(n) for n in schemes}, schemes=schemes,
            mappings=layer_mappings(layer, set(schemes)), inputs=hidden, kwargs=kwargs, device=device, keep_on=keep_on,
            fused=fused_shards(layer, set(schemes)),
        )
        float_out = ctx.run_and_trace(num_batches=1)
        _check_finite(name, "activations", float_out)
        for stage in transforms:
            TRANSFORM_FNS[stage.algorithm](ctx, stage.params)
        static = [n for n, g in schemes.items() if _needs_input_amax(g)]
        layer_kv = [m.kv_quant for m in layer.modules() if isinstance(getattr(m, "kv_quant", None), KVCacheQuant)]
        for kv in layer_kv:
            kv.observing = True
        input_amax = _observe_activations(ctx, static) if (static or layer_kv) else {}
        for kv in layer_kv:
            kv.observing = False
            kv.set_scales_from_observed()
        qweights = ROUNDER_FNS[rounder.algorithm](ctx, rounder.params)
        for local, qweight in qweights.items():
            linear = ctx.targets[local]
            parent_name, _, child = local.rpartition(".")
            parent = layer.get_submodule(parent_name) if parent_name else layer
            act = schemes[local].activations
            setattr(parent, child, QuantLinear(qweight, linear.bias, act, dtype, *activation_scales(act, input_amax.get(local))).to(device))
            assigned[f"{name}.{local}"] = schemes[local]
        with decoded_weights(layer):
            quant_out = ctx.run()
        _check_finite(name, "quantized outputs", quant_out)
        # Error against the float layer (transforms preserve its function), which ran on the first batch
        # only: zip pairs that batch with its quantized output.
        num = sum((q.float() - f.float()).pow(2).sum() for q, f in zip(quant_out, float_out))
        den = sum(f.float().pow(2).sum() for f in float_out)
        hidden = quant_out
        layer.to("cpu")
        stats.append(LayerStats(name, float(num / den.clamp(min=1e-30)), time.perf_counter() - t0, _peak_mem_mib(device)))
        notes.extend(ctx._notes)
        bar.set_postfix(rel_mse=f"{stats[-1].rel_mse:.2e}")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    assigned.update(_quantize_outside_layers(model, layers, recipe, dtype, rounder.algorithm))
    return CalibrationResult(stats, time.perf_counter() - start, max(s.peak_mem_mib for s in stats), notes, kv_states,
                             assigned)


def _quantize_outside_layers(model: nn.Module, layers: nn.ModuleList, recipe: Recipe, dtype: torch.dtype,
                             rounder: str) -> dict[str, SchemeGroup]:
    """Round targeted Linears outside the decoder layers (e.g. an un-ignored lm_head) with RTN; returns
    each one's name and scheme group.

    They see no calibration pass, so only weight-only or dynamic-activation schemes are possible.
    """
    inside = {id(m) for m in layers.modules()}
    assigned = {}
    for name, module in list(model.named_modules()):
        if id(module) in inside:
            continue
        group = match_scheme(name, module, recipe)
        if group is None:
            continue
        if group.activations is not None and _needs_input_amax(group):
            raise QuantlabError(f"{name} is outside the decoder layers and cannot take calibrated activation ranges; ignore it or use dynamic activations")
        if rounder != "rtn":
            log.warning("%s is outside the decoder layers: rounded with RTN, not %s", name, rounder)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, QuantLinear(quantize_weight(module.weight.detach().float(), group.weights),
                                           module.bias, group.activations, dtype))
        assigned[name] = group
    return assigned
