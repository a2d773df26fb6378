"""Private torch APIs are used only in xq_compile/_torch_private.py: the code of the package, the passes,
the benchmarks and the examples reaches them through its named functions (tests may use them directly)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHECKED = ("xq_compile", "passes", "benchmarks", "examples")
OWNER = ROOT / "xq_compile" / "_torch_private.py"
# What Dynamo records on nodes (meta keys) and private torch modules imported by name.
DYNAMO_META_KEYS = {"example_value", "grapharg", "val", "tensor_dict"}
PRIVATE_MODULES = ("torch._", "torch.utils.weak", "torch.utils._")


def _docstrings(tree: ast.AST) -> set[int]:
    return {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _private_torch_attribute(node: ast.Attribute) -> bool:
    """``torch.<...>._x``, reported at its first private name only (torch._C, not also torch._C._nn)."""
    chain = []
    while isinstance(node, ast.Attribute):
        chain.append(node.attr)
        node = node.value
    names = chain[::-1]
    return (isinstance(node, ast.Name) and node.id == "torch" and _is_private(names[-1])
            and not any(_is_private(n) for n in names[:-1]))


def private_uses(source: str) -> list[str]:
    """Each private torch API the code uses, as ``line: what`` (comments and docstrings do not count)."""
    tree = ast.parse(source)
    docstrings = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        what = None
        if isinstance(node, ast.Attribute):
            if _private_torch_attribute(node) or node.attr in ("_version", "_dynamo_source"):
                what = ast.unparse(node)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(PRIVATE_MODULES):
            what = f"from {node.module} import ..."
        elif isinstance(node, ast.Import):
            what = next((a.name for a in node.names if a.name.startswith(PRIVATE_MODULES)), None)
        elif (isinstance(node, ast.Constant) and node.value in DYNAMO_META_KEYS and id(node) not in docstrings):
            what = f"meta key {node.value!r}"
        if what:
            found.append((node.lineno, what))
    return [f"{line}: {what}" for line, what in sorted(found)]


def test_the_checker_finds_each_kind_of_private_use():
    code = '''
import torch
from torch.utils.weak import WeakIdKeyDictionary
"""A docstring may name torch._dynamo and meta["example_value"]."""
# so may a comment: torch._check
t = torch._C._nn.linear
torch._dynamo.mark_dynamic(x, 1)
v = weight._version
e = node.meta.get("example_value")
ok = torch.__version__, torch.nn.functional.linear, node.meta
'''
    assert private_uses(code) == ["3: from torch.utils.weak import ...", "6: torch._C", "7: torch._dynamo",
                                  "8: weight._version", "9: meta key 'example_value'"]


def test_private_torch_apis_live_in_torch_private_only():
    leaks = []
    for folder in CHECKED:
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path != OWNER:
                leaks += [f"{path.relative_to(ROOT)}:{use}" for use in private_uses(path.read_text())]
    assert leaks == [], "use a named function of xq_compile/_torch_private.py instead:\n" + "\n".join(leaks)
