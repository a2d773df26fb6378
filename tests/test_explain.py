"""explain(), the `xq-compile explain` command, the TORCH_LOGS artifact, counters, custom pipelines."""

import importlib.util
import warnings
from pathlib import Path

import pytest
import torch
from transformers import StaticCache

import xq_compile as xq
from xq_compile import cli

from conftest import decode_inputs, max_error, reference_logits, tiny_llama
from xq_compile.cache import cache_kwargs

AOT_EAGER = xq.make_xquant_backend("aot_eager")
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_explain_reports_each_layer_form_bytes_and_both_graphs():
    model = tiny_llama(num_kv_heads=4)  # d 64, 4 KV heads of 16
    prompt = decode_inputs(batch=2, steps=0)[0]
    e = xq.explain(model, prompt, xquant=xq.XQuantConfig(bits=4, group_size=16))
    assert [g.name for g in e.graphs] == ["prefill", "decode"]
    # the bytes are those of a realistic cache; the run itself writes only the prompt and one decode step
    assert e.cache.max_cache_len == xq.explanation.DEFAULT_CACHE_LEN == 4096 and e.tokens_written == 7
    assert [(r.layer, r.status, r.form) for r in e.layers] == [(0, "rewritten", "X (4-bit)"), (1, "rewritten", "X (4-bit)")]
    # fp16 K+V: 2 x 4 heads x 16 x 2 bytes; X: 32 bytes of 4-bit codes + fp16 scale and zero per group of 16
    assert all(r.kv_bytes_per_token == 256 and r.x_bytes_per_token == r.x_bytes_per_token_limit == 32 + 2 * 4 * 2
               for r in e.layers)
    before, after = e.graphs[0].code_before, e.graphs[0].code_after
    assert "index_copy_" in before and "xq_layer0_codes" not in before
    assert "xq_layer0_codes" in after and "xq_layer1_codes" in after
    text = str(e)
    assert "| 0 | rewritten | X (4-bit) | 256 | 48 | 5.33x | 48 | 5.33x |" in text
    # total: 2 layers x 48 + the int64 position (8) + fixed bytes (placeholders, counters, 16x16 fp32
    # Hadamard block: 2 x 16 + 1024) spread over 2 sequences x 4096 tokens
    assert e.bytes_per_token == (512, 104 + 1056 / (2 * 4096)) and e.bytes_per_token_limit == (512, 104)
    assert "all layers at 4096 tokens: 512 -> 104.1 bytes per token (4.92x smaller;" in text
    assert "===== decode graph after the xquant rewrite =====" in text


def test_explain_latent_bytes_are_measured_and_agree_with_memory_report():
    """The GQA latent form has a small fixed cost per layer (the open key group's low code bits) and
    per-group key scale/zero: explain() reports both the bytes at its capacity (measured) and the rate as
    n grows (memory_report), and they agree."""
    model = tiny_llama(num_kv_heads=1)  # X 64 wide, K+V 2 x 16: latent form, r = 16
    prompt = decode_inputs(batch=2, steps=0)[0]
    config = xq.XQuantConfig(bits=4, group_size=16)
    e = xq.explain(model, prompt, xquant=config)
    assert all(r.form.startswith("GQA latent") for r in e.layers)
    # per layer and sequence: value latent 8 B codes + 4 B scale/zero per token; key latent in
    # ceil(4096/16) groups of 16 rows x 8 B codes + 16 channels x fp16 scale/zero; the open group's low
    # code bits: 16 rows x 16 channels x 4 bits
    layer_bytes = 4096 * 12 + 256 * (16 * 8 + 4 * 16) + 16 * 16 // 2
    assert [r.x_bytes_per_token for r in e.layers] == [layer_bytes / 4096] * 2
    assert [r.x_bytes_per_token_limit for r in e.layers] == [24, 24]  # 12 B value + 8 B key codes + 4 B key groups
    report = xq.memory_report(model.config, config, 4096, batch=2)
    assert e.memory.xquant.total_at == report.xquant.total_at
    assert [r.x_bytes_per_token for r in e.layers] == [m.per_token_at for m in report.xquant_layers]
    assert [r.x_bytes_per_token_limit for r in e.layers] == [float(m.per_token) for m in report.xquant_layers]
    measured = e.cache.nbytes() / (2 * 4096)
    assert e.bytes_per_token == (128, measured) and measured == report.xquant.per_token_at
    assert e.bytes_per_token_limit == (128, 56) and float(report.xquant.per_token) == 56
    table = e.ratio_by_capacity()
    assert [n for n, _, _ in table] == [128, 512, 2048, 4096, 32768]
    assert table[3] == (4096, measured, 128 / measured)
    assert [round(r, 2) for _, _, r in table] == [2.06, 2.22, 2.27, 2.28, 2.28]  # rising towards 128 / 56 = 2.29
    text = e.report()
    assert "| 0 | rewritten | GQA latent" in text and "| 64 | 24.0 | 2.66x | 24 | 2.67x |" in text
    assert "all layers as n -> inf: 128 -> 56 bytes per token (2.29x smaller;" in text
    assert "| fp16/X | 2.06x | 2.22x | 2.27x | 2.28x | 2.28x | 2.29x |" in text

    # a cache of a few dozen tokens: the fixed bytes no longer dominate, it is smaller than fp16 K/V
    # (prefill only: faster)
    short = xq.explain(model, prompt, xquant=config, max_cache_len=24, decode_steps=0)
    measured = short.cache.nbytes() / (2 * 24)
    assert short.bytes_per_token == (128, measured) == (128, xq.memory_report(model.config, config, 24, 2).xquant.per_token_at)
    assert short.bytes_per_token_limit == (128, 56)  # the rate does not depend on the capacity
    assert measured < 128
    assert (f"all layers at 24 tokens: 128 -> {measured:.1f} bytes per token ({128 / measured:.2f}x smaller;"
            in short.report())
    assert [n for n, _, _ in short.ratio_by_capacity()] == [24, 128, 512, 2048, 4096, 32768]
    with pytest.raises(ValueError, match=r"explain\(\) needs max_cache_len >= 7 \(the prompt's 6 tokens "
                                         r"\+ decode_steps=1\), got 6: pass a larger max_cache_len"):
        xq.explain(model, prompt, xquant=config, max_cache_len=6)


def test_explain_unquantized_runs_the_model_unchanged():
    model = tiny_llama(num_kv_heads=2)
    calls = decode_inputs(batch=2, steps=0)
    e = xq.explain(model, calls[0], xquant=xq.XQuantConfig(bits=None, group_size=16), decode_steps=0)
    assert [g.name for g in e.graphs] == ["prefill"]
    assert max_error(e.logits, reference_logits(model, calls, 8)) < 1e-4


def test_explain_with_another_cache_says_why_each_site_is_skipped():
    model = tiny_llama(num_kv_heads=2)
    with pytest.warns(UserWarning, match="not an XQuantCache"):
        e = xq.explain(model, decode_inputs(steps=0)[0], cache=StaticCache(config=model.config, max_cache_len=16))
    assert [r.status for r in e.layers] == ["skipped", "skipped"]
    assert all("not an XQuantCache" in r.reason and r.x_bytes_per_token is None for r in e.layers)
    # a StaticCache allocates itself inside the prefill graph, so the two graphs give different reasons
    assert "| 1 | skipped | prefill: the K/V cache tensors are not graph inputs (a cache allocated lazily" \
           in e.report()
    assert "decode: the cache is not an XQuantCache" in e.report()
    assert "0/2 layers rewritten" in e.report()


def test_explain_writes_readable_files(tmp_path):
    model = tiny_llama(num_kv_heads=4)
    e = xq.explain(model, decode_inputs(steps=0)[0], xquant=xq.XQuantConfig(bits=3, group_size=16))
    paths = e.write(tmp_path / "out")
    assert [p.name for p in paths] == ["before.py", "after.py", "report.md"]
    for p in paths[:2]:
        text = p.read_text()
        compile(text, str(p), "exec")  # valid Python
        assert "# ===== prefill graph =====" in text and "# ===== decode graph =====" in text
    assert "X (3-bit)" in paths[2].read_text()


class _Tokenizer:
    """Just enough of a tokenizer for the CLI: fixed ids, whatever the text."""

    pad_token = eos_token = "<eos>"
    padding_side = "right"

    def __call__(self, text, return_tensors="pt", padding=False):
        return {"input_ids": torch.tensor([[5, 17, 3, 99, 42]]), "attention_mask": torch.ones(1, 5, dtype=torch.long)}


def test_cli_explain_prints_the_table_and_writes_files(monkeypatch, tmp_path, capsys):
    model = tiny_llama(num_kv_heads=4)
    monkeypatch.setattr(xq.models, "load_model", lambda name, dtype=torch.float32: (model, _Tokenizer()))
    cli.main(["explain", "--model", "tiny", "--bits", "4", "--group-size", "16", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "| 1 | rewritten | X (4-bit) |" in out and "wrote" in out
    assert "max_cache_len=4096, batch=1); the explained run wrote 6 of its 4096 token rows" in out
    assert {p.name for p in tmp_path.iterdir()} == {"before.py", "after.py", "report.md"}
    cli.main(["explain", "--model", "tiny", "--group-size", "16", "--max-cache-len", "100", "--decode-steps", "0"])
    out = capsys.readouterr().out
    assert "max_cache_len=100, batch=1)" in out and "| X state at 100 tokens (measured) |" in out
    assert "| tokens | 100 | 128 | 512 | 2048 | 4096 | 32768 | n -> inf |" in out


def test_torch_logs_artifact_shows_the_site_reports(capfd):
    model = tiny_llama(num_kv_heads=2)
    cache = xq.XQuantCache(model.config, max_batch_size=2, max_cache_len=8, xquant=xq.XQuantConfig(group_size=16))
    forward = torch.compile(model.forward, backend=AOT_EAGER, fullgraph=True)
    torch._logging.set_logs(modules={"xquant": True})
    try:
        with torch.no_grad():
            forward(**decode_inputs(steps=0)[0], **cache_kwargs(forward, cache), use_cache=True)
    finally:
        torch._logging.set_logs()  # back to the default (nothing logged)
    err = capfd.readouterr().err
    assert "[__xquant] xquant: 2 site(s) rewritten, 0 skipped" in err
    assert "layer 1: rewritten (X (4-bit))" in err
    assert "===== graph after the xquant rewrite =====" in err and "xq_layer1_codes" in err


def test_artifact_is_silent_unless_enabled(capfd):
    model = tiny_llama(num_kv_heads=2)
    cache = xq.XQuantCache(model.config, max_batch_size=2, max_cache_len=8, xquant=xq.XQuantConfig(group_size=16))
    with torch.no_grad():
        torch.compile(model.forward, backend=AOT_EAGER, fullgraph=True)(**decode_inputs(steps=0)[0], **cache_kwargs(model, cache))
    assert "__xquant" not in capfd.readouterr().err


def test_counters_count_rewritten_and_skipped_sites_per_compile():
    counters = torch._dynamo.utils.counters
    counters.clear()
    model = tiny_llama(num_kv_heads=2)  # 2 layers
    calls = decode_inputs(steps=3)
    cache = xq.XQuantCache(model.config, max_batch_size=2, max_cache_len=16, xquant=xq.XQuantConfig(group_size=16))
    forward = torch.compile(model.forward, backend=AOT_EAGER, fullgraph=True)
    with torch.no_grad():
        for c in calls:
            forward(**c, **cache_kwargs(forward, cache), use_cache=True)
    # two graphs (prefill, decode), each with two rewritten sites; decode steps reuse the graph
    assert counters["xquant"]["graphs"] == 2
    assert counters["xquant"]["sites_rewritten"] == 4 and counters["xquant"]["sites_skipped"] == 0
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        forward = torch.compile(model.forward, backend=AOT_EAGER, fullgraph=True)
        with torch.no_grad():
            forward(**calls[0], **cache_kwargs(forward, StaticCache(config=model.config, max_cache_len=16)), use_cache=True)
    assert counters["xquant"]["sites_skipped"] == 2 and counters["xquant"]["sites_rewritten"] == 4


def _load_example(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_custom_pipeline_example_composes_the_rewrite_with_a_user_pass():
    example = _load_example("custom_pipeline")
    error, stats = example.main(bits=None)  # unquantized X: must reproduce the unmodified model
    assert error < 1e-4
    # prefill + decode graph, 2 layers each: the XQuant rewrite and the user's silu pass both ran
    assert stats == {"sites_rewritten": 4, "silu_replaced": 4}


def test_make_xquant_backend_accepts_any_callable_inner_compiler():
    seen = []

    def inner(gm, example_inputs):
        seen.append([n.name for n in gm.graph.nodes if n.op == "placeholder" and n.name.startswith("xq_")])
        return gm.forward  # run the rewritten graph as is

    model = tiny_llama(num_kv_heads=2)
    calls = decode_inputs(steps=2)
    cache = xq.XQuantCache(model.config, max_batch_size=2, max_cache_len=16,
                           xquant=xq.XQuantConfig(bits=None, group_size=16))
    forward = torch.compile(model.forward, backend=xq.make_xquant_backend(inner), fullgraph=True)
    with torch.no_grad():
        out = [forward(**c, **cache_kwargs(forward, cache), use_cache=True).logits for c in calls]
    assert max_error(out, reference_logits(model, calls, 16)) < 1e-4
    assert len(seen) == 2 and "xq_layer0_x" in seen[0]
