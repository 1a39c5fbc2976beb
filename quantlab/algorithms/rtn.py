"""Round-to-nearest: each weight quantized independently with its observer's range."""

from __future__ import annotations

from ..recipe.stages import RTNParams


def apply(ctx, params: RTNParams) -> dict:
    """Pipeline adapter: quantize every target Linear of the layer with its scheme's observer range
    (NVFP4 shards of one fused Linear share their global scale, ``LayerContext.global_amax``).

    Returns:
        local Linear name -> QTensor.
    """
    from ..observers import quantize_weight

    return {name: quantize_weight(lin.weight.detach().float(), ctx.schemes[name].weights, global_amax=ctx.global_amax(name))
            for name, lin in ctx.targets.items()}
