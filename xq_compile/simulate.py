"""Simulated XQuant: the unmodified eager model, with K and V computed from fake-quantized X.

It quantizes exactly what the compiled path caches, so it is both the torch reference the compiled
decode path is tested against and a fast one-pass mode for sweeps. Every token's K/V (the current
token's included) comes from X̂ = dequantize(quantize(X·R))·Rᵀ; queries use the exact X, as in the
compiled path.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F

from . import quant
from .config import XQuantConfig
from .latent import LATENT_FACTORS, fake_quantize_key_latent
from .rotation import hadamard, rotate


def _rotation(config: XQuantConfig, x: torch.Tensor) -> torch.Tensor | None:
    return hadamard(config.group_size, device=x.device) if config.rotation == "hadamard" else None


def simulated_x(x: torch.Tensor, config: XQuantConfig, bits: int | None = None) -> torch.Tensor:
    """X̂ as the compiled path reconstructs it (rotation undone, so it feeds the original weights)."""
    bits = config.bits if bits is None else bits
    h = _rotation(config, x)
    if h is None:
        return quant.fake_quantize(x, bits, config.group_size)
    # blockdiag(H) is symmetric and orthogonal: R⁻¹ = R.
    return rotate(quant.fake_quantize(rotate(x, h), bits, config.group_size), h)


def _kv_projections(model: torch.nn.Module) -> list[tuple[torch.nn.Module, ...]]:
    """Per attention layer, in order: (k_proj, v_proj), or (qkv_proj, first K/V row) for a fused one."""
    layers = []
    for module in model.modules():
        k, v, qkv, wqkv = (getattr(module, name, None) for name in ("k_proj", "v_proj", "qkv_proj", "wqkv"))
        if isinstance(k, torch.nn.Linear) and isinstance(v, torch.nn.Linear):
            layers.append((k, v))
        elif isinstance(qkv, torch.nn.Linear):  # Phi-3 style: rows [q | k | v]
            layers.append((qkv, module.config.num_attention_heads * module.head_dim))
        elif isinstance(wqkv, torch.nn.Linear):  # gpt-fast: rows [q | k | v], q as wide as the model
            layers.append((wqkv, module.dim))
    if not layers:
        raise ValueError("no attention module with k_proj/v_proj, qkv_proj or wqkv Linear layers to simulate "
                         "XQuant on")
    return layers


def rotated_reconstruction(rotated_x: torch.Tensor, below: torch.Tensor | None, bits: int | None,
                           group_size: int) -> torch.Tensor:
    """X̂·R of one layer (fp32) from its rotated X: Q(X·R), or with XQuant-CL's delta against the
    reconstruction ``below`` of the layer underneath, X̂_{i-1}·R + Q(X·R - X̂_{i-1}·R)."""
    if below is None:
        return quant.fake_quantize(rotated_x.float(), bits, group_size)
    return below + quant.fake_quantize(rotated_x.float() - below, bits, group_size)


@contextlib.contextmanager
def simulate_xquant(model: torch.nn.Module, config: XQuantConfig, trace: dict | None = None) -> Iterator[None]:
    """Within the block, every k_proj/v_proj of ``model`` sees X̂ instead of X.

    With ``cross_layer`` the layers are chained in module order exactly as the compiled path chains
    them: layer i sees X̂_{i-1} + deq(Q(X_i·R - X̂_{i-1})) for the tokens of the current call.
    ``trace``, if given, receives for every X-form layer i ``trace[i] = (X·R, X̂_{i-1}·R or None)``:
    what its reconstruction was computed from (:mod:`xq_compile.calibrate` re-quantizes it at other
    widths).
    """
    layers = _kv_projections(model)
    reconstructed: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> (its X, X̂·R)

    def x_hat(i: int, x: torch.Tensor) -> torch.Tensor:
        if i in reconstructed and reconstructed[i][0] is x:
            rotated_hat = reconstructed[i][1]  # v_proj of the layer whose k_proj just ran
        else:
            h = _rotation(config, x)
            xr = rotate(x, h) if h is not None else x
            below = reconstructed[i - 1][1] if config.stores_delta(i) else None
            rotated_hat = rotated_reconstruction(xr, below, config.bits_of_layer(i), config.group_size)
            reconstructed[i] = (x, rotated_hat)
            if trace is not None:
                trace[i] = (xr, below)
        h = _rotation(config, x)
        return (rotate(rotated_hat, h) if h is not None else rotated_hat).to(x.dtype)

    def fused_hook(module, args, out, i, kv_start):
        # queries keep the exact X; only the K/V rows of the fused projection see X̂
        bias = module.bias[kv_start:] if module.bias is not None else None
        kv = torch.nn.functional.linear(x_hat(i, args[0]), module.weight[kv_start:], bias)
        return torch.cat([out[..., :kv_start], kv], dim=-1)

    handles = []
    joint: dict = {}  # XQuant-CL in the latent form: the chain's state for the current call
    for i, (first, second) in enumerate(layers):
        if not isinstance(second, int) and config.form_of(first.in_features, first.out_features) == "latent":
            handles += (_joint_latent_hooks(i, first, second, config, joint) if config.cross_layer
                        else _latent_hooks(first, second, config, config.bits_of_layer(i)))
            continue
        if isinstance(second, int):
            handles.append(first.register_forward_hook(lambda m, a, o, i=i, s=second: fused_hook(m, a, o, i, s)))
            continue
        hook = lambda module, args, i=i: (x_hat(i, args[0]), *args[1:])  # noqa: E731
        handles += [first.register_forward_pre_hook(hook), second.register_forward_pre_hook(hook)]
    with hooks_removed_after(handles):
        yield


def _latent_hooks(k_proj: torch.nn.Module, v_proj: torch.nn.Module, config: XQuantConfig, bits: int | None) -> list:
    """GQA latent form: K and V from the latents as the cache holds them once the window is written.

    Key latent: complete token groups quantized per channel, the open group in fp16; value latent per
    token (rotated). See :mod:`xq_compile.latent`.
    """
    def key_hook(module, args, out):
        down, up = LATENT_FACTORS.get(module.weight)
        latent = fake_quantize_key_latent(F.linear(args[0], down), bits, config.group_size, config.keep_channel0)
        return F.linear(latent, up, module.bias)

    def value_hook(module, args, out):
        down, up = LATENT_FACTORS.get(module.weight, None, _rotation(config, args[0]))
        latent = quant.fake_quantize(F.linear(args[0], down), bits, config.group_size)
        return F.linear(latent, up, module.bias)

    return [k_proj.register_forward_hook(key_hook), v_proj.register_forward_hook(value_hook)]


def _joint_latent_hooks(i: int, k_proj: torch.nn.Module, v_proj: torch.nn.Module, config: XQuantConfig,
                        chain: dict) -> list:
    """XQuant-CL in the latent form, layer ``i``: the joint K|V latent as the compiled path rebuilds it.

    ``chain`` carries X̃ (fp32) from layer to layer within one forward call, as the compiled graph's
    accumulator does: a base layer quantizes its own latent, a layer above quantizes the delta
    against X̃·downᵀ, and X̃ then moves to the reconstructed latent in this layer's subspace.
    """
    kv = k_proj.out_features

    def latent_hat(x):
        if chain.get(i, (None,))[0] is x:
            return chain[i][1], chain[i][2]
        down, up = LATENT_FACTORS.get_joint(k_proj.weight, v_proj.weight, rotation=_rotation(config, x))
        latent, d32, bits = F.linear(x, down).float(), down.float(), config.bits_of_layer(i)
        below = chain.get("acc") if i > 0 else None
        if below is None:
            hat = quant.fake_quantize(latent, bits, config.group_size)
            acc = F.linear(hat, d32.t())
        else:
            seen = F.linear(below, d32)
            hat = (seen + quant.fake_quantize(latent - seen, bits, config.group_size) if config.stores_delta(i)
                   else quant.fake_quantize(latent, bits, config.group_size))
            acc = below + F.linear(hat - seen, d32.t())
        chain["acc"], chain[i] = acc, (x, hat.to(x.dtype), up)
        return chain[i][1], up

    def key_hook(module, args, out):
        hat, up = latent_hat(args[0])
        return F.linear(hat, up[:kv], module.bias)

    def value_hook(module, args, out):
        hat, up = latent_hat(args[0])
        return F.linear(hat, up[kv:], module.bias)

    return [k_proj.register_forward_hook(key_hook), v_proj.register_forward_hook(value_hook)]


@contextlib.contextmanager
def hooks_removed_after(handles: list) -> Iterator[None]:
    """Keep module hooks installed for the ``with`` block only (also on error)."""
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
