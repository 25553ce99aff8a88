"""model.py against Hugging Face transformers, the KV cache, the chunked loss, weights I/O; tokenizer.py."""

import json

import pytest
import torch
import torch.nn.functional as F

import model as model_module
from common import UserError
from model import GPT, GPTConfig, KVCache, attention

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
    ours = GPT.from_pretrained(str(save_hf(hf_model, tmp_path, form))).eval()
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
    ours = GPT.from_pretrained(str(save_hf(hf_model, tmp_path, "safetensors"))).eval()
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
        GPT.from_pretrained(str(folder))
    assert "\n" not in str(e.value)
    (folder / "config.json").write_text(json.dumps({**cfg, "n_layer": 3}))
    with pytest.raises(UserError, match="tensors missing"):
        GPT.from_pretrained(str(folder))


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(UserError, match="neither a folder nor one of"):
        GPT.from_pretrained("gpt3")
    with pytest.raises(UserError, match="no config.json"):
        GPT.from_pretrained(str(tmp_path))


def test_offline_download_fails_with_one_line(tmp_path, monkeypatch):
    import urllib.error
    import urllib.request

    import common

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    monkeypatch.setattr(common, "CACHE_DIR", tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(UserError, match="could not download .*gpt2-medium.*offline: .*pass that folder"):
        GPT.from_pretrained("gpt2-medium")


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
    monkeypatch.setattr(model_module, "LOSS_CHUNK", 7)  # several chunks and a ragged last one
    tiny_model.train()
    tiny_model.lm_head.weight.requires_grad_(not frozen_head)  # frozen as in LoRA fine-tuning
    idx = torch.randint(0, 64, (3, 20))
    targets = torch.randint(0, 64, (3, 20))
    targets[0, :9] = model_module.IGNORE_INDEX
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
    targets[1, :4] = model_module.IGNORE_INDEX
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


def test_cache_reorder_equals_indexing_its_filled_positions():
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=8, block_size=16, vocab_size=10)
    cache = KVCache(cfg, 6, 12, "cpu", torch.float32, pad=torch.tensor([0, 2, 1]), rows=3)
    for layer in range(2):
        cache.store(layer, torch.randn(3, 2, 5, 4), torch.randn(3, 2, 5, 4))
    cache.len = 5

    def filled():
        rows = slice(0, cache.rows)
        return cache.k[:, rows, :, :cache.len].clone(), cache.v[:, rows, :, :cache.len].clone(), cache.pad.clone()

    # more rows (up to the buffers' size), a permutation with repeats, fewer rows; each as plain indexing would do
    for index in ([0, 0, 1, 1, 2, 2], [1, 0, 0, 5, 4, 4], [0, 1, 5, 4]):
        index = torch.tensor(index)
        k, v, pad = filled()
        want = k[:, index], v[:, index], pad[index]
        cache.reorder(index)
        for got, w in zip(filled(), want):
            assert torch.equal(got, w)
    # from `start` on only: the positions before stay as they were
    k, v, _ = filled()
    cache.reorder(torch.tensor([1, 0, 3, 2]), start=3)
    assert torch.equal(cache.k[:, :4, :, :3], k[:, :, :, :3])
    assert torch.equal(cache.k[:, :4, :, 3:5], k[:, [1, 0, 3, 2], :, 3:5])
    assert torch.equal(cache.v[:, :4, :, 3:5], v[:, [1, 0, 3, 2], :, 3:5])
    # a start per row (rows 2 and 3 take rows 0 and 1 from columns 2 and 4 on), straight row to row
    k, v, _ = filled()
    cache.reorder(torch.tensor([0, 1, 0, 1]), start=torch.tensor([0, 0, 2, 4]))
    for buf, old in ((cache.k, k), (cache.v, v)):
        assert torch.equal(buf[:, :2, :, :5], old[:, :2])
        assert torch.equal(buf[:, 2, :, :2], old[:, 2, :, :2]) and torch.equal(buf[:, 2, :, 2:5], old[:, 0, :, 2:5])
        assert torch.equal(buf[:, 3, :, :4], old[:, 3, :, :4]) and torch.equal(buf[:, 3, :, 4:5], old[:, 1, :, 4:5])


@pytest.mark.parametrize("with_mask", [False, True])
def test_one_query_attention_reads_shared_keys_once_per_group_with_the_same_result(with_mask):
    torch.manual_seed(0)
    g, groups, H, S, T, D = 3, 4, 2, 5, 3, 8  # 4 groups of 3 rows share their first 5 keys and values
    B = g * groups
    k, v = (torch.randn(B, H, S + T, D, dtype=torch.float64) for _ in range(2))
    for x in (k, v):
        x[:, :, :S] = x[::g, :, :S].repeat_interleave(g, 0)
    q = torch.randn(B, H, 1, D, dtype=torch.float64)
    mask = None
    if with_mask:  # shared padding in the shared columns, anything in the others, never all masked
        shared_pad = (torch.rand(groups, 1, 1, S) > 0.4).repeat_interleave(g, 0)
        mask = torch.cat([shared_pad, torch.rand(B, 1, 1, T) > 0.4], -1)
        mask[..., -1] = True
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # float64; ours takes the softmax in float32
    for shared in ((g, S), (g, 2), (1, 0), (g, 0)):
        torch.testing.assert_close(attention(q, k, v, mask, 0.0, "sdpa", shared), want, rtol=0, atol=1e-6)
    # it does read the shared columns from each group's first row only
    k[1::g, :, :S] += 1.0
    torch.testing.assert_close(attention(q, k, v, mask, 0.0, "sdpa", (g, S)), want, rtol=0, atol=1e-6)


def test_cache_insert_and_make_room_keep_every_rows_positions():
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=8, block_size=16, vocab_size=10)
    cache = KVCache(cfg, 7, 10, "cpu", torch.float32, pad=torch.tensor([1, 3]), rows=2)
    fresh = KVCache(cfg, 2, 7, "cpu", torch.float32, pad=torch.tensor([2, 0]))
    for c, n in ((cache, 5), (fresh, 7)):
        for layer in range(2):
            c.store(layer, torch.randn(c.rows, 2, n, 4), torch.randn(c.rows, 2, n, 4))
        c.len = n

    def real(c, row):  # the keys and values of a row's own tokens, and the position of its next one
        p = c.pad[row].item()
        return c.k[:, row, :, p:c.len].clone(), c.v[:, row, :, p:c.len].clone(), c.positions(1, "cpu")[row].item()

    before = [real(cache, r) for r in range(2)] + [real(fresh, r) for r in (0, 1, 1)]
    cache.insert(fresh, copies=2)  # 7 columns into a cache of 5: its columns move right first
    cache.reorder(torch.tensor([0, 1, 2, 4, 5]))
    assert (cache.rows, cache.len, cache.lo) == (5, 7, 0)
    for row, want in enumerate(before):
        assert all(torch.equal(g, w) for g, w in zip(real(cache, row)[:2], want[:2])) and real(cache, row)[2] == want[2]
    with pytest.raises(RuntimeError, match="full"):  # row 3 starts at column 0: nothing to give back
        cache.make_room(4)
    cache.reorder(torch.tensor([2, 0, 1]))
    cache.make_room(4)  # the columns before the first token of every row go
    assert (cache.len, cache.lo) == (5, 0)
    for row, want in enumerate([before[2], before[0], before[1]]):
        assert all(torch.equal(g, w) for g, w in zip(real(cache, row)[:2], want[:2])) and real(cache, row)[2] == want[2]


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
    draws = {model_module.sample_next(logits, top_k=2, generator=torch.Generator().manual_seed(s)).item()
             for s in range(200)}
    assert draws == {0, 1}
    # p = softmax: [0.64, 0.24, 0.09, ...]; the nucleus of 0.8 is the first two tokens
    draws = {model_module.sample_next(logits, top_p=0.8, generator=torch.Generator().manual_seed(s)).item()
             for s in range(200)}
    assert draws == {0, 1}
    assert model_module.sample_next(logits, greedy=True).item() == 0


def test_prompt_longer_than_context(tiny_model):
    with pytest.raises(UserError, match="exceeds the model's context of 32 tokens"):
        tiny_model.generate(torch.zeros(1, 30, dtype=torch.long), 5)
    with pytest.raises(UserError, match="longer than the model's context"):
        tiny_model(torch.zeros(1, 33, dtype=torch.long))


def test_config_errors():
    with pytest.raises(UserError, match="multiple of n_head"):
        GPTConfig(n_embd=30, n_head=4)
    with pytest.raises(UserError, match="attn_impl"):
        GPTConfig(attn_impl="flash")


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_is_gpt2_offline():
    import tokenizer

    enc = tokenizer.get_encoding()
    assert enc.n_vocab == 50257 and tokenizer.EOT == enc.eot_token == 50256
    assert tokenizer.encode("Hello world") == [15496, 995]  # GPT-2's ids, as published
    assert tokenizer.encode(" The Eagle is a coffee shop.") == [383, 18456, 318, 257, 6891, 6128, 13]
    text = "Ünïcödé, emoji 🙂 and <|endoftext|> stay text."
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.EOT not in tokenizer.encode(text)


def test_vocab_file_is_checked(tmp_path, monkeypatch):
    import tokenizer

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
