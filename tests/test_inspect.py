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
    assert [(r.layer, r.status, r.form) for r in e.layers] == [(0, "rewritten", "X (4-bit)"), (1, "rewritten", "X (4-bit)")]
    # fp16 K+V: 2 x 4 heads x 16 x 2 bytes; X: 32 bytes of 4-bit codes + fp16 scale and zero per group of 16
    assert all(r.kv_bytes_per_token == 256 and r.x_bytes_per_token == 32 + 2 * 4 * 2 for r in e.layers)
    before, after = e.graphs[0].code_before, e.graphs[0].code_after
    assert "index_copy_" in before and "xq_layer0_codes" not in before
    assert "xq_layer0_codes" in after and "xq_layer1_codes" in after
    text = str(e)
    assert "| 0 | rewritten | X (4-bit) | 256 | 48 | 5.33x |" in text
    assert "===== decode graph after the xquant rewrite =====" in text


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
    assert {p.name for p in tmp_path.iterdir()} == {"before.py", "after.py", "report.md"}


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
