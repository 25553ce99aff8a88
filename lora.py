"""LoRA (Hu et al., 2021): fine-tune a frozen GPT-2 through low-rank updates of its linear layers.

A target layer y = x Wᵀ + b becomes y = x Wᵀ + b + (α/r)·(drop(x) Aᵀ) Bᵀ with A (r, in) and
B (out, r) the only trainable weights. A starts random and B at zero, so a fresh adapter leaves
the model exactly as it was.

Target names (LoRAConfig.lora_targets), per transformer block:
    'q', 'k', 'v'   the query, key and value thirds of the fused attn.c_attn (each on or off)
    'attn_out'      attn.c_proj, the attention output projection
    'mlp_in'        mlp.c_fc
    'mlp_out'       mlp.c_proj
and, once per model:
    'wte'           the token embedding and the LM head tied to it: one update B A of their shared
                    (vocab, n_embd) weight, seen by the head as a LoRA linear layer and by the
                    embedding as rows B[token] A (loralib's LoRA Embedding, tied)
The default, q and v, is the LoRA paper's choice for GPT-2. 'wte' matters for a base whose
embeddings saw little training (a small model pretrained for minutes): there the frozen
vocabulary, not the attention, limits what an adapter can learn.

An adapter is saved alone (`save_adapter`: safetensors of the LoRA tensors, a few MB at most)
together with its config and the identity of the base it was trained on, so that loading it
into any other base stops with one line saying what differs.
"""

import hashlib
import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from model import UserError, setting, warn_once

# target name -> (module path inside a block, which third of the module's output it adapts;
# None: the whole output)
TARGETS = {
    "q": ("attn.c_attn", 0),
    "k": ("attn.c_attn", 1),
    "v": ("attn.c_attn", 2),
    "attn_out": ("attn.c_proj", None),
    "mlp_in": ("mlp.c_fc", None),
    "mlp_out": ("mlp.c_proj", None),
    "wte": ("lm_head", None),  # not in a block: the model's (tied) head and embedding
}

ADAPTER_FORMAT = "gpt2-study-lora-adapter/2"  # /2: LoRAConfig keys lora_r, lora_alpha, ...
_OLD_FORMAT = "gpt2-study-lora-adapter/1"
FINGERPRINT_SAMPLE = 65536  # values per tensor that base_fingerprint reads


@dataclass
class LoRAConfig:
    lora_r: int = setting(4, "rank of the update", at_least=1)
    lora_alpha: float = setting(32.0, "the update is scaled by lora_alpha / lora_r, so a change of rank keeps "
                                "its size comparable", above=0.0)
    lora_dropout: float = setting(0.1, "dropout on the LoRA branch's input only", at_least=0.0, below=1.0)
    lora_targets: tuple = setting(("q", "v"), "layers to adapt: " + ", ".join(TARGETS), choices=tuple(TARGETS))

    def __post_init__(self):
        if isinstance(self.lora_targets, str):
            self.lora_targets = (self.lora_targets,)
        unknown = [t for t in self.lora_targets if t not in TARGETS]
        if unknown:
            raise UserError(f"config key 'lora_targets' has {unknown[0]!r}; choose from {', '.join(TARGETS)}")
        if not self.lora_targets:
            raise UserError(f"config key 'lora_targets' is empty; choose one or more of {', '.join(TARGETS)}")
        self.lora_targets = tuple(t for t in TARGETS if t in self.lora_targets)  # canonical order, no duplicates
        if isinstance(self.lora_r, bool) or not isinstance(self.lora_r, int) or self.lora_r < 1:
            raise UserError(f"config key 'lora_r' is {self.lora_r!r}; it must be a positive integer")

    @property
    def scale(self) -> float:
        return self.lora_alpha / self.lora_r



class LoRALinear(nn.Module):
    """A frozen nn.Linear (`.base`) plus one trainable low-rank update per adapted part.

    `parts` maps each target name to the slot of the output it adapts, out of `n_slots` equal
    slots: q, k, v are slots 0, 1, 2 of 3 in the fused c_attn; a whole layer is slot 0 of 1.
    Each part owns lora_A[name] (r, in) and lora_B[name] (out/n_slots, r).
    `options` (the model's config) gives lora_impl, read at each call: the unfused layers, one
    matmul over concatenated operands (_ConcatLinear), or the Triton kernel.
    """

    def __init__(self, base: nn.Linear, parts: dict[str, int], n_slots: int, cfg: LoRAConfig, options=None):
        super().__init__()
        self.base = base
        self.options = options  # the model's config, read at each call: its lora_impl decides how the layer computes
        self.parts, self.n_slots = parts, n_slots
        self.r, self.scale, self.dropout = cfg.lora_r, cfg.scale, cfg.lora_dropout
        w = base.weight
        slot_out = base.out_features // n_slots
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for name in parts:
            a = torch.empty(cfg.lora_r, base.in_features, device=w.device, dtype=w.dtype)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as in the paper's code (nn.Linear's default)
            self.lora_A[name] = nn.Parameter(a)
            self.lora_B[name] = nn.Parameter(torch.zeros(slot_out, cfg.lora_r, device=w.device, dtype=w.dtype))
        self.merged = False
        # the exact base weight while merged; a buffer so that model.to(...) moves it along
        self.register_buffer("_unmerged_weight", None, persistent=False)

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A (k·r, in), B (out, k·r)) for the k adapted parts, so that the whole update is one
        low-rank product B A. B is block-structured: part i's B fills its own slot of rows and
        columns i·r..(i+1)·r, zeros elsewhere. Built each call (tiny), so gradients reach the
        per-part parameters."""
        names = list(self.parts)
        if self.n_slots == 1:
            return self.lora_A[names[0]], self.lora_B[names[0]]
        A = torch.cat([self.lora_A[n] for n in names])
        zero = self.lora_B[names[0]].new_zeros(self.base.out_features // self.n_slots, self.r)
        columns = [torch.cat([self.lora_B[n] if slot == self.parts[n] else zero for slot in range(self.n_slots)])
                   for n in names]
        return A, torch.cat(columns, dim=1)

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight W + (α/r)·B A: for code that multiplies by the weight itself, as
        the model's chunked loss does with its head."""
        if self.merged:
            return self.base.weight
        A, B = self.lora_factors()
        return self.base.weight + self.scale * (B @ A)

    def forward(self, x):
        if self.merged:  # the update is inside the base weight
            return self.base(x)
        A, B = self.lora_factors()
        impl = _lora_impl(self.options.lora_impl if self.options is not None else "auto", x)
        if impl == "triton":
            from kernels.lora_linear import lora_linear

            return lora_linear(x, self.base.weight, self.base.bias, A, B, self.scale,
                               dropout_p=self.dropout, training=self.training)
        h = F.dropout(x, self.dropout, self.training)
        if impl == "concat":
            return _ConcatLinear.apply(x, self.scale * F.linear(h, A), self.base.weight, B, self.base.bias)
        return self.base(x) + self.scale * F.linear(F.linear(h, A), B)

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        W = self.base.weight
        A, B = self.lora_factors()
        self._unmerged_weight = W.detach().clone()
        W.copy_((W.float() + self.scale * (B.float() @ A.float())).to(W.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        self.base.weight.copy_(self._unmerged_weight)
        self._unmerged_weight = None
        self.merged = False

    def extra_repr(self) -> str:
        return f"parts={list(self.parts)}, r={self.r}, scale={self.scale:g}, dropout={self.dropout:g}"


def _lora_impl(impl: str, x) -> str:
    """What lora_impl means for input x. 'auto': our kernel on a GPU generation where it was measured faster
    (kernels.wins); else the plain layers. 'concat' (one matmul over concatenated operands) stays one setting
    away until a GPU session measures it faster than the plain layers."""
    if impl == "auto":
        if not x.is_cuda:
            return "unfused"
        from kernels import wins

        return "triton" if wins("lora_linear" if torch.is_grad_enabled() else "lora_linear_fwd", x.device) \
            else "unfused"
    if impl == "triton":
        from kernels import triton_available

        if not triton_available(x):
            warn_once("lora_impl='triton' needs a CUDA tensor (or TRITON_INTERPRET=1): using the unfused layer")
            return "unfused"
    return impl


class _ConcatLinear(torch.autograd.Function):
    """y = [x | t] [W | B]ᵀ + b = x Wᵀ + t Bᵀ + b as one matmul, t = s·drop(x)·Aᵀ the (N, r) LoRA activation.

    Backward, again one matmul for the two input gradients: dy [W | B] = [dx | dt]; dB = dyᵀ t (thin);
    dW only if W is trainable. Autograd carries dt on to A and x. Under autocast every operand is cast to its
    dtype, as F.linear would."""

    @staticmethod
    def forward(ctx, x, t, weight, lora_b, bias):
        dev = x.device.type
        cdt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else weight.dtype
        w_cat = torch.cat([weight.to(cdt), lora_b.to(cdt)], dim=1)  # (out, in + r)
        x_cat = torch.cat([x.to(cdt), t.to(cdt)], dim=-1)  # (..., in + r)
        y = F.linear(x_cat, w_cat, bias.to(cdt) if bias is not None else None)
        ctx.save_for_backward(w_cat, t.to(cdt), x if ctx.needs_input_grad[2] else None)
        ctx.dtypes = (x.dtype, t.dtype, weight.dtype, lora_b.dtype, bias.dtype if bias is not None else None)
        return y

    @staticmethod
    def backward(ctx, dy):
        w_cat, t, x = ctx.saved_tensors
        x_dt, t_dt, w_dt, b_dt, bias_dt = ctx.dtypes
        n_in = w_cat.size(1) - t.size(-1)
        dy = dy.to(w_cat.dtype)
        d_cat = dy @ w_cat if ctx.needs_input_grad[0] or ctx.needs_input_grad[1] else None
        dx = d_cat[..., :n_in].to(x_dt) if ctx.needs_input_grad[0] else None
        dt = d_cat[..., n_in:].to(t_dt) if ctx.needs_input_grad[1] else None
        dy2 = dy.reshape(-1, dy.size(-1))
        dw = (dy2.t() @ x.reshape(-1, n_in).to(dy.dtype)).to(w_dt) if ctx.needs_input_grad[2] else None
        db = (dy2.t() @ t.reshape(-1, t.size(-1))).to(b_dt) if ctx.needs_input_grad[3] else None
        dbias = dy2.sum(0).to(bias_dt) if ctx.needs_input_grad[4] else None
        return dx, dt, dw, db, dbias


class LoRAEmbedding(nn.Module):
    """The token embedding whose weight the LM head shares, when the head is adapted ('wte'):
    row t of the effective weight is E[t] + (α/r)·B[t] A. The head owns A and B."""

    def __init__(self, embedding: nn.Embedding, head: LoRALinear):
        super().__init__()
        self.weight = embedding.weight  # registered under the embedding's own name: the base is unchanged
        # plain attributes, not submodules: the head's weights belong to lm_head
        object.__setattr__(self, "head", head)
        object.__setattr__(self, "original", embedding)

    def forward(self, idx):
        out = F.embedding(idx, self.weight)
        if self.head.merged:  # the shared weight holds the update
            return out
        A, B = self.head.lora_factors()
        return out + self.head.scale * (F.embedding(idx, B) @ A)


# ----------------------------------------------------------------------------- injection


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """(name, layer) of every LoRA layer in the model, in module order."""
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            yield name, m


def inject_lora(model: nn.Module, cfg: LoRAConfig) -> nn.Module:
    """Replace the target Linear layers of every block by LoRALinear (in place) and freeze
    everything but the LoRA weights. Returns the model."""
    if any(True for _ in lora_layers(model)):
        raise UserError("the model already has LoRA adapters: inject_lora was called twice")
    blocks = getattr(getattr(model, "transformer", None), "h", None)
    if blocks is None:
        raise UserError("inject_lora needs a GPT model (transformer.h holds its blocks)")
    for p in model.parameters():
        p.requires_grad_(False)
    cfg = LoRAConfig(**{f.name: getattr(cfg, f.name) for f in fields(LoRAConfig)})  # of a fine-tuning config, say
    options = getattr(model, "config", None)  # its lora_impl: how the layers compute
    if "wte" in cfg.lora_targets:
        if model.lm_head.weight is not model.transformer.wte.weight:
            raise UserError("the 'wte' LoRA target needs the LM head tied to the token embedding")
        model.lm_head = LoRALinear(model.lm_head, {"wte": 0}, 1, cfg, options).train(model.lm_head.training)
        model.transformer.wte = LoRAEmbedding(model.transformer.wte, model.lm_head).train(model.training)
    # module path -> ({target: slot}, number of slots); q, k and v share one module
    by_module: dict[str, tuple[dict[str, int], int]] = {}
    for t in cfg.lora_targets:
        if t == "wte":
            continue
        path, slot = TARGETS[t]
        parts, _ = by_module.setdefault(path, ({}, 1 if slot is None else 3))
        parts[t] = slot or 0
    for block in blocks:
        for path, (parts, n_slots) in by_module.items():
            parent_path, attr = path.rsplit(".", 1)
            parent = block.get_submodule(parent_path)
            base = getattr(parent, attr)
            # a new module starts in training mode: keep the model's mode (eval: no LoRA dropout)
            setattr(parent, attr, LoRALinear(base, parts, n_slots, cfg, options).train(base.training))
    model.lora_config = cfg
    return model


def lora_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """(name, parameter) of every LoRA weight, named as in model.named_parameters()."""
    for name, m in lora_layers(model):
        yield from m.lora_A.named_parameters(prefix=f"{name}.lora_A")
        yield from m.lora_B.named_parameters(prefix=f"{name}.lora_B")


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in lora_parameters(model)}


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every update into its base weight (W += α/r · B A, in float32) for fast inference."""
    for _, m in lora_layers(model):
        m.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo merge_lora, restoring the exact original base weights."""
    for _, m in lora_layers(model):
        m.unmerge()
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every update into its base weight for good and put the plain Linear layers back:
    the result is an ordinary model (GPT.save writes it like any other), without the adapter."""
    for name, m in list(lora_layers(model)):
        m.merge()
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, m.base)
    for name, m in list(model.named_modules()):
        if isinstance(m, LoRAEmbedding):  # its weight, shared with the head, now holds the update
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, m.original)
    for p in model.parameters():
        p.requires_grad_(True)
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


# ----------------------------------------------------------------------------- base identity


def _base_parameters(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name in the plain model, unmerged value) of every non-LoRA parameter: the same whether or
    not LoRA is injected or merged."""
    lora_ids = {id(p) for _, p in lora_parameters(model)}
    renames, unmerged = {}, {}
    for name, m in lora_layers(model):
        renames[f"{name}.base"] = name
        if m.merged:
            unmerged[id(m.base.weight)] = m._unmerged_weight
    for name, p in model.named_parameters():
        if id(p) in lora_ids:
            continue
        module, leaf = name.rsplit(".", 1)
        yield f"{renames.get(module, module)}.{leaf}", unmerged.get(id(p), p)


def base_fingerprint(model: nn.Module) -> str:
    """16 hex digits of a SHA-256 over the base model's parameter names, shapes and values.

    Reading all of GPT-2 medium's 355M values would take seconds, so each tensor contributes an
    evenly strided sample of at most FINGERPRINT_SAMPLE values (any trained or differently seeded
    weights differ there). Values are hashed rounded to bfloat16, so a base loaded in float32 or
    cast to bfloat16 has the same fingerprint, and so has a base whose embedding is padded to an
    aligned size (GPT.padded_vocab) and its export without the padding. LoRA weights are left out,
    and a merged model is hashed with its pre-merge weights.
    """
    h = hashlib.sha256()
    vocab = model.config.vocab_size
    for name, p in sorted(_base_parameters(model), key=lambda item: item[0]):
        if name == "transformer.wte.weight":  # its padding rows are no token: the same base padded or not
            p = p[:vocab]
        flat = p.detach().reshape(-1)
        step = max(1, -(-flat.numel() // FINGERPRINT_SAMPLE))
        sample = flat[::step].to(torch.bfloat16).cpu().contiguous()
        h.update(f"{name}{tuple(p.shape)};".encode())
        h.update(sample.view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- files


def save_adapter(model: nn.Module, path, extra_meta: dict | None = None) -> None:
    """Write the LoRA weights alone, with their config and the base's identity, as safetensors.

    `extra_meta` (JSON-serialisable) is stored too; its key 'base', a human-readable description
    of the base such as 'gpt2-medium' or a checkpoint path, is shown when the adapter is refused.
    """
    from safetensors.torch import save_file

    cfg = getattr(model, "lora_config", None)
    if cfg is None:
        raise UserError("the model has no LoRA adapters to save (call inject_lora first)")
    meta = {
        "format": ADAPTER_FORMAT,
        "lora_config": json.dumps(asdict(cfg)),
        "base_fingerprint": base_fingerprint(model),
        "base_architecture": json.dumps(model.config.architecture()),
        "extra": json.dumps(extra_meta or {}),
    }
    tensors = {name: t.contiguous().cpu() for name, t in lora_state_dict(model).items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)


def read_adapter_meta(path) -> dict:
    """The metadata of an adapter file: {'format', 'lora_config' (dict), 'base_fingerprint',
    'base_architecture' (dict), 'extra' (dict)}."""
    from safetensors import safe_open

    if not Path(path).is_file():
        raise UserError(f"adapter file {path} not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise UserError(f"{path} is not a safetensors file ({e})") from e
    if meta.get("format") not in (ADAPTER_FORMAT, _OLD_FORMAT):
        raise UserError(f"{path} is not a LoRA adapter saved by this project (format {meta.get('format')!r})")
    for key in ("lora_config", "base_architecture", "extra"):
        meta[key] = json.loads(meta[key])
    if meta["format"] == _OLD_FORMAT:  # the keys before they took the names the configs use
        meta["lora_config"] = {f"lora_{k}": v for k, v in meta["lora_config"].items()}
    return meta


def _check_base(model: nn.Module, meta: dict, path) -> None:
    said = meta["extra"].get("base")
    described = f" (described as {said!r})" if said else ""
    # an adapter from before vocab_multiple was made for a base of vocab_size rows
    ours, theirs = model.config.architecture(), {"vocab_multiple": 1, **meta["base_architecture"]}
    differ = [f"{k} is {theirs.get(k)} there, {ours.get(k)} here" for k in sorted(ours.keys() | theirs.keys())
              if ours.get(k) != theirs.get(k)]
    if differ:
        raise UserError(f"adapter {path} was trained on a base{described} of another architecture: "
                        + "; ".join(differ))
    fp = base_fingerprint(model)
    if fp != meta["base_fingerprint"]:
        raise UserError(f"adapter {path} was trained on base {meta['base_fingerprint']}{described}, "
                        f"this base is {fp}: its weights differ")


def load_adapter(model: nn.Module, path) -> LoRAConfig:
    """Load an adapter saved by save_adapter into `model`, injecting LoRA with the saved config
    if the model has none yet. Refuses (UserError) a base other than the one it was trained on."""
    from safetensors.torch import load_file

    meta = read_adapter_meta(path)
    _check_base(model, meta, path)
    cfg = LoRAConfig(**meta["lora_config"])
    have = getattr(model, "lora_config", None)
    if have is None:
        inject_lora(model, cfg)
    elif (have.lora_r, have.lora_alpha, have.lora_targets) != (cfg.lora_r, cfg.lora_alpha, cfg.lora_targets):
        raise UserError(f"adapter {path} has lora_r={cfg.lora_r}, lora_alpha={cfg.lora_alpha:g}, lora_targets="
                        f"{list(cfg.lora_targets)}; the model's LoRA has lora_r={have.lora_r}, lora_alpha="
                        f"{have.lora_alpha:g}, lora_targets={list(have.lora_targets)}")
    if any(m.merged for _, m in lora_layers(model)):
        raise UserError("the model's LoRA is merged: unmerge_lora before loading another adapter")
    saved, params = load_file(str(path)), dict(lora_parameters(model))
    if saved.keys() != params.keys() or any(saved[k].shape != p.shape for k, p in params.items()):
        raise UserError(f"adapter {path} holds tensors that do not match its own config")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name])
    return cfg
