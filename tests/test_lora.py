import copy
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lora import (
    TARGETS,
    LoRAConfig,
    LoRALinear,
    base_fingerprint,
    inject_lora,
    load_adapter,
    lora_parameters,
    lora_state_dict,
    merge_and_unload,
    merge_lora,
    read_adapter_meta,
    save_adapter,
    unmerge_lora,
)
from model import GPT, GPTConfig, UserError

ROOT = Path(__file__).resolve().parents[1]
C = 32  # n_embd of the tiny model
ALL = tuple(TARGETS)


def tiny(seed=0, n_layer=2) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=n_layer, n_head=2, n_embd=C)).eval()


def randomize_b(model, seed=1):
    """Give every B a nonzero value, so that the adapters change the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lora_parameters(model):
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


IDX = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))


def logits(model):
    return model(IDX)[0]


def test_fresh_adapter_leaves_logits_unchanged():
    model = tiny()
    before = logits(model)
    inject_lora(model, LoRAConfig(lora_targets=ALL))
    assert torch.equal(logits(model), before)


def test_output_matches_hand_merged_weights_and_unmerge_is_exact():
    model = tiny()
    reference = copy.deepcopy(model)
    cfg = LoRAConfig(lora_targets=("q", "v", "mlp_in"))
    inject_lora(model, cfg)
    randomize_b(model)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}

    # W + α/r · B A by hand: q and v update their thirds of c_attn, mlp_in the whole c_fc
    with torch.no_grad():
        for ref_block, block in zip(reference.transformer.h, model.transformer.h):
            qkv, fc = block.attn.c_attn, block.mlp.c_fc
            ref_block.attn.c_attn.weight[:C] += cfg.scale * qkv.lora_B["q"] @ qkv.lora_A["q"]
            ref_block.attn.c_attn.weight[2 * C:] += cfg.scale * qkv.lora_B["v"] @ qkv.lora_A["v"]
            ref_block.mlp.c_fc.weight += cfg.scale * fc.lora_B["mlp_in"] @ fc.lora_A["mlp_in"]
    expected = logits(reference)
    assert not torch.allclose(expected, logits(tiny()))  # the adapters do change the output

    torch.testing.assert_close(logits(model), expected)
    merge_lora(model)
    assert all(m.merged for m in model.modules() if isinstance(m, LoRALinear))
    torch.testing.assert_close(logits(model), expected)
    unmerge_lora(model)
    for name, p in model.named_parameters():
        assert torch.equal(p, original[name]), name
    torch.testing.assert_close(logits(model), expected)


def test_baked_model_is_a_plain_gpt_with_the_update(tmp_path):
    model = inject_lora(tiny(), LoRAConfig(lora_targets=ALL))
    randomize_b(model)
    adapted = logits(model)
    baked = merge_and_unload(model)
    assert not any(isinstance(m, LoRALinear) for m in baked.modules())
    assert torch.allclose(logits(baked), adapted, atol=1e-5)
    baked.save(tmp_path / "baked.safetensors")  # the names are the plain model's again
    assert torch.allclose(logits(GPT.from_file(tmp_path / "baked.safetensors").eval()), adapted, atol=1e-5)


def test_beam_search_sees_an_unmerged_adapter_as_its_baked_model():
    from gpt2study.decoding import beam_search

    model = inject_lora(tiny(), LoRAConfig(lora_targets=ALL))  # 'wte' included: the head's weight is adapted
    randomize_b(model)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    kw = dict(beam_size=3, max_new_tokens=6, eos=0)
    assert beam_search(model, prompts, **kw) == beam_search(merge_and_unload(copy.deepcopy(model)), prompts, **kw)
    assert beam_search(model, prompts, **kw) != beam_search(tiny(), prompts, **kw)


def test_only_lora_parameters_train():
    model = tiny()
    cfg = LoRAConfig(lora_targets=ALL, lora_dropout=0.0)
    inject_lora(model, cfg)
    randomize_b(model)
    model.train()
    _, loss = model(IDX, targets=IDX)
    loss.backward()
    lora_names = {n for n, _ in lora_parameters(model)}
    for name, p in model.named_parameters():
        if name in lora_names:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    per_block = [t for t in cfg.lora_targets if t != "wte"]  # 'wte' is one update for the whole model
    expected = (model.config.n_layer * len(per_block) + ("wte" in cfg.lora_targets)) * 2  # an A and a B each
    assert len(optimizer.param_groups[0]["params"]) == len(lora_names) == expected
    # the base weights keep their names, under .base
    assert "transformer.h.0.attn.c_attn.base.weight" in dict(model.named_parameters())


@pytest.mark.parametrize("targets", [("q",), ("k",), ("v",), ("q", "v"), ("k", "v")])
def test_each_of_q_k_v_adapts_only_its_third(targets):
    model = tiny()
    inject_lora(model, LoRAConfig(lora_targets=targets))
    randomize_b(model)
    layer = model.transformer.h[0].attn.c_attn
    x = torch.randn(2, 5, C)
    out, base_out = layer(x), layer.base(x)
    for slot, part in enumerate("qkv"):
        same = torch.equal(out[..., slot * C:(slot + 1) * C], base_out[..., slot * C:(slot + 1) * C])
        assert same == (part not in targets), part
    assert set(layer.lora_A) == set(targets)
    assert layer.lora_A[targets[0]].shape == (4, C) and layer.lora_B[targets[0]].shape == (C, 4)


def test_dropout_applies_to_the_lora_input_only():
    model = tiny()
    before = logits(model)
    inject_lora(model, LoRAConfig(lora_targets=ALL, lora_dropout=0.5))
    model.train()  # the GPT's own dropout is 0: only LoRA's is random
    assert torch.equal(logits(model), before) and torch.equal(logits(model), before)
    randomize_b(model)
    assert not torch.allclose(logits(model), logits(model))
    model.eval()
    assert torch.equal(logits(model), logits(model))


def test_adapter_round_trip(tmp_path):
    base_path, adapter = tmp_path / "base.safetensors", tmp_path / "adapter.safetensors"
    tiny().save(base_path)
    model = GPT.from_file(base_path).eval()
    cfg = LoRAConfig(lora_r=2, lora_alpha=8, lora_targets=("q", "v", "attn_out"))
    inject_lora(model, cfg)
    randomize_b(model)
    want = logits(model)
    save_adapter(model, adapter, extra_meta={"base": str(base_path), "step": 100})

    fresh = GPT.from_file(base_path).eval()
    assert load_adapter(fresh, adapter) == cfg
    assert torch.equal(logits(fresh), want)

    meta = read_adapter_meta(adapter)
    assert LoRAConfig(**meta["lora_config"]) == cfg
    assert meta["base_architecture"] == fresh.config.architecture()
    assert meta["base_fingerprint"] == base_fingerprint(tiny())
    assert meta["extra"] == {"base": str(base_path), "step": 100}
    with safe_open(str(adapter), framework="pt") as f:
        names = set(f.keys())
    assert names == set(lora_state_dict(model)) and len(names) == 2 * 3 * 2
    # the file holds the adapter and nothing else
    lora_bytes = sum(t.numel() * t.element_size() for t in lora_state_dict(model).values())
    assert adapter.stat().st_size < lora_bytes + 4096


def test_adapter_is_a_tiny_fraction_of_gpt2_medium():
    with torch.device("meta"):  # shapes only: no memory, no time
        model = GPT(GPTConfig(n_layer=24, n_head=16, n_embd=1024))
        inject_lora(model, LoRAConfig())
    n_lora = sum(p.numel() for _, p in lora_parameters(model))
    assert n_lora == 24 * 2 * (4 * 1024 + 1024 * 4)
    assert n_lora < 0.01 * model.num_params(non_embedding=False)


def test_adapter_refused_by_another_base(tmp_path):
    adapter = tmp_path / "adapter.safetensors"
    model = inject_lora(tiny(seed=0), LoRAConfig())
    save_adapter(model, adapter, extra_meta={"base": "tiny seed 0"})

    other = tiny(seed=1)  # same shapes, other weights
    with pytest.raises(UserError, match=rf"trained on base {base_fingerprint(model)} \(described as 'tiny seed 0'\), "
                                        rf"this base is {base_fingerprint(other)}"):
        load_adapter(other, adapter)
    assert not list(lora_parameters(other))  # refused before touching the model

    with pytest.raises(UserError, match="another architecture: n_layer is 2 there, 3 here"):
        load_adapter(tiny(n_layer=3), adapter)

    differently_injected = inject_lora(tiny(seed=0), LoRAConfig(lora_targets=("q",)))
    with pytest.raises(UserError, match=r"targets=\['q', 'v'\].*targets=\['q'\]"):
        load_adapter(differently_injected, adapter)


def test_fingerprint_ignores_lora_merging_and_bf16_but_not_weights():
    model = tiny()
    fp = base_fingerprint(model)
    inject_lora(model, LoRAConfig(lora_targets=ALL))
    randomize_b(model)
    assert base_fingerprint(model) == fp
    merge_lora(model)
    assert base_fingerprint(model) == fp
    assert base_fingerprint(copy.deepcopy(model).to(torch.bfloat16)) == fp
    unmerge_lora(model)
    with torch.no_grad():
        model.transformer.h[1].mlp.c_fc.base.weight[0, 0] += 0.5
    assert base_fingerprint(model) != fp


def test_config_and_injection_errors():
    with pytest.raises(UserError, match="'lora_targets' has 'o'; choose from q, k, v, attn_out, mlp_in, mlp_out"):
        LoRAConfig(lora_targets=("q", "o"))
    with pytest.raises(UserError, match="config key 'lora_r' is 0"):
        LoRAConfig(lora_r=0)
    assert LoRAConfig(lora_targets=["v", "q", "v"]).lora_targets == ("q", "v")
    model = inject_lora(tiny(), LoRAConfig())
    with pytest.raises(UserError, match="twice"):
        inject_lora(model, LoRAConfig())


def _kernel_importable() -> bool:
    try:
        import kernels.lora_linear  # noqa: F401
    except Exception:
        return False
    return True


KERNEL_CHECK = """
    import torch
    from kernels.lora_linear import lora_linear
    from lora import LoRAConfig, inject_lora, lora_parameters
    from model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=32))
    inject_lora(model, LoRAConfig(lora_targets=("q", "v", "mlp_in"), lora_dropout=0.0))
    with torch.no_grad():
        for _, p in lora_parameters(model):
            p.normal_(0, 0.1)
    for layer in (model.transformer.h[0].attn.c_attn, model.transformer.h[0].mlp.c_fc):
        x = torch.randn(2, 5, 32, requires_grad=True)
        wrt = [x, *layer.lora_A.values(), *layer.lora_B.values()]
        want = layer(x)  # a CPU tensor: the PyTorch path
        g = torch.randn_like(want)
        want_grads = torch.autograd.grad(want, wrt, g)
        A, B = layer.lora_factors()
        got = lora_linear(x, layer.base.weight, layer.base.bias, A, B, layer.scale)
        got_grads = torch.autograd.grad(got, wrt, g)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        for a, b in zip(got_grads, want_grads):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    print("kernel path matches")
"""


@pytest.mark.skipif(not _kernel_importable(), reason="kernels.lora_linear is not available")
def test_kernel_path_matches_pytorch_path():
    # TRITON_INTERPRET must be set before triton is imported: a fresh interpreter
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(KERNEL_CHECK)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


# ----------------------------------------------------------------------------- lora_impl


@pytest.mark.parametrize(("dropout", "train_base"), [(0.0, False), (0.3, False), (0.0, True)])
def test_concat_path_equals_unfused_in_float64(dropout, train_base):
    """lora_impl='concat' ([x | s·x·Aᵀ] [W | B]ᵀ in one matmul, and its own backward) gives the unfused layer's
    output and gradients (x, every A and B, the bias; W too when it is trainable) in float64, dropout included."""
    results = {}
    for impl in ("unfused", "concat"):
        model = tiny().double()
        model.config.lora_impl = impl
        inject_lora(model, LoRAConfig(lora_targets=("q", "v", "mlp_in", "wte"), lora_dropout=dropout))
        randomize_b(model)
        model.train()
        layers = [model.transformer.h[0].attn.c_attn, model.transformer.h[0].mlp.c_fc, model.lm_head]
        outs = []
        for layer in layers:
            layer.base.weight.requires_grad_(train_base)
            if layer.base.bias is not None:
                layer.base.bias.requires_grad_(True)
            x = torch.randn(3, 5, layer.base.in_features, dtype=torch.float64,
                            generator=torch.Generator().manual_seed(7), requires_grad=True)
            wrt = [x, *layer.lora_A.values(), *layer.lora_B.values(),
                   *(p for p in (layer.base.weight, layer.base.bias) if p is not None and p.requires_grad)]
            torch.manual_seed(3)  # the same dropout mask for both
            y = layer(x)
            g = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
            outs.append((y, *torch.autograd.grad(y, wrt, g)))
        results[impl] = outs
    for want, got in zip(results["unfused"], results["concat"], strict=True):
        assert len(want) == len(got)
        for a, b in zip(want, got, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)


def test_lora_impl_setting(monkeypatch, capsys):
    """lora_impl: what 'auto' picks on each device (the kernel on CUDA only where kernels.MEASURED_WINS says
    so, else the unfused layer until concat is measured faster); 'triton' without a GPU warns once and
    computes the unfused layer."""
    import types

    import kernels
    import lora

    cpu = torch.zeros(1)
    fake_cuda = types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0))
    assert lora._lora_impl("auto", cpu) == "unfused"
    assert lora._lora_impl("auto", fake_cuda) == "unfused"  # concat: unmeasured on a GPU
    monkeypatch.setattr(kernels, "MEASURED_WINS", {(9, 0): {"lora_linear": "bench/results/x.md"}})
    monkeypatch.setattr(kernels, "_capability", lambda device: (9, 0))
    assert lora._lora_impl("auto", fake_cuda) == "triton"
    assert lora._lora_impl("concat", cpu) == "concat" and lora._lora_impl("unfused", fake_cuda) == "unfused"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = tiny()
    model.config.lora_impl = "triton"
    inject_lora(model, LoRAConfig())
    randomize_b(model)
    import model as model_module

    monkeypatch.setattr(model_module, "_warned", set())  # said once per process: this test must see it said
    capsys.readouterr()
    got = logits(model)
    assert "warning: lora_impl='triton' needs a CUDA tensor" in capsys.readouterr().err
    model.config.lora_impl = "unfused"
    assert torch.equal(got, logits(model))
    with pytest.raises(UserError, match="lora_impl"):
        from gpt2study.cli import check_settings

        check_settings(GPTConfig(lora_impl="fused"))
