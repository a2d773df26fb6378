"""XQuantCache: real packed bytes, no K/V-sized allocations, and clear errors."""

import pytest
import torch

import xq_compile as xq
from xq_compile import quant

from conftest import decode_inputs, run_calls, tiny_llama


def tensors_bytes_formula(config, xquant, batch, max_len):
    layers, hidden = config.num_hidden_layers, config.hidden_size
    if xquant.quantized:
        per_row = hidden * xquant.bits // 8 + 2 * 2 * (hidden // xquant.group_size)
    else:
        per_row = hidden * 4
    placeholders_and_counters = layers * (4 + 4 + 8)
    hadamard = xquant.group_size ** 2 * 4 if xquant.rotation == "hadamard" else 0
    return batch * max_len * (layers * per_row + 8) + placeholders_and_counters + hadamard


@pytest.mark.parametrize("bits", [2, 3, 4, 8, None])
@pytest.mark.parametrize("group_size, rotation", [(16, "hadamard"), (32, "none")])
def test_nbytes_is_packed_codes_scales_zeros_positions(bits, group_size, rotation):
    model = tiny_llama(num_kv_heads=2)
    cfg = xq.XQuantConfig(bits=bits, group_size=group_size, rotation=rotation)
    cache = xq.XQuantCache(model.config, max_batch_size=3, max_cache_len=40, xquant=cfg)
    assert cache.nbytes() == tensors_bytes_formula(model.config, cfg, 3, 40)
    assert xq.xquant_cache_bytes(model.config, cfg, 3, 40) == tensors_bytes_formula(model.config, cfg, 3, 40) \
        - model.config.num_hidden_layers * 16 - (group_size ** 2 * 4 if rotation == "hadamard" else 0)


def test_no_tensor_of_kv_size_is_allocated():
    model = tiny_llama(num_kv_heads=4)
    cache = xq.XQuantCache(model.config, max_batch_size=2, max_cache_len=64, xquant=xq.XQuantConfig(bits=4, group_size=16))
    kv_layer_bytes = 2 * 4 * 64 * 16 * 2  # one fp16 K of one layer
    for layer in cache.layers:
        assert layer.keys.shape == layer.values.shape == (2, 4, 64, 16)
        assert layer.keys.stride() == (0, 0, 0, 0) and layer.keys.untyped_storage().nbytes() == 4
    assert max(t.untyped_storage().nbytes() for t in cache.tensors()) < kv_layer_bytes
    assert cache.nbytes() * 3 < xq.fp16_kv_cache_bytes(model.config, 2, 64)


def test_state_really_holds_packed_codes_of_x():
    model = tiny_llama(num_kv_heads=2)
    cfg = xq.XQuantConfig(bits=4, group_size=16, rotation="none")
    cache = xq.XQuantCache(model.config, max_batch_size=2, max_cache_len=16, xquant=cfg)
    calls = decode_inputs(batch=2, prompt=5, steps=0)
    forward = torch.compile(model.forward, backend=xq.make_xquant_backend("aot_eager"), fullgraph=True)
    captured = {}
    hook = model.model.layers[0].self_attn.k_proj.register_forward_pre_hook(lambda m, a: captured.setdefault("x", a[0]))
    run_calls(model.forward, None, calls)  # eager: layer 0 sees the same X with or without XQuant
    hook.remove()
    run_calls(forward, cache, calls)
    state = cache.layers[0].state
    x_hat = quant.dequantize(state["codes"][:, :5], state["scale"][:, :5], state["zero"][:, :5], 4, 16)
    assert torch.allclose(x_hat, quant.fake_quantize(captured["x"], 4, 16), atol=1e-5)
    assert int(cache.layers[0].cumulative_length) == 5
    assert cache.positions[1, :5].tolist() == [0, 0, 0, 1, 2]  # row 1 is left-padded by 2
    assert state["codes"][:, 5:].count_nonzero() == 0


def test_eager_write_fails_loudly():
    model = tiny_llama()
    cache = xq.XQuantCache(model.config, max_batch_size=2, max_cache_len=16, xquant=xq.XQuantConfig(group_size=16))
    with pytest.raises(RuntimeError, match="backend='xquant'"):
        run_calls(model.forward, cache, decode_inputs(steps=0))


def test_overflow_raises_before_writing():
    model = tiny_llama()
    cache = xq.XQuantCache(model.config, max_batch_size=2, max_cache_len=8, xquant=xq.XQuantConfig(group_size=16))
    forward = torch.compile(model.forward, backend=xq.make_xquant_backend("aot_eager"), fullgraph=True)
    calls = decode_inputs(prompt=6, steps=3)
    run_calls(forward, cache, calls[:3])
    before = [t.clone() for t in cache.layers[0].state.values()]
    with pytest.raises(ValueError, match="do not fit in max_cache_len=8"):
        run_calls(forward, cache, calls[3:])
    assert all(torch.equal(a, b) for a, b in zip(before, cache.layers[0].state.values()))


def test_reset_and_crop_keep_the_x_state_consistent():
    model = tiny_llama(num_kv_heads=2)
    cfg = xq.XQuantConfig(bits=None, group_size=16)
    cache = xq.XQuantCache(model.config, max_batch_size=2, max_cache_len=16, xquant=cfg)
    forward = torch.compile(model.forward, backend=xq.make_xquant_backend("aot_eager"), fullgraph=True)
    calls = decode_inputs(steps=3)
    first = run_calls(forward, cache, calls)
    cache.reset()
    assert int(cache.get_seq_length()) == 0 and cache.layers[0].host_length == 0
    again = run_calls(forward, cache, calls)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    cache.crop(-2)  # drop the last two decode steps, then redo them
    assert int(cache.get_seq_length()) == 7
    redo = run_calls(forward, cache, calls[2:])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(first[2:], redo))


def test_reorder_cache_permutes_rows_with_their_positions():
    model = tiny_llama(num_kv_heads=2)
    cache = xq.XQuantCache(model.config, max_batch_size=2, max_cache_len=16, xquant=xq.XQuantConfig(group_size=16))
    forward = torch.compile(model.forward, backend=xq.make_xquant_backend("aot_eager"), fullgraph=True)
    run_calls(forward, cache, decode_inputs(steps=0))
    codes, positions = cache.layers[0].state["codes"].clone(), cache.positions.clone()
    cache.reorder_cache(torch.tensor([1, 0]))
    assert torch.equal(cache.layers[0].state["codes"], codes.flip(0))
    assert torch.equal(cache.positions, positions.flip(0))
    with pytest.raises(NotImplementedError, match="max_batch_size"):
        cache.batch_repeat_interleave(2)


def test_dtype_mismatch_says_what_to_do():
    model = tiny_llama(dtype=torch.bfloat16)
    cache = xq.XQuantCache(model.config, max_batch_size=2, max_cache_len=16, xquant=xq.XQuantConfig(group_size=16))
    forward = torch.compile(model.forward, backend=xq.make_xquant_backend("aot_eager"), fullgraph=True)
    with pytest.raises(Exception, match="create the cache with dtype=torch.bfloat16"):
        run_calls(forward, cache, decode_inputs(steps=0))


def test_group_size_not_dividing_hidden_size_is_refused():
    model = tiny_llama(hidden=96, heads=4, num_kv_heads=4)
    with pytest.raises(ValueError, match="does not divide the hidden size 96"):
        xq.XQuantCache(model.config, max_batch_size=1, max_cache_len=8, xquant=xq.XQuantConfig(group_size=64))


def test_an_unquantized_latent_the_rotation_cannot_tile_is_refused():
    """Unquantized, the value latent is still Hadamard-rotated (by default): a 16-wide latent (one K/V head
    of 16) in blocks of 64 is refused when the cache is made, not deep in the compile; without the rotation
    it is fine."""
    model = tiny_llama(num_kv_heads=1)
    with pytest.raises(ValueError, match="group_size=64 does not divide the latent width .* 16; .*e.g. \\[16\\]"):
        xq.XQuantCache(model.config, max_batch_size=1, max_cache_len=8, xquant=xq.XQuantConfig(bits=None))
    cache = xq.XQuantCache(model.config, max_batch_size=1, max_cache_len=8,
                           xquant=xq.XQuantConfig(bits=None, rotation="none"))
    assert cache.layers[0].form.name == "latent"


def test_cache_kwargs_follow_the_models_keyword():
    """transformers renamed forward's past_key_values to cache during 5.x: use whichever the model takes."""
    def new_style(input_ids=None, cache=None, **kwargs): ...
    def old_style(input_ids=None, past_key_values=None, **kwargs): ...
    marker = object()
    assert xq.cache_kwargs(new_style, marker) == {"cache": marker}
    assert xq.cache_kwargs(old_style, marker) == {"past_key_values": marker}
    model = tiny_llama()
    name = xq.cache_argument(model)
    assert name in ("cache", "past_key_values") and name in __import__("inspect").signature(model.forward).parameters
