"""The GQA latent form: X·U_k / X·U_v cached instead of X (xq_compile/latent.py)."""

import pytest
import torch
import torch.nn.functional as F

import xq_compile as xq
from xq_compile.backend import collect_records
from xq_compile import quant
from xq_compile.forms import form_for
from xq_compile.forms.base import LayerShape, allocate
from xq_compile.latent import (LATENT_FACTORS, fake_quantize_key_latent, in_open_group, key_latent_rows,
                               open_key_group, store_key_latent, svd_factors)
from xq_compile.rotation import hadamard
from xq_compile.simulate import simulate_xquant

from conftest import (compiled_run as _compiled_run, decode_inputs, max_error, prefix_reference, reference_logits,
                      run_calls, tiny_llama)

MAX_LEN = 48


def compiled_run(model, calls, config, backend="xquant", max_len=MAX_LEN):
    return _compiled_run(model, calls, config, backend, max_len)  # a longer cache: groups complete mid-run


def test_svd_factors_reproduce_the_projection_with_and_without_rotation():
    torch.manual_seed(0)
    w, x = torch.randn(48, 128), torch.randn(5, 128)
    for rotation in (None, hadamard(16)):
        down, up = svd_factors(w, rotation)
        assert down.shape == (48, 128) and up.shape == (48, 48)
        torch.testing.assert_close(F.linear(F.linear(x, down), up), F.linear(x, w), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(down @ down.T, torch.eye(48), atol=1e-5, rtol=0)  # orthonormal rows


def key_latent_state(bits, group_size, capacity, width, batch):
    """The key latent's state tensors as the latent form allocates them: codes, scale, zero, low bits."""
    config = xq.XQuantConfig(bits=bits, group_size=group_size, form="latent")
    form = form_for(config, 0, LayerShape(hidden_size=4 * width, kv_width=width))
    state = allocate(form.state_spec(batch, capacity, torch.float32), torch.device("cpu"))
    return [state.get(name) for name in ("k_codes", "k_scale", "k_zero", "k_low")]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("capacity", [64, 61])
def test_key_latent_store_and_rebuild_equal_the_reference_for_any_chunking(bits, capacity):
    """Chunks of 1..40 rows across group boundaries, up to a full cache without a spare group: the
    rebuilt rows are the reference's for the same chunks (complete groups per channel at ``bits``, the
    open group at open_bits, requantized on its grid after each chunk), and as accurate as one chunk."""
    torch.manual_seed(bits)
    B, C, g = 2, 24, 8
    data = torch.randn(B, capacity, C) * torch.linspace(0.1, 10, C)  # channels of very different ranges
    data[:, :, 0] += 30  # an outlier channel, as channel 0 of a key latent
    state = key_latent_state(bits, g, capacity, C, B)
    assert state[0].shape[1] == 64  # ceil(capacity / g) groups: no spare group
    chunks = []
    for s in (5, 1, 1, 9, 8, 16, 1, 3, 20 - (64 - capacity)):
        pos = sum(chunks)
        store_key_latent(*state, data[:, pos:pos + s], torch.tensor(pos), bits, g)
        chunks.append(s)
        pos += s
        got, exact = key_latent_rows(*state, pos, pos, bits, g, torch.float32), data[:, :pos]
        assert torch.equal(got, fake_quantize_key_latent(exact, bits, g, chunks=chunks)), f"after {pos} rows"
        open_rows = open_key_group(*state, pos, bits, g, torch.float32)[:, :pos % g]
        complete = pos - pos % g
        assert torch.equal(open_rows, got[:, complete:]), f"the fused op's tail after {pos} rows"
        one_chunk = fake_quantize_key_latent(exact, bits, g)
        assert (got - exact)[:, :complete].norm() <= 1.01 * (one_chunk - exact)[:, :complete].norm(), pos
        if pos % g:  # the open group: within a few steps of its grid (plus the fp16 rounding of ~30)
            open_step = (exact[:, complete:].amax(1) - exact[:, complete:].amin(1)) / (2 ** (bits + 4) - 1)
            assert ((got - exact)[:, complete:].abs() <= 2 * open_step.unsqueeze(1) + 0.02).all(), pos
    assert pos == capacity
    # Per-channel groups: the outlier channel does not cost the others their precision.
    assert (got - exact)[:, :complete, 1].abs().max() < 0.1 * 2 ** (4 - bits) + 1e-3


def test_unquantized_latent_reproduces_the_model_and_is_chosen_automatically():
    model = tiny_llama(num_kv_heads=1)  # X is 64 wide, K+V 2·16: the latent form is smaller
    calls = decode_inputs(batch=2, steps=16, pad=2)
    with collect_records() as records:
        out, cache = compiled_run(model, calls, xq.XQuantConfig(bits=None, group_size=16))
    assert max_error(out, reference_logits(model, calls, MAX_LEN)) < 1e-4
    assert all(layer.form.name == "latent" for layer in cache.layers)
    assert len(records) == 2 and all(r.rewritten == 2 for r in records)
    assert all("GQA latent" in r.form for rec in records for r in rec.reports)


@pytest.mark.parametrize("rebuild", ["inline", "op"])
def test_forced_forms_on_a_gqa_model_are_exact_unquantized(rebuild):
    model = tiny_llama(num_kv_heads=2, bias=True)  # K+V as wide as X: "auto" keeps X; force each form
    calls = decode_inputs(batch=2, steps=6, pad=1)
    ref = reference_logits(model, calls, MAX_LEN)
    for form in ("latent", "x"):
        torch._dynamo.reset()
        out, cache = compiled_run(model, calls, xq.XQuantConfig(bits=None, group_size=16, form=form),
                                  backend=xq.make_xquant_backend("aot_eager", rebuild=rebuild))
        assert cache.layers[0].form.name == form
        assert max_error(out, ref) < 1e-4, form


@pytest.mark.parametrize("config", [
    xq.XQuantConfig(bits=4, group_size=16),
    xq.XQuantConfig(bits=3, group_size=16, rotation="none"),
    xq.XQuantConfig(bits=2, group_size=16, keep_channel0=True),
], ids=["4bit", "3bit-norot", "2bit-channel0"])
@pytest.mark.parametrize("rebuild", ["inline", "op", "fused"])
def test_quantized_latent_matches_the_torch_reference(config, rebuild):
    model = tiny_llama(num_kv_heads=1, num_layers=1)
    calls = decode_inputs(batch=2, steps=20, pad=2)  # 26 tokens: groups of 16 complete mid-decode
    out, _ = compiled_run(model, calls, config, backend=xq.make_xquant_backend("aot_eager", rebuild=rebuild))
    assert max_error(out, prefix_reference(model, calls, config)) < 2e-4
    assert max_error(out, reference_logits(model, calls, MAX_LEN)) > 1e-3  # really quantized


_INDUCTOR_RUNS = {}  # bits -> (model, calls, config, logits): each compiled once for the two tests below


def _under_inductor(bits):
    if bits not in _INDUCTOR_RUNS:
        model = tiny_llama(num_kv_heads=1, num_layers=1)
        calls = decode_inputs(batch=2, steps=12, pad=2)
        config = xq.XQuantConfig(bits=bits, group_size=16)
        torch._dynamo.reset()
        out, _ = compiled_run(model, calls, config)
        _INDUCTOR_RUNS[bits] = model, calls, config, out
    return _INDUCTOR_RUNS[bits]


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_quantized_latent_under_inductor_matches_the_reference(bits):
    model, calls, config, out = _under_inductor(bits)
    assert max_error(out, prefix_reference(model, calls, config)) < 2e-4


def test_the_open_group_mask_compiles_right_at_every_fill():
    """``in_open_group`` over the n cached rows, n read with ``.item()`` as the inline rebuild reads it, under
    Inductor: right at fills that are not multiples of the group size. Written as ``rows // g == open_group``
    it is not (Inductor's C++ backend computes that mask only up to the last multiple of g; on torch 2.11 it
    made the latent form's decode logits wrong by up to 0.1)."""
    g = 16

    def mask(length):
        n = length.item()
        torch._check(n >= 1)
        torch._check(n <= 64)
        return in_open_group(torch.arange(n), length // g, g)

    compiled = torch.compile(mask, backend="inductor", fullgraph=True)
    for n in (1, 7, 15, 16, 17, 31, 40):
        assert torch.equal(compiled(torch.tensor(n)), torch.arange(n) // g == n // g), n


def test_quantized_latent_under_inductor_errors_grow_with_fewer_bits():
    runs = [_under_inductor(bits) for bits in (8, 4, 2)]
    exact = reference_logits(runs[0][0], runs[0][1], MAX_LEN)
    errors = [max_error(out, exact) for _, _, _, out in runs]
    assert errors == sorted(errors)


def test_dynamic_chunk_lengths_compile_once_and_match_the_reference():
    """Chunks of changing length make Dynamo compile a dynamic-shape graph: the key latent's store
    then works with a symbolic number of new rows."""
    model = tiny_llama(num_kv_heads=1, num_layers=1)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 128, (1, 40), generator=g)
    calls, start = [], 0
    for length in (9, 3, 5, 7, 1, 6, 9):
        positions = torch.arange(start, start + length)[None]
        calls.append(dict(input_ids=ids[:, start:start + length], attention_mask=torch.ones(1, start + length,
                          dtype=torch.long), position_ids=positions))
        start += length
    config = xq.XQuantConfig(bits=4, group_size=8)
    out, _ = compiled_run(model, calls, config, backend=xq.make_xquant_backend("aot_eager"))
    assert max_error(out, prefix_reference(model, calls, config)) < 2e-4


def test_factors_are_computed_once_and_follow_in_place_weight_changes():
    model = tiny_llama(num_kv_heads=1)
    calls = decode_inputs(batch=1, steps=6)
    cache = xq.XQuantCache(model.config, max_batch_size=1, max_cache_len=MAX_LEN,
                           xquant=xq.XQuantConfig(bits=None, group_size=16))
    forward = torch.compile(model.forward, backend="xquant", fullgraph=True)
    run_calls(forward, cache, calls[:2])
    computed = LATENT_FACTORS.computed
    cache.reset()
    run_calls(forward, cache, calls)
    assert LATENT_FACTORS.computed == computed  # no SVD per step
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.weight.mul_(-0.5)
        model.model.layers[1].self_attn.v_proj.weight.add_(0.1)
    cache.reset()
    out = run_calls(forward, cache, calls)
    assert LATENT_FACTORS.computed == computed + 2  # only the two changed weights
    assert max_error(out, reference_logits(model, calls, MAX_LEN)) < 1e-4


def test_crop_into_a_completed_group_reopens_it_with_its_rows():
    model = tiny_llama(num_kv_heads=1, num_layers=1)
    calls = decode_inputs(batch=1, steps=14, pad=0)  # 20 tokens: group 0 (16) complete
    out, cache = compiled_run(model, calls, xq.XQuantConfig(bits=4, group_size=16))
    layer, g = cache.layers[0], 16
    key_state = [layer.state[name] for name in ("k_codes", "k_scale", "k_zero", "k_low")]
    before = key_latent_rows(*key_state, 20, 20, 4, g, torch.float32)
    cache.crop(-8)  # transformers: a negative count of tokens to remove
    assert layer.host_length == 12
    after = key_latent_rows(*key_state, 12, 12, 4, g, torch.float32)
    # the kept rows, now the open group: its 8-bit grid over their per-channel 4-bit values
    assert torch.equal(after, fake_quantize_key_latent(before[:, :12], 4, g))
    assert not torch.equal(after, before[:, :12])  # really requantized


@pytest.mark.parametrize("config", [
    xq.XQuantConfig(bits=None, base_bits=None, group_size=16, cross_layer=True, base_layers=2),
    xq.XQuantConfig(bits=4, group_size=16, cross_layer=True, base_layers=1),
    xq.XQuantConfig(bits=2, group_size=16, cross_layer=True, base_layers=2, rotation="none"),
], ids=["unquantized", "4bit-base1", "2bit-base2-norot"])
@pytest.mark.parametrize("rebuild", ["inline", "op"])
def test_cross_layer_joint_latent_matches_the_reference(config, rebuild):
    """XQuant-CL on a GQA model: per-token deltas in each layer's joint K|V latent, an fp32 X̃ carried
    up the layers. Unquantized it is the model; quantized, the chained torch reference (per call)."""
    model = tiny_llama(num_kv_heads=1, num_layers=4, hidden=128, heads=8)  # joint latent 32 of d = 128
    calls = decode_inputs(batch=2, steps=10, pad=2)
    out, cache = compiled_run(model, calls, config, backend=xq.make_xquant_backend("aot_eager", rebuild=rebuild),
                              max_len=32)
    exact = reference_logits(model, calls, 32)
    with simulate_xquant(model, config):
        reference = reference_logits(model, calls, 32)
    assert max_error(out, reference) < 2e-4
    if config.bits is None:
        assert max_error(out, exact) < 1e-4
    assert all(layer.form.name == "joint_latent" and layer.form.width == 32 for layer in cache.layers)
    forms = [r.form for r in xq.COMPILE_LOG[-1].reports]
    assert "base layer" in forms[0] and "delta vs layer 2" in forms[3]
    assert cache.nbytes() == xq.memory_report(model.config, config, 32, 2).xquant.total_at
