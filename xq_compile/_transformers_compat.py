"""Workarounds for specific transformers releases, in one place, each saying which versions need it and why.

xq-compile supports transformers 5.17-5.24. Code that depends on transformers *internals* of some of
those releases lives here; when the oldest supported release no longer needs a workaround, delete it.
(The cache argument's rename, ``cache_argument`` in cache.py, is public API and stays there.)
"""

from __future__ import annotations

import types

import torch
import transformers
from packaging.version import Version

TRANSFORMERS_RELEASE: tuple[int, ...] = Version(transformers.__version__).release

# transformers 5.18.0 and 5.19.0: a StaticCache-like cache (XQuantCache is one) cannot be compiled with
# fullgraph=True for a prefill without padding.
#
#   * generate() drops an all-ones attention mask (new in 5.18), so the prefill's mask code sees
#     padding_mask=None;
#   * masking_utils._ignore_causal_mask_sdpa then evaluates ``if q_offset == 0 and (...)``, and a static
#     cache's q_offset is its length *tensor* (StaticLayer keeps it on the device so that decode steps do
#     not recompile): Dynamo fails with "Unsupported: Data-dependent branching".
#
# 5.17 never reaches that line while tracing (it returns False for any traced call), and 5.20 added
# ``if isinstance(q_offset, torch.Tensor) and is_tracing(q_offset): return False`` before it. The fix
# below is that 5.20 line, for 5.18 and 5.19 only.
_MASK_SKIP_NEEDS_TENSOR_OFFSET_CHECK = (5, 18) <= TRANSFORMERS_RELEASE[:2] < (5, 20)

_mask_tracing_fixed = False


def make_mask_creation_traceable() -> None:
    """On transformers 5.18/5.19, let Dynamo trace the mask code of a prefill with a static cache's q_offset.

    Registers, with the public ``torch.compiler.substitute_in_graph``, a stand-in that Dynamo traces in
    place of ``masking_utils._ignore_causal_mask_sdpa``. Eager code keeps calling transformers' own
    function (the module attribute is not replaced), and under Dynamo the stand-in differs from it only
    where the original fails to trace: a traced tensor ``q_offset`` gives False ("do not skip the
    causal mask"), as in transformers 5.20+, so the mask is built from the traced offset. Called when
    an XQuantCache is created; idempotent; does nothing on other releases.
    """
    global _mask_tracing_fixed
    if _mask_tracing_fixed or not _MASK_SKIP_NEEDS_TENSOR_OFFSET_CHECK:
        return
    from transformers import masking_utils

    original = masking_utils._ignore_causal_mask_sdpa
    # Dynamo substitutes by object identity, so the stand-in calls a copy of the original function
    # (same code, globals and defaults): Dynamo inlines that copy instead of the stand-in again.
    traceable_original = types.FunctionType(original.__code__, original.__globals__, original.__name__,
                                            original.__defaults__, original.__closure__)

    @torch.compiler.substitute_in_graph(original)
    def _ignore_causal_mask_sdpa(padding_mask, q_length, kv_length, q_offset, kv_offset,
                                 local_attention_size=None):
        if isinstance(q_offset, torch.Tensor):  # only ever traced: eager calls run the original
            return False
        return traceable_original(padding_mask, q_length, kv_length, q_offset, kv_offset, local_attention_size)

    _mask_tracing_fixed = True
