"""RoPE computed in the fused decode-attention kernel from the cached rows' positions.

Where the keys' cos/sin tables are transformers' default rotary embedding (``passes/rope.py``
``default_rope``), the fused op (``rebuild="fused"``: what CUDA decode steps run, here through the op's
CPU kernel) gets the positions, the model's inv_freq buffer and attention_scaling instead of the tables;
anything else keeps the tables. Checked here:

* the matcher on the graphs Dynamo records for tiny Llama, Qwen2 and Mistral models, in both forms
  transformers writes the rotary forward (the broadcast product of 5.19+, and the matmul of 5.17, from a
  copy of 5.17's forward), and on variants it must refuse, each with its reason;
* the compiled model: the same logits, bit for bit, as the same fused op fed the model's own tables; at 4
  bits close to ``simulate_xquant``; a wrong inv_freq handed to the kernel changes the logits;
* the Triton kernels under the interpreter: cos/sin computed from the positions against the tables of
  transformers' own rotary module (YaRN: attention_scaling != 1).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import operator
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as tf

import xq_compile as xq
from xq_compile.passes import attend
from xq_compile.passes.attend import plain_rope
from xq_compile.passes.match import find_sites
from xq_compile.passes.rope import DefaultRope, default_rope

from conftest import compiled_run, decode_inputs, errors_against_simulation, max_error, run_calls

ROOT = Path(__file__).resolve().parents[1]
HAS_TRITON = importlib.util.find_spec("triton") is not None
FUSED = xq.make_xquant_backend("aot_eager", rebuild="fused")
COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512)
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 128}
FAMILIES = {
    "llama": lambda rope=None: tf.LlamaConfig(**COMMON, rope_parameters=rope),
    "qwen2": lambda rope=None: tf.Qwen2Config(**COMMON, rope_parameters=rope),
    "mistral": lambda rope=None: tf.MistralConfig(**COMMON, sliding_window=None, rope_parameters=rope),
}


def tiny_model(config, adjust) -> torch.nn.Module:
    """A random model of ``config`` (seed 0, SDPA), ``adjust(name, parameter)`` applied to every parameter."""
    torch.manual_seed(0)
    config._attn_implementation = "sdpa"
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            adjust(name, p)
    return model


def build(family: str = "llama", rope: dict | None = None):
    """A tiny random model whose q/k projections are scaled up, so that a RoPE error moves the logits."""
    return tiny_model(FAMILIES[family](rope), lambda name, p: p.mul_(4) if "k_proj" in name or "q_proj" in name
                      else None)


def matched(model) -> list:
    """``default_rope`` of every site in the decode graph Dynamo records for ``model`` (a StaticCache)."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.compiler.reset()
    cache = tf.StaticCache(config=model.config, max_cache_len=16)
    run_calls(torch.compile(model.forward, backend=capture, fullgraph=True), cache, decode_inputs(steps=1))
    sites, _ = find_sites(graphs[-1].graph)
    assert len(sites) == model.config.num_hidden_layers
    return [default_rope(*plain_rope(site), site.position_source, site.head_dim) for site in sites]


def _rotary_forward_5_17(self, x, position_ids):
    """LlamaRotaryEmbedding.forward as transformers 5.17 writes it (the matmul form; 5.19 on: a product)."""
    inv_freq_expanded = (
        self.inv_freq[None, :, None].expand(position_ids.shape[0], -1, 1).to(dtype=torch.float, device=x.device)
    )
    position_ids_expanded = position_ids[:, None, :].float()
    with torch.autocast(device_type=x.device.type, enabled=False):
        freqs = (inv_freq_expanded @ position_ids_expanded).transpose(1, 2)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
    return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def _rotary_forward_positions_halved(self, x, position_ids):
    """A custom RoPE: positions scaled inside the forward (DeepSeek-V1's linear scaling is written so)."""
    freqs = (position_ids.float() / 2)[..., None] * self.inv_freq.to(device=x.device, dtype=torch.float)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype=x.dtype), emb.sin().to(dtype=x.dtype)


def _rotary_forward_interleaved(self, x, position_ids):
    """A custom RoPE layout: each frequency repeated in place (GPT-J's pairs) instead of two halves."""
    freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
    emb = freqs.repeat_interleave(2, dim=-1)
    return emb.cos().to(dtype=x.dtype), emb.sin().to(dtype=x.dtype)


ROTARY = tf.models.llama.modeling_llama.LlamaRotaryEmbedding


def _matmul_form(monkeypatch):
    """The 5.17 forward, unless the installed transformers writes it so already."""
    if "inv_freq_expanded @" not in inspect.getsource(ROTARY.forward):
        monkeypatch.setattr(ROTARY, "forward", _rotary_forward_5_17)


# --------------------------------------------------------------------------------------------------
# The matcher
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_default_rotary_embedding_is_matched(family):
    model = build(family)
    for found in matched(model):
        assert isinstance(found, DefaultRope), found
        assert found.positions.op == "placeholder" and "position_ids" in found.positions.name
        assert found.inv_freq.op == "placeholder" and "inv_freq" in found.inv_freq.name
        assert found.scaling == 1.0


def test_the_matmul_form_of_transformers_5_17_is_matched(monkeypatch):
    _matmul_form(monkeypatch)
    for found in matched(build("llama")):
        assert isinstance(found, DefaultRope), found
        assert "inv_freq" in found.inv_freq.name and "position_ids" in found.positions.name


LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


@pytest.mark.parametrize("rope", [{"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}, LLAMA3, YARN],
                         ids=["linear", "llama3", "yarn"])
def test_init_time_variants_are_matched_with_their_scaling(rope):
    """Linear, llama3 and YaRN scaling change inv_freq (and YaRN attention_scaling) when the model is built;
    the forward is the default one, so the kernel computes exactly their tables from the buffer and the
    scaling."""
    model = build("llama", rope)
    scaling = model.model.rotary_emb.attention_scaling
    assert (scaling != 1.0) == (rope["rope_type"] == "yarn")
    assert all(isinstance(f, DefaultRope) and f.scaling == scaling for f in matched(model))


@pytest.mark.parametrize("forward, reason", [
    (_rotary_forward_positions_halved, "the angles are a product, but not position_ids[..., None] times inv_freq"),
    (_rotary_forward_interleaved, "the angles are not cat((freqs, freqs), dim=-1)"),
], ids=["positions-halved", "interleaved"])
def test_a_custom_rotary_embedding_is_refused_with_its_reason(monkeypatch, forward, reason):
    monkeypatch.setattr(ROTARY, "forward", forward)
    found = matched(build("llama"))
    assert all(isinstance(f, str) and f.startswith(reason) for f in found), found


def test_longrope_frequency_update_in_the_graph_is_refused():
    """longrope copies its short or long frequencies into inv_freq inside the forward: the buffer is
    written by the graph, so the tables are kept. (transformers 5.17 and 5.19 branch on the sequence length
    in Python there instead: no full graph to match.)"""
    if "torch.where(seq_len" not in inspect.getsource(tf.modeling_rope_utils):
        pytest.skip("this transformers' longrope update is not traceable in one graph")
    half = COMMON["hidden_size"] // COMMON["num_attention_heads"] // 2
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * half,
            "long_factor": [4.0] * half, "original_max_position_embeddings": 8}
    found = matched(build("llama", rope))
    assert all(isinstance(f, str) and f.startswith("inv_freq is updated inside the graph") for f in found), found


# --------------------------------------------------------------------------------------------------
# The compiled model
# --------------------------------------------------------------------------------------------------


def _fused_run(model, calls, config):
    out, _ = compiled_run(model, calls, config, backend=FUSED)
    records = list(xq.COMPILE_LOG)[-2:]
    assert all("decode_attention" in r.code_after for r in records)
    return out, [r.form for record in records for r in record.reports]


def _with_tables(monkeypatch):
    """Make the rewrite pass the model's tables to the fused op, as it does where the matcher refuses."""
    monkeypatch.setattr(attend, "default_rope", lambda *args: "tables forced by the test")


@pytest.mark.parametrize("family, rope", [("llama", None), ("qwen2", None), ("mistral", None), ("llama", YARN)],
                         ids=["llama", "qwen2", "mistral", "llama-yarn"])
def test_rope_from_positions_gives_the_logits_of_the_tables(monkeypatch, family, rope):
    """The op's CPU kernel computes cos/sin from the positions exactly as transformers' tables hold them, so
    the compiled model's logits are those of the same op fed the tables, bit for bit (4 bits: the codes and
    everything else are the same)."""
    model = build(family, rope)
    calls = decode_inputs(steps=3)
    config = xq.XQuantConfig(bits=4, group_size=16)
    torch.compiler.reset()
    computed, forms = _fused_run(model, calls, config)
    assert forms and all(f == "X (4-bit); RoPE from positions" for f in forms), forms
    _with_tables(monkeypatch)
    torch.compiler.reset()
    tables, forms = _fused_run(model, calls, config)
    assert all(f == "X (4-bit); RoPE tables: tables forced by the test" for f in forms), forms
    assert all(torch.equal(a, b) for a, b in zip(computed, tables))


def test_bf16_rope_from_positions_gives_the_logits_of_the_tables(monkeypatch):
    """In bf16 (inv_freq cast with the model) the kernel rounds cos/sin to bf16 once, as the tables are."""
    model = build("llama").to(torch.bfloat16)
    calls = decode_inputs(steps=2)
    config = xq.XQuantConfig(bits=4, group_size=16)

    def run():
        torch.compiler.reset()
        cache = xq.XQuantCache(model.config, max_batch_size=2, max_cache_len=32, xquant=config, dtype=torch.bfloat16)
        out = run_calls(torch.compile(model.forward, backend=FUSED, fullgraph=True), cache, calls)
        return out, [r.form for r in xq.COMPILE_LOG[-1].reports]

    computed, forms = run()
    assert all(f.endswith("RoPE from positions") for f in forms), forms
    _with_tables(monkeypatch)
    tables, forms = run()
    assert all(f.endswith("RoPE tables: tables forced by the test") for f in forms), forms
    assert all(torch.equal(a, b) for a, b in zip(computed, tables))


def test_the_matmul_form_compiles_to_the_logits_of_the_tables(monkeypatch):
    _matmul_form(monkeypatch)
    model = build("llama")
    calls = decode_inputs(steps=2)
    config = xq.XQuantConfig(bits=4, group_size=16)
    torch.compiler.reset()
    computed, forms = _fused_run(model, calls, config)
    assert all(f.endswith("RoPE from positions") for f in forms), forms
    _with_tables(monkeypatch)
    torch.compiler.reset()
    tables, _ = _fused_run(model, calls, config)
    assert all(torch.equal(a, b) for a, b in zip(computed, tables))


@pytest.mark.parametrize("rope", [None, YARN], ids=["default", "yarn"])
def test_quantized_rope_from_positions_matches_the_simulation(rope):
    model = build("llama", rope)
    config = xq.XQuantConfig(bits=4, group_size=16)
    to_simulation, simulation_to_exact, _ = errors_against_simulation(model, decode_inputs(steps=4), config, FUSED)
    assert to_simulation < 2e-4 < simulation_to_exact
    assert all(r.form.endswith("RoPE from positions") for r in xq.COMPILE_LOG[-1].reports)


def test_a_wrong_inv_freq_gives_wrong_logits(monkeypatch):
    """Negative control: the same rewrite with inv_freq off by 0.1% handed to the kernel (the model's own
    query rotation unchanged) moves the logits far past the bound the tests above hold."""
    model = build("llama")
    calls = decode_inputs(steps=3)
    config = xq.XQuantConfig(bits=4, group_size=16)
    torch.compiler.reset()
    right, _ = _fused_run(model, calls, config)

    def off_by_a_little(cos, sin, position_source, head_dim):
        found = default_rope(cos, sin, position_source, head_dim)
        with cos.graph.inserting_before(cos):
            wrong = cos.graph.call_function(operator.mul, (found.inv_freq, 1.001))
        return found._replace(inv_freq=wrong)

    monkeypatch.setattr(attend, "default_rope", off_by_a_little)
    torch.compiler.reset()
    wrong, forms = _fused_run(model, calls, config)
    assert all(f.endswith("RoPE from positions") for f in forms)
    assert max_error(right, wrong) > 1e-3


def test_explain_shows_how_each_fused_site_gets_rope(monkeypatch):
    monkeypatch.setattr(ROTARY, "forward", _rotary_forward_interleaved)
    model = build("llama")
    torch.compiler.reset()
    e = xq.explain(model, torch.randint(0, 128, (1, 5)), rebuild="fused", max_cache_len=32)
    assert [r.form for r in e.layers] == ["X (4-bit); RoPE tables: the angles are not cat((freqs, freqs), dim=-1) "
                                          "(a different RoPE layout)"] * 2
    assert "RoPE tables: the angles are not cat" in str(e)
    monkeypatch.undo()
    torch.compiler.reset()  # (else the second compile of the same code is dynamic: no fused form)
    e = xq.explain(build("llama"), torch.randint(0, 128, (1, 5)), rebuild="fused", max_cache_len=32)
    assert [r.form for r in e.layers] == ["X (4-bit); RoPE from positions"] * 2


# --------------------------------------------------------------------------------------------------
# A per-head key norm before RoPE (Qwen3, Gemma 3): applied in the fused kernel
# --------------------------------------------------------------------------------------------------

NORMED = {  # Qwen3 norms the heads before their transpose to [B, H, S, D], Gemma 3 after it (its 1 + w)
    "qwen3": lambda layers: tf.Qwen3Config(**{**COMMON, "num_hidden_layers": layers}, head_dim=16),
    "gemma3": lambda layers: tf.Gemma3TextConfig(**{**COMMON, "num_hidden_layers": layers}, head_dim=16,
                                                 layer_types=["full_attention"] * layers),
}


def build_normed(family: str, layers: int = 1):
    """A tiny random Qwen3 / Gemma 3 whose key norm weights are not the identity (1 ± 0.3 as multipliers),
    so a kernel ignoring them gives other logits."""
    identity = 0.0 if family == "gemma3" else 1.0  # Gemma's norm multiplies by 1 + w
    return tiny_model(NORMED[family](layers), lambda name, p: p.copy_(identity + 0.3 * torch.randn_like(p))
                      if "k_norm" in name else None)


@pytest.mark.parametrize("family", sorted(NORMED))
def test_key_norm_then_rope_is_matched_where_transformers_writes_it(family, monkeypatch):
    """The matcher finds the per-head RMSNorm of every layer's keys (the weight node the norm multiplies by,
    the model's eps) and the RoPE after it; plain_rope refuses such a region. A norm that computes anything
    more (here a factor after the weight) is refused."""
    model = build_normed(family, layers=2)
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def sites_of(model):
        torch.compiler.reset()
        run_calls(torch.compile(model.forward, backend=capture, fullgraph=True),
                  tf.StaticCache(config=model.config, max_cache_len=16), decode_inputs(steps=1))
        sites, _ = find_sites(graphs[-1].graph)
        assert len(sites) == 2
        return sites

    for site in sites_of(model):
        assert plain_rope(site) is None
        norm, rope = attend.key_norm_then_rope(site)
        assert norm.eps == model.config.rms_norm_eps and len(rope) == 2
        weight = attend.example_value(norm.weight)
        assert tuple(weight.shape) == (16,) and weight.dtype.is_floating_point
    k_norm = type(model.model.layers[0].self_attn.k_norm)
    forward = k_norm.forward
    monkeypatch.setattr(k_norm, "forward", lambda self, x: forward(self, x) * 1.5)
    assert all(attend.key_norm_then_rope(site) is None for site in sites_of(model))


@pytest.mark.parametrize("family", sorted(NORMED))
def test_fused_op_applies_the_key_norm(family, monkeypatch):
    """rebuild="fused" takes Qwen3's and Gemma 3's layers (the key norm in the kernel) and computes what the
    unfused op form -- the model's own norm replayed on the rebuilt keys -- does (one layer: with more,
    rounding flips codes in the layers above); the kernel without the norm gives other logits."""
    model = build_normed(family)
    calls = decode_inputs(batch=2, steps=8, pad=2)
    config = xq.XQuantConfig(bits=4, group_size=16)
    torch.compiler.reset()
    fused, forms = _fused_run(model, calls, config)
    assert forms == ["X (4-bit); RoPE from positions, key norm in the kernel"] * 2, forms
    torch.compiler.reset()
    unfused, _ = compiled_run(model, calls, config, backend=xq.make_xquant_backend("aot_eager", rebuild="op"))
    assert max_error(fused, unfused) < 1e-5
    from xq_compile.passes import rewrite

    monkeypatch.setattr(rewrite, "key_norm_then_rope", lambda site: (None, attend.key_norm_then_rope(site)[1]))
    torch.compiler.reset()
    without, _ = _fused_run(model, calls, config)
    assert max_error(without, unfused) > 1e-2


# --------------------------------------------------------------------------------------------------
# The Triton kernels under the interpreter
# --------------------------------------------------------------------------------------------------


def _interpreter_fma_rounds_once() -> bool:
    """Whether this Triton's interpreter rounds tl.fma once, as the GPU does (3.9's does; 3.6's and 3.7's
    multiply and add in fp32, rounding twice): fma(a, a, -fl(a·a)) is 2⁻²⁴ for a = 1 + 2⁻¹², else 0."""
    import triton
    import triton.language as tl

    @triton.jit
    def fma_kernel(a_ptr, c_ptr, out_ptr):
        a = tl.load(a_ptr)
        tl.store(out_ptr, tl.fma(a, a, tl.load(c_ptr)))

    a, c, out = torch.tensor([1 + 2.0 ** -12]), torch.tensor([-(1 + 2.0 ** -11)]), torch.zeros(1)
    fma_kernel[(1,)](a, c, out)
    return out.item() == 2.0 ** -24


def _interpreter_case() -> None:
    """In a TRITON_INTERPRET=1 subprocess: the Triton launcher with cos/sin from the positions against the
    launcher fed the tables of transformers' own rotary module (YaRN, attention_scaling != 1), at positions
    near 0 and near 50 000; the wrong theta and a one-off position are negative controls."""
    from test_decode_attention import Case, make_inputs

    from xq_compile.kernels import decode_attention as da

    config = tf.LlamaConfig(**{**COMMON, "hidden_size": 128}, rope_parameters=YARN)  # head_dim 32
    rotary = tf.models.llama.modeling_llama.LlamaRotaryEmbedding(config)
    assert rotary.attention_scaling != 1.0
    small = dict(block_n=16, block_c=32, block_h=2, block_m=16, block_nv=16, block_cv=32, num_splits=2)
    # The kernel reduces the angle with FMAs (Cody-Waite); an interpreter that rounds them twice loses
    # about 1e-3 of it near position 50 000. The GPU's fma rounds once.
    far_tol = 1e-4 if _interpreter_fma_rounds_once() else 5e-3

    def run(args):
        return da.decode_attention_triton(da.DecodeAttentionInputs.from_op_args(**args), **small)

    for dtype in (torch.float32, torch.bfloat16):
        for offset in (0, 50_000):
            c = Case(B=2, Hq=4, Hkv=2, D=32, L=40, n=29, C=64, rope="tables", dtype=dtype)
            a = make_inputs(c)
            positions = torch.arange(c.L)[None] + 5 * torch.arange(c.B)[:, None] + offset
            cos, sin = rotary(torch.zeros((), dtype=dtype), positions)
            tables = dict(a, cos=cos.contiguous(), sin=sin.contiguous())
            computed = dict(a, cos=None, sin=None, positions=positions, rope_inv_freq=rotary.inv_freq.clone(),
                            rope_scale=rotary.attention_scaling)
            expected = run(tables).float()
            got = run(computed).float()
            # test_decode_attention's bounds for the kernels against the reference: in bf16 the two runs
            # may differ by the rounding of a cos/sin value (the interpreter's tl.cos of the reduced angle)
            fp32_tol = far_tol if offset else 1e-4
            tol = dict(rtol=fp32_tol, atol=fp32_tol) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
            torch.testing.assert_close(got, expected, **tol, msg=lambda m: f"{dtype} offset {offset}: {m}")
            if dtype != torch.float32:
                continue
            # negative controls (fp32, where the bound is tight): a slightly wrong inv_freq, positions off by one
            for name, args in (("wrong inv_freq", dict(computed, rope_inv_freq=rotary.inv_freq * 1.001)),
                               ("positions + 1", dict(computed, positions=positions + 1))):
                off = (run(args).float() - expected).abs().max().item()
                assert off > 1e-2, (name, offset, off)
    print("fused rope interpreter cases passed")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_cpu_kernel_computes_transformers_tables_bit_for_bit(dtype):
    """The op's CPU kernel (what the compiled model runs on CPU) computes cos/sin from the positions as
    transformers' rotary module does: the same tables, bit for bit (YaRN: attention_scaling != 1)."""
    from xq_compile.kernels import decode_attention as da

    rotary = ROTARY(tf.LlamaConfig(**COMMON, rope_parameters=YARN))
    positions = torch.arange(64)[None] + torch.tensor([[0], [70_000]])
    cos, sin = rotary(torch.zeros((), dtype=dtype), positions)
    inputs = da.DecodeAttentionInputs(
        query=None, keys=None, values=None, col0=None, k_weight=torch.zeros(1, dtype=dtype), k_bias=None,
        v_weight=None, v_bias=None, cos=None, sin=None, mask=None, length=None, sm_scale=1.0, positions=positions,
        rope_inv_freq=rotary.inv_freq, rope_scale=rotary.attention_scaling)
    got_cos, got_sin = da.rope_tables(inputs, 64)
    assert torch.equal(got_cos, cos) and torch.equal(got_sin, sin)
    wrong_cos, _ = da.rope_tables(dataclasses.replace(inputs, rope_inv_freq=rotary.inv_freq * 1.001), 64)
    assert not torch.equal(wrong_cos, cos)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_rope_from_positions_matches_transformers_tables():
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--interpreter"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    assert "fused rope interpreter cases passed" in proc.stdout, proc.stdout + proc.stderr


if __name__ == "__main__":
    if sys.argv[1:] == ["--interpreter"]:
        _interpreter_case()
    else:
        sys.exit(f"usage: TRITON_INTERPRET=1 {sys.argv[0]} --interpreter")
