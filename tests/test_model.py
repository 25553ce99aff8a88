"""model.py against Hugging Face transformers, the KV cache, the chunked loss, weights I/O; tokenizer.py."""

import json

import pytest
import torch
import torch.nn.functional as F

import model as model_module
from gpt2study.cli import check_settings
from gpt2study.hf_format import load_hf_model
from kernels import linear_cross_entropy as loss_module
from model import GPT, GPTConfig, UserError

transformers = pytest.importorskip("transformers", reason="transformers is the reference (test-only dependency)")

HF_CONFIG = dict(n_layer=2, n_head=4, n_embd=32, n_positions=48, vocab_size=101)


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(**HF_CONFIG, bos_token_id=0, eos_token_id=0)
    m = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # random LayerNorm gains and biases, so that every tensor's loading matters
        for name, p in m.named_parameters():
            if name.endswith(("bias", "ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.normal_(0, 0.5)
    return m


def save_hf(hf_model, folder, form: str):
    """The model as a Hugging Face folder: model.safetensors, or a pytorch_model.bin in the old
    hub layout (no 'transformer.' prefix, causal-mask buffers, an explicit lm_head)."""
    hf_model.save_pretrained(folder)
    if form == "bin":
        (folder / "model.safetensors").unlink()
        state = {k.removeprefix("transformer."): v for k, v in hf_model.state_dict().items()}
        state["lm_head.weight"] = hf_model.lm_head.weight.detach()
        for layer in range(HF_CONFIG["n_layer"]):
            state[f"h.{layer}.attn.bias"] = torch.tril(torch.ones(48, 48)).view(1, 1, 48, 48)
        torch.save(state, folder / "pytorch_model.bin")
    return folder


@pytest.mark.parametrize("form", ["safetensors", "bin"])
def test_from_pretrained_matches_transformers(hf_model, tmp_path, form):
    ours = load_hf_model(str(save_hf(hf_model, tmp_path, form))).eval()
    idx = torch.randint(0, 101, (3, 40))
    with torch.no_grad():
        ref = hf_model(idx).logits
        logits, _ = ours(idx)
    assert (logits - ref).abs().max().item() <= 1e-4
    # the loss: transformers shifts the labels itself
    with torch.no_grad():
        ref_loss = hf_model(idx, labels=idx).loss
        _, loss = ours(idx[:, :-1], idx[:, 1:])
    assert abs(loss.item() - ref_loss.item()) <= 1e-5


def test_greedy_generation_matches_transformers(hf_model, tmp_path):
    ours = load_hf_model(str(save_hf(hf_model, tmp_path, "safetensors"))).eval()
    idx = torch.randint(1, 101, (2, 7))
    ref = hf_model.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=25, do_sample=False,
                            pad_token_id=0, eos_token_id=None)
    out = ours.generate(idx, 25, greedy=True)
    assert torch.equal(out, ref)


def test_checkpoint_that_does_not_fit_its_config(hf_model, tmp_path):
    folder = save_hf(hf_model, tmp_path, "safetensors")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "n_embd": 64}))
    with pytest.raises(UserError, match=r"does not fit the model: .* is \(.*\) there") as e:
        load_hf_model(str(folder))
    assert "\n" not in str(e.value)
    (folder / "config.json").write_text(json.dumps({**cfg, "n_layer": 3}))
    with pytest.raises(UserError, match="tensors missing"):
        load_hf_model(str(folder))


def test_model_paths_that_name_nothing_fail_with_one_line(tmp_path):
    from gpt2study.loading import load_model

    with pytest.raises(UserError, match="holds no model"):
        load_model(str(tmp_path))
    with pytest.raises(UserError, match="model file .* not found"):
        load_model(str(tmp_path / "m.safetensors"))
    (tmp_path / "m.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="not a readable safetensors file"):
        load_model(str(tmp_path / "m.safetensors"))


def test_save_and_from_file_round_trip(tiny_model, tmp_path):
    tiny_model.save(tmp_path / "m.safetensors")
    loaded = GPT.from_file(tmp_path / "m.safetensors").eval()
    idx = torch.randint(0, 64, (2, 10))
    assert torch.equal(loaded(idx)[0], tiny_model(idx)[0])
    assert loaded.lm_head.weight is loaded.transformer.wte.weight  # still tied
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(UserError, match="not a model saved by this project"):
        GPT.from_file(tmp_path / "other.safetensors")


# ----------------------------------------------------------------------------- loss


@pytest.mark.parametrize(("smoothing", "frozen_head"), [(0.0, False), (0.1, False), (0.1, True)])
def test_chunked_loss_equals_cross_entropy(tiny_model, monkeypatch, smoothing, frozen_head):
    monkeypatch.setattr(loss_module, "LOSS_CHUNK", 7)  # several chunks and a ragged last one
    tiny_model.train()
    tiny_model.lm_head.weight.requires_grad_(not frozen_head)  # frozen as in LoRA fine-tuning
    idx = torch.randint(0, 64, (3, 20))
    targets = torch.randint(0, 64, (3, 20))
    targets[0, :9] = loss_module.IGNORE_INDEX
    params = [p for p in tiny_model.parameters() if p.requires_grad]
    _, loss = tiny_model(idx, targets, label_smoothing=smoothing)
    grads = torch.autograd.grad(loss, params)
    logits, _ = tiny_model(idx)
    ref = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, label_smoothing=smoothing)
    ref_grads = torch.autograd.grad(ref, params)
    assert torch.allclose(loss, ref, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, atol=1e-6, rtol=1e-4)


def test_score_counts_loss_and_accuracy(tiny_model, monkeypatch):
    monkeypatch.setattr(model_module, "LOSS_CHUNK", 5)
    idx = torch.randint(0, 64, (2, 12))
    targets = torch.randint(0, 64, (2, 12))
    targets[1, :4] = loss_module.IGNORE_INDEX
    logits, _ = tiny_model(idx)
    valid = targets != -100
    loss_sum, correct, count = tiny_model.score(idx, targets)
    ref = F.cross_entropy(logits[valid], targets[valid], reduction="sum")
    assert count == valid.sum().item()
    assert abs(loss_sum - ref.item()) < 1e-3
    assert correct == (logits.argmax(-1)[valid] == targets[valid]).sum().item()


# ----------------------------------------------------------------------------- generation


def test_kv_cache_generation_equals_uncached(tiny_model):
    idx = torch.randint(0, 64, (3, 5))
    assert torch.equal(tiny_model.generate(idx, 20, greedy=True), tiny_model.generate(idx, 20, greedy=True,
                                                                                         use_cache=False))
    sampled = [tiny_model.generate(idx, 20, temperature=0.9, top_k=20, top_p=0.9, use_cache=cached,
                                   generator=torch.Generator().manual_seed(3)) for cached in (True, False)]
    assert torch.equal(*sampled)


def test_left_padded_batch_equals_single_prompts(tiny_model):
    prompts = [torch.randint(0, 64, (n,)) for n in (6, 2, 4)]
    T = max(len(p) for p in prompts)
    idx = torch.stack([torch.cat([torch.zeros(T - len(p), dtype=torch.long), p]) for p in prompts])
    pad = torch.tensor([T - len(p) for p in prompts])
    batched = tiny_model.generate(idx, 12, greedy=True, pad=pad)
    for row, p in enumerate(prompts):
        alone = tiny_model.generate(p[None], 12, greedy=True)[0]
        assert torch.equal(batched[row, pad[row]:], alone)


def test_stop_token_ends_rows(tiny_model):
    idx = torch.randint(0, 64, (4, 3))
    free = tiny_model.generate(idx, 10, greedy=True)
    stop = free[0, 5].item()  # a token row 0 produces
    out = tiny_model.generate(idx, 10, greedy=True, stop_token=stop)
    for row in out[:, 3:].tolist():
        if stop in row:
            assert all(t == stop for t in row[row.index(stop):])


def test_sampling_filters():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    draws = {model_module.pick_next_tokens(logits, top_k=2, generator=torch.Generator().manual_seed(s)).item()
             for s in range(200)}
    assert draws == {0, 1}
    # p = softmax: [0.64, 0.24, 0.09, ...]; the nucleus of 0.8 is the first two tokens
    draws = {model_module.pick_next_tokens(logits, top_p=0.8, generator=torch.Generator().manual_seed(s)).item()
             for s in range(200)}
    assert draws == {0, 1}
    assert model_module.pick_next_tokens(logits, greedy=True).item() == 0


def test_prompt_longer_than_context(tiny_model):
    with pytest.raises(UserError, match="exceeds the model's context of 32 tokens"):
        tiny_model.generate(torch.zeros(1, 30, dtype=torch.long), 5)
    with pytest.raises(UserError, match="longer than the model's context"):
        tiny_model(torch.zeros(1, 33, dtype=torch.long))


def test_config_errors():
    with pytest.raises(UserError, match="multiple of n_head"):
        GPTConfig(n_embd=30, n_head=4)
    with pytest.raises(UserError, match="config key 'attn_impl' is 'flash'; choose from 'auto', 'triton', 'sdpa'"):
        check_settings(GPTConfig(attn_impl="flash"))
    with pytest.raises(UserError, match="config key 'n_layer' is 0; it must be at least 1"):
        check_settings(GPTConfig(n_layer=0))


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_is_gpt2_offline():
    from gpt2study import tokenizer

    enc = tokenizer.get_encoding()
    assert enc.n_vocab == 50257 and tokenizer.EOT == enc.eot_token == 50256
    assert tokenizer.encode("Hello world") == [15496, 995]  # GPT-2's ids, as published
    assert tokenizer.encode(" The Eagle is a coffee shop.") == [383, 18456, 318, 257, 6891, 6128, 13]
    text = "Ünïcödé, emoji 🙂 and <|endoftext|> stay text."
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.EOT not in tokenizer.encode(text)


def test_vocab_file_is_checked(tmp_path, monkeypatch):
    from gpt2study import tokenizer

    bad = tmp_path / "gpt2.tiktoken"
    bad.write_bytes(tokenizer.VOCAB_FILE.read_bytes()[:-10])
    monkeypatch.setattr(tokenizer, "VOCAB_FILE", bad)
    tokenizer.get_encoding.cache_clear()
    try:
        with pytest.raises(ValueError, match="[Hh]ash"):
            tokenizer.get_encoding()
    finally:
        monkeypatch.undo()
        tokenizer.get_encoding.cache_clear()


# ----------------------------------------------------------------------------- the padded vocabulary


def twins(vocab=64, seed=0):
    """(a model of vocab_multiple 128, the same model unpadded) in float64; the padded one's extra rows are large,
    so that any use of them would show in its logits, losses and picks."""
    torch.manual_seed(seed)
    shape = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=vocab)
    padded = GPT(GPTConfig(**shape)).double().eval()
    plain = GPT(GPTConfig(**shape, vocab_multiple=1)).double().eval()
    with torch.no_grad():
        padded.transformer.wte.weight[vocab:] = 3.0
    state = {k: v[:vocab] if k.endswith("wte.weight") else v for k, v in padded.state_dict().items()
             if k != "lm_head.weight"}
    model_module.load_weights(plain, state, "the padded twin")
    return padded, plain


def test_padded_vocabulary_is_invisible():
    """The embedding and head weights have 128 rows for a vocabulary of 64; logits, losses, gradients and
    every decoder's picks are those of the same model without padding rows."""
    from gpt2study.decoding.beam import beam_search

    padded, plain = twins()
    assert padded.transformer.wte.weight.shape[0] == 128 and plain.transformer.wte.weight.shape[0] == 64
    assert (GPTConfig(vocab_size=50257).padded_vocab, GPTConfig(vocab_size=50304).padded_vocab) == (50304, 50304)
    idx = torch.randint(0, 64, (3, 12))
    a, b = padded(idx)[0], plain(idx)[0]
    assert a.shape == b.shape == (3, 12, 64) and torch.allclose(a, b, rtol=1e-12, atol=1e-12)
    g = torch.Generator().manual_seed(1)
    sampled = padded.generate(idx, 10, temperature=2.0, top_k=None, generator=g)
    assert sampled.max() < 64
    assert torch.equal(padded.generate(idx, 10, greedy=True), plain.generate(idx, 10, greedy=True))
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    beams = beam_search(padded, prompts, beam_size=4, max_new_tokens=8, eos=0, no_repeat_ngram_size=0)
    assert beams == beam_search(plain, prompts, beam_size=4, max_new_tokens=8, eos=0, no_repeat_ngram_size=0)
    assert all(t < 64 for out in beams for t in out)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_loss_paths_equal_in_float64(monkeypatch, smoothing):
    """loss_impl 'chunked' and 'plain' give the loss and gradients of cross-entropy over the unpadded model's
    logits (float64), with ignored targets and label smoothing."""
    monkeypatch.setattr(loss_module, "LOSS_CHUNK", 7)  # several chunks and a ragged last one
    padded, plain = twins(seed=2)
    idx, targets = torch.randint(0, 64, (3, 20)), torch.randint(0, 64, (3, 20))
    targets[0, :9] = loss_module.IGNORE_INDEX
    logits = plain.train()(idx)[0]
    ref = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, label_smoothing=smoothing)
    ref_grads = dict(zip(dict(plain.named_parameters()), torch.autograd.grad(ref, list(plain.parameters()))))
    for impl in ("chunked", "plain"):
        padded.config.loss_impl = impl
        _, loss = padded.train()(idx, targets, label_smoothing=smoothing)
        grads = torch.autograd.grad(loss, list(padded.parameters()))
        assert torch.allclose(loss, ref, rtol=1e-12), impl
        for (name, _), grad in zip(padded.named_parameters(), grads, strict=True):
            want = ref_grads[name]
            if name.endswith("wte.weight"):  # the padding rows get no gradient
                assert torch.all(grad[64:] == 0), impl
                grad = grad[:64]
            assert torch.allclose(grad, want, rtol=1e-9, atol=1e-12), (impl, name, (grad - want).abs().max())


def test_file_from_before_padding_loads_unpadded(tmp_path):
    """A model file whose config has no vocab_multiple (saved before it existed) holds vocab_size rows: it loads
    exactly so."""
    from safetensors.torch import load_file, save_file

    _, plain = twins()
    plain.save(tmp_path / "new.safetensors")
    arch = plain.config.architecture()
    del arch["vocab_multiple"]
    save_file(load_file(str(tmp_path / "new.safetensors")), str(tmp_path / "old.safetensors"),
              metadata={"gpt_config": json.dumps(arch)})
    old = GPT.from_file(tmp_path / "old.safetensors").double().eval()
    assert old.config.vocab_multiple == 1 and old.transformer.wte.weight.shape[0] == 64
    idx = torch.randint(0, 64, (2, 9))
    assert torch.equal(old(idx)[0], plain(idx)[0])
