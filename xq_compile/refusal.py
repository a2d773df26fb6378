"""Errors found while Dynamo traces a call, delivered to the user as they are written.

A check inside traced code (``XQuantLayer.update``) cannot simply ``raise``: with ``fullgraph=True``
Dynamo turns any exception raised in the code it traces into its own ``Unsupported: Observed
exception`` and buries our message in a "developer debug context". And a check that lets tracing go on
to an impossible operation (writing bf16 rows into a float32 cache, 2 rows into a 1-row cache) ends in a
fake-tensor error from inside Dynamo.

So a traced check that fails emits ``xq_compile::refuse`` instead: an op that stands in for the K/V the
cache would have returned (same shapes, so tracing reaches the end of the graph without touching the
cache) and carries the error. The backend looks for it before rewriting anything and returns a callable
that raises the error, so the user gets our exception, unwrapped, from the call they made, before
anything is written. Run eagerly (a user's own pipeline that compiles the graph as it is), the op raises
the same error itself.
"""

from __future__ import annotations

import torch

# Only these types travel through the op (a string in the graph); anything else is a bug of ours.
_ERRORS = {"ValueError": ValueError, "TypeError": TypeError}


@torch.library.custom_op("xq_compile::refuse", mutates_args=())
def _refuse(like: torch.Tensor, length: int, error: str, message: str) -> torch.Tensor:
    raise _ERRORS[error](message)


@_refuse.register_fake
def _(like, length, error, message):
    return like.new_empty(*like.shape[:-2], length, like.shape[-1])


def refuse(like: torch.Tensor, length: int, error: type[Exception], message: str) -> torch.Tensor:
    """In traced code: a stand-in for cached K or V (``like`` with ``length`` rows) that carries an error."""
    # The name by identity, not error.__name__: torch 2.11's Dynamo cannot read the attributes of a builtin
    # exception class ("NotImplementedError: BuiltinVariable(ValueError)").
    for name, known in _ERRORS.items():
        if error is known:
            return torch.ops.xq_compile.refuse(like, length, name, message)
    raise AssertionError(f"refuse() takes {sorted(_ERRORS)}, got {error}")


def refusal_in(gm: torch.fx.GraphModule) -> Exception | None:
    """The first error a traced check left in ``gm`` (in graph order), or None."""
    op = torch.ops.xq_compile.refuse
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in (op, op.default):  # Dynamo records the packet
            _, _, error, message = node.args
            return _ERRORS[error](message)
    return None


def raiser(error: Exception):
    """What a backend returns for a graph that must not run: a callable that raises ``error``."""

    def refuse_call(*args):
        raise error

    return refuse_call
