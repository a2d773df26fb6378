"""benchmarks/stall_profile.py: the warps' PC samples per kernel and source line (CUPTI, on a GPU only). On
CPU: the summing of proton's sample tree, the report, and finding a CUPTI that matches a CUDA 13 driver."""

from __future__ import annotations

import inspect

import pytest

from test_compile_report import _benchmark_module

sp = _benchmark_module("stall_profile")


def _line(path: str, number: int, kernel: str, samples: int, **reasons: int) -> dict:
    return {"frame": {"name": f"{path}:{number}@{kernel}", "type": "function"},
            "metrics": {"num_samples": samples, "num_stalled_samples": sum(reasons.values()), "stalled_drain": 0,
                        **{f"stalled_{k}": v for k, v in reasons.items()}}, "children": []}


def _node(name: str, *children: dict) -> dict:
    return {"frame": {"name": name, "type": "function"}, "metrics": {}, "children": list(children)}


HERE = inspect.getsourcefile(_line)
MARKED_LINE = inspect.getsourcelines(_line)[1]  # "def _line(...)": the report prints the sampled line's text


def _tree() -> list:
    default, gluon = "llama7b n=8192 default", "llama7b n=8192 gluon=auto"
    return [
        _node("ROOT",
              _node(default,
                    _node("_scores_kernel",
                          _line(HERE, MARKED_LINE, "_scores_kernel", 60, long_scoreboard=40, selected=10),
                          _line(HERE, 2, "_scores_kernel", 40, barrier=30)),
                    _node("_softmax_kernel", _line(HERE, 3, "_softmax_kernel", 5, selected=5))),
              _node(gluon, _node("_gluon_scores_kernel", _line(HERE, 4, "_gluon_scores_kernel", 10,
                                                                math_pipe_throttle=8))),
              _line(HERE, 5, "_scores_kernel", 1000, selected=1000)),  # outside every scope: not counted
        {"CUDA": {"0": {"arch": "90"}}},  # proton's device information
    ], [default, gluon]


def test_samples_are_summed_per_scope_kernel_and_line():
    tree, scopes = _tree()
    stalls = sp.stalls_by_kernel(tree, scopes)
    assert set(stalls) == set(scopes)
    scores = stalls[scopes[0]]["_scores_kernel"]
    assert (scores["samples"], scores["stalled"]) == (100, 80)
    assert scores["reasons"] == {"stalled_long_scoreboard": 40, "stalled_selected": 10, "stalled_barrier": 30}
    assert scores["lines"][f"{HERE}:2"] == {"samples": 40, "stalled": 30, "reasons": {"stalled_barrier": 30}}
    assert stalls[scopes[0]]["_softmax_kernel"]["samples"] == 5
    assert stalls[scopes[1]]["_gluon_scores_kernel"]["reasons"] == {"stalled_math_pipe_throttle": 8}


def test_report_ranks_kernels_lines_and_reasons():
    tree, scopes = _tree()
    text = sp.report(sp.stalls_by_kernel(tree, scopes), "scores", lines=1)
    lines = text.splitlines()
    assert lines[0] == f"== {scopes[0]}"
    assert lines[1].startswith("  _scores_kernel: 100 samples, 80% stalled -- long_scoreboard 40%, barrier 30%, "
                               "selected 10%")
    # the busiest line only (lines=1), its share of the kernel's samples, its reasons and its source text
    assert lines[2].split()[:4] == ["60.0%", f"test_stall_profile.py:{MARKED_LINE}", "long_scoreboard", "67%,"]
    assert lines[2].endswith("| def _line(path: str, number: int, kernel: str, samples: int, **reasons: int) -> dict:")
    assert lines[3].startswith("  _softmax_kernel: 5 samples")  # not a scores kernel: no lines listed
    assert lines[4] == f"== {scopes[1]}"
    assert "math_pipe_throttle 80%" in text


def test_cupti_for_a_cuda_13_driver_comes_from_the_nvidia_wheels(tmp_path):
    lib = tmp_path / "nvidia" / "cu13" / "lib"
    lib.mkdir(parents=True)
    (lib / "libcupti.so.13").write_bytes(b"\x7fELF")
    folder = sp.cupti_dir(13, [str(tmp_path)])
    assert (tmp_path / "nvidia/cu13/lib/libcupti.so.13").samefile(f"{folder}/libcupti.so")
    assert sp.cupti_dir(12, [str(tmp_path)]) is None  # triton's bundled CUPTI suits CUDA 12 drivers
    assert sp.cupti_dir(14, [str(tmp_path)]) is None  # none for that driver: proton's default stays
    assert sp.cupti_dir(None, [str(tmp_path)]) is None


@pytest.mark.skipif(sp.torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_without_cuda_it_says_what_it_needs():
    with pytest.raises(SystemExit, match="needs CUDA"):
        sp.main(["--shape", "smollm2"])


def _stand_ins(monkeypatch, tmp_path, start_fails: bool = False) -> dict:
    """main() on CPU: CUDA's calls, the inputs' device and the launcher replaced, and a stand-in for proton
    that records the scopes and writes a sample tree with one line per scope."""
    import contextlib
    import json
    import sys
    import types

    from xq_compile.kernels import decode_attention as da

    seen = {"scopes": [], "configs": []}
    monkeypatch.setattr(sp.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(sp.torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(sp.torch.cuda, "get_device_name", lambda: "stand-in")
    monkeypatch.setenv("TRITON_CUPTI_LIB_PATH", str(tmp_path))
    make = sp.make_inputs
    monkeypatch.setattr(sp, "make_inputs", lambda shape, B, L, S, bits, dtype, dev: make(shape, B, L, S, bits, dtype,
                                                                                         "cpu"))
    monkeypatch.setattr(da, "decode_attention_triton", lambda inputs, **config: seen["configs"].append(config))
    proton = types.ModuleType("triton.profiler")

    def start(name, **kwargs):
        if start_fails:
            raise RuntimeError("CUPTI_ERROR_INSUFFICIENT_PRIVILEGES")
        seen.update(name=name, kwargs=kwargs)

    @contextlib.contextmanager
    def scope(name):
        seen["scopes"].append(name)
        yield

    def finalize():
        tree = [_node("ROOT", *[_node(s, _line(HERE, MARKED_LINE, "_scores_kernel", 10, wait=4))
                                for s in seen["scopes"]]), {}]
        (tmp_path / "stalls.hatchet").write_text(json.dumps(tree))

    proton.start, proton.scope, proton.finalize = start, scope, finalize
    monkeypatch.setitem(sys.modules, "triton.profiler", proton)
    return seen


def test_main_samples_each_shape_and_configuration_under_one_session(monkeypatch, tmp_path):
    import json

    seen = _stand_ins(monkeypatch, tmp_path)
    out = tmp_path / "stalls.json"
    rc = sp.main(["--shape", "smollm2", "gqa", "--capacity", "64", "--n", "48", "--calls", "2", "--out", str(out),
                  "--configs", "default", "gluon=auto,num_splits=2"])
    assert rc == 0 and seen["kwargs"] == {"backend": "cupti", "mode": "pcsampling"}
    scopes = [f"{s} n=48 {c}" for s in ("smollm2", "gqa") for c in ("default", "gluon=auto,num_splits=2")]
    assert seen["scopes"] == scopes
    assert seen["configs"] == [{}, {}, {"gluon": "auto", "num_splits": 2}, {"gluon": "auto", "num_splits": 2}] * 2
    written = json.loads(out.read_text())
    assert list(written["stalls"]) == scopes and written["failed"] == {}
    assert written["stalls"][scopes[3]]["_scores_kernel"]["reasons"] == {"stalled_wait": 4}


def test_main_says_why_when_sampling_cannot_start(monkeypatch, tmp_path):
    _stand_ins(monkeypatch, tmp_path, start_fails=True)
    with pytest.raises(SystemExit, match="PC sampling could not start: RuntimeError: "
                                         "CUPTI_ERROR_INSUFFICIENT_PRIVILEGES .*TRITON_CUPTI_LIB_PATH"):
        sp.main(["--shape", "smollm2", "--capacity", "64", "--n", "48", "--out", str(tmp_path / "s.json")])
