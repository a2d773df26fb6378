"""Per-layer bits for a memory target: ``xq.calibrate(model, input_ids, target_ratio=10.0)``.

Layers do not suffer equally from a narrower X cache, so a cache of a given size is best spent unevenly.
:func:`calibrate` returns the ``XQuantConfig(layer_bits=...)`` whose cache is at least ``target_ratio``
times smaller than an fp16 K/V cache (as :func:`xq_compile.memory_report` counts it) with the least
estimated damage:

1. **Sensitivity** (:func:`layer_sensitivity`). One forward pass of the model under
   :func:`~xq_compile.simulate.simulate_xquant` with the ``base`` config, then a few backward passes,
   give for every layer i the diagonal of the per-token empirical Fisher information F_i = Σ_t g_t²
   of its reconstruction X̂_i (what K and V are rebuilt from; g_t the gradient of token t's loss).
   Each backward pass differentiates Σ_t z_t·loss_t with random signs z_t = ±1, whose squared
   gradient is Σ_t g_t² on average (the cross terms cancel): the Fisher diagonal without one backward
   pass per token. Quantizing the layer's X (or XQuant-CL delta) at width w leaves an error
   δ_i(w) = X̂_i(w) − X_i; the loss it costs is estimated as ½·Σ F_i ⊙ δ_i(w)² (the second-order
   Fisher-weighted error SqueezeLLM and KVQuant build on), in the rotated basis, where the errors of the elements are
   independent. One forward pass serves every layer and every width; measuring the loss of each
   candidate instead costs one forward pass each (30-90 on a 30-layer model), and on a few hundred
   tokens the loss change of one layer dropping a bit is mostly noise (±0.02-0.04 nats on SmolLM2,
   256 tokens).
2. **Allocation** (:func:`allocate_bits`): a multiple-choice knapsack, one width per layer, summed
   damage least, total bytes within the budget, solved exactly over the Pareto front of (bytes, damage).
3. **A second round** measures again around the widths of the first and allocates again: with XQuant-CL a
   narrow layer enlarges the delta the layer above it stores, which the first round cannot see. On
   SmolLM2 (10x, 512 Hamlet tokens, simulated on Britannica) it moved two layers and took the
   perplexity change from +3.22% to +1.95%; with 1024 calibration tokens the result was +3.51%: at
   this level the estimates do not separate configs reliably (docs/eval_smollm2_mha_auto.md).

The estimates assume that the damage of the layers adds up; the returned config is what they rank best,
not a measured optimum. Only the X form is calibrated (MHA-like models, where X is not wider than K+V).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
import torch.nn.functional as F

from . import memory
from .config import SUPPORTED_BITS, XQuantConfig
from .rotation import rotate
from .simulate import _kv_projections, _rotation, hooks_removed_after, rotated_reconstruction, simulate_xquant

DEFAULT_BASE = XQuantConfig(bits=3, cross_layer=True, base_layers=1)


def _progress(items, desc: str, show: bool):
    if not show:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, leave=False)


def _rows(input_ids: torch.Tensor) -> torch.Tensor:
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.shape[1] < 2:
        raise ValueError(f"input_ids must be [tokens] or [windows, tokens] with >= 2 tokens, got {tuple(input_ids.shape)}")
    return input_ids


def layer_sensitivity(model: torch.nn.Module, input_ids: torch.Tensor, base: XQuantConfig,
                      candidate_bits: Sequence[int] = SUPPORTED_BITS, probes: int = 4,
                      progress: bool = False) -> list[dict[int, float]]:
    """Per layer, {width: estimated increase of the mean next-token loss (nats) that this layer's
    quantization error at that width causes, against its exact X; the other layers as ``base``}.

    ``input_ids``: [tokens] or [windows, tokens], each window one forward pass and ``probes`` backward
    passes (random-sign probes of the per-token Fisher diagonal; more probes, less noise).
    """
    rows = _rows(input_ids)
    layers = _kv_projections(model)
    if any(isinstance(second, tuple) for _, second in layers):
        raise ValueError("calibrate needs separate k_proj/v_proj; this model fuses them into one projection: give "
                         "XQuantConfig(layer_bits=...) by hand")
    k_proj = layers[0][0]
    if base.form_of(k_proj.in_features, k_proj.out_features) != "x":
        raise ValueError(
            "calibrate supports the X form only (X no wider than K+V, e.g. MHA); this model caches the "
            "GQA latent form: give XQuantConfig(layer_bits=...) by hand, or base=XQuantConfig(form='x', ...)")
    if not base.quantized:
        raise ValueError("calibrate needs a quantized base config (bits=2, 3, 4 or 8), got bits=None")
    if probes < 1:
        raise ValueError(f"probes={probes}: at least one backward pass is needed")
    fisher: dict[int, torch.Tensor] = {}  # layer -> Σ_t g_t² per element of X̂·R (diagonal empirical Fisher)
    damage: dict[int, dict[int, float]] = {}  # layer -> width -> ½·Σ fisher ⊙ error², summed over windows
    tokens = 0
    signs = torch.Generator().manual_seed(0)
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:  # gradients for X̂ only, not for the weights
        p.requires_grad_(False)
    try:
        for ids in _progress(rows, "calibrate: forward + backward", progress):
            trace: dict = {}
            leaves: dict[int, list[torch.Tensor]] = {}

            def as_leaf(module, args, i):
                leaf = args[0].detach().requires_grad_()  # X̂_i as seen by k_proj / v_proj
                leaves.setdefault(i, []).append(leaf)
                return (leaf, *args[1:])

            # Registered inside simulate_xquant, so they run after its hooks and see X̂.
            with simulate_xquant(model, base, trace=trace), torch.enable_grad():
                handles = [proj.register_forward_pre_hook(lambda m, a, i=i: as_leaf(m, a, i))
                           for i, pair in enumerate(layers) for proj in pair]
                with hooks_removed_after(handles):
                    logits = model(ids[None]).logits
                token_losses = F.cross_entropy(logits[0, :-1].float(), ids[1:], reduction="none")
                for probe in range(probes):
                    # Σ_t z_t·loss_t with random signs z: E[(Σ_t z_t g_t)²] = Σ_t g_t², the per-token Fisher
                    # diagonal, without one backward pass per token (the cross terms cancel on average).
                    z = torch.randint(0, 2, token_losses.shape, generator=signs).float() * 2 - 1
                    (z * token_losses).sum().backward(retain_graph=probe < probes - 1)
                    for i, own in leaves.items():
                        grad = sum(leaf.grad for leaf in own).float()
                        h = _rotation(base, grad)
                        # X̂ = (X̂·R)·Rᵀ with R symmetric orthogonal: the gradient in the rotated basis is grad·R.
                        rotated = rotate(grad, h) if h is not None else grad
                        fisher[i] = fisher.get(i, 0) + rotated.square() / probes
                        for leaf in own:
                            leaf.grad = None
            tokens += ids.numel() - 1
            for i, (rotated_x, below) in trace.items():
                layer_damage = damage.setdefault(i, dict.fromkeys(candidate_bits, 0.0))
                for bits in candidate_bits:
                    error = (rotated_reconstruction(rotated_x, below, bits, base.group_size, base.scale_format)
                             - rotated_x.float())
                    layer_damage[bits] += 0.5 * (fisher[i] * error.square()).sum().item()
            fisher.clear()
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return [{bits: damage[i][bits] / tokens for bits in candidate_bits} for i in range(len(layers))]


def allocate_bits(costs: Sequence[dict[int, float]], damage: Sequence[dict[int, float]],
                  budget: float) -> tuple[int, ...] | None:
    """One width per layer with summed cost <= ``budget`` and the least summed damage, or None if no
    choice fits. ``costs[i][w]`` and ``damage[i][w]`` for every width w offered for layer i.

    Exact: dynamic programming over the layers, keeping only the Pareto front of partial choices
    (no other partial choice both cheaper and less damaging), which stays small.
    """
    front = [(0.0, 0.0, ())]  # (cost, damage, widths so far), cost ascending, damage descending
    for layer_costs, layer_damage in zip(costs, damage):
        extended = sorted((c + layer_costs[w], d + layer_damage[w], widths + (w,))
                          for c, d, widths in front for w in layer_costs if c + layer_costs[w] <= budget)
        front = []
        for entry in extended:
            if not front or entry[1] < front[-1][1]:
                front.append(entry)
        if not front:
            return None
    return front[-1][2]


@dataclasses.dataclass(frozen=True)
class Calibration:
    """What :func:`calibrate` chose and why: the config, its ratio, and the estimates behind it."""

    config: XQuantConfig
    ratio: float  # fp16 K/V bytes / XQuant bytes (memory_report), at seq_len or as n -> infinity
    estimated_damage: float  # summed estimated loss change (nats per token) of the chosen widths
    sensitivity: list[dict[int, float]]  # layer_sensitivity's estimates


def _ratio(report: memory.MemoryReport, seq_len: int | None) -> float:
    if seq_len is None:
        return float(report.ratio_to_fp16_limit(report.xquant))
    return report.ratio_to_fp16(report.xquant)


def calibrate(model: torch.nn.Module, input_ids: torch.Tensor, target_ratio: float = 10.0,
              base: XQuantConfig | None = None, seq_len: int | None = None,
              candidate_bits: Sequence[int] = SUPPORTED_BITS, probes: int = 4, rounds: int = 2,
              progress: bool = True, return_details: bool = False) -> XQuantConfig | Calibration:
    """The ``base`` config with per-layer ``layer_bits`` chosen so that the cache is at least
    ``target_ratio`` times smaller than an fp16 K/V cache, with the least estimated loss.

    Args:
        model: the model (its K/V projections are hooked for the measurement; weights are untouched).
        input_ids: calibration tokens, [tokens] or [windows, tokens].
        target_ratio: fp16 K/V bytes / XQuant bytes as :func:`~xq_compile.memory_report` counts them.
        base: everything but the widths (group size, rotation, XQuant-CL and its base layers); default
            XQuant-CL, 1 base layer, Hadamard rotation, group 64. Sensitivities are measured around it.
        seq_len: the cache length the ratio must hold at (fixed bytes included); ``None``: as n -> inf.
        candidate_bits: the widths a layer may get.
        probes: backward passes per calibration window (see :func:`layer_sensitivity`).
        rounds: measure and allocate this many times, each round's sensitivities measured around the
            previous round's widths (the first around ``base``).
        return_details: return a :class:`Calibration` (config, ratio, estimates) instead of the config.
    """
    base = DEFAULT_BASE if base is None else base
    if not candidate_bits or any(b not in SUPPORTED_BITS for b in candidate_bits):
        raise ValueError(f"candidate_bits={tuple(candidate_bits)!r}: give widths among {SUPPORTED_BITS}")
    layers = memory._dims(model.config)[0]
    reports = {b: memory.memory_report(model.config, dataclasses.replace(base, layer_bits=(b,) * layers),
                                       seq_len or 1) for b in candidate_bits}
    if seq_len is None:  # per-token rates: the ratio as n -> infinity
        costs = [{b: float(r.xquant_layers[i].per_token) for b, r in reports.items()} for i in range(layers)]
        some = next(iter(reports.values()))
        rest = float(some.xquant.per_token) - sum(float(e.per_token) for e in some.xquant_layers)
        budget = float(some.fp16_kv.per_token) / target_ratio - rest
    else:
        costs = [{b: float(r.xquant_layers[i].total_at) for b, r in reports.items()} for i in range(layers)]
        some = next(iter(reports.values()))
        rest = some.xquant.total_at - sum(e.total_at for e in some.xquant_layers)  # positions + fixed bytes
        budget = some.fp16_kv.total_at / target_ratio - rest
    best_ratio = max(_ratio(r, seq_len) for r in reports.values())
    if best_ratio < target_ratio:
        raise ValueError(f"target_ratio={target_ratio} is out of reach: with every layer at "
                         f"{min(candidate_bits)} bits the cache is {best_ratio:.2f}x smaller than fp16 K/V. Lower "
                         "the target or allow narrower widths (candidate_bits).")
    config = base
    for _ in range(rounds):
        # Round 2 on measures around round 1's choice: a narrow layer enlarges the XQuant-CL delta of the
        # layer above it, which sensitivities measured around the uniform base do not see.
        sensitivity = layer_sensitivity(model, input_ids, config, candidate_bits, probes, progress)
        widths = allocate_bits(costs, sensitivity, budget)
        assert widths is not None  # every layer at the narrowest width fits, checked above
        config = dataclasses.replace(base, layer_bits=widths)
    ratio = _ratio(memory.memory_report(model.config, config, seq_len or 1), seq_len)
    assert ratio >= target_ratio * (1 - 1e-12), (ratio, target_ratio)
    if not return_details:
        return config
    estimated = sum(layer[w] for layer, w in zip(sensitivity, widths))
    return Calibration(config, ratio, estimated, sensitivity)
