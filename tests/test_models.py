"""xq_compile.models: the embedded SmolLM2 model, the GQA -> MHA conversion and the Britannica text."""

import re

import pytest
import torch

from xq_compile import models

PAGE_MARKER = re.compile(r"(?m)^p\.\d+:\d+")


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def smollm2_pair():
    """(gqa model, mha model, tokenizer), loaded once for the module."""
    try:
        gqa, tok = models.load_smollm2("gqa")
        mha, _ = models.load_smollm2("mha")
    except models.MissingResourceError as err:
        pytest.skip(str(err))
    return gqa, mha, tok


@pytest.fixture(scope="module")
def britannica():
    try:
        return models.load_britannica_text()
    except models.MissingResourceError as err:
        pytest.skip(str(err))


def _tiny(arch: str, **overrides):
    torch.manual_seed(0)
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=128)
    common.update(overrides)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common))  # Qwen2 has q/k/v biases
    return model.eval()


# ---------------------------------------------------------------------------------------------- to_mha


@pytest.mark.parametrize("arch,overrides", [
    ("llama", {}),
    ("llama", {"attention_bias": True, "head_dim": 32}),  # biases, head_dim != hidden/heads
    ("qwen2", {}),
])
def test_to_mha_tiny_model_same_logits(arch, overrides):
    model = _tiny(arch, **overrides)
    ids = torch.randint(0, 101, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # a left-padded row
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
    if overrides.get("attention_bias") or arch == "qwen2":
        with torch.no_grad():  # random init leaves biases at 0: make them matter
            for layer in model.model.layers:
                for lin in (layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.q_proj):
                    lin.bias.normal_()
            ref = model(ids, attention_mask=mask).logits

    n_heads = model.config.num_attention_heads
    head_dim = model.model.layers[0].self_attn.head_dim
    assert models.to_mha(model) is model
    assert model.config.num_key_value_heads == model.config.num_attention_heads == n_heads
    for layer in model.model.layers:
        attn = layer.self_attn
        assert attn.k_proj.out_features == attn.v_proj.out_features == n_heads * head_dim
        assert attn.k_proj.weight.shape == (n_heads * head_dim, 64)
        assert attn.num_key_value_groups == 1
    with torch.no_grad():
        out = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert models.to_mha(model) is model  # idempotent no-op on an MHA model


def test_to_mha_head_order_matches_repeat_kv():
    model = _tiny("llama")
    k = model.model.layers[0].self_attn.k_proj.weight.detach().clone()  # (2 kv heads * 8, 64)
    models.to_mha(model)
    k_mha = model.model.layers[0].self_attn.k_proj.weight.view(8, 8, 64)
    for h in range(8):  # query head h reads KV head h // 4
        torch.testing.assert_close(k_mha[h], k.view(2, 8, 64)[h // 4], atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------- loaders


def test_load_model_local_dir_and_errors(tmp_path):
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models as tok_models

    model = _tiny("llama")
    model.save_pretrained(tmp_path)
    vocab = {f"t{i}": i for i in range(101)}
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(tok_models.WordLevel(vocab, unk_token="t0"))).save_pretrained(tmp_path)
    loaded, tok = models.load_model(str(tmp_path))
    assert not loaded.training and loaded.config.num_key_value_heads == 2
    ids = torch.arange(10)[None]
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    with pytest.raises(ValueError, match="smollm2-mha"):
        models.load_model(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="variant"):
        models.load_smollm2("mqa")


def test_load_model_keeps_gemma2_attention_soft_cap(tmp_path):
    """transformers' SDPA attention ignores Gemma 2's attention-logit soft cap (5.19; later releases refuse SDPA
    for Gemma 2): load_model loads such a model with eager attention, so it computes what was saved (the cap
    here is low enough to change the logits)."""
    import transformers as tf
    from tokenizers import Tokenizer, models as tok_models

    torch.manual_seed(0)
    config = tf.Gemma2Config(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16, attn_logit_softcapping=0.1,
                             initializer_range=0.5)  # scores well past the cap
    model = tf.Gemma2ForCausalLM(config).eval()
    model.save_pretrained(tmp_path)
    vocab = {f"t{i}": i for i in range(101)}
    tf.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(tok_models.WordLevel(vocab, unk_token="t0"))).save_pretrained(tmp_path)
    loaded, _ = models.load_model(str(tmp_path))
    ids = torch.arange(12)[None]
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
        for layer in model.model.layers:
            layer.self_attn.attn_logit_softcapping = None
        assert (model(ids).logits - loaded(ids).logits).abs().max() > 1e-3


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("XQ_COMPILE_CACHE", str(tmp_path))
    assert models.cache_dir() == tmp_path
    monkeypatch.delenv("XQ_COMPILE_CACHE")
    assert models.cache_dir().parts[-2:] == (".cache", "xq_compile")


def test_clean_britannica_synthetic():
    raw = (
        "## Title line\n\n### START: X_0.tif.txt ###\n#### Source: http://x\n\np.772:0\n\n"
        "Shakespeare, William, English poet,\nand playwright.\n\n  \n[Youth]\n\n"
        "p.777:1\n[[ed: TODO italicising]]\n\n[[ed: reformatted]]\n\nSecond para.\n\n### END: X_0.tif.txt ###\n"
    )
    assert models.clean_britannica(raw) == (
        "Shakespeare, William, English poet,\nand playwright.\n\n[Youth]\n\nSecond para."
    )


def test_load_text_path(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("héllo\nworld", encoding="utf-8")
    assert models.load_text(str(f)) == "héllo\nworld"
    with pytest.raises(ValueError, match="britannica"):
        models.load_text(str(tmp_path / "nope.txt"))


def test_shipped_texts_read_from_the_cache(tmp_path, monkeypatch):
    """A cached text is read from <cache>/text/ without any download; unknown names list the shipped ones."""
    monkeypatch.setenv("XQ_COMPILE_CACHE", str(tmp_path))
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / models._HAMLET_CACHE_NAME).write_text("Ber.\nWho's there?", encoding="utf-8")
    assert models.load_text("hamlet") == "Ber.\nWho's there?"
    with pytest.raises(ValueError, match=r"expected one of \['britannica', 'hamlet'\]"):
        models.load_text("macbeth")


def test_hamlet_text():
    try:
        hamlet = models.load_text("hamlet")
    except models.MissingResourceError as err:
        pytest.skip(str(err))
    assert hamlet.startswith("HAMLET, PRINCE OF DENMARK") and "To be, or not to be" in hamlet
    assert "\r" not in hamlet and len(hamlet) > 170_000
    assert models.load_text("hamlet") == hamlet  # second call: from the cache


# ---------------------------------------------------------------------------------------------- real model


@pytest.mark.real_model
def test_smollm2_shapes(smollm2_pair):
    gqa, mha, _ = smollm2_pair
    for model, kv in ((gqa, 3), (mha, 9)):
        cfg = model.config
        assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size) == ("llama", 30, 576)
        assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (9, kv, 64)
        assert model.model.layers[0].self_attn.k_proj.out_features == kv * 64
        assert not model.training and model.dtype == torch.float32
        assert getattr(cfg, "quantization_config", None) is None


@pytest.mark.real_model
def test_smollm2_mha_logits_equal_gqa(smollm2_pair, britannica):
    gqa, mha, tok = smollm2_pair
    ids = tok(britannica[:2000], return_tensors="pt").input_ids[:, :64]
    with torch.no_grad():
        ref = gqa(ids).logits
        out = mha(ids).logits
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
    # sanity: the model predicts this text well (the mean NLL of a random model would be ~ln(49152) = 10.8)
    nll = torch.nn.functional.cross_entropy(ref[0, :-1], ids[0, 1:])
    assert nll < 5.0


@pytest.mark.real_model
def test_britannica_text(britannica, smollm2_pair):
    _, _, tok = smollm2_pair
    assert britannica.startswith("Shakespeare, William (1564--1616), English poet")
    paragraphs = britannica.split("\n\n")
    assert len(paragraphs) > 100
    assert not any(p.startswith("#") for p in paragraphs)
    assert not PAGE_MARKER.search(britannica)
    assert "[[ed:" not in britannica and "tif.txt" not in britannica
    assert len(tok(britannica).input_ids) > 50_000
    assert models.load_text("britannica") == britannica  # second call: from the cache
