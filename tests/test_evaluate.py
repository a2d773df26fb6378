"""xq_compile.evaluate: the real compiled path against the simulation, KIVI*, method parsing, the CLI."""

import json
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import xq_compile as xq
from xq_compile import evaluate as ev
from xq_compile.kivi import fake_quantize_keys, simulate_kivi
from xq_compile.simulate import simulate_xquant


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=101, hidden_size=128, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256)
    return LlamaForCausalLM(config).eval()


class CharTokenizer:
    """One token per character: enough for run_eval, which only asks for input_ids."""

    def __call__(self, text, return_tensors):
        return type("Batch", (), {"input_ids": torch.tensor([[ord(c) % 101 for c in text]])})()


def _windows(n=2, length=64, seed=1):
    ids = torch.randint(0, 101, (n * length,), generator=torch.Generator().manual_seed(seed))
    return ev.text_windows(ids, n, length)


@pytest.mark.parametrize("bits,rotation", [(8, "none"), (4, "hadamard"), (2, "hadamard"), (3, "none")])
def test_real_path_matches_simulation(tiny, bits, rotation):
    """Compiled prefill + decode from the packed X cache == one eager pass under simulate_xquant."""
    cfg = xq.XQuantConfig(bits=bits, group_size=64, rotation=rotation)
    windows = _windows()
    real_nll, real_n, held = ev.eval_xquant_real(tiny, windows, cfg, prefill=16, step=8)
    sim_nll, sim_n = ev.eval_simulated(tiny, windows, lambda: simulate_xquant(tiny, cfg))
    assert real_n == sim_n == 2 * 63
    assert math.exp(real_nll / real_n) == pytest.approx(math.exp(sim_nll / sim_n), rel=5e-3)
    assert held == xq.memory.memory_report(tiny.config, cfg, 64).xquant.total_at
    # Logits, position by position (prefill and decode chunks alike).
    cache = xq.XQuantCache(tiny.config, 1, 64, xquant=cfg)
    forward = ev.compile_xquant(tiny)
    with torch.no_grad():
        real = ev.teacher_forced_logits(forward, windows[1], cache, 16, 8)
    with torch.no_grad(), simulate_xquant(tiny, cfg):
        sim = tiny(windows[1]).logits
    torch.testing.assert_close(real, sim, atol=1e-4, rtol=1e-4)


def test_cache_reset_between_windows(tiny):
    """Reusing one compiled forward and one cache across windows: reset() gives a fresh-cache result."""
    cfg = xq.XQuantConfig(bits=4, group_size=64)
    a, b = _windows(seed=3)
    forward = ev.compile_xquant(tiny)
    cache = xq.XQuantCache(tiny.config, 1, 64, xquant=cfg)
    with torch.no_grad():
        first_b = ev.teacher_forced_logits(forward, b, cache, 16, 8)
        cache.reset()
        ev.teacher_forced_logits(forward, a, cache, 16, 8)
        cache.reset()
        again_b = ev.teacher_forced_logits(forward, b, cache, 16, 8)
        fresh = xq.XQuantCache(tiny.config, 1, 64, xquant=cfg)
        fresh_b = ev.teacher_forced_logits(forward, b, fresh, 16, 8)
    assert torch.equal(first_b, again_b) and torch.equal(first_b, fresh_b)
    with pytest.raises(ValueError, match="overflow"):  # no reset: the window does not fit any more
        with torch.no_grad():
            ev.teacher_forced_logits(forward, b, fresh, 16, 8)


def test_fp16_loop_matches_one_pass(tiny):
    """The chunked StaticCache loop scores like one full-window forward (the loop itself is exact)."""
    windows = _windows()
    nll, n, held = ev.eval_fp16(tiny, windows, prefill=16, step=8)
    ref_nll, ref_n = ev.eval_simulated(tiny, windows, __import__("contextlib").nullcontext)
    assert n == ref_n and nll == pytest.approx(ref_nll, rel=1e-5)
    assert held == 2 * 2 * 64 * 128 * 4  # fp32 K and V of 2 layers, 64 tokens, 128 channels


def test_kivi_keys_per_channel_with_partial_group():
    torch.manual_seed(0)
    k = torch.randn(1, 70, 8)
    k[..., 3] *= 100  # an outlier channel must not hurt the others: each channel has its own scale
    q = fake_quantize_keys(k, 4, 32)
    assert q.shape == k.shape
    for start, stop in ((0, 32), (32, 64), (64, 70)):  # last group: the 6 remaining tokens on their own
        for c in range(8):
            seg = k[0, start:stop, c]
            step = (seg.max() - seg.min()) / 15
            assert (q[0, start:stop, c] - seg).abs().max() <= step / 2 + 1e-2 * step + 1e-6
    assert (q - k)[..., [0, 1, 2]].abs().max() < 0.5


def test_kivi_simulation_hooks(tiny):
    ids = _windows(1)[0]
    with torch.no_grad():
        ref = tiny(ids).logits
        with simulate_kivi(tiny, 8, 32):
            out8 = tiny(ids).logits
        with simulate_kivi(tiny, 2, 32):
            out2 = tiny(ids).logits
        after = tiny(ids).logits
    assert torch.equal(after, ref)  # hooks removed
    assert (out8 - ref).abs().max() < (out2 - ref).abs().max()


def test_parse_methods():
    ms = ev.parse_methods(ev.DEFAULT_METHODS + ",xquant:3:sim,xquant:4:norot")
    assert [m.label for m in ms][-3:] == ["xquant:2", "xquant:3:sim", "xquant:4:norot"]
    assert ms[1] == ev.Method("kivi", 4, simulated=True)
    cl = ev.parse_methods("xquant-cl:3:base1")[0]
    assert cl == ev.Method("xquant-cl", 3, base_layers=1) and cl.label == "xquant-cl:3:base1"
    for bad in ("foo:4", "xquant", "fp16:4", "hf-quanto:3", "kivi:4:sim", "xquant:5", "xquant:3:base1"):
        with pytest.raises(ValueError):
            ev.parse_methods(bad)
    with pytest.raises(ValueError, match="multiple"):
        ev.chunks(100, 64, 8)


def test_run_eval_and_outputs(tiny, tmp_path):
    """The whole table on the tiny model with a fake tokenizer; a failing method is recorded, not faked."""

    text = "".join(chr(32 + (i * 7919) % 90) for i in range(200))
    methods = ev.parse_methods("fp16,kivi:4,xquant:8,xquant:8:sim,hf-quanto:4")
    results = ev.run_eval(tiny, CharTokenizer(), text, methods, n_windows=2, window_len=64, group_size=64,
                          prefill=16, step=8, quanto_residual=16)
    by = {r.method: r for r in results}
    assert by["fp16"].change_vs_fp16 == 0 and by["fp16"].ratio_to_fp16_kv == 1
    assert abs(by["xquant:8"].change_vs_fp16) < 0.01
    assert by["xquant:8"].perplexity == pytest.approx(by["xquant:8:sim"].perplexity, rel=1e-3)
    assert by["xquant:8"].bytes_source == "measured" and by["kivi:4"].bytes_source == "formula"
    paths = ev.write_outputs(results, tmp_path, {"model": "tiny", "text": "t", "windows": 2, "window_len": 64,
                                                 "group_size": 64, "prefill": 16, "step": 8})
    data = json.loads(paths["json"].read_text())
    assert [r["method"] for r in data["results"]] == [m.label for m in methods]
    assert "| xquant:8 | real |" in paths["md"].read_text()
    assert paths["png"].stat().st_size > 1000


def test_hybrid_model_ratio_is_against_its_own_cache():
    """A sliding-window layer's cache holds only its window, in transformers' StaticCache (the fp16 row) as in
    the XQuantCache: the baseline counts it so, not at the full window length."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         use_sliding_window=True, sliding_window=8, layer_types=["sliding_attention", "full_attention"] * 2)
    model = Qwen2ForCausalLM(config).eval()
    text = "".join(chr(32 + (i * 7919) % 90) for i in range(200))
    results = ev.run_eval(model, CharTokenizer(), text, ev.parse_methods("fp16,xquant:4:sim,kivi:4"), n_windows=2,
                          window_len=64, group_size=16, prefill=16, step=8)
    fp16, xquant, kivi = results
    # fp16 K+V of 2 heads x 16: 128 B a token per layer; the full layers hold 64 rows, the sliding ones 8
    assert fp16.bytes_per_token == (2 * 128 * 64 + 2 * 128 * 8) / 64 == 288  # was 512: every layer at 64 rows
    # the fp32 StaticCache the fp16 row ran with holds twice that, measured
    assert "StaticCache held 576 B/token (measured)" in fp16.note and "2 sliding-window layers" in fp16.note
    cache = xq.XQuantCache(config, max_batch_size=1, max_cache_len=64, xquant=xq.XQuantConfig(bits=4, group_size=16))
    assert xquant.bytes_per_token == cache.nbytes() / 64
    assert xquant.ratio_to_fp16_kv == 288 / xquant.bytes_per_token
    assert kivi.mode == "failed" and "sliding-window layers" in kivi.note


def test_cli_registers_eval():
    import argparse

    from xq_compile import cli

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    for add in cli.SUBCOMMANDS:
        add(sub)
    args = parser.parse_args(["eval", "--methods", "fp16,xquant:4", "--windows", "2"])
    assert args.func is ev.eval_command and args.window_len == 512 and args.windows == 2
    assert args.calib_text is None and args.calib_tokens == 512
    args = parser.parse_args(["eval", "--window-tokens", "2048", "--calib-text", "hamlet"])
    assert args.window_len == 2048 and args.calib_text == "hamlet"
    assert parser.parse_args(["eval", "--window-len", "1024"]).window_len == 1024


def test_kivi_window_cache_holds_what_kivi_holds():
    """Per step, the rows KIVI has quantized (keys R at a time, values older than R) and only those."""
    from xq_compile.kivi import KIVILayer, fake_quantize_values

    g = torch.Generator().manual_seed(0)
    keys, values = torch.randn(1, 2, 40, 8, generator=g), torch.randn(1, 2, 40, 8, generator=g)
    layer, r, start = KIVILayer(bits=2, group_size=4, residual=8), 8, 0
    for length in (11, 1, 1, 3, 4, 8, 1, 11):  # a prefill of 11, then decode chunks; 40 rows in all
        k, v = layer.update(keys[..., start:start + length, :], values[..., start:start + length, :])
        flushed_k = start // r * r  # keys: whole blocks of R flushed before this call
        flushed_v = max(start - r, 0)  # values: all but the R most recent rows before this call
        start += length
        assert torch.equal(k[..., flushed_k:start, :], keys[..., flushed_k:start, :])
        assert torch.equal(v[..., flushed_v:start, :], values[..., flushed_v:start, :])
        if flushed_k:
            torch.testing.assert_close(k[..., :flushed_k, :], fake_quantize_keys(keys[..., :flushed_k, :], 2, 4))
        if flushed_v:
            torch.testing.assert_close(v[..., :flushed_v, :], fake_quantize_values(values[..., :flushed_v, :], 2, 4))
    assert (layer.quantized_keys, layer.quantized_values) == (24, 21)
    assert not torch.equal(k[..., :24, :], keys[..., :24, :])  # 2-bit codes really changed them


def test_kivi_window_exact_when_it_holds_the_whole_window(tiny):
    """R >= the window length: nothing is ever quantized, the loop scores exactly like the fp16 model."""
    windows = _windows()
    nll, n = ev.eval_kivi_window(tiny, windows, bits=2, group_size=32, residual=64, prefill=16, step=8)
    ref_nll, ref_n, _ = ev.eval_fp16(tiny, windows, prefill=16, step=8)
    assert n == ref_n and nll == pytest.approx(ref_nll, rel=1e-6)
    small_nll, _ = ev.eval_kivi_window(tiny, windows, bits=2, group_size=32, residual=32, prefill=16, step=8)
    assert abs(small_nll - ref_nll) > 1e-5 * ref_nll  # a shorter window quantizes: 100x the rounding above
    with pytest.raises(ValueError, match="KIVI's residual window \\(48 tokens\\) must be a positive multiple "
                                         "of the group size 32 or shorter than it"):
        ev.KIVICache(tiny.config, 2, 32, 48)


def test_kivi_bytes_formula():
    """Hand count: max(n-R, 0) quantized rows (keys' partial group pays a full scale+zero), min(n, R)
    fp16 rows of K and V; R = 0 is memory_report's KIVI*."""
    config = LlamaConfig(hidden_size=256, num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=8)
    kv, layers = 256, 3
    for n, r in ((20, 32), (32, 32), (100, 32), (512, 128), (77, 0)):
        q, key_group = max(n - r, 0), min(64, r) if r else 64  # R = 32 < 64: keys in groups of 32 tokens
        expected = layers * (2 * kv * q * 2 // 8 + 4 * kv * -(-q // key_group) + 4 * (kv // 64) * q
                             + 4 * kv * min(n, r))
        assert xq.memory.kivi_memory(config, 2, 64, n, residual=r).total_at == expected
    assert (xq.memory.kivi_memory(config, 4, 64, 77).total_at
            == xq.memory_report(config, xq.XQuantConfig(bits=4), 77).kivi_kv.total_at)
    # R rows at fp16 instead of 2-bit: the window costs (16 - 2 - 0.5) / 16 of R fp16 K/V rows more
    with_window = xq.memory.kivi_memory(config, 2, 64, 512, residual=128).total_at
    without = xq.memory.kivi_memory(config, 2, 64, 512).total_at
    assert with_window - without == layers * 128 * (4 * kv - 2 * kv * 2 // 8 - 2 * 4 * kv // 64)


def test_parse_kivi_window_and_auto_methods():
    ms = ev.parse_methods("kivi:2:r32,kivi:2:r128,xquant-auto:10x,xquant-auto:9.5x:sim:base2")
    assert [m.label for m in ms] == ["kivi:2:r32", "kivi:2:r128", "xquant-auto:10x", "xquant-auto:9.5x:base2:sim"]
    assert ms[0] == ev.Method("kivi", 2, simulated=True, residual=32)
    assert ms[3] == ev.Method("xquant-auto", simulated=True, target_ratio=9.5, base_layers=2)
    windowed = ev.parse_methods("xquant-auto:10x:r32:s4")[0]
    assert (windowed.label, windowed.residual, windowed.sink) == ("xquant-auto:10x:r32:s4", 32, 4)
    for bad in ("kivi:2:r0", "xquant:4:r32:sim", "kivi:2:r32:sim", "kivi:2:s4", "xquant:2:r8:r16", "hf-quanto:2:s4",
                "xquant-auto:10", "xquant-auto:1x", "xquant-auto:10x:norot", "xquant-auto",
                "xquant-auto:10x:r32:sim", "xquant-auto:10x:r8:r16"):
        with pytest.raises(ValueError):
            ev.parse_methods(bad)


def test_parse_xquant_exact_rows():
    """xquant:B:rR:sS is XQuantConfig(recent=R, sink=S); the sink alone may be simulated (its rows do not move)."""
    ms = ev.parse_methods("xquant:2:r128:s4,xquant-cl:3:base1:r32,xquant:2:s4:sim")
    assert [m.label for m in ms] == ["xquant:2:r128:s4", "xquant-cl:3:base1:r32", "xquant:2:s4:sim"]
    assert (ms[0].residual, ms[0].sink, ms[1].residual, ms[1].sink, ms[2].sink) == (128, 4, 32, 0, 4)
    with pytest.raises(ValueError, match="no :sim with :rR"):
        ev.parse_methods("xquant:2:r128:s4:sim")


def test_auto_method_calibrates_on_held_out_tokens(tiny):
    """xquant-auto: layer_bits calibrated on other tokens than the scored ones, meeting the ratio at the
    window length; the note says what was chosen."""

    text = "".join(chr(32 + (i * 7919) % 90) for i in range(300))
    ids, where = ev.calibration_ids(CharTokenizer(), text, n_windows=2, window_len=64, calib_tokens=100)
    assert where == "tokens 128-228 of the text"
    assert torch.equal(ids, CharTokenizer()(text, "pt").input_ids[0, 128:228])
    with pytest.raises(ValueError, match="the calibration text has 300 tokens, fewer than the 400 needed"):
        ev.calibration_ids(CharTokenizer(), text, 2, 64, calib_text=text, calib_tokens=400)
    # 2 layers, d 128, g 64, 64 tokens: rows of 72/56/40 B at 4/3/2 bits + 8 for the position, 16 KiB fixed
    # (the Hadamard block); fp16 K/V 64 KiB. 2.8x needs a 2-bit layer: 3+2 bits 2.84x, 4+3 bits 2.61x.
    results = ev.run_eval(tiny, CharTokenizer(), text,
                          ev.parse_methods("xquant-auto:2.8x:sim,xquant-cl:3:base1:sim"), n_windows=2, window_len=64, group_size=64, prefill=16, step=8, calib_ids=ids)
    auto, uniform = results
    assert auto.mode == "simulated", auto.note
    assert auto.ratio_to_fp16_kv >= 2.8 > uniform.ratio_to_fp16_kv
    assert "calibrated on 100 tokens" in auto.note and "layer_bits " in auto.note
    # With 4 exact sink rows (fp16: 1 KiB per layer) the widths pay for the window: at 2.5x 4+4 bits fit
    # without it (2.51x), with it at most 3+3 (2.51x; 4+3 would be 2.42x).
    plain, _ = ev.calibrated_config(tiny, ev.parse_methods("xquant-auto:2.5x:sim")[0], ids, 64, 64)
    windowed, _ = ev.calibrated_config(tiny, ev.parse_methods("xquant-auto:2.5x:s4:sim")[0], ids, 64, 64)
    report = xq.memory_report(tiny.config, windowed, 64)
    assert windowed.sink == 4 and report.ratio_to_fp16(report.xquant) >= 2.5
    assert plain.layer_bits == (4, 4) and sum(windowed.layer_bits) <= 6


# ---------------------------------------------------------------------------------------------- real model


@pytest.mark.real_model
def test_real_model_short_eval():
    """SmolLM2 (MHA), one 512-token window: 8-bit XQuant ~ lossless, 4-bit + rotation within 4%."""
    try:
        model, tok = xq.models.load_smollm2("mha")
        text = xq.models.load_text("britannica")
    except xq.models.MissingResourceError as err:
        pytest.skip(str(err))
    results = ev.run_eval(model, tok, text, ev.parse_methods("fp16,xquant:8:sim,xquant:4,xquant:4:sim"),
                          n_windows=1, window_len=512, prefill=64, step=8)
    by = {r.method: r for r in results}
    assert all(r.mode != "failed" for r in results), [r.note for r in results]
    assert abs(by["xquant:8:sim"].change_vs_fp16) < 0.005  # simulated: one compile keeps the test short
    assert 0 < by["xquant:4"].change_vs_fp16 < 0.04  # measured +3.1% real, +2.5% simulated on this window
    # The compiled chunked path and the eager one-pass reference compute X with different kernels; the
    # last-ulp differences flip a few codes at rounding edges, and over 30 layers that moves one window's
    # perplexity by up to ~0.6% (over 6 windows the two differ by 0.15%). Exact agreement of the two paths
    # is asserted on the tiny model above (logits within 1e-4).
    assert by["xquant:4"].perplexity == pytest.approx(by["xquant:4:sim"].perplexity, rel=1e-2)
    assert by["xquant:4"].ratio_to_fp16_kv > 7.0  # measured bytes at 512 tokens, fixed overhead included
