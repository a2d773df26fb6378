"""How a rewritten layer reads its cache back: the rebuild strategies, as a table.

* ``inline``: plain torch over the data-dependent length n (read with ``.item()``): Inductor fuses
  unpack + dequantize into the kernel feeding the matmul, and the work follows n. The CPU default.
* ``op``: the length stays a device tensor and the rebuild covers all max_cache_len rows (no host
  sync, static shapes: CUDA graphs possible); packed X rows go through the ``xq_compile::dequant_project``
  op (a Triton kernel on CUDA, the torch reference elsewhere).
* ``fused``: ``op``, and decode steps attend with ``xq_compile::decode_attention``, which rebuilds K
  tiles with RoPE on chip and absorbs the values: K and V never reach memory. Where a site or a form
  does not allow it (another RoPE than HF's rotate_half, XQuant-CL, long chunks) the site falls back
  to ``op``. The CUDA default (compute capability 8.0 on: see :func:`strategy_for`).
"""

from __future__ import annotations

import dataclasses

import torch

from xq_compile.kernels.devices import triton_kernels_serve, unserved


@dataclasses.dataclass(frozen=True)
class RebuildStrategy:
    name: str
    device_length: bool      # length read on device; max_cache_len rows rebuilt, masked past the length
    packed_projection: bool  # packed X rows projected by the dequant_project op
    fused_attention: bool    # decode steps use the fused decode-attention op where allowed


STRATEGIES = {
    "inline": RebuildStrategy("inline", device_length=False, packed_projection=False, fused_attention=False),
    "op": RebuildStrategy("op", device_length=True, packed_projection=True, fused_attention=False),
    "fused": RebuildStrategy("fused", device_length=True, packed_projection=True, fused_attention=True),
}
REBUILD_FORMS = ("auto", *STRATEGIES)
FUSED_MAX_QUERY_TOKENS = 16  # the fused decode-attention kernel is written for decode steps and short chunks


def strategy_for(rebuild: str, device: torch.device) -> RebuildStrategy:
    """``rebuild`` ("auto", or a name of :data:`STRATEGIES`) for a layer whose cache lives on ``device``.

    "auto" is ``fused`` where the ops' Triton kernels serve the device (CUDA, compute capability 8.0 on),
    else ``inline``: on CPU, and on older GPUs (T4, V100), which Triton's dots do not serve. A forced
    ``op`` or ``fused`` on such a GPU is refused here, at compile time, rather than at the first launch."""
    if rebuild == "auto":
        if triton_kernels_serve(device):
            return STRATEGIES["fused"]
        return STRATEGIES["inline"]
    strategy = STRATEGIES[rebuild]
    if strategy.packed_projection and device.type == "cuda" and not triton_kernels_serve(device):
        raise ValueError(
            f"rebuild={rebuild!r} runs the ops' Triton kernels, which need a GPU of {unserved(device)}: use "
            f"rebuild='auto' (or 'inline'), which rebuilds in plain torch there")
    return strategy
