"""XQuantCache: a transformers ``Cache`` that holds only the packed low-bit X of every layer.

The model's attention code still calls ``cache.update(k, v)`` and reads ``layer.keys``/``layer.values``:
Dynamo traces that, and the xquant backend rewrites the traced writes into an X-cache store and the
reads into a K/V rebuild from X. So the cache must keep K/V *shapes* but never their memory:
``keys``/``values`` are stride-0 views of one 4-byte tensor. Any eager (un-rewritten) write into them
fails loudly instead of silently corrupting the X cache.

Each layer's state is what its cache form (:mod:`xq_compile.forms`) specifies: e.g. packed codes +
fp16 scale/zero per token for the X form, the key and value latents for GQA models.
A sliding-window layer keeps the last ``sliding_window`` rows of X (:class:`XWindowLayer`), or where that is
not smaller, the model's own K/V window (:class:`ModelWindowLayer`, transformers' static sliding-window
layer): the pass leaves that one as the model wrote it.
Shared by all X layers: positions int64 [B, L], the position id each cached row was written with
(RoPE is re-applied to rebuilt keys at these positions, so left-padded rows keep their own).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, StaticLayer, StaticSlidingWindowLayer

from . import refusal
from ._torch_private import mark_static_address, weak_tensor_map
from ._transformers_compat import make_mask_creation_traceable
from .config import XQuantConfig
from .forms import CacheForm, LayerShape, allocate, form_for, layer_shapes
from .forms.window import ModelWindowForm, XWindowForm
from .rotation import rotation_of

# Maps each layer's K and V placeholder tensor to its XQuantLayer. The compiled graph receives those
# placeholders as inputs (Dynamo lifts ``cache.layers[i].keys``); this is how the backend finds the
# X state that belongs to them, both at compile time and on every call. Weak: dies with the cache.
_LAYER_OF_PLACEHOLDER = weak_tensor_map()


def layer_of(tensor: torch.Tensor) -> "XQuantLayer | None":
    """The XQuantLayer whose K or V placeholder ``tensor`` is, or None for any other tensor."""
    return _LAYER_OF_PLACEHOLDER.get(tensor)


# The same for the sliding-window layers of an XQuantCache: their K/V are real, the pass leaves them.
_WINDOW_OF_PLACEHOLDER = weak_tensor_map()


def window_layer_of(tensor: torch.Tensor) -> "ModelWindowLayer | None":
    """The ModelWindowLayer whose K or V ``tensor`` is, or None for any other tensor."""
    return _WINDOW_OF_PLACEHOLDER.get(tensor)


def _is_compiling() -> bool:
    return torch.compiler.is_compiling()


def _static_or_none(size) -> int | None:
    """``size`` if it is a plain int; None for a symbolic size (the run-time check covers that case)."""
    return size if isinstance(size, int) else None


EAGER_WRITE_MESSAGE = (
    "XQuantCache holds only the quantized X and cannot be written by eager code, but the model ran "
    "uncompiled. Either its forward is not compiled with the xquant backend: use "
    "xq.compile_model(model, ...), or model.forward = torch.compile(model.forward, backend='xquant', "
    "fullgraph=True) and generate(..., disable_compile=True) so transformers does not run its own "
    "compile (cm = torch.compile(model, ...) compiles cm(...) only: cm.generate() runs the original, "
    "uncompiled model; use model.compile(backend='xquant', fullgraph=True) or xq.compile_model). Or "
    "Dynamo gave up compiling it: a graph break (compile with fullgraph=True), or its recompile limit "
    "(torch._dynamo.config.recompile_limit graphs per model object; each XQuantConfig x cache size "
    "takes two: torch.compiler.reset() between configurations, or xq.compile_model, which raises the "
    "limit for its own calls)."
)


class XQuantLayer(StaticLayer):
    """One attention layer's X state. Written and read only by graphs compiled with backend='xquant'."""

    def __init__(
        self,
        *,
        layer_idx: int,
        max_cache_len: int,
        batch_size: int,
        hidden_size: int,
        num_kv_heads: int,
        head_dim: int,
        xquant: XQuantConfig,
        dtype: torch.dtype,
        device: torch.device,
        positions: torch.Tensor,
        rotation: torch.Tensor | None,
        model_buffers: tuple[torch.Tensor, torch.Tensor] | None = None,
        form: CacheForm | None = None,
    ) -> None:
        super().__init__(max_cache_len=max_cache_len)
        xquant.check_window_fits(max_cache_len)
        self.layer_idx = layer_idx
        self.xquant = xquant
        self.hidden_size = hidden_size
        self.form = form or form_for(xquant, layer_idx, LayerShape(hidden_size, num_kv_heads * head_dim))
        self.bits = self.form.bits
        self.dtype = dtype
        self.device = device
        self.batch_size, self.num_heads = batch_size, num_kv_heads
        self.k_head_dim = self.v_head_dim = head_dim
        self.positions = positions
        self.rotation = rotation
        # Everything the rewrite bakes into a compiled graph. update() reads it while Dynamo traces, so
        # Dynamo guards on it and a forward compiled for one configuration recompiles for another.
        self.compile_key = (self.bits, xquant.group_size, xquant.rotation, xquant.cross_layer, self.form.name,
                            xquant.absorb_values, xquant.keep_channel0, xquant.recent, xquant.sink, xquant.scale_format,
                            max_cache_len,
                            batch_size, hidden_size, num_kv_heads, head_dim)
        # Host-side mirror of cumulative_length: lets us refuse an overflow before running the graph,
        # without reading the device counter (a sync, and impossible under CUDA graphs). A model's own
        # buffers (options= mode) are written at positions the model picks: no mirror is possible.
        self.host_length = 0
        self.tracks_length = model_buffers is None

        shape = (batch_size, num_kv_heads, max_cache_len, head_dim)
        if model_buffers is None:
            self.keys = torch.zeros(1, dtype=dtype, device=device).expand(shape)
            self.values = torch.zeros(1, dtype=dtype, device=device).expand(shape)
        else:  # the model's own K/V buffers, read by its graph until release_kv_buffers() drops them
            self.keys, self.values = model_buffers
        self.cumulative_length = torch.zeros((), dtype=torch.int64, device=device)
        self.state = allocate(self.form.state_spec(batch_size, max_cache_len, dtype), device)
        for tensor in (*self.state.values(), self.cumulative_length):
            # Fixed addresses: the compiled graph writes them in place, and CUDA graphs need them stable.
            mark_static_address(tensor)
        _LAYER_OF_PLACEHOLDER[self.keys] = self
        _LAYER_OF_PLACEHOLDER[self.values] = self
        self.is_initialized = True

    # -- what transformers calls -------------------------------------------------------------
    def lazy_initialization(self, key_states, value_states) -> None:  # allocated in __init__
        return None

    def update(self, key_states, value_states, *args, **kwargs):
        if not _is_compiling():
            raise RuntimeError(EAGER_WRITE_MESSAGE)
        for setting in self.compile_key:  # never true: only here so that Dynamo guards on the settings
            if setting == "unreachable":
                raise AssertionError
        problem = self.call_problem(key_states.shape[0], _static_or_none(key_states.shape[-2]),
                                    key_states.dtype, key_states.device)
        if problem is not None:
            # Checked while Dynamo traces (shapes, dtype and device are static there); see refusal.py
            # for why this is not a plain raise.
            error, message = problem
            return (refusal.refuse(key_states, self.max_cache_len, error, message),
                    refusal.refuse(value_states, self.max_cache_len, error, message))
        return super().update(key_states, value_states, *args, **kwargs)

    def call_problem(self, rows: int, new_tokens: int | None, dtype: torch.dtype,
                     device: torch.device) -> tuple[type[Exception], str] | None:
        """Why a call with these inputs cannot run on this layer (error type, message), or None.

        The one place these rules live: the traced check in update(), and the eager checks of
        :func:`xq_compile.compile_model` before a call, both ask here.
        """
        if dtype != self.dtype or device.type != self.device.type:
            return TypeError, (
                f"XQuantCache was created with dtype={self.dtype}, device={self.device}, but layer "
                f"{self.layer_idx} runs in dtype={dtype} on {device}: create the cache with dtype={dtype}, "
                f"device='{device}' (the model's)."
            )
        if rows != self.batch_size:
            return ValueError, (
                f"XQuantCache was created with max_batch_size={self.batch_size}, but this call has {rows} rows, "
                "and its rows are fixed, as in transformers' StaticCache. generate() runs batch x num_beams x "
                "num_return_sequences rows, so max_batch_size must be at least batch x num_beams: create the "
                f"cache with max_batch_size={rows}"
                + (" (or pad the batch to its size)." if rows < self.batch_size else ".")
            )
        if new_tokens is not None and new_tokens > self.max_cache_len:
            return ValueError, (
                f"XQuantCache overflow: a call with {new_tokens} new tokens does not fit in "
                f"max_cache_len={self.max_cache_len}. Create the cache with max_cache_len >= the prompt length "
                "+ max_new_tokens."
            )
        return None

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor this layer owns (what nbytes counts)."""
        return [*self.state.values(), self.keys, self.values, self.cumulative_length]

    def check_room(self, new_tokens: int) -> None:
        """Refuse, before anything is written, a call whose ``new_tokens`` do not fit."""
        if self.tracks_length and self.host_length + new_tokens > self.max_cache_len:
            raise ValueError(
                f"XQuantCache overflow in layer {self.layer_idx}: it holds {self.host_length} tokens and "
                f"{new_tokens} more do not fit in max_cache_len={self.max_cache_len}. Create the cache "
                "with max_cache_len >= prompt + max_new_tokens, or call cache.reset() before an unrelated "
                "prompt (a used cache is continued, as transformers' StaticCache is) or cache.crop(n) first."
            )

    def reset(self) -> None:
        for tensor in self.state.values():
            tensor.zero_()
        self.cumulative_length.zero_()
        self.host_length = 0

    def crop(self, max_length: int) -> None:
        """transformers' semantics: keep the first ``max_length`` tokens (> 0), or drop ``-max_length`` (<= 0;
        transformers' generate calls ``crop(0)`` between steps, which changes nothing)."""
        keep = max_length if max_length > 0 else max(self.host_length + max_length, 0)
        if not self.tracks_length:
            raise NotImplementedError(
                "This X state belongs to a model's own K/V buffers (options= mode): the model chooses the "
                "positions it writes, so there is no length to crop."
            )
        if keep >= self.host_length:
            return
        # Rows past cumulative_length are never read (the rebuild follows the current length), so
        # cropping is moving the counter back; the next store overwrites the stale rows.
        # Done here rather than by StaticLayer.crop, which transformers 5.17 does not have.
        before = self.host_length
        self.cumulative_length.fill_(keep)  # in place: the counter's address is static
        self.host_length = keep
        self.form.after_crop(self.state, before, keep)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        beam_idx = beam_idx.to(self.device)
        for tensor in self.state.values():
            tensor.copy_(tensor.index_select(0, beam_idx))  # in place: the addresses are static

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError(
            "XQuantCache has a fixed max_batch_size; create it with max_batch_size = batch * num_beams "
            "instead of expanding it."
        )

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("XQuantCache has a fixed batch; selecting rows would move its static buffers.")


def sliding_mask_sizes(length: int, window: int, query_length: int) -> tuple[int, int]:
    """(kv_length, kv_offset) of the mask of a query of ``query_length`` tokens over transformers' static
    sliding-window layer of ``window`` rows holding ``length`` tokens: its ``get_mask_sizes``, written out
    (a test compares the two) so that Dynamo traces plain int arithmetic. The K/V rows it returns are the
    cache rows ``kv_offset`` .. ``kv_offset + kv_length - 1``."""
    kv_offset = max(length - window + 1, 0)
    if length >= window:  # full: the window's last rows before this call, and the call's rows
        return window + query_length - 1, kv_offset
    if length + query_length > window:  # filled by this call: every row so far
        return length + query_length, kv_offset
    return window, kv_offset  # not full: the whole (static) window


class XWindowLayer(XQuantLayer):
    """A sliding-window layer whose cache is the last ``sliding_window`` rows of X (:class:`XWindowForm`).

    To the model it is transformers' static sliding-window layer: the same mask sizes, and update()
    returns K/V rows in the same order (cache rows ``kv_offset .. kv_offset + kv_length - 1`` of
    :meth:`get_mask_sizes`: the window, or all rows of a chunk that runs past it), so the model's own
    sliding mask applies to them. The traced code writes the placeholders at absolute cache rows and
    reads that slice of them; the pass turns the write into the ring's store and the slice into the
    rebuild of those rows. As in transformers, the mask sizes follow a host-side length
    (``cumulative_length_int``): graphs specialize on whether the window is full, not on the length.
    """

    is_sliding = True

    def __init__(self, *, form: XWindowForm, max_cache_len: int, **kwargs) -> None:
        super().__init__(form=form, max_cache_len=max_cache_len, **kwargs)
        self.sliding_window = form.sliding_window
        self.cumulative_length_int = 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return sliding_mask_sizes(self.cumulative_length_int, self.form.window_rows(self.max_cache_len), query_length)

    def get_seq_length(self) -> int:
        return self.cumulative_length_int

    def update(self, key_states, value_states, *args, **kwargs):
        kv_length, kv_offset = self.get_mask_sizes(key_states.shape[-2])
        self.cumulative_length_int += key_states.shape[-2]
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        return keys.narrow(-2, kv_offset, kv_length), values.narrow(-2, kv_offset, kv_length)

    def reset(self) -> None:
        super().reset()
        self.cumulative_length_int = 0

    def crop(self, max_length: int) -> None:
        """As :meth:`XQuantLayer.crop`, while the ring still holds the window of the kept tokens' last
        query: a crop past the window would need rows the ring has overwritten."""
        keep = max_length if max_length > 0 else max(self.host_length + max_length, 0)
        ring = self.form.window_rows(self.max_cache_len)
        if keep < self.host_length - 1 and self.host_length > ring:
            raise NotImplementedError(
                f"layer {self.layer_idx} keeps only the last {ring} rows of X (a sliding window): cropping "
                f"{self.host_length} tokens to {keep} needs rows it has overwritten. Reset the cache and "
                "run the kept prompt again."
            )
        super().crop(max_length)
        self.cumulative_length_int = self.host_length


def register_placeholders(layer: XQuantLayer, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Make ``keys``/``values`` (new K/V tensors of a model, e.g. after release) lead to ``layer``."""
    layer.keys, layer.values = keys, values
    _LAYER_OF_PLACEHOLDER[keys] = layer
    _LAYER_OF_PLACEHOLDER[values] = layer


def cache_argument(model) -> str:
    """The keyword a transformers model takes its cache under: ``cache`` (recent), ``past_key_values`` (older).

    transformers renamed the argument during 5.x (``past_key_values`` is a deprecated alias in 5.24 and
    absent before the rename), and we support both sides of it.
    """
    import inspect

    forward = getattr(model, "forward", model)
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def cache_kwargs(model, cache) -> dict:
    """``{"cache": cache}`` or ``{"past_key_values": cache}``, whichever ``model`` takes: splat it into
    ``model(...)`` or ``model.generate(...)``."""
    return {cache_argument(model): cache}


class ModelWindowLayer(StaticSlidingWindowLayer):
    """A sliding-window layer of an XQuantCache: transformers' own static sliding-window layer (the
    model's K/V, last ``sliding_window`` rows), allocated up front. The pass leaves its site unmodified."""

    def __init__(self, *, layer_idx: int, form: ModelWindowForm, max_cache_len: int, batch_size: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(max_cache_len=max_cache_len, sliding_window=form.window)
        self.layer_idx, self.form, self.dtype = layer_idx, form, dtype
        spec = form.state_spec(batch_size, max_cache_len, dtype)
        # Allocated now by transformers' own code, as a StaticCache allocates it on its first update: the
        # compiled graphs take these tensors as inputs, so they must exist (at fixed addresses) before.
        empty = torch.zeros(batch_size, form.num_kv_heads, 0, form.head_dim, dtype=dtype, device=device)
        self.lazy_initialization(empty, empty)
        for name, tensor in self.state.items():  # memory_report counts the form's spec: they must agree
            if tuple(tensor.shape) != spec[name].shape or tensor.dtype != spec[name].dtype:
                raise RuntimeError(
                    f"transformers allocated the sliding-window layer's {name} as {tuple(tensor.shape)} "
                    f"{tensor.dtype}, the window form expects {spec[name].shape} {spec[name].dtype}: this "
                    "transformers release lays its window cache out differently; report it to xq-compile."
                )
        _WINDOW_OF_PLACEHOLDER[self.keys] = self
        _WINDOW_OF_PLACEHOLDER[self.values] = self

    @property
    def state(self) -> dict[str, torch.Tensor]:
        """The tensors of the form's spec."""
        return {"keys": self.keys, "values": self.values}

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor this layer owns (what nbytes counts)."""
        return [self.keys, self.values, self.cumulative_length]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        # in place (transformers' own assigns new tensors): the compiled graphs hold these addresses
        beam_idx = beam_idx.to(self.keys.device)
        for tensor in (self.keys, self.values):
            tensor.copy_(tensor.index_select(0, beam_idx))


class XQuantCache(Cache):
    """A transformers Cache storing each attention layer's input X, quantized, instead of K and V.

    Use it with a forward compiled by the xquant backend::

        cache = xq.XQuantCache(model.config, max_batch_size=2, max_cache_len=1024,
                               xquant=xq.XQuantConfig(bits=4), dtype=torch.float32)
        model.forward = torch.compile(model.forward, backend="xquant", fullgraph=True)
        model.generate(**batch, **xq.cache_kwargs(model, cache), max_new_tokens=64, disable_compile=True)
    """

    def __init__(
        self,
        config,
        max_batch_size: int,
        max_cache_len: int,
        xquant: XQuantConfig | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        xquant = xquant or XQuantConfig()
        if not isinstance(xquant, XQuantConfig):
            raise TypeError(f"xquant must be an XQuantConfig, got {type(xquant).__name__}")
        if max_batch_size < 1 or max_cache_len < 1:
            raise ValueError(f"max_batch_size and max_cache_len must be >= 1, got {max_batch_size}, {max_cache_len}")
        if not dtype.is_floating_point:
            raise TypeError(f"dtype must be the model's floating dtype, got {dtype}")
        shapes = layer_shapes(config)  # raises for layer types other than full and sliding-window attention
        xquant.check_layer_count(config.num_hidden_layers)
        forms = [form_for(xquant, i, shape) for i, shape in enumerate(shapes)]
        windows = [i for i, shape in enumerate(shapes) if shape.sliding_window is not None]
        if windows and xquant.cross_layer:
            raise ValueError(
                "cross_layer=True chains every layer's X to the layer below, but this model has sliding-window "
                f"layers ({', '.join(map(str, windows))}), which keep only their window: use cross_layer=False."
            )
        hidden_size = config.hidden_size
        num_kv_heads = shapes[0].num_kv_heads  # the same in every layer
        head_dim = shapes[0].kv_width // num_kv_heads
        device = torch.device(device if device is not None else "cpu")

        make_mask_creation_traceable()  # transformers 5.18/5.19 only: see _transformers_compat
        self.xquant = xquant
        self._max_batch_size = max_batch_size
        self._max_cache_len = max_cache_len
        self.dtype = dtype
        self.positions = torch.zeros(max_batch_size, max_cache_len, dtype=torch.int64, device=device)
        mark_static_address(self.positions)
        self.rotation = rotation_of(xquant, device)
        layers = [
            ModelWindowLayer(layer_idx=i, form=form, max_cache_len=max_cache_len, batch_size=max_batch_size,
                             dtype=dtype, device=device)
            if isinstance(form, ModelWindowForm) else
            (XWindowLayer if isinstance(form, XWindowForm) else XQuantLayer)(
                layer_idx=i,
                max_cache_len=max_cache_len,
                batch_size=max_batch_size,
                hidden_size=hidden_size,
                num_kv_heads=num_kv_heads,
                head_dim=head_dim,
                xquant=xquant,
                dtype=dtype,
                device=device,
                positions=self.positions,
                rotation=self.rotation,
                form=form,
            )
            for i, form in enumerate(forms)
        ]
        super().__init__(layers=layers)

    # Our own read-only properties: transformers 5.17 defines both as deprecated read-only properties on
    # Cache (so assigning them fails there) and later versions dropped them; users still read them.
    @property
    def max_batch_size(self) -> int:
        return self._max_batch_size

    @property
    def max_cache_len(self) -> int:
        return self._max_cache_len

    @property
    def xquant_layers(self) -> list[XQuantLayer]:
        """The layers holding X state (all but the sliding-window layers, which keep the model's K/V)."""
        return [layer for layer in self.layers if isinstance(layer, XQuantLayer)]

    def tensors(self) -> list[torch.Tensor]:
        extra = [self.positions] + ([self.rotation] if self.rotation is not None else [])
        return [t for layer in self.layers for t in layer.tensors()] + extra

    def nbytes(self) -> int:
        """Bytes of memory this cache really holds, measured from the storages it allocated."""
        seen, total = set(), 0
        for tensor in self.tensors():
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        return total

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self.positions.copy_(self.positions.index_select(0, beam_idx.to(self.positions.device)))

    def __repr__(self) -> str:
        return (
            f"XQuantCache({self.xquant.describe()}, layers={len(self.layers)}, batch={self.max_batch_size}, "
            f"max_cache_len={self.max_cache_len}, {self.nbytes()} bytes)"
        )
