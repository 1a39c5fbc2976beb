"""Our checkpoints, read by compressed-tensors itself (the library vLLM loads them with): the config
parses, its matching assigns every module the scheme quantlab used, and its own decompressors turn our
stored tensors into exactly our dequantized weights. Pinned to the layout of compressed-tensors 0.20: the
``test`` extra pins the exact version, and these tests fail (never skip) without it."""

import importlib.metadata
import json
import re
from pathlib import Path

import pytest
import torch
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.compressors.format import infer_module_format
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig
from compressed_tensors.quantization.utils.helpers import calculate_qparams, generate_gparam
from compressed_tensors.utils.match import match_named_modules, match_targets
from safetensors.torch import load_file

from quantlab import formats
from quantlab.checkpoint import schema
from quantlab.checkpoint.reader import assign_groups, build_model
from quantlab.checkpoint.writer import write_checkpoint
from quantlab.fake_quant import KVCacheQuant, QuantLinear, activation_scales
from quantlab.recipe.schema import ActivationScheme as A
from quantlab.recipe.schema import KVCacheScheme, SchemeGroup
from quantlab.recipe.schema import WeightScheme as W

def test_compressed_tensors_is_the_version_the_test_extra_pins():
    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    (pinned,) = re.findall(r'"compressed-tensors==([^"]+)"', pyproject)
    assert importlib.metadata.version("compressed-tensors") == pinned


ALL = ("Linear",)
SCHEMES = {
    "fp8-static-kv": ([SchemeGroup(ALL, W("fp8_e4m3", "tensor"), A("fp8_e4m3", "tensor", False))], KVCacheScheme()),
    "fp8-dynamic": ([SchemeGroup(ALL, W("fp8_e4m3", "channel"), A("fp8_e4m3", "token", True))], None),
    "int8-w8a8": ([SchemeGroup(ALL, W("int8", "channel"), A("int8", "token", True))], None),
    "int4-g32": ([SchemeGroup(ALL, W("int4", "group", 32))], None),
    "int4-asym-g32": ([SchemeGroup(ALL, W("int4_asym", "group", 32))], None),
    "int4-asym-channel": ([SchemeGroup(ALL, W("int4_asym", "channel"))], None),
    "nvfp4-w4a4-kv-head": ([SchemeGroup(ALL, W("nvfp4", "group", 16), A("nvfp4", "group", True))],
                           KVCacheScheme(granularity="head")),
    "mxfp4": ([SchemeGroup(ALL, W("mxfp4", "group", 32))], None),
    "mixed": ([SchemeGroup((r"re:.*mlp\..*",), W("int4_asym", "group", 64)),
               SchemeGroup(ALL, W("fp8_e4m3", "channel"), A("fp8_e4m3", "token", True))], None),
}


@pytest.fixture(scope="module", params=list(SCHEMES))
def written(request, quantize, tmp_path_factory):
    """One calibrated model and its checkpoint per scheme, shared by the read-only tests below."""
    groups, kv = SCHEMES[request.param]
    c = quantize(groups, kv)
    path = tmp_path_factory.mktemp(request.param) / "ckpt"
    write_checkpoint(c.model, c.tokenizer, c.recipe, c.calib, c.result, path)
    qcfg = json.loads((path / "config.json").read_text())["quantization_config"]
    return c, path, qcfg, load_file(str(path / "model.safetensors"))


def test_config_parses_and_reserializes_unchanged(written):
    _, _, qcfg, _ = written
    qc = QuantizationConfig.model_validate(qcfg)
    assert qc.quant_method == "compressed-tensors" and qc.quantization_status == "compressed"
    for key, scheme in qc.config_groups.items():
        # compressed-tensors would pick the same compressor for this scheme on its own.
        assert infer_module_format(torch.nn.Linear, scheme).value == scheme.format
        assert scheme.format == qcfg["config_groups"][key]["format"]
        ours = qcfg["config_groups"][key]
        for field in ("weights", "input_activations"):
            if ours[field] is not None:
                assert QuantizationArgs.model_validate(ours[field]).model_dump() == ours[field]
    if qcfg["kv_cache_scheme"] is not None:
        assert QuantizationArgs.model_validate(qcfg["kv_cache_scheme"]).model_dump() == qcfg["kv_cache_scheme"]
    formats_used = {s.format for s in qc.config_groups.values()}
    assert qc.format == (formats_used.pop() if len(formats_used) == 1 else "mixed-precision")


def test_compressed_tensors_matching_gives_quantlabs_assignment(written):
    c, path, qcfg, _ = written
    qc = QuantizationConfig.model_validate(qcfg)
    model = build_model(path, torch.float32, device="meta")
    target_to_group = {t: k for k, s in qc.config_groups.items() for t in s.targets}
    theirs = {n: target_to_group[match_targets(n, m, target_to_group)[0]]
              for n, m in match_named_modules(model, target_to_group, qc.ignore)}
    assert theirs == assign_groups(model, qcfg)
    quantized = {n: m.qweight.fmt for n, m in c.model.named_modules() if isinstance(m, QuantLinear)}
    assert set(theirs) == set(quantized)
    for n, key in theirs.items():
        assert schema.weight_format(qcfg["config_groups"][key]["weights"]) == quantized[n]
    assert qc.ignore == [n for n, m in c.model.named_modules() if type(m) is torch.nn.Linear]


def test_compressed_tensors_decompressors_give_our_weights(written):
    c, path, qcfg, tensors = written
    qc = QuantizationConfig.model_validate(qcfg)
    model = build_model(path, torch.float32, device="meta")
    for name, key in assign_groups(model, qcfg).items():
        scheme = qc.config_groups[key]
        compressor = BaseCompressor.get_value_from_registry(scheme.format)
        names = compressor.compression_param_names(scheme)
        stored = {k.rpartition(".")[2] for k in tensors if k.rpartition(".")[0] == name}
        assert set(names) <= stored and stored - set(names) <= {"input_scale", "input_global_scale"}
        weight = compressor.decompress({k: tensors[f"{name}.{k}"] for k in names}, scheme)["weight"]
        ours = formats.dequantize(c.model.get_submodule(name).qweight, weight.dtype)
        assert weight.shape == ours.shape and torch.equal(weight, ours), name


def _amaxes(n: int, seed: int = 0) -> torch.Tensor:
    """Positive float32 ranges spread over ten decades."""
    g = torch.Generator().manual_seed(seed)
    return torch.exp(torch.empty(n).uniform_(-16.0, 7.0, generator=g)).float()


@pytest.mark.parametrize("act", [A("fp8_e4m3", "tensor", False), A("nvfp4", "group", True)], ids=lambda a: a.format)
def test_static_scales_follow_compressed_tensors_formulas(act):
    """The input scales calibration gives a range are the ones compressed-tensors computes for it (int8:
    see test_int8_static_input_scale_is_amax_over_127)."""
    args = QuantizationArgs.model_validate(schema.activation_args(act))
    for a in _amaxes(300):
        a = a.reshape(1)
        input_scale, input_global_scale = activation_scales(act, a)
        if act.format == "nvfp4":
            assert input_scale is None and torch.equal(input_global_scale, generate_gparam(-a, a))
        else:
            scale, _ = calculate_qparams(-a, a, args)
            assert input_global_scale is None and torch.equal(input_scale, scale.float().reshape(1)), float(a)


def test_stored_input_and_kv_scales_are_the_modules_own(written):
    c, _, qcfg, tensors = written
    qc = QuantizationConfig.model_validate(qcfg)
    for name, m in c.model.named_modules():
        if isinstance(m, QuantLinear):
            for scale in ("input_scale", "input_global_scale"):
                held = getattr(m, scale)
                assert (f"{name}.{scale}" in tensors) == (held is not None), (name, scale)
                assert held is None or torch.equal(tensors[f"{name}.{scale}"], held)
        if isinstance(m, KVCacheQuant):
            attn = name.rpartition(".")[0]
            heads = c.model.config.num_key_value_heads
            shape = (heads, 1, 1) if qc.kv_cache_scheme.strategy == "attn_head" else (1,)
            for kind in ("k", "v"):
                assert tensors[f"{attn}.{kind}_scale"].shape == shape
                assert tensors[f"{attn}.{kind}_scale"].dtype == torch.float32
                assert torch.equal(tensors[f"{attn}.{kind}_scale"].reshape(-1), getattr(m, f"{kind}_scale"))


def test_weight_global_scale_is_compressed_tensors_gparam_of_the_fused_weights(quantize, tmp_path):
    """As llm-compressor's fused observers give it: one gparam over q/k/v and one over gate/up (vLLM
    loads each group as one Linear with one global scale), the Linear's own elsewhere."""
    from quantlab.mappings import LLAMA_FUSED
    from quantlab.models import load_model

    c = quantize(*SCHEMES["nvfp4-w4a4-kv-head"])
    float_model, _ = load_model(c.recipe.model)
    write_checkpoint(c.model, c.tokenizer, c.recipe, c.calib, c.result, tmp_path / "ckpt")
    tensors = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    for name, m in float_model.named_modules():
        if isinstance(m, torch.nn.Linear) and name != "lm_head":
            layer, _, local = name.partition(".self_attn.") if ".self_attn." in name else name.partition(".mlp.")
            local = ("self_attn." if ".self_attn." in name else "mlp.") + local
            group = next((g for g in LLAMA_FUSED if local in g), (local,))
            w = torch.cat([float_model.get_submodule(f"{layer}.{n}").weight.detach().flatten() for n in group])
            expected = generate_gparam(w.amin().reshape(1), w.amax().reshape(1))
            assert torch.equal(tensors[f"{name}.weight_global_scale"], expected)


def test_int8_static_input_scale_is_amax_over_127():
    """quantlab's symmetric int scale is amax/qmax (compressed-tensors' observer uses amax/127.5); both
    decode as code * scale, so vLLM reads the stored scale exactly as quantlab simulated it."""
    for a in _amaxes(300, seed=3):
        assert torch.equal(activation_scales(A("int8", "tensor", False), a)[0], (a / 127).reshape(1))


@pytest.mark.parametrize("name", ["int4-asym-g32", "nvfp4-w4a4-kv-head", "mxfp4"])
def test_model_free_dequantizer_reads_packed_checkpoints(name, quantize, tmp_path):
    """compressed-tensors' checkpoint-level dequantizer (no model) gives our weights. Its naive path treats
    a ``Linear`` target as every ``weight`` in the file, embeddings included, so fp8/int8 are covered by
    the per-module test above instead."""
    from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import CompressedTensorsDequantizer

    c = quantize(*SCHEMES[name])
    write_checkpoint(c.model, c.tokenizer, c.recipe, c.calib, c.result, tmp_path / "ckpt")
    out = CompressedTensorsDequantizer(tmp_path / "ckpt", dtype=torch.float32).process(
        load_file(str(tmp_path / "ckpt" / "model.safetensors")))
    for n, m in c.model.named_modules():
        if isinstance(m, QuantLinear):
            # ct decompresses these formats in bf16 (its scale / fp4 lookup dtype): compare there.
            assert torch.equal(out[f"{n}.weight"].to(torch.bfloat16), formats.dequantize(m.qweight, torch.bfloat16)), n


@pytest.mark.parametrize("targets", [
    [["Linear"], [r"re:.*down_proj"]],                      # regex beats class
    [[r"re:.*mlp.*"], ["model.layers.0.mlp.up_proj"]],      # exact name beats regex
    [["Linear"], ["Linear", r"re:.*q_proj"]],               # a later group redefining a target wins
    [[r"re:model\.layers\.1"], [r"re:.*o_proj$"]],          # re.match is a prefix match
])
def test_resolve_agrees_with_compressed_tensors_on_overlapping_targets(targets, tiny_dir):
    model = __import__("transformers").AutoModelForCausalLM.from_pretrained(tiny_dir)
    groups = {f"group_{i}": {"targets": t} for i, t in enumerate(targets)}
    ignore = ["lm_head"]
    target_to_group = {t: k for k, g in groups.items() for t in g["targets"]}
    theirs = {n: target_to_group[match_targets(n, m, target_to_group)[0]]
              for n, m in match_named_modules(model, target_to_group, ignore)}
    ours = {n: k for n, m in model.named_modules()
            if (k := schema.resolve(n, schema.class_names(m), groups, ignore)) is not None}
    assert ours == theirs
