"""Our GPT-2 and LoRA adapters in Hugging Face's formats, and PEFT adapters back into our model.

- `save_hf_model(model, folder)`: a transformers GPT-2 folder (config.json, model.safetensors in
  GPT2LMHeadModel's names and Conv1D layout, generation_config.json, tokenizer files), which
  `GPT2LMHeadModel.from_pretrained(folder)` and `AutoTokenizer.from_pretrained(folder)` load offline.
- `save_peft_adapter(model, folder, base)`: a PEFT LoRA adapter (adapter_config.json,
  adapter_model.safetensors) for that base, with the same logits as ours.
- `load_peft_adapter(model, folder)`: a PEFT LoRA adapter for GPT-2 injected into our plain GPT.

Every mapping is exact: an adapter that cannot be expressed exactly on the other side is refused
with one line rather than approximated.

PEFT's side, as peft 0.21 does it for GPT-2: a target module gets lora_A (r, in) and lora_B
(out, r) in nn.Linear layout, whatever the Conv1D base stores (fan_in_fan_out only matters when
merging), and adds scaling · B A x with scaling = alpha / r (alpha / √r with use_rslora); r and
alpha per module through rank_pattern / alpha_pattern. Our q, k and v are three parts of one
fused c_attn, each with its own rank-r pair: together they are one PEFT c_attn adapter of rank
parts × r whose B is block-structured (lora.LoRALinear.lora_factors), with alpha scaled by the
number of parts so that alpha / rank stays ours.
"""

import json
import math
import re
from collections import Counter
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

import lora
from gpt2study import tokenizer
from model import GPT, GPTConfig, UserError, load_weights

PEFT_PREFIX = "base_model.model."  # what PEFT puts before a module's name in adapter_model.safetensors
# the modules of a block our LoRA can adapt, by their name in a block, and the PEFT target that names each
PEFT_TARGETS = {"attn.c_attn": "c_attn", "attn.c_proj": "attn.c_proj", "mlp.c_fc": "mlp.c_fc",
                "mlp.c_proj": "mlp.c_proj"}
FINGERPRINT_KEY = "gpt2_study_base_fingerprint"  # our base's identity, in the adapter file's metadata
CONV1D_WEIGHTS = ("c_attn.weight", "c_proj.weight", "c_fc.weight")  # stored (in, out) by transformers


# ----------------------------------------------------------------------------- the model


def hf_config(cfg) -> dict:
    """config.json of a transformers GPT2LMHeadModel with the architecture of our GPTConfig."""
    has_tokens = cfg.vocab_size >= tokenizer.VOCAB_SIZE  # GPT-2's token ids exist in the vocabulary
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.block_size,
        "n_ctx": cfg.block_size,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": None,  # 4 × n_embd, as ours
        "activation_function": "gelu_new",  # the tanh GELU
        "layer_norm_epsilon": 1e-5,  # nn.LayerNorm's default, which ours use
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "use_cache": True,
        "bos_token_id": tokenizer.EOT if has_tokens else None,
        "eos_token_id": tokenizer.EOT if has_tokens else None,
    }


def load_hf_model(folder, **options) -> GPT:
    """A transformers GPT-2 folder (config.json plus model.safetensors or pytorch_model.bin) as our
    GPT; `options` set ModelOptions' fields. Hub names become folders in hub.py."""
    folder = Path(folder)
    hf = json.loads((folder / "config.json").read_text())
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        raise UserError(f"{folder}/config.json uses activation {act!r}; GPT-2 uses the tanh GELU (gelu_new)")
    cfg = GPTConfig(block_size=hf["n_positions"], vocab_size=hf["vocab_size"], vocab_multiple=1, n_layer=hf["n_layer"],
                    n_head=hf["n_head"], n_embd=hf["n_embd"], bias=True, **options)
    model = GPT(cfg)
    load_weights(model, _hf_to_ours(_read_hf_weights(folder)), f"{folder} (config.json: n_layer={cfg.n_layer}, "
                 f"n_head={cfg.n_head}, n_embd={cfg.n_embd}, vocab_size={cfg.vocab_size})")
    return model


def _read_hf_weights(folder: Path) -> dict:
    if (folder / "model.safetensors").exists():
        from safetensors.torch import load_file

        return load_file(str(folder / "model.safetensors"))
    if (folder / "pytorch_model.bin").exists():
        return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise UserError(f"{folder} has no model.safetensors or pytorch_model.bin")


def _hf_to_ours(hf: dict) -> dict:
    """Rename transformers' GPT-2 tensors and transpose its Conv1D weights."""
    out = {}
    for k, v in hf.items():
        k = k.removeprefix("transformer.")
        if k.endswith((".attn.bias", ".attn.masked_bias")) or k == "lm_head.weight":
            continue  # causal-mask buffers of old checkpoints; the head is tied to wte
        out[f"transformer.{k}"] = (v.t() if k.endswith(CONV1D_WEIGHTS) else v).contiguous()
    return out


def _plain(model) -> None:
    if getattr(model, "lora_config", None) is not None or any(isinstance(m, lora.LoRALinear) for m in model.modules()):
        raise UserError("the model has LoRA adapters: export them with save_peft_adapter, or merge them into the "
                        "base first (lora.merge_and_unload)")


def hf_state_dict(model) -> dict[str, torch.Tensor]:
    """A plain GPT's weights as GPT2LMHeadModel stores them: the same names, Conv1D weights
    transposed to (in, out), the head left out (tied to wte: transformers ties it on loading),
    the embedding's padding rows too (GPT-2's format has vocab_size rows). A model without biases
    gets zero biases, which compute the same."""
    _plain(model)
    out = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        if name == "transformer.wte.weight":
            t = t[:model.config.vocab_size]
        out[name] = (t.t() if name.endswith(CONV1D_WEIGHTS) else t).detach().cpu().contiguous()
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear | nn.LayerNorm) and name != "lm_head" and m.bias is None:
            w = m.weight
            out[f"{name}.bias"] = w.new_zeros(w.shape[0]).cpu()
    return out


def save_hf_model(model, folder) -> None:
    """Write `model` (a plain GPT) as a transformers GPT-2 folder, with GPT-2's tokenizer files
    when its vocabulary holds GPT-2's tokens."""
    from safetensors.torch import save_file

    state = hf_state_dict(model)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = hf_config(model.config)
    config["dtype"] = str(model.transformer.wte.weight.dtype).removeprefix("torch.")
    _write_json(folder / "config.json", config)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})  # transformers wants "pt"
    if config["eos_token_id"] is not None:
        _write_json(folder / "generation_config.json", {"bos_token_id": tokenizer.EOT, "eos_token_id": tokenizer.EOT})
        save_tokenizer_files(folder, model_max_length=model.config.block_size)


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------- the tokenizer


@lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """The printable character GPT-2's vocab.json spells each byte with: printable Latin-1
    bytes stand for themselves, the other 68 (controls, space, ...) for code points 256, 257,
    ... in byte order. So 'Ġ' is a space, 'Ċ' a newline."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    out, extra = {}, 256
    for b in range(256):
        if b in printable:
            out[b] = chr(b)
        else:
            out[b] = chr(extra)
            extra += 1
    return out


def _merge_pair(token: bytes, rank: int, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The two tokens whose merge made `token`: byte-level BPE on its bytes with only the merges
    ranked before it stops at exactly two parts, and merging those is the merge of rank `rank`."""
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best = min(range(len(parts) - 1), key=lambda i: ranks.get(parts[i] + parts[i + 1], math.inf))
        if ranks.get(parts[best] + parts[best + 1], math.inf) >= rank:
            break
        parts[best:best + 2] = [parts[best] + parts[best + 1]]
    if len(parts) != 2:
        raise RuntimeError(f"token {token!r} (rank {rank}) is no merge of two earlier tokens")
    return parts[0], parts[1]


def vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """GPT-2's vocab.json (token spelled with byte_to_unicode -> id) and merges.txt (pairs in
    merge order), derived from our vendored BPE ranks: a token's id is its rank, and the tokens
    ranked 256 on are the merges, in order."""
    enc = tokenizer.get_encoding()
    ranks = {enc.decode_single_token_bytes(i): i for i in range(tokenizer.EOT)}
    spell = byte_to_unicode()

    def text(b: bytes) -> str:
        return "".join(spell[x] for x in b)

    vocab = {text(b): i for b, i in ranks.items()}
    vocab[tokenizer.EOT_TEXT] = tokenizer.EOT
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) > 1:
            a, b = _merge_pair(token, rank, ranks)
            merges.append((text(a), text(b)))
    return vocab, merges


def save_tokenizer_files(folder, model_max_length: int = 1024) -> None:
    """vocab.json, merges.txt and tokenizer_config.json of GPT-2's tokenizer. '<|endoftext|>'
    is its one special token (id 50256), as in OpenAI's GPT-2 on the hub."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = vocab_and_merges()
    _write_json(folder / "vocab.json", vocab)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                       encoding="utf-8")
    eot = tokenizer.EOT_TEXT
    _write_json(folder / "tokenizer_config.json", {
        "tokenizer_class": "GPT2Tokenizer",
        "model_max_length": model_max_length,
        "bos_token": eot,
        "eos_token": eot,
        "unk_token": eot,
        "add_prefix_space": False,
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "added_tokens_decoder": {str(tokenizer.EOT): {"content": eot, "lstrip": False, "normalized": True,
                                                      "rstrip": False, "single_word": False, "special": True}},
    })


# ----------------------------------------------------------------------------- LoRA -> PEFT


def check_peft_exportable(cfg: "lora.LoRAConfig") -> None:
    """Refuse (one line) what a PEFT adapter cannot hold exactly: the tied 'wte' update. PEFT
    can adapt the embedding and the head with one shared pair (ensure_weight_tying), but its
    merge_and_unload then adds the update to their shared weight twice."""
    if "wte" in cfg.lora_targets:
        raise UserError("the adapter adapts 'wte' (the token embedding tied to the LM head), which a PEFT adapter "
                        "cannot hold exactly: export the merged model instead (--merged)")


def peft_adapter(model) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json as a dict, adapter_model.safetensors' tensors) of the model's LoRA."""
    cfg = getattr(model, "lora_config", None)
    if cfg is None:
        raise UserError("the model has no LoRA adapters to export")
    check_peft_exportable(cfg)
    tensors, targets, rank_pattern, alpha_pattern = {}, set(), {}, {}
    for name, m in lora.lora_layers(model):
        A, B = m.lora_factors()
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = A.detach().cpu().contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = B.detach().cpu().contiguous()
        target = PEFT_TARGETS[name.split(".", 3)[3]]  # transformer.h.<i>.<module in the block>
        targets.add(target)
        parts = len(m.parts)
        if parts > 1:  # q, k, v: one adapter of rank parts × r, so alpha grows alike to keep alpha / r
            rank_pattern[target] = parts * cfg.lora_r
            alpha_pattern[target] = parts * cfg.lora_alpha
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None,
        "r": cfg.lora_r,
        "lora_alpha": cfg.lora_alpha,
        "lora_dropout": cfg.lora_dropout,
        "target_modules": sorted(targets),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "fan_in_fan_out": True,  # GPT-2's Conv1D stores (in, out)
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "inference_mode": True,
    }
    return config, tensors


def save_peft_adapter(model, folder, base_name_or_path: str) -> None:
    """Write the model's LoRA as a PEFT adapter folder for the base at `base_name_or_path` (a hub
    name or a transformers folder, e.g. one written by save_hf_model)."""
    from safetensors.torch import save_file

    config, tensors = peft_adapter(model)
    config["base_model_name_or_path"] = str(base_name_or_path)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _write_json(folder / "adapter_config.json", config)
    save_file(tensors, str(folder / "adapter_model.safetensors"),
              metadata={"format": "pt", FINGERPRINT_KEY: lora.base_fingerprint(model)})


# ----------------------------------------------------------------------------- PEFT -> LoRA


# PEFT options that change what an adapter computes beyond B A, or that need more than the base
_UNSUPPORTED = {
    "use_dora": "DoRA (use_dora)", "lora_bias": "a LoRA bias (lora_bias)", "modules_to_save": "modules_to_save",
    "trainable_token_indices": "trainable_token_indices", "layer_replication": "layer_replication",
    "target_parameters": "target_parameters", "alora_invocation_tokens": "aLoRA (alora_invocation_tokens)",
    "use_qalora": "QALoRA (use_qalora)", "use_bdlora": "BD-LoRA (use_bdlora)", "arrow_config": "Arrow routing",
    "kasa_config": "KaSA", "velora_config": "VeLoRA", "monteclora_config": "MonteCLoRA",
}
_MODULE_KEY = re.compile(r"transformer\.h\.(\d+)\.(" + "|".join(map(re.escape, PEFT_TARGETS)) + r")\.(.+)")


def _pattern_value(patterns: dict, module: str, default):
    # as PEFT matches rank_pattern and alpha_pattern keys: a regex for the module name's tail
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _read_peft(folder: Path) -> tuple[dict, dict[str, torch.Tensor], dict]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{folder}/adapter_config.json cannot be read: {e}") from None
    weights = folder / "adapter_model.safetensors"
    if weights.is_file():
        with safe_open(str(weights), framework="pt") as f:
            meta = f.metadata() or {}
        return config, load_file(str(weights)), meta
    if (folder / "adapter_model.bin").is_file():
        return config, torch.load(folder / "adapter_model.bin", map_location="cpu", weights_only=True), {}
    raise UserError(f"{folder} has no adapter_model.safetensors or adapter_model.bin")


def _check_peft_config(config: dict, folder: Path) -> None:
    where = f"PEFT adapter {folder}"
    if config.get("peft_type", "LORA") != "LORA":
        raise UserError(f"{where} is of type {config.get('peft_type')}; only LoRA adapters map onto our LoRA")
    used = [what for key, what in _UNSUPPORTED.items() if config.get(key)]
    if config.get("bias", "none") != "none":
        used.insert(0, f"bias={config['bias']!r}")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init != "gaussian":  # PiSSA, OLoRA, LoftQ, ... change the base weights too
        used.append(f"init_lora_weights={init!r}")
    if used:
        raise UserError(f"{where} uses {used[0]}, which our LoRA does not model: only plain LoRA (B A) loads exactly")


def _peft_updates(config: dict, tensors: dict, folder: Path) -> dict[tuple[int, str], tuple]:
    """{(layer, module in the block): (A, B, scaling)} of a PEFT adapter for GPT-2."""
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        name = key.removeprefix(PEFT_PREFIX)
        match = _MODULE_KEY.fullmatch(name)
        if match is None:
            module = re.sub(r"\.(lora_\w+|weight|bias)(\..*)?$", "", name)
            raise UserError(f"PEFT adapter {folder} has {key}: it adapts {module}, which our LoRA cannot reproduce "
                            f"exactly (it adapts {', '.join(PEFT_TARGETS)} of each block)")
        if match[3] not in ("lora_A.weight", "lora_B.weight"):
            raise UserError(f"PEFT adapter {folder} has {key}, which plain LoRA (lora_A, lora_B) does not have")
        pairs.setdefault((int(match[1]), match[2]), {})[match[3][5]] = t
    if not pairs:
        raise UserError(f"PEFT adapter {folder} holds no LoRA weights")
    r, alpha = config.get("r", 8), config.get("lora_alpha", 8)
    updates = {}
    for (layer, module), ab in sorted(pairs.items()):
        full = f"transformer.h.{layer}.{module}"
        if ab.keys() != {"A", "B"}:
            raise UserError(f"PEFT adapter {folder} lacks lora_{'AB'[('A' in ab)]} of {full}")
        A, B = ab["A"], ab["B"]
        rank = _pattern_value(config.get("rank_pattern"), full, r)
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != rank or B.shape[1] != rank:
            raise UserError(f"PEFT adapter {folder}: {full} has lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}, "
                            f"not rank {rank} as its config says")
        a = _pattern_value(config.get("alpha_pattern"), full, alpha)
        scaling = a / math.sqrt(rank) if config.get("use_rslora") else a / rank
        updates[(layer, module)] = (A, B, scaling)
    return updates


def _split_c_attn(A, B) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A c_attn adapter (A (R, C), B (3C, R)) as our q, k, v parts {part: (A_p, B_p)}.

    When each column of B is non-zero in one third of the rows at most (what save_peft_adapter
    writes), each third keeps its own columns and the matching rows of A: the parts' ranks add
    up to R. Otherwise each part gets rank R, A whole and its third of B: (B A) restricted to a
    third of the rows is B_third A, so that too is exact."""
    thirds = B.reshape(3, B.shape[0] // 3, B.shape[1])
    used = (thirds != 0).any(dim=1)  # (3, R): which thirds each column touches
    if used.any() and (used.sum(0) <= 1).all():
        return {part: (A[used[i]], thirds[i][:, used[i]]) for i, part in enumerate("qkv") if used[i].any()}
    return {part: (A, thirds[i]) for i, part in enumerate("qkv")}


def load_peft_adapter(model, folder) -> "lora.LoRAConfig":
    """Inject our LoRA into a plain GPT and fill it from a PEFT LoRA adapter folder, so that the
    model computes what PeftModel.from_pretrained(its transformers twin, folder) does. Returns
    the LoRAConfig: the largest rank the adapter uses (smaller ranks padded with zeros), its
    most common scaling (other modules' B rescaled), and every target it adapts in any layer
    (zero in layers it leaves alone). Anything that cannot be mapped exactly is refused."""
    folder = Path(folder)
    if not (folder / "adapter_config.json").is_file():
        raise UserError(f"{folder} is not a PEFT adapter folder (no adapter_config.json)")
    _plain(model)
    config, tensors, meta = _read_peft(folder)
    _check_peft_config(config, folder)
    updates = _peft_updates(config, tensors, folder)
    n_layer, C = model.config.n_layer, model.config.n_embd
    # (layer, our target) -> (A, B, scaling)
    parts: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, float]] = {}
    for (layer, module), (A, B, scaling) in updates.items():
        base = model.transformer.h[layer].get_submodule(module) if layer < n_layer else None
        if base is None or tuple(A.shape[1:]) != (base.in_features,) or B.shape[0] != base.out_features:
            there = f"lora_A {tuple(A.shape)}, lora_B {tuple(B.shape)}"
            raise UserError(f"PEFT adapter {folder} does not fit the model: transformer.h.{layer}.{module} has "
                            f"{there}; the model has {n_layer} layers of width {C}")
        if module == "attn.c_attn":
            for part, (a, b) in _split_c_attn(A, B).items():
                parts[(layer, part)] = (a, b, scaling)
        else:
            target = next(t for t, (path, _) in lora.TARGETS.items() if path == module)
            parts[(layer, target)] = (A, B, scaling)
    fingerprint, here = meta.get(FINGERPRINT_KEY), lora.base_fingerprint(model)
    if fingerprint and fingerprint != here:  # exported by save_peft_adapter from another base
        raise UserError(f"PEFT adapter {folder} was exported from base {fingerprint}, this base is {here}: "
                        f"its weights differ")
    rank = max(a.shape[0] for a, _, _ in parts.values())
    scales = Counter(s for _, _, s in parts.values())
    scale = scales.most_common(1)[0][0]
    r0, alpha0 = config.get("r", 8), config.get("lora_alpha", 8)
    default = alpha0 / math.sqrt(r0) if config.get("use_rslora") else alpha0 / r0
    # the adapter's own r and alpha when they say it all; else an alpha that gives the scale at this rank
    alpha = alpha0 if (rank, scale) == (r0, default) and not config.get("use_rslora") else scale * rank
    cfg = lora.LoRAConfig(lora_r=rank, lora_alpha=float(alpha), lora_dropout=float(config.get("lora_dropout", 0.0)),
                          lora_targets=tuple({t for _, t in parts}))
    lora.inject_lora(model, cfg)
    with torch.no_grad():
        for _, m in lora.lora_layers(model):
            for p in (*m.lora_A.values(), *m.lora_B.values()):
                p.zero_()  # what the adapter leaves alone stays zero, so that the model is the adapter's
        for layer, block in enumerate(model.transformer.h):
            for target in cfg.lora_targets:
                if (layer, target) not in parts:
                    continue
                a, b, s = parts[(layer, target)]
                m = block.get_submodule(lora.TARGETS[target][0])
                k = a.shape[0]
                m.lora_A[target][:k].copy_(a)
                m.lora_B[target][:, :k].copy_(b.double() * (s / m.scale) if s != m.scale else b)
    return cfg
