"""The compact log8 scale format (XQuantConfig(scale_format="log8")): its rounding against a torch
reference and the fp16 format, the bytes the cache really holds, compiled parity with the simulation
(X form, XQuant-CL, mixed widths, exact rows, the device-length rebuild), refusals and the eval suffix."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import transformers as tf

import xq_compile as xq
from xq_compile import quant
from xq_compile.backend import collect_records
from xq_compile.evaluate import parse_methods
from xq_compile.memory import memory_report
from xq_compile.simulate import simulate_xquant

from conftest import (compiled_run, decode_inputs, errors_against_simulation, max_error, prefix_reference,
                      random_model, reference_logits, tiny_llama)

EAGER = xq.make_xquant_backend("aot_eager")


def outlier_rows(shape=(4, 7, 256), seed=0) -> torch.Tensor:
    """Rows of very different scales per group, a few outliers, an all-positive and a constant group."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.logspace(-2, 1, shape[-1] // 64).repeat_interleave(64)
    x[..., 5] *= 30
    x[0, 0, :64] = x[0, 0, :64].abs() + 0.5  # the range does not contain 0
    x[0, 1, 64:128] = 0.25  # constant
    return x


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_log8_ranges_cover_each_group_and_cost_at_most_one_log_step(bits):
    x = outlier_rows()
    codes, row, log_scale, zero_code = quant.quantize_log8(x, bits, 64)
    scale, zero = quant.log8_decode(row, log_scale, zero_code, bits)
    qmax = (1 << bits) - 1
    # torch reference: each group's range widened to include 0 and a zero on the 1/255 grid
    groups = x.unflatten(-1, (-1, 64))
    low, high = groups.amin(-1).clamp(max=0), groups.amax(-1).clamp(min=0)
    need = (high - low) / qmax * 255 / 254
    s, z = scale.float(), zero.float()
    assert torch.all(s >= need * (1 - 1e-3))                               # u rounded to a larger scale
    assert torch.all(s <= need * 2 ** (1 / 16) * (1 + 1e-3) + 1e-7)        # by at most one step of 2^(1/16)
    span = s * qmax
    assert torch.all(z <= low + 1e-3 * span) and torch.all(z + span >= high - 1e-3 * span)  # never clipped
    assert torch.equal(row.float().squeeze(-1), s.amax(-1))                 # the row scale is the largest
    x_hat = quant.dequantize_codes(codes, scale, zero, 64)
    error = (x_hat - x).abs().unflatten(-1, (-1, 64))
    assert torch.all(error <= 0.5 * s.unsqueeze(-1) * (1 + 1e-3) + 1e-6)
    assert torch.equal(x_hat, quant.fake_quantize_as(x, bits, 64, "log8"))
    # against the fp16 format: the same error to within the coarser ranges, not the same values
    fp16 = quant.fake_quantize(x, bits, 64)
    ratio = (x_hat - x).square().mean() / (fp16 - x).square().mean()
    assert 1.0 < ratio < 1.25, ratio


def test_the_ops_are_the_quantizer_and_the_codes_follow_what_is_stored():
    x = outlier_rows((2, 3, 128), seed=1)
    compact = torch.ops.xq_compile.log8_encode(x, 3, 64)
    for got, expected in zip(compact, quant.log8_encode(x, 3, 64)):
        assert got.dtype == expected.dtype and torch.equal(got, expected)
    scale, zero = torch.ops.xq_compile.log8_decode(*compact, 3)
    assert scale.dtype == zero.dtype == torch.float16 and scale.shape == (2, 3, 2)
    codes = quant.quantize_log8(x, 3, 64)[0]
    assert torch.equal(codes, quant.codes_for(x, scale, zero, 3, 64))


@pytest.mark.parametrize("bits, codes_bytes", [(2, 144), (3, 216), (4, 288)])
def test_a_row_stores_20_bytes_of_scales_instead_of_36_at_hidden_576(bits, codes_bytes):
    model = tiny_llama(num_kv_heads=9, heads=9, hidden=576, num_layers=2)  # SmolLM2's width: 9 groups of 64
    batch, rows = 2, 24
    caches = {fmt: xq.XQuantCache(model.config, max_batch_size=batch, max_cache_len=rows,
                                  xquant=xq.XQuantConfig(bits=bits, group_size=64, scale_format=fmt))
              for fmt in ("fp16", "log8")}
    state = caches["log8"].layers[0].state
    assert {n: (tuple(t.shape), t.dtype) for n, t in state.items()} == {
        "codes": ((batch, rows, codes_bytes), torch.uint8), "scale_row": ((batch, rows, 1), torch.float16),
        "scale_log8": ((batch, rows, 9), torch.uint8), "zero_u8": ((batch, rows, 9), torch.uint8)}
    per_row = {fmt: sum(t.nbytes for t in c.layers[0].state.values()) // (batch * rows) for fmt, c in caches.items()}
    assert per_row == {"fp16": codes_bytes + 36, "log8": codes_bytes + 20}
    assert caches["fp16"].nbytes() - caches["log8"].nbytes() == 2 * batch * rows * 16
    for fmt, cache in caches.items():  # the formulas and the byte budget count what is allocated
        config = cache.xquant
        assert cache.nbytes() == memory_report(model.config, config, rows, batch).xquant.total_at
    assert memory_report(model.config, caches["log8"].xquant, rows).xquant.per_token == 2 * (codes_bytes + 20) + 8


def test_explain_counts_the_compact_bytes():
    model = tiny_llama(num_kv_heads=4)  # d 64: 4 groups of 16
    prompt = decode_inputs(batch=2, steps=0)[0]
    e = xq.explain(model, prompt, xquant=xq.XQuantConfig(bits=4, group_size=16, scale_format="log8"))
    assert [r.form for r in e.layers] == ["X (4-bit, log8 scales)"] * 2
    # 32 bytes of codes + an fp16 row scale + one byte of log scale and one of zero per group
    assert all(r.x_bytes_per_token == 32 + 2 + 2 * 4 for r in e.layers)


CONFIGS = {
    "x-4bit": xq.XQuantConfig(bits=4, group_size=16, scale_format="log8"),
    "cross-layer-3bit": xq.XQuantConfig(bits=3, group_size=16, cross_layer=True, base_layers=1,
                                        scale_format="log8"),
    "cross-layer-unquantized-base": xq.XQuantConfig(bits=2, group_size=16, cross_layer=True, base_layers=1,
                                                    base_bits=None, scale_format="log8"),
    "mixed-layer-bits": xq.XQuantConfig(layer_bits=(4, 2, 3), group_size=16, cross_layer=True, base_layers=1,
                                        scale_format="log8"),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_compiled_path_matches_the_simulation(name):
    config = CONFIGS[name]
    model, calls = tiny_llama(num_layers=3), decode_inputs(steps=4)
    backend = "xquant" if name == "x-4bit" else EAGER  # Inductor once: the ops inside generated code
    error, quantization, cache = errors_against_simulation(model, calls, config, backend)
    assert error < 2e-4 < quantization
    assert "zero_u8" in cache.layers[1].state and "scale" not in cache.layers[1].state
    # the format is in use: the fp16 format's simulation is another reference
    with simulate_xquant(model, dataclasses.replace(config, scale_format="fp16")):
        fp16 = reference_logits(model, calls, 32)
    with simulate_xquant(model, config):
        log8 = reference_logits(model, calls, 32)
    assert max_error(fp16, log8) > 10 * error


def test_exact_rows_and_the_device_length_rebuild():
    """recent/sink rows next to log8 rows (history-free model: the prefix simulation is exact), and
    rebuild="op" / "fused", where the dequantize-and-project / fused attention ops read the decoded fp16
    scales."""
    model = tiny_llama(num_layers=2)
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight.zero_()
    calls = decode_inputs(batch=2, prompt=6, steps=12)
    config = xq.XQuantConfig(bits=2, group_size=16, recent=4, sink=2, scale_format="log8")
    out, cache = compiled_run(model, calls, config, backend=EAGER)
    assert {"x_recent", "x_sink", "scale_row"} <= set(cache.layers[1].state)
    assert max_error(out, prefix_reference(model, calls, config)) < 2e-5
    plain = dataclasses.replace(config, recent=0, sink=0)
    for rebuild, op in (("op", "dequant_project"), ("fused", "decode_attention")):
        with collect_records() as records:
            out, _ = compiled_run(model, calls, plain, backend=xq.make_xquant_backend("aot_eager", rebuild=rebuild))
        code = records[-1].code_after
        assert op in code and "log8_decode" in code, rebuild
        assert max_error(out, prefix_reference(model, calls, plain)) < 2e-5, rebuild


@pytest.mark.parametrize("kwargs, message", [
    (dict(scale_format="log9"), r"scale_format='log9': use one of \('fp16', 'log8'\)"),
    (dict(bits=None, scale_format="log8"), "with bits=None there are none"),
    (dict(form="latent", scale_format="log8"), "applies to the X forms only"),
])
def test_bad_settings_say_what_to_do(kwargs, message):
    with pytest.raises(ValueError, match=message):
        xq.XQuantConfig(**kwargs)


def test_latent_forms_and_the_vllm_plugin_refuse_log8():
    model = tiny_llama(num_kv_heads=1)  # X (64) wider than K+V (32): the latent form
    config = xq.XQuantConfig(bits=4, group_size=16, scale_format="log8")
    with pytest.raises(ValueError, match="caches the GQA latents.*use scale_format='fp16', or form='x'"):
        xq.XQuantCache(model.config, max_batch_size=1, max_cache_len=16, xquant=config)
    cache = xq.XQuantCache(model.config, max_batch_size=1, max_cache_len=16,
                           xquant=dataclasses.replace(config, form="x"))
    assert cache.layers[0].form.describe() == "X (4-bit, log8 scales)"
    from xq_compile.vllm import check_servable
    with pytest.raises(NotImplementedError, match="scale_format='log8'"):
        check_servable(config)


def test_sliding_window_layers_keep_the_models_window_with_the_reason():
    config = tf.Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                            num_key_value_heads=4, max_position_embeddings=512, num_hidden_layers=2,
                            use_sliding_window=True, sliding_window=8, layer_types=["sliding_attention",
                                                                                     "full_attention"])
    model = random_model(config)
    xquant = xq.XQuantConfig(bits=2, group_size=16, scale_format="log8")
    cache = xq.XQuantCache(model.config, max_batch_size=1, max_cache_len=40, xquant=xquant)
    assert cache.layers[0].form.describe() == ("sliding-window layer (window 8): K/V kept in the model's own window "
                                               "cache (an X window keeps fp16 scales, not log8)")
    assert "scale_row" in cache.layers[1].state
    calls = decode_inputs(batch=1, steps=10)
    out, _ = compiled_run(model, calls, xquant, backend=EAGER, max_len=40)
    with simulate_xquant(model, xquant):
        simulated = reference_logits(model, calls, 40)
    assert max_error(out, simulated) < 2e-4


def test_eval_methods_take_the_log8_suffix():
    methods = parse_methods("xquant-auto:10x:log8,xquant-auto:12x:r16:s4:log8,xquant:3:log8:sim,xquant-cl:2:log8")
    assert [m.scale_format for m in methods] == ["log8"] * 4
    assert [m.label for m in methods] == ["xquant-auto:10x:log8", "xquant-auto:12x:r16:s4:log8",
                                          "xquant:3:log8:sim", "xquant-cl:2:log8"]
    assert methods[1].residual == 16 and methods[1].sink == 4 and methods[0].target_ratio == 10
    assert parse_methods("xquant:3")[0].scale_format == "fp16"
    for bad, message in (("kivi:2:log8", "apply to xquant"), ("xquant:3:latent:log8", "X forms only"),
                         ("xquant-auto:10x:log9", "':log8' only")):
        with pytest.raises(ValueError, match=message):
            parse_methods(bad)


def test_calibration_spends_the_freed_bytes_on_wider_codes():
    from xq_compile.calibration import calibrate

    model = tiny_llama(num_layers=4, hidden=128, heads=4, num_kv_heads=4)
    ids = torch.randint(0, 128, (64,), generator=torch.Generator().manual_seed(0))
    chosen = {}
    for fmt in ("fp16", "log8"):
        base = xq.XQuantConfig(bits=3, group_size=16, cross_layer=True, base_layers=1, scale_format=fmt)
        result = calibrate(model, ids, target_ratio=7.0, base=base, seq_len=64, progress=False,
                           return_details=True, rounds=1, probes=1)
        report = memory_report(model.config, result.config, 64)
        assert result.config.scale_format == fmt and report.ratio_to_fp16(report.xquant) >= 7.0
        chosen[fmt] = result.config.layer_bits
    assert sum(chosen["log8"]) > sum(chosen["fp16"]), chosen
