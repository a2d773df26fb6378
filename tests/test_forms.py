"""Cache forms as registered data: the one choice, the spec as the single source of the state's layout
and bytes, and a new form added as one class plus one registry entry (the README's walk-through)."""

from __future__ import annotations

import pytest
import sympy
import torch

import xq_compile as xq
from xq_compile import forms
from xq_compile.forms import CacheForm, LayerShape, StateTensor, form_for
from xq_compile.forms.per_token import store_rows
from xq_compile.memory import N, memory_report
from xq_compile.simulate import simulate_xquant

from conftest import compiled_run, decode_inputs, max_error, reference_logits, tiny_llama

MHA, GQA = LayerShape(hidden_size=256, kv_width=256), LayerShape(hidden_size=256, kv_width=64)


@pytest.mark.parametrize("config,shape,names", [
    (xq.XQuantConfig(), MHA, ["x"] * 4),
    (xq.XQuantConfig(), GQA, ["latent"] * 4),  # X (256) wider than K+V (128)
    (xq.XQuantConfig(form="x"), GQA, ["x"] * 4),
    (xq.XQuantConfig(cross_layer=True, base_layers=2), MHA, ["x", "x", "x_delta", "x_delta"]),
    (xq.XQuantConfig(cross_layer=True, base_layers=1), GQA, ["joint_latent"] * 4),
])
def test_form_for_chooses_from_config_and_shape(config, shape, names):
    assert [form_for(config, i, shape).name for i in range(4)] == names


@pytest.mark.parametrize("config,shape", [
    (xq.XQuantConfig(bits=3, group_size=32), MHA),
    (xq.XQuantConfig(bits=None), MHA),
    (xq.XQuantConfig(bits=2, group_size=16, keep_channel0=True), GQA),
    (xq.XQuantConfig(bits=None), GQA),
    (xq.XQuantConfig(bits=4, cross_layer=True, base_layers=1), GQA),
])
@pytest.mark.parametrize("capacity", [1, 31, 64, 100])
def test_the_spec_gives_the_allocation_and_the_formula(config, shape, capacity):
    form = form_for(config, 1, shape)
    allocated = forms.allocate(form.state_spec(3, capacity, torch.bfloat16), torch.device("cpu"))
    measured = sum(t.untyped_storage().nbytes() for t in allocated.values())
    assert measured == 3 * form.state_bytes(capacity, 2)
    # the same spec at a symbolic capacity is the memory formula
    assert sympy.sympify(form.state_bytes(N, 2)).subs(N, capacity) == form.state_bytes(capacity, 2)
    # per token as the capacity grows: the fixed part (open key group, spare group) vanishes
    big = 64 * 4096
    assert form.bytes_per_token(2) == sympy.Rational(form.state_bytes(2 * big, 2) - form.state_bytes(big, 2), big)


# -- the README's "Adding a cache form" example ------------------------------------------------------
class HalfXForm(CacheForm):
    """Unquantized X kept in fp16 whatever the model's dtype (half of an fp32 model's X cache)."""

    name = "x_fp16"

    @classmethod
    def applies(cls, xquant, layer_idx, shape):
        return xquant.bits is None and xquant.rotation == "none" and xquant.form == "x" and not xquant.cross_layer

    def state_spec(self, batch, rows, dtype):
        return {"x": StateTensor((batch, rows, self.shape.hidden_size), torch.float16)}

    def describe(self, note=""):
        return f"X (fp16{note})"

    def emit_store(self, ctx):
        ctx.emit(store_rows, ctx.state["x"], ctx.index, ctx.x)

    def emit_weights(self, ctx):
        return ctx.model_weight("key"), ctx.model_weight("value")

    def emit_rebuild(self, ctx):
        rows = ctx.emit(lambda t, dtype: t.to(dtype), ctx.rows_of("x"), ctx.dtype)
        return rows, rows

    def simulation_hooks(self, k_proj, v_proj, chain):
        hook = lambda module, args: (args[0].half().to(args[0].dtype), *args[1:])  # noqa: E731
        return [k_proj.register_forward_pre_hook(hook), v_proj.register_forward_pre_hook(hook)]


@pytest.mark.parametrize("rebuild", ["inline", "op"])
def test_a_new_form_is_one_class_and_one_registry_entry(monkeypatch, rebuild):
    monkeypatch.setattr(forms, "FORMS", [HalfXForm, *forms.FORMS])
    model, calls = tiny_llama(), decode_inputs(batch=2, steps=4)
    config = xq.XQuantConfig(bits=None, rotation="none", form="x")
    out, cache = compiled_run(model, calls, config, backend=xq.make_xquant_backend("aot_eager", rebuild=rebuild))
    assert [layer.form.name for layer in cache.layers] == ["x_fp16", "x_fp16"]
    assert {r.form for r in xq.COMPILE_LOG[-1].reports} == {"X (fp16)"}
    assert all(layer.state["x"].dtype == torch.float16 for layer in cache.layers)
    # the simulation (its hooks) is the reference of the compiled path...
    with simulate_xquant(model, config):
        simulated = reference_logits(model, calls, 32)
    assert max_error(out, simulated) < 1e-4
    # ...and fp16 rows really moved the logits away from the exact model (the form is in use)
    assert max_error(out, reference_logits(model, calls, 32)) > 1e-6
    # memory_report counts the new form's bytes from its spec, as the cache allocated them
    assert cache.nbytes() == memory_report(model.config, config, 32, 2).xquant.total_at
    # unregistered, the same config is the built-in X form again
    monkeypatch.setattr(forms, "FORMS", forms.FORMS[1:])
    torch._dynamo.reset()
    out, cache = compiled_run(model, calls, config, backend=xq.make_xquant_backend("aot_eager", rebuild=rebuild))
    assert cache.layers[0].form.name == "x" and cache.layers[0].state["x"].dtype == torch.float32
    assert max_error(out, reference_logits(model, calls, 32)) < 1e-4
