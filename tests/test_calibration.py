"""Per-layer bits (XQuantConfig.layer_bits) and xq.calibrate: cache layout, exact bytes, the compiled
path against the simulation, and the allocation on a model with known insensitive layers."""

import dataclasses
import itertools

import pytest
import torch
from transformers import LlamaConfig

import xq_compile as xq
from xq_compile.calibration import allocate_bits, layer_sensitivity
from xq_compile.memory import memory_report
from xq_compile.simulate import simulate_xquant

from conftest import compiled_run, decode_inputs, max_error, tiny_llama


def _config(layers=4, kv_heads=8, hidden=256):
    return LlamaConfig(vocab_size=50, hidden_size=hidden, intermediate_size=64, num_hidden_layers=layers,
                       num_attention_heads=8, num_key_value_heads=kv_heads)


@pytest.mark.parametrize("cfg", [
    xq.XQuantConfig(layer_bits=(2, 8, 3, 4), group_size=32),
    xq.XQuantConfig(layer_bits=(4, 2, 3, 2), group_size=64, rotation="none", cross_layer=True, base_layers=1),
])
def test_layer_bits_layout_and_exact_bytes(cfg):
    config = _config()
    cache = xq.XQuantCache(config, max_batch_size=2, max_cache_len=40, xquant=cfg)
    for layer, bits in zip(cache.layers, cfg.layer_bits):
        assert layer.bits == bits
        assert layer.state["codes"].shape == (2, 40, 256 * bits // 8)  # 3-bit: 8 codes in 3 bytes
        assert layer.state["scale"].shape == (2, 40, 256 // cfg.group_size)
    report = memory_report(config, cfg, 40, batch=2)
    assert report.xquant.total_at == cache.nbytes()
    # Each layer's own share, as a hand count: packed codes + fp16 scale and zero per group, per row.
    for entry, bits in zip(report.xquant_layers, cfg.layer_bits):
        assert entry.total_at == 2 * 40 * (256 * bits // 8 + 4 * 256 // cfg.group_size)
    assert cfg.effective_bits() == sum(cfg.layer_bits) / 4 + 32 / cfg.group_size


def test_layer_bits_latent_form_exact_bytes():
    config = _config(kv_heads=2)  # X (256) wider than K+V (128): the latent form
    cfg = xq.XQuantConfig(layer_bits=(2, 4, 8, 3), group_size=32)
    cache = xq.XQuantCache(config, max_batch_size=1, max_cache_len=70, xquant=cfg)
    assert [layer.form.name for layer in cache.layers] == ["latent"] * 4
    assert memory_report(config, cfg, 70).xquant.total_at == cache.nbytes()


def test_layer_bits_refusals():
    with pytest.raises(ValueError, match=r"layer_bits=\(4, 5\): give one width per layer, each one of "
                                         r"\(2, 3, 4, 8\)"):
        xq.XQuantConfig(layer_bits=(4, 5))
    cfg = xq.XQuantConfig(layer_bits=[2, 4])  # a list from options= becomes a tuple (hashable)
    assert cfg.layer_bits == (2, 4) and hash(cfg)
    message = "XQuantConfig.layer_bits has 2 entries but the model has 4 attention layers: give one width per layer."
    with pytest.raises(ValueError, match=message):
        xq.XQuantCache(_config(), max_batch_size=1, max_cache_len=8, xquant=cfg)
    with pytest.raises(ValueError, match=message):
        memory_report(_config(), cfg, 8)


@pytest.mark.parametrize("cross_layer", [False, True])
def test_mixed_bits_compiled_path_matches_simulation(cross_layer):
    """The rewritten graph stores and rebuilds every layer at its own width, as the simulation does."""
    model = tiny_llama(num_layers=3)
    cfg = xq.XQuantConfig(layer_bits=(8, 2, 3), group_size=32, cross_layer=cross_layer, base_layers=1)
    calls = decode_inputs(batch=1, prompt=6, steps=5)
    got, cache = compiled_run(model, calls, cfg, backend=xq.make_xquant_backend("aot_eager"))
    with torch.no_grad(), simulate_xquant(model, cfg):
        ids = torch.cat([c["input_ids"] for c in calls], 1)
        want = model(ids).logits
    got = torch.cat(got, 1)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)
    # and it is not the uniform config: the 2-bit layer changes the logits
    with torch.no_grad(), simulate_xquant(model, dataclasses.replace(cfg, layer_bits=(8, 8, 8))):
        uniform = model(ids).logits
    assert (uniform - want).abs().max() > 1e-2


def test_allocate_bits_is_the_exact_knapsack():
    """Against brute force over all 3^5 choices, for several budgets."""
    g = torch.Generator().manual_seed(0)
    costs = [{2: 10.0, 3: 14.0, 4: 18.0} for _ in range(5)]
    damage = [{2: float(a), 3: float(b), 4: float(c)}
              for a, b, c in (torch.rand(5, 3, generator=g).sort(dim=1, descending=True).values * 10).tolist()]
    for budget in (50, 61, 70, 77, 90):
        fitting = [c for c in itertools.product((2, 3, 4), repeat=5)
                   if sum(costs[i][w] for i, w in enumerate(c)) <= budget]
        best = min(fitting, key=lambda c: sum(damage[i][w] for i, w in enumerate(c)))
        assert allocate_bits(costs, damage, budget) == best
    assert allocate_bits(costs, damage, 49) is None


def _model_with_blind_layers():
    """4 layers; layers 1 and 3 have zero K/V projections, so their cached X cannot change anything."""
    model = tiny_llama(num_layers=4, hidden=64, heads=4, num_kv_heads=4)
    with torch.no_grad():
        for i in (1, 3):
            model.model.layers[i].self_attn.k_proj.weight.zero_()
            model.model.layers[i].self_attn.v_proj.weight.zero_()
    return model


def test_sensitivity_zero_where_kv_ignore_x_and_falls_with_bits():
    model = _model_with_blind_layers()
    ids = torch.randint(0, 128, (2, 48), generator=torch.Generator().manual_seed(3))
    base = xq.XQuantConfig(bits=3, group_size=32, cross_layer=True, base_layers=1)
    sens = layer_sensitivity(model, ids, base, (2, 3, 4, 8))
    for i in (1, 3):
        assert all(v == 0 for v in sens[i].values())
    for i in (0, 2):
        assert sens[i][2] > sens[i][3] > sens[i][4] > sens[i][8] > 0
    assert all(p.requires_grad for p in model.parameters())  # restored after the measurement


def test_calibrate_meets_the_target_on_the_insensitive_layers():
    model = _model_with_blind_layers()
    ids = torch.randint(0, 128, (48,), generator=torch.Generator().manual_seed(3))
    base = xq.XQuantConfig(bits=3, group_size=32, cross_layer=True, base_layers=1)
    # Per layer and token: 64·b/8 codes + 4·2 scale/zero bytes; fp16 K/V 256 bytes; + 8 for the position.
    # Two layers at 2 bits and two at 4: 1024 / (8 + 2·24 + 2·40) = 7.53x; one at 2 bits only: 6.74x.
    result = xq.calibrate(model, ids, target_ratio=7.5, base=base, candidate_bits=(2, 4), progress=False,
                          return_details=True)
    assert result.config.layer_bits == (4, 2, 4, 2)
    assert result.ratio == pytest.approx(1024 / 136)
    assert result.config == dataclasses.replace(base, layer_bits=(4, 2, 4, 2))
    # At a cache length the fixed bytes (the 4 KiB Hadamard block, placeholders) count too: at 1024
    # tokens two 2-bit layers give 7.31x, one 6.56x.
    cfg = xq.calibrate(model, ids, target_ratio=7.0, base=base, seq_len=1024, candidate_bits=(2, 4),
                       progress=False)
    report = memory_report(model.config, cfg, 1024)
    assert cfg.layer_bits == (4, 2, 4, 2) and 7.0 <= report.ratio_to_fp16(report.xquant) < 7.32
    with pytest.raises(ValueError, match=r"target_ratio=12 is out of reach: with every layer at 2 bits the cache "
                                         r"is 9.85x smaller than fp16 K/V"):
        xq.calibrate(model, ids, target_ratio=12, base=base, candidate_bits=(2, 4), progress=False)


def test_calibrate_refuses_the_latent_form():
    model = tiny_llama(num_kv_heads=1, hidden=64, heads=4)  # X (64) wider than K+V (32)
    with pytest.raises(ValueError, match="calibrate supports the X form only"):
        xq.calibrate(model, torch.arange(16), target_ratio=2.0, base=xq.XQuantConfig(bits=4, group_size=16),
                     progress=False)


def test_sensitivity_probes_estimate_the_per_token_fisher():
    """The random-sign probes converge to ½·Σ_t Σ (g_t·R ⊙ δ)², computed here with one backward pass per
    token's loss (g_t: gradient of token t's loss with respect to the layer's X̂, R the Hadamard block)."""
    from xq_compile.rotation import hadamard, rotate
    from xq_compile.simulate import hooks_removed_after, rotated_reconstruction

    model = tiny_llama(num_layers=2, hidden=64, heads=4, num_kv_heads=4)
    ids = torch.randint(0, 128, (9,), generator=torch.Generator().manual_seed(5))
    base = xq.XQuantConfig(bits=3, group_size=32)
    h = hadamard(32)
    leaves, trace = {}, {}

    def as_leaf(module, args, i):
        leaves.setdefault(i, []).append(args[0].detach().requires_grad_())
        return (leaves[i][-1], *args[1:])

    for p in model.parameters():
        p.requires_grad_(False)
    with simulate_xquant(model, base, trace=trace), torch.enable_grad():
        projections = [(layer.self_attn.k_proj, layer.self_attn.v_proj) for layer in model.model.layers]
        handles = [proj.register_forward_pre_hook(lambda m, a, i=i: as_leaf(m, a, i))
                   for i, pair in enumerate(projections) for proj in pair]
        with hooks_removed_after(handles):
            losses = torch.nn.functional.cross_entropy(model(ids[None]).logits[0, :-1], ids[1:], reduction="none")
    fisher = {i: 0 for i in leaves}
    for t in range(len(losses)):
        grads = torch.autograd.grad(losses[t], [leaf for i in sorted(leaves) for leaf in leaves[i]], retain_graph=True)
        for i in leaves:
            fisher[i] = fisher[i] + rotate(grads[2 * i] + grads[2 * i + 1], h).square()
    for p in model.parameters():
        p.requires_grad_(True)
    expected = [{b: 0.5 * (fisher[i] * (rotated_reconstruction(*trace[i], b, 32) - trace[i][0]).square()).sum().item()
                 / len(losses) for b in (2, 4)} for i in range(2)]
    estimated = layer_sensitivity(model, ids, base, (2, 4), probes=1500)
    for want, got in zip(expected, estimated):
        for b in (2, 4):
            assert got[b] == pytest.approx(want[b], rel=0.1)
    one_probe = layer_sensitivity(model, ids, base, (2, 4), probes=1)
    assert any(abs(got[2] / want[2] - 1) > 0.1 for got, want in zip(one_probe, expected))  # the probes matter
