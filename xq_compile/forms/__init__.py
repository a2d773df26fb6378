"""Cache forms: what one attention layer keeps instead of K and V, as registered data.

:data:`FORMS` lists every form; :func:`form_for` is the one place a layer's form is chosen, from the
config and the layer's widths. The cache allocates a layer's state from its form's spec, the memory
formulas evaluate the same spec, the rewrite asks the form to emit its store and rebuild, and the
simulation installs the form's hooks. A new form is a new module here and one entry in ``FORMS``
(see "Adding a cache form" in the README).
"""

from __future__ import annotations

from ..config import XQuantConfig
from .base import CacheForm, FusedSources, LayerShape, StateTensor, allocate
from .joint_latent import JointLatentForm
from .split_latent import SplitLatentForm
from .x import XDeltaForm, XForm

# In order: a layer's form is the first entry whose ``applies`` is true (a specialization goes before the
# form it specializes). The four built-in predicates are exclusive and cover every config and shape.
FORMS: list[type[CacheForm]] = [XForm, XDeltaForm, SplitLatentForm, JointLatentForm]


def form_for(xquant: XQuantConfig, layer_idx: int, shape: LayerShape) -> CacheForm:
    """The form of layer ``layer_idx`` with these widths under ``xquant``: the one place it is chosen."""
    for form in FORMS:
        if form.applies(xquant, layer_idx, shape):
            return form(xquant, layer_idx, shape)
    raise RuntimeError(f"no cache form applies to layer {layer_idx} ({shape}, {xquant.describe()})")


__all__ = ["FORMS", "CacheForm", "FusedSources", "LayerShape", "StateTensor", "allocate", "form_for"]
