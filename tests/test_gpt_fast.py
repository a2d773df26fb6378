"""gpt-fast's model and generate loop (tests/gpt_fast_model.py) compiled with backend="xquant", options=...

The K/V cache is the model's own module buffers (``k_out[:, :, input_pos] = k_val``): the rewrite
creates the X state, owned by the compiled model. Prefill of 8 tokens at ``arange(8)``, then 8 decode
steps at an int32 ``input_pos`` incremented in place, as gpt-fast's generate.py runs them.
"""

import pytest
import torch

import xq_compile as xq
from xq_compile.backend import collect_records
from xq_compile.passes.positions import checked_positions, rows_after_write
from xq_compile.simulate import simulate_xquant

from conftest import max_error
from gpt_fast_model import decode_one_token, generate_greedy, generate_logits, prefill, random_tokens, tiny_gpt_fast

AOT_EAGER = xq.make_xquant_backend("aot_eager")


def compiled(model, bits, backend=AOT_EAGER):
    return torch.compile(model, backend=backend, fullgraph=True, options={"bits": bits, "group_size": 16})


@pytest.mark.parametrize("kv_heads", [-1, 2, 1], ids=["mha", "gqa", "gqa-latent"])
def test_prefill_and_decode_exact_unquantized(kv_heads):
    model, reference = tiny_gpt_fast(kv_heads), tiny_gpt_fast(kv_heads)
    prompt, tokens = random_tokens(steps=8)
    with collect_records() as records:
        out = generate_logits(compiled(model, None), prompt, tokens)
    assert len(out) == 9
    assert max_error(out, generate_logits(reference, prompt, tokens)) < 1e-5
    assert len(records) == 2  # one prefill graph, one decode graph for all 8 steps
    assert [r.rewritten for r in records] == [2, 2]
    form = "GQA latents" if kv_heads == 1 else "X (unquantized, state owned by the compiled model)"
    assert all(form in r.form for record in records for r in record.reports)


def test_chunks_written_at_an_offset_exact_unquantized():
    """Chunks of several tokens after the prompt, as gpt-fast's speculative decoding verifies k+1 draft
    tokens at arange(input_pos, input_pos + k + 1). Chunks of 3 and then 4 tokens make Dynamo compile a
    graph whose token count is a symbol; the cloned RoPE code must use the cached rows there too."""
    model, reference = tiny_gpt_fast(2), tiny_gpt_fast(2)
    forward = compiled(model, None)
    g = torch.Generator().manual_seed(0)
    out, expected = [], []
    with collect_records() as records, torch.no_grad():
        for start, size in [(0, 8), (8, 1), (9, 3), (12, 4), (16, 1)]:
            idx, pos = torch.randint(0, 96, (1, size), generator=g), torch.arange(start, start + size)
            out.append(forward(idx, pos))
            expected.append(reference(idx, pos))
    assert max_error(out, expected) < 1e-5
    assert [r.rewritten for r in records] == [2, 2, 2]  # prefill, decode, chunks of any size


def test_compiled_prefill_and_decode_one_token_functions_as_generate_py_compiles_them():
    """generate.py compiles its prefill and decode_one_token functions, the model being an argument."""
    model, reference = tiny_gpt_fast(2), tiny_gpt_fast(2)
    prompt, _ = random_tokens()
    options = {"bits": None, "group_size": 16}
    with collect_records() as records:
        tokens, logits = generate_greedy(
            torch.compile(prefill, backend=AOT_EAGER, fullgraph=True, options=options),
            torch.compile(decode_one_token, backend=AOT_EAGER, fullgraph=True, options=options), model, prompt, 9)
    expected_tokens, expected_logits = generate_greedy(prefill, decode_one_token, reference, prompt, 9)
    assert torch.equal(tokens, expected_tokens)
    assert max_error(logits, expected_logits) < 1e-5
    assert [r.rewritten for r in records] == [2, 2]


def test_complex_rope_exact_unquantized():
    model, reference = tiny_gpt_fast(2, rope="complex"), tiny_gpt_fast(2, rope="complex")
    prompt, tokens = random_tokens(steps=8)
    out = generate_logits(compiled(model, None), prompt, tokens)
    assert max_error(out, generate_logits(reference, prompt, tokens)) < 1e-5
    assert xq.COMPILE_LOG[-1].rewritten == 2


def test_bf16_unquantized_within_bf16_rounding():
    model, reference = tiny_gpt_fast(2, dtype=torch.bfloat16), tiny_gpt_fast(2, dtype=torch.bfloat16)
    prompt, tokens = random_tokens(steps=8)
    out = generate_logits(compiled(model, None), prompt, tokens)
    expected = generate_logits(reference, prompt, tokens)
    assert all(o.dtype == torch.bfloat16 for o in out)
    scale = max(e.abs().max().item() for e in expected)
    # a few bf16 roundings (2^-8 relative) apart; a wrong RoPE position or row moves logits by O(scale)
    assert max_error(out, expected) < 8 * 2 ** -8 * scale


@pytest.mark.parametrize("rebuild", ["auto", "op"])
def test_inductor_prefill_decode_exact_then_position_past_the_end_refused(rebuild):
    """The reported failure: Inductor's generated code asserted `u1 <= 1` on the first decode step. The op
    form (rows up to max_cache_len, the length on the device) refuses the position as clearly: its
    stores read the positions through the check, which therefore runs before any kernel indexes."""
    model, reference = tiny_gpt_fast(2), tiny_gpt_fast(2)
    prompt, tokens = random_tokens(steps=8)
    forward = compiled(model, None, backend=xq.make_xquant_backend("inductor", rebuild=rebuild))
    out = generate_logits(forward, prompt, tokens)
    assert max_error(out, generate_logits(reference, prompt, tokens)) < 1e-5
    assert model.max_seq_length == 32
    with torch.no_grad(), pytest.raises(ValueError) as error:
        forward(tokens[:, :1], torch.tensor([32], dtype=torch.int))
    assert str(error.value) == (
        "xquant: cache position 32 is past the end of the cache (32 rows, positions 0..31). Allocate a longer "
        "cache (gpt-fast: setup_caches(max_seq_length=...); XQuantCache or StaticCache: max_cache_len=...).")


@pytest.mark.parametrize("kv_heads, batch", [(-1, 1), (2, 2)], ids=["mha", "gqa-batch2"])
def test_4bit_matches_simulation(kv_heads, batch):
    model, reference = tiny_gpt_fast(kv_heads, max_batch_size=batch), tiny_gpt_fast(kv_heads, max_batch_size=batch)
    prompt, tokens = random_tokens(batch=batch, steps=8)
    out = generate_logits(compiled(model, 4), prompt, tokens)
    with simulate_xquant(reference, xq.XQuantConfig(bits=4, group_size=16)):
        expected = generate_logits(reference, prompt, tokens)
    assert max_error(out, expected) < 2e-4
    assert max_error(out, generate_logits(reference, prompt, tokens)) > 1e-2  # X really is quantized


def test_release_kv_buffers_after_prefill():
    model, reference = tiny_gpt_fast(2), tiny_gpt_fast(2)
    prompt, tokens = random_tokens(steps=8)
    forward = compiled(model, 4)
    out = generate_logits(forward, prompt, tokens[:, :3])
    caches = [block.attention.kv_cache for block in model.layers]
    kv_bytes = sum(c.k_cache.untyped_storage().nbytes() + c.v_cache.untyped_storage().nbytes() for c in caches)
    assert xq.release_kv_buffers(model) == kv_bytes
    assert all(c.k_cache.untyped_storage().nbytes() == 4 for c in caches)
    with torch.no_grad():  # the rest of the decode, against the released buffers (one recompile)
        for step in range(3, 8):
            out.append(forward(tokens[:, step:step + 1], torch.tensor([8 + step], dtype=torch.int)))
    with simulate_xquant(reference, xq.XQuantConfig(bits=4, group_size=16)):
        expected = generate_logits(reference, prompt, tokens)
    assert max_error(out, expected) < 2e-4


def test_without_options_the_buffers_are_left_alone():
    model, reference = tiny_gpt_fast(2), tiny_gpt_fast(2)
    prompt, tokens = random_tokens(steps=2)
    forward = torch.compile(model, backend=AOT_EAGER, fullgraph=True)
    with pytest.warns(UserWarning, match="not an XQuantCache"):
        out = generate_logits(forward, prompt, tokens)
    assert max_error(out, generate_logits(reference, prompt, tokens)) < 1e-5


def test_rope_code_that_cannot_follow_the_rows_is_refused_at_compile_time(monkeypatch):
    import gpt_fast_model

    def rotary_with_a_fixed_expand(x, freqs_cis):  # expand() takes the token count as a size
        pairs = x.float().reshape(*x.shape[:-1], -1, 2)
        freqs = freqs_cis.view(1, pairs.size(1), 1, pairs.size(3), 2).expand(x.size(0), x.size(1), x.size(2), -1, -1)
        rotated = torch.stack([pairs[..., 0] * freqs[..., 0] - pairs[..., 1] * freqs[..., 1],
                               pairs[..., 1] * freqs[..., 0] + pairs[..., 0] * freqs[..., 1]], -1)
        return rotated.flatten(3).type_as(x)

    monkeypatch.setattr(gpt_fast_model, "apply_rotary_emb", rotary_with_a_fixed_expand)
    model = tiny_gpt_fast(2)
    prompt, _ = random_tokens()
    with torch.no_grad(), pytest.raises(Exception) as error:  # Dynamo wraps what the backend raised
        compiled(model, None)(prompt, torch.arange(8))
    message = str(error.value)
    assert "RowReplayError: xquant cannot apply this model's RoPE code to the cached rows: the graph was " \
           "traced for 8 token(s), and " in message
    assert ", 1, 8, 2, -1, -1) (File " in message  # the expand() call, with the model's line
    assert "in rotary_with_a_fixed_expand: freqs = freqs_cis.view(1, pairs.size(1)" in message
    assert message.split("\n")[1].endswith(
        ") does not follow the number of rows (xquant adapts the sizes given to view/reshape only). Compile this "
        "model without the xquant backend, or report its rotary-embedding code.")


@pytest.mark.parametrize("positions, consecutive, message", [
    ([-1, 0], False, "xquant: cache position -1 is negative; positions index the cache rows 0..15."),
    ([2, 2, 1, 1], False, "xquant: the call writes 4 tokens but its highest cache position is 2: the positions "
                          "a call writes must be distinct."),
    ([4, 6], True, "xquant: the GQA latent cache stores tokens in order, but the call writes positions [4, 6]: "
                   "write consecutive positions p, p+1, ... (or use form='x')."),
])
@pytest.mark.parametrize("check", [rows_after_write, checked_positions])
def test_write_positions_that_do_not_fit_are_refused(check, positions, consecutive, message):
    with pytest.raises(ValueError) as error:
        check(torch.tensor(positions), 16, consecutive)
    assert str(error.value) == message


def test_rows_after_write_is_one_past_the_highest_position():
    assert rows_after_write(torch.tensor([5, 6, 7], dtype=torch.int32), 16, True).item() == 8
    assert rows_after_write(torch.tensor([9, 2]), 16, False).item() == 10


def test_checked_positions_are_a_copy_of_the_positions():
    positions = torch.tensor([[9, 2], [3, 15]])
    checked = checked_positions(positions, 16, False)
    assert torch.equal(checked, positions) and checked.data_ptr() != positions.data_ptr()
    torch.library.opcheck(checked_positions, (positions, 16, False))


def test_cache_transformed_before_attention_keeps_the_transform(monkeypatch):
    """Only reshapes and the GQA head repeat may sit between the cache and SDPA when attention is
    rewritten over the cached rows; any other op there is kept (the rebuild is cache-shaped)."""
    import gpt_fast_model

    update = gpt_fast_model.KVCache.update
    monkeypatch.setattr(gpt_fast_model.KVCache, "update",
                        lambda self, pos, k, v: tuple(t * 1.5 for t in update(self, pos, k, v)))
    model, reference = tiny_gpt_fast(2), tiny_gpt_fast(2)
    prompt, tokens = random_tokens(steps=2)
    out = generate_logits(compiled(model, None), prompt, tokens)
    assert max_error(out, generate_logits(reference, prompt, tokens)) < 1e-5
    assert xq.COMPILE_LOG[-1].rewritten == 2
