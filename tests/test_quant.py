"""Quantization core: packing round trips, error bounds, the fp16 scale/zero format, config checks."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from xq_compile import XQuantConfig, quant
from xq_compile.rotation import hadamard, rotate, fold_into_weight

BITS = [2, 3, 4, 8]


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from(BITS), words=st.integers(1, 6), rows=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_pack_unpack_round_trip(bits, words, rows, seed):
    per_word, bytes_per_word = quant.word_layout(bits)
    d = words * per_word * 8
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (rows, d), generator=g, dtype=torch.int32).to(torch.uint8)
    packed = quant.pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (rows, quant.packed_width(d, bits)) == (rows, d * bits // 8)
    assert torch.equal(quant.unpack(packed, bits), codes.to(torch.int32))


def test_three_bit_is_packed_densely():
    assert quant.packed_width(576, 3) == 216  # 3/8 byte per element, not 4 bits
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0]], dtype=torch.uint8)
    packed = quant.pack(codes, 3)
    word = sum(int(c) << (3 * i) for i, c in enumerate(codes[0]))
    assert packed.tolist() == [[word & 255, (word >> 8) & 255, (word >> 16) & 255]]


@settings(max_examples=30, deadline=None)
@given(bits=st.sampled_from(BITS), group=st.sampled_from([16, 32, 64]), seed=st.integers(0, 2**16),
       scale=st.floats(1e-3, 30))
def test_quantize_error_is_within_half_a_step(bits, group, seed, scale):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 5, 2 * group, generator=g) * scale
    codes, s, z = quant.quantize(x, bits, group)
    assert s.dtype == z.dtype == torch.float16 and s.shape == (3, 5, 2)
    assert int(codes.max()) <= (1 << bits) - 1
    x_hat = quant.dequantize(quant.pack(codes, bits), s, z, bits, group)
    step = s.float().repeat_interleave(group, -1)
    # half a step, plus the fp16 rounding of zero and scale (relative 2^-11 of the group's range)
    slack = (x.abs().unflatten(-1, (-1, group)).amax(-1).repeat_interleave(group, -1)) * 2e-3
    assert ((x - x_hat).abs() <= step / 2 + slack + 1e-6).all()
    assert torch.allclose(x_hat, quant.fake_quantize(x, bits, group))


def _values_of_every_kind():
    """fp32 values across fp16's subnormal, normal and overflow ranges and bf16's, with exact ties."""
    g = torch.Generator().manual_seed(0)
    spread = [torch.randn(1 << 14, generator=g) * m for m in (1e-9, 1e-6, 1e-4, 1e-2, 1.0, 1e2, 6e4, 1e6, 1e30, 3e38)]
    ties = torch.tensor([1 + 2.0 ** -11, 1 + 3 * 2.0 ** -11, 1 + 2.0 ** -8, 1 + 3 * 2.0 ** -8,  # fp16, bf16 halfway
                         2.0 ** -25, 3 * 2.0 ** -25, 65504.0, 65519.99, 65520.0, 0.0, -0.0, float("inf")])
    return torch.cat(spread + [ties, -ties])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rounded_equals_the_cast_there_and_back_also_when_compiled(dtype):
    x = _values_of_every_kind()
    expected = x.to(dtype).float()
    assert torch.equal(quant.rounded(x, dtype), expected)
    torch.compiler.reset()
    assert torch.equal(torch.compile(quant.rounded, fullgraph=True)(x, dtype), expected)
    # rounding really happens: most of these fp32 values are not 16-bit values
    assert (expected != x).float().mean() > 0.9


def test_compiled_quantize_chooses_the_codes_of_the_stored_scales():
    """A fused kernel may keep fp32 where the code casts to fp16 and back (Inductor's C++ backend does,
    when scale and zero are not outputs of the kernel): the codes would then be chosen for scales other
    than the stored ones, a step off at rounding edges (252 of these codes at 4 bits before rounded()).
    Plain torch.compile must give the eager codes, bit for bit."""
    x = torch.randn(64, 8, 256, generator=torch.Generator().manual_seed(1)) * 3
    for bits in (2, 4):
        torch.compiler.reset()
        codes_only = torch.compile(lambda t: quant.quantize(t, bits, 16)[0], fullgraph=True, dynamic=False)
        assert torch.equal(codes_only(x), quant.quantize(x, bits, 16)[0])


def test_error_shrinks_with_more_bits():
    x = torch.randn(64, 256)
    errors = [(quant.fake_quantize(x, b, 64) - x).pow(2).mean().item() for b in (2, 3, 4, 8)]
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] < 1e-4 < errors[0]


def test_constant_group_is_exact():
    x = torch.full((2, 64), 0.3125)
    assert torch.equal(quant.fake_quantize(x, 4, 32), x)


def test_hadamard_rotation_is_orthogonal_and_folds_into_weights():
    h = hadamard(64)
    assert torch.allclose(h @ h.T, torch.eye(64), atol=1e-6)
    x, w = torch.randn(5, 128), torch.randn(32, 128)
    assert torch.allclose(rotate(x, h) @ fold_into_weight(w, h).T, x @ w.T, atol=1e-4)


@pytest.mark.parametrize("kwargs, message", [
    (dict(bits=5), "bits=5 is not supported"),
    (dict(group_size=48), "power-of-two group_size"),
    (dict(group_size=1, rotation="none"), "group_size must be an integer >= 2"),
    (dict(rotation="random"), "rotation='random'"),
])
def test_bad_config_is_refused_clearly(kwargs, message):
    with pytest.raises(ValueError, match=message):
        XQuantConfig(**kwargs)


def test_group_size_must_divide_hidden_size():
    with pytest.raises(ValueError, match="does not divide the hidden size 96"):
        XQuantConfig(group_size=64).check_hidden_size(96)
    XQuantConfig(group_size=32).check_hidden_size(96)


def test_options_reject_unknown_keys():
    assert XQuantConfig.from_options({"bits": 3}).bits == 3
    with pytest.raises(ValueError, match="unknown xquant option"):
        XQuantConfig.from_options({"bitz": 3})
