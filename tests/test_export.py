"""Our models and adapters in Hugging Face's formats, and PEFT adapters in ours, checked against
the real transformers and peft: the same fp32 logits both ways, the same token ids."""

import copy
import json

import pytest
import torch
from conftest import assert_one_line_error, run_cli, shared_path
from safetensors.torch import load_file

import lora
from gpt2study import hf_format, loading, tokenizer
from model import GPT, GPTConfig, UserError

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import AutoTokenizer, GPT2LMHeadModel  # noqa: E402

TOL = 1e-4
SHAPE = dict(n_layer=2, n_head=2, n_embd=32, block_size=64)  # GPT-2's full vocabulary: tokenizer files apply


def tiny_gpt(seed=0, **overrides) -> GPT:
    """A tiny GPT whose every weight, biases and LayerNorms included, is random."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{**SHAPE, **overrides})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def trained(model, seed=1):
    """Every LoRA weight random (B too), as after training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in lora.lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def with_lora(base, targets, r=4, alpha=16.0):
    model = copy.deepcopy(base)
    lora.inject_lora(model, lora.LoRAConfig(lora_r=r, lora_alpha=alpha, lora_dropout=0.1, lora_targets=targets))
    return trained(model.eval())


def tokens(seed=2, vocab=50257):
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def ours(model, x):
    return model(x)[0]


@torch.no_grad()
def theirs(model, x):
    return model.eval()(x).logits


def hf_model(folder):
    model, info = GPT2LMHeadModel.from_pretrained(folder, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny random GPT and its export: (our model, the HF folder)."""
    model = tiny_gpt()
    folder = tmp_path_factory.mktemp("hf") / "base"
    hf_format.save_hf_model(model, folder)
    return model, folder


# ----------------------------------------------------------------------------- the model


def test_model_loads_in_transformers_with_our_logits(base):
    model, folder = base
    x = tokens()
    assert (theirs(hf_model(folder), x) - ours(model, x)).abs().max() <= TOL
    config = json.loads((folder / "config.json").read_text())
    assert (config["n_positions"], config["n_embd"], config["n_layer"], config["n_head"]) == (64, 32, 2, 2)
    generation = transformers.GenerationConfig.from_pretrained(folder)
    assert generation.eos_token_id == generation.bos_token_id == tokenizer.EOT
    # the padded embedding (50304 rows here) is written as GPT-2's 50257
    assert model.transformer.wte.weight.size(0) == 50304 and config["vocab_size"] == 50257
    # and back: model.py's loader reads what we wrote into the same weights, without the padding rows
    back = hf_format.load_hf_model(folder).state_dict()
    assert back["transformer.wte.weight"].size(0) == 50257
    assert all(torch.equal(back[k], v[:back[k].size(0)]) for k, v in model.state_dict().items())


def test_model_without_biases_exports_zero_biases(tmp_path):
    model = tiny_gpt(seed=3, bias=False)
    hf_format.save_hf_model(model, tmp_path)
    x = tokens(seed=4)
    assert (theirs(hf_model(tmp_path), x) - ours(model, x)).abs().max() <= TOL


def test_model_of_another_vocabulary_exports_without_tokenizer(tmp_path):
    model = tiny_gpt(seed=5, vocab_size=64)
    hf_format.save_hf_model(model, tmp_path)
    x = tokens(vocab=64)
    assert (theirs(hf_model(tmp_path), x) - ours(model, x)).abs().max() <= TOL
    assert not (tmp_path / "vocab.json").exists() and not (tmp_path / "generation_config.json").exists()


def test_hf_state_dict_is_conv1d_layout_without_head(base):
    model, folder = base
    state = hf_format.hf_state_dict(model)
    saved = load_file(str(folder / "model.safetensors"))
    assert state.keys() == saved.keys() and "lm_head.weight" not in state
    hf_state = GPT2LMHeadModel(transformers.GPT2Config.from_pretrained(folder)).state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == {k: tuple(v.shape) for k, v in hf_state.items()
                                                             if k != "lm_head.weight"}
    assert torch.equal(state["transformer.h.0.attn.c_attn.weight"], model.transformer.h[0].attn.c_attn.weight.t())


def test_lora_model_is_not_a_plain_model(base):
    with pytest.raises(UserError, match="LoRA"):
        hf_format.hf_state_dict(with_lora(base[0], ("q",)))


# ----------------------------------------------------------------------------- the tokenizer

TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "  two leading spaces, and trailing ones   ",
    " one leading space",
    "naïve café, Zürich, 東京都, Москва, عربى, ελληνικά",
    "emoji 🤖👍🏽 and a family 👨‍👩‍👧 and flags 🇫🇷",
    "line one\nline two\n\n\n\ttabbed\r\nwindows\r\n",
    "digits 0 12 345 6789 3.14159 1,000,000 2024-05-01 +44 (0)20",
    "don't won't they'll I'M we've she'd it's 'quoted'",
    "code: def f(x):\n    return x**2  # comment\n",
    "\u00a0non-breaking\u2003em space\u200bzero-width",
    "           ",
    "",
    "a",
]


@pytest.fixture(scope="module")
def hf_tokenizer(base):
    return AutoTokenizer.from_pretrained(base[1])


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_gives_our_ids(hf_tokenizer, text):
    ids = hf_tokenizer(text)["input_ids"]
    assert ids == tokenizer.encode(text)
    assert hf_tokenizer.decode(ids) == text


def test_tokenizer_endoftext_is_the_special_token(hf_tokenizer):
    text = "<|endoftext|>first document<|endoftext|> second"
    # transformers reads it as the special token, as tiktoken does when it is allowed...
    ids = hf_tokenizer(text)["input_ids"]
    assert ids == tokenizer.get_encoding().encode(text, allowed_special={tokenizer.EOT_TEXT})
    assert ids.count(tokenizer.EOT) == 2
    # ...and as ordinary text, as our encode() always does, when told to split it
    assert hf_tokenizer(text, split_special_tokens=True)["input_ids"] == tokenizer.encode(text)
    assert hf_tokenizer.eos_token_id == tokenizer.EOT


def test_tokenizer_on_a_real_corpus(hf_tokenizer):
    corpus = shared_path("data", "corpus")
    text = "".join(p.read_text(encoding="utf-8")[:40_000] for p in sorted(corpus.glob("*.txt"))[:8])
    assert len(text) > 10_000
    assert hf_tokenizer(text)["input_ids"] == tokenizer.encode(text)


def test_merges_rebuild_the_ranks():
    vocab, merges = hf_format.vocab_and_merges()
    assert len(vocab) == tokenizer.VOCAB_SIZE and len(merges) == tokenizer.EOT - 256
    # the merge of rank i makes the token of id 256 + i
    assert all(vocab[a + b] == 256 + i for i, (a, b) in enumerate(merges))
    assert vocab["Ġthe"] == tokenizer.encode(" the")[0]


# ----------------------------------------------------------------------------- LoRA -> PEFT

TARGET_SETS = [("q", "v"), ("q", "k", "v", "attn_out", "mlp_in", "mlp_out"), ("k",), ("mlp_out",)]


@pytest.mark.parametrize("targets", TARGET_SETS, ids="-".join)
def test_peft_loads_our_adapter_with_our_logits(base, tmp_path, targets):
    model, folder = base
    adapted = with_lora(model, targets)
    hf_format.save_peft_adapter(adapted, tmp_path, folder)
    x = tokens()
    want = ours(adapted, x)
    assert (want - ours(model, x)).abs().max() > 1e-2  # the adapter does something
    peft_model = PeftModel.from_pretrained(hf_model(folder), tmp_path)
    assert (theirs(peft_model, x) - want).abs().max() <= TOL
    merged = peft_model.merge_and_unload()  # PEFT's own merge of GPT-2's Conv1D layout
    assert (theirs(merged, x) - want).abs().max() <= TOL
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    parts = sum(t in targets for t in "qkv")
    if parts > 1:
        assert config["rank_pattern"] == {"c_attn": parts * 4} and config["alpha_pattern"] == {"c_attn": parts * 16.0}

    # and back into ours: the same config, the same tensors
    back = copy.deepcopy(model)
    cfg = hf_format.load_peft_adapter(back, tmp_path)
    assert (cfg.lora_r, cfg.lora_alpha, cfg.lora_targets) == (4, 16.0, adapted.lora_config.lora_targets)
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(lora.lora_parameters(back), lora.lora_parameters(adapted)))
    assert (ours(back, x) - want).abs().max() <= TOL


def test_merged_export_equals_the_unmerged_adapter(base, tmp_path):
    adapted = with_lora(base[0], tuple(lora.TARGETS))  # every target, 'wte' too
    x = tokens()
    want = ours(adapted, x)
    hf_format.save_hf_model(lora.merge_and_unload(copy.deepcopy(adapted)), tmp_path)
    assert (theirs(hf_model(tmp_path), x) - want).abs().max() <= TOL


def test_wte_adapter_refuses_peft_export(base, tmp_path):
    with pytest.raises(UserError, match="--merged"):
        hf_format.save_peft_adapter(with_lora(base[0], ("q", "wte")), tmp_path, "base")
    assert not (tmp_path / "adapter_config.json").exists()


# ----------------------------------------------------------------------------- PEFT -> LoRA

PEFT_CONFIGS = {
    "dense c_attn": dict(r=4, lora_alpha=8, target_modules=["c_attn"]),
    "every module, patterns, rslora": dict(r=2, lora_alpha=5, target_modules=["c_attn", "c_proj", "c_fc"],
                                          rank_pattern={"c_fc": 3}, alpha_pattern={"mlp.c_proj": 1.5},
                                          use_rslora=True),
    "one layer": dict(r=3, lora_alpha=6, target_modules=["attn.c_proj", "mlp.c_fc"], layers_to_transform=[1]),
}


def peft_adapter(folder, out, seed=5, **kwargs):
    """A PEFT LoRA made by peft itself, every weight random; saved to `out`. Returns the PEFT model."""
    torch.manual_seed(seed)
    peft_model = get_peft_model(hf_model(folder), LoraConfig(lora_dropout=0.0, **kwargs))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.1)
    peft_model.save_pretrained(out)
    return peft_model.eval()


@pytest.mark.parametrize("kind", PEFT_CONFIGS)
def test_peft_adapter_loads_into_ours(base, tmp_path, kind):
    model, folder = base
    peft_model = peft_adapter(folder, tmp_path / "peft", **PEFT_CONFIGS[kind])
    x = tokens()
    want = theirs(peft_model, x)
    ours_model = copy.deepcopy(model)
    cfg = hf_format.load_peft_adapter(ours_model, tmp_path / "peft")
    assert (ours(ours_model, x) - want).abs().max() <= TOL
    if kind == "dense c_attn":  # a general c_attn update: q, k and v each of the full rank
        assert (cfg.lora_r, cfg.lora_targets) == (4, ("q", "k", "v"))
    # through ours and out again: PEFT still computes the same
    hf_format.save_peft_adapter(ours_model, tmp_path / "again", folder)
    again = PeftModel.from_pretrained(hf_model(folder), tmp_path / "again")
    assert (theirs(again, x) - want).abs().max() <= TOL


@pytest.mark.parametrize("kwargs, needle", [
    (dict(target_modules=["c_attn"], use_dora=True), "DoRA"),
    (dict(target_modules=["wte"]), "transformer.wte"),
    (dict(target_modules=["lm_head"]), "lm_head"),
    (dict(target_modules=["c_attn"], modules_to_save=["ln_f"]), "modules_to_save"),
    (dict(target_modules=["c_attn"], bias="all"), "bias='all'"),
])
def test_peft_adapter_we_cannot_reproduce_refuses(base, tmp_path, kwargs, needle):
    model, folder = base
    peft_adapter(folder, tmp_path, r=2, lora_alpha=4, **kwargs)
    fresh = copy.deepcopy(model)
    with pytest.raises(UserError, match=needle.replace("(", r"\(")) as e:
        hf_format.load_peft_adapter(fresh, tmp_path)
    assert "\n" not in str(e.value)
    assert getattr(fresh, "lora_config", None) is None


def test_peft_adapter_refuses_another_base(base, tmp_path):
    model, folder = base
    hf_format.save_peft_adapter(with_lora(model, ("q", "v")), tmp_path / "ad", folder)
    with pytest.raises(UserError, match="weights differ"):
        hf_format.load_peft_adapter(tiny_gpt(seed=9), tmp_path / "ad")
    with pytest.raises(UserError, match="does not fit"):
        hf_format.load_peft_adapter(tiny_gpt(n_embd=64), tmp_path / "ad")


# ----------------------------------------------------------------------------- the command line


def fake_run(folder, weights: dict, run_info: dict, model):
    """A run folder as trainer.py leaves it: checkpoint/ with weights, train_state.pt, config.json."""
    from dataclasses import asdict

    ckpt = folder / "checkpoint"
    ckpt.mkdir(parents=True)
    for name, save in weights.items():
        save(ckpt / name)
    torch.save({"step": 1, "optimizer": {}, "sampler": {}}, ckpt / "train_state.pt")
    info = {"step": 1, "train": {}, "model": asdict(model.config), **run_info}
    if getattr(model, "lora_config", None) is not None:
        info["lora"] = asdict(model.lora_config)
    (ckpt / "config.json").write_text(json.dumps(info))
    return folder


def test_cli_exports_runs(tmp_path):
    model = tiny_gpt(seed=7)
    run = fake_run(tmp_path / "pretrain", {"model.safetensors": model.save}, {}, model)
    adapted = with_lora(model, ("q", "v", "mlp_in"))
    lora_run = fake_run(tmp_path / "lora", {"adapter.safetensors": lambda p: lora.save_adapter(adapted, p)},
                        {"base": str(run)}, adapted)
    wte = with_lora(model, ("v", "wte"), r=2)
    wte_run = fake_run(tmp_path / "wte", {"adapter.safetensors": lambda p: lora.save_adapter(wte, p)},
                       {"base": str(run)}, wte)
    x = tokens()

    done = run_cli("export.py", run, "--out", tmp_path / "hf")
    assert done.returncode == 0, done.stderr
    assert (theirs(hf_model(tmp_path / "hf"), x) - ours(model, x)).abs().max() <= TOL
    assert AutoTokenizer.from_pretrained(tmp_path / "hf")("a text")["input_ids"] == tokenizer.encode("a text")

    done = run_cli("export.py", lora_run, "--out", tmp_path / "peft")
    assert done.returncode == 0, done.stderr
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tmp_path / "peft" / "base")
    peft_model = PeftModel.from_pretrained(hf_model(tmp_path / "peft" / "base"), tmp_path / "peft")
    assert (theirs(peft_model, x) - ours(adapted, x)).abs().max() <= TOL
    # and the folder is a model wherever ours are taken (sample.py, e2e_eval.py)
    assert (ours(loading.load_model(str(tmp_path / "peft")).eval(), x) - ours(adapted, x)).abs().max() <= TOL

    done = run_cli("export.py", wte_run, "--out", tmp_path / "refused")
    assert_one_line_error(done, "--merged")
    assert not (tmp_path / "refused").exists() and sorted(p.name for p in tmp_path.iterdir()) == [
        "hf", "lora", "peft", "pretrain", "wte"]

    done = run_cli("export.py", wte_run, "--out", tmp_path / "hf", "--merged")
    assert_one_line_error(done, "not an empty folder")

    (tmp_path / "merged").mkdir()  # an empty folder is fine
    done = run_cli("export.py", wte_run, "--out", tmp_path / "merged", "--merged")
    assert done.returncode == 0, done.stderr
    assert (theirs(hf_model(tmp_path / "merged"), x) - ours(wte, x)).abs().max() <= TOL
