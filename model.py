"""GPT-2, written out in one file.

The architecture is OpenAI's GPT-2 (Radford et al., 2019): learned token and position
embeddings, a stack of pre-LayerNorm transformer blocks (causal self-attention, then a
GELU MLP, each added back onto a residual stream), a final LayerNorm, and a language-model
head that shares its weight with the token embedding. Module names follow Hugging Face's
GPT2LMHeadModel so that OpenAI's released weights load by name.
"""

import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

from kernels.linear_cross_entropy import IGNORE_INDEX, LOSS_CHUNK, linear_cross_entropy


class UserError(Exception):
    """A problem the user can fix (a bad setting, a file that is not a model): the commands print it as one line."""


def setting(default, help: str, *, choices=None, at_least=None, above=None, at_most=None, below=None,
            positional: bool = False):
    """A config field with its help text and allowed values, which the commands' configurator shows and checks."""
    allowed = dict(choices=choices, at_least=at_least, above=above, at_most=at_most, below=below)
    rules = {k: v for k, v in allowed.items() if v is not None}
    return field(default=default, metadata={"help": help, "positional": positional, **rules})


@dataclass
class ModelOptions:
    """What a model does when it runs, not what its weights are: settable for a loaded model too."""

    dropout: float = setting(0.0, "dropout of the model's own layers while training", at_least=0.0, below=1.0)
    attn_impl: str = setting("auto", "attention: 'triton' (our kernel), 'sdpa' (PyTorch), 'auto' (the measured "
                             "faster one for the device)", choices=("auto", "triton", "sdpa"))
    lora_impl: str = setting("auto", "LoRA layers (fine-tuning): 'unfused' (the base layer, then the rank-r update), "
                             "'concat' (one matmul over [x | s·x·Aᵀ] and [W | B]), 'triton' (our kernel), 'auto' (the "
                             "kernel or concat where measured faster; unfused until then)",
                             choices=("auto", "unfused", "concat", "triton"))
    loss_impl: str = setting("auto", "training loss: 'chunked' (never the whole logits at once: least memory), "
                             "'plain' (cross-entropy of the whole logits, which torch.compile fuses), 'auto' "
                             "(chunked; plain on CUDA once a GPU session measures it faster)",
                             choices=("auto", "chunked", "plain"))


@dataclass
class GPTConfig(ModelOptions):
    block_size: int = setting(1024, "longest sequence the position embedding covers", at_least=1)
    vocab_size: int = setting(50257, "GPT-2's BPE: 50,000 merges + 256 bytes + <|endoftext|>", at_least=1)
    vocab_multiple: int = setting(128, "the embedding and LM head hold vocab_size rounded up to a multiple of this "
                                  "(50304 rows for GPT-2's 50257): aligned rows make the head's matmul faster; the "
                                  "extra rows are no token and never predicted. 1: no padding (OpenAI's weights)",
                                  at_least=1)
    n_layer: int = setting(6, "transformer blocks", at_least=1)
    n_head: int = setting(12, "attention heads per block", at_least=1)
    n_embd: int = setting(768, "width of the residual stream (a multiple of n_head)", at_least=1)
    bias: bool = setting(True, "biases in Linear layers and LayerNorms, as in GPT-2")

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise UserError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")

    @property
    def padded_vocab(self) -> int:
        """Rows of the embedding and head weights: vocab_size rounded up to a multiple of vocab_multiple."""
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple

    def architecture(self) -> dict:
        """The fields that decide the shapes of the weights (ModelOptions' do not)."""
        options = {f.name for f in fields(ModelOptions)}
        return {k: v for k, v in asdict(self).items() if k not in options}



# ----------------------------------------------------------------------------- attention

_warned = set()


def warn_once(message: str) -> None:
    """`warning: message` on stderr, once per process, and only from the first of several (torchrun's RANK 0)."""
    if message not in _warned and os.environ.get("RANK", "0") == "0":
        _warned.add(message)
        print(f"warning: {message}", file=sys.stderr)


def attention(q, k, v, mask, dropout_p: float, impl: str):
    """softmax(q kᵀ / √d + mask) v for q (B, H, Tq, D) and k, v (B, H, Tk, D).

    `mask` is None for plain causal attention over equal-length q and k (training, or the
    first step of generation), or a boolean (B, 1, Tq, Tk) tensor of allowed positions. Our
    Triton kernel covers the plain causal case without dropout; PyTorch's SDPA the rest.
    """
    causal = mask is None and q.size(2) > 1
    if _use_kernel(impl, q) and causal and q.size(2) == k.size(2):
        from kernels import causal_attention, triton_available

        if not triton_available(q):
            warn_once("attn_impl='triton' needs a CUDA tensor (or TRITON_INTERPRET=1): using PyTorch SDPA")
        elif dropout_p > 0:
            warn_once("the Triton attention kernel has no dropout: using PyTorch SDPA while attention dropout is on")
        else:
            return causal_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal)


def _use_kernel(impl: str, q) -> bool:
    if impl != "auto":
        return impl == "triton"
    # 'auto' takes our kernel only on a GPU generation where it was measured faster than SDPA:
    # forward and backward for training, the forward alone for decoding
    if not q.is_cuda:
        return False
    from kernels import wins

    return wins("attention" if torch.is_grad_enabled() else "attention_fwd", q.device)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.dropout = cfg.dropout
        self.impl = cfg.attn_impl

    def forward(self, x, cache=None, layer: int = 0, mask=None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, n_head, T, head_dim): every head attends independently.
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is None:
            y = attention(q, k, v, None, self.dropout if self.training else 0.0, self.impl)
        else:  # keys and values of the earlier positions come from the cache
            y = cache.attend(q, *cache.update(layer, k, v), mask, self.impl)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x, cache=None, layer: int = 0, mask=None):
        x = x + self.attn(self.ln_1(x), cache, layer, mask)
        return x + self.mlp(self.ln_2(x))


# ----------------------------------------------------------------------------- KV cache


class KVCache:
    """Keys and values of the positions seen so far, so that each new token costs one step.

    Buffers of `batch_size` rows and `max_len` columns; `filled` columns are in use. Prompts of
    different lengths are padded on the left, so that every row's next token goes in the same
    column: row b's first `pad[b]` columns are padding, never attended to, and its positions
    count from its first real token. Columns before `start` are padding in every row and are
    skipped altogether.
    """

    def __init__(self, cfg: GPTConfig, batch_size: int, max_len: int, device, dtype, pad=None):
        shape = (cfg.n_layer, batch_size, cfg.n_head, max_len, cfg.n_embd // cfg.n_head)
        # zeros, not empty: masked columns still enter attention's products with weight 0, and 0 x NaN is NaN
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.block_size = cfg.block_size
        self.filled = 0
        self.set_pad(pad)

    def set_pad(self, pad) -> None:
        """pad: (rows,) long tensor of each row's padding columns, or None (no padding)."""
        self.pad = pad
        self.start = 0 if pad is None else int(pad.min()) if pad.numel() else self.filled

    def append(self, T: int):
        """Take T more columns: the positions (rows, T) of the new tokens and the mask (rows, 1, T,
        keys) of what they may attend to, or None for the plain causal case."""
        self.check_room(T)
        device = self.k.device
        q = torch.arange(self.filled, self.filled + T, device=device)
        pos = q if self.pad is None else (q - self.pad[:, None]).clamp(min=0)
        mask = None
        if self.pad is not None or (T > 1 and self.filled > 0):
            kpos = torch.arange(self.start, self.filled + T, device=device)[None, :]
            allowed = kpos <= q[:, None]
            if self.pad is not None:
                # Padding is never a key, except to itself: a query with no key at all gives NaN.
                allowed = allowed & ((kpos >= self.pad[:, None, None]) | (kpos == q[:, None]))
            mask = allowed.unsqueeze(-3) if allowed.dim() == 3 else allowed
        self.filled += T
        return pos, mask

    def check_room(self, T: int) -> None:
        longest = self.filled - self.start + T  # the row with the least padding
        if longest > self.block_size:
            raise UserError(f"sequence of {longest} tokens is longer than the model's context ({self.block_size})")
        if self.filled + T > self.k.size(3):
            raise RuntimeError(f"KV cache of {self.k.size(3)} columns is full ({self.filled} used, {T} more asked)")

    def update(self, layer: int, k, v):
        """Store the new positions' keys and values (the columns `append` took) in the first
        k.size(0) rows; return those rows' keys and values of every position attended to."""
        B, T = k.size(0), k.size(2)
        self.k[layer, :B, :, self.filled - T:self.filled] = k
        self.v[layer, :B, :, self.filled - T:self.filled] = v
        return self.k[layer, :B, :, self.start:self.filled], self.v[layer, :B, :, self.start:self.filled]

    def attend(self, q, k, v, mask, impl: str):
        """Attention of the new queries over the cached keys; a cache for a special kind of
        decoding may attend its own way."""
        return attention(q, k, v, mask, 0.0, impl)


# ----------------------------------------------------------------------------- the model


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.padded_vocab, cfg.n_embd),
            wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
            drop=nn.Dropout(cfg.dropout),
            h=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)),
            ln_f=nn.LayerNorm(cfg.n_embd, bias=cfg.bias),
        ))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.padded_vocab, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying
        self.apply(self._init_weights)
        with torch.no_grad():  # rows that are no token: zero, and they stay so (no token reads them, no loss uses them)
            self.transformer.wte.weight[cfg.vocab_size:] = 0
        # GPT-2's scaled init: each residual branch's output projection shrinks with depth,
        # so the residual stream's variance does not grow with the number of layers.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def hidden_states(self, idx, cache: KVCache | None = None):
        """The final LayerNorm's output (B, T, n_embd): what the LM head turns into logits.
        With a cache, idx continues the sequences it holds."""
        B, T = idx.shape
        if cache is not None:
            pos, mask = cache.append(T)
        elif self.config.block_size < T:
            raise UserError(f"sequence of {T} tokens is longer than the model's context ({self.config.block_size})")
        else:
            pos, mask = torch.arange(T, device=idx.device), None
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for layer, block in enumerate(self.transformer.h):
            x = block(x, cache, layer, mask)
        return self.transformer.ln_f(x)

    def logits(self, x):
        """The LM head on hidden states x (..., n_embd): logits over the vocabulary, the padding rows left out."""
        return self.lm_head(x)[..., :self.config.vocab_size]

    def forward(self, idx, targets=None, label_smoothing: float = 0.0):
        """Without targets: logits (B, T, vocab), None. With targets (B, T): None, mean loss.

        Targets equal to IGNORE_INDEX do not count. The loss follows loss_impl: the chunked one
        never builds the full logits (kernels/linear_cross_entropy.py).
        """
        x = self.hidden_states(idx)
        if targets is None:
            return self.logits(x), None
        impl = self.config.loss_impl
        if impl == "auto":  # plain is unmeasured on a GPU: off by default until measured faster
            impl = "chunked"
        x, targets = x.flatten(0, 1), targets.flatten()
        if impl == "plain":
            logits = self.logits(x)
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # float32 at least under autocast
            loss = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing,
                                   reduction="sum")
            return None, loss / (targets != IGNORE_INDEX).sum().clamp(min=1)  # the chunked loss's mean
        return None, linear_cross_entropy(x, self.lm_head.weight, targets, label_smoothing, self.config.vocab_size)

    @torch.no_grad()
    def score(self, idx, targets):
        """(summed loss, correct next-token predictions, counted tokens) for evaluation, as tensors."""
        x = self.hidden_states(idx).flatten(0, 1)
        targets = targets.flatten()
        loss = x.new_zeros((), dtype=torch.float64)
        correct = torch.zeros((), dtype=torch.long, device=x.device)
        for s in range(0, x.size(0), LOSS_CHUNK):
            logits = self.logits(x[s:s + LOSS_CHUNK]).float()
            t = targets[s:s + LOSS_CHUNK]
            loss += F.cross_entropy(logits, t, ignore_index=IGNORE_INDEX, reduction="sum").double()
            correct += ((logits.argmax(-1) == t) & (t != IGNORE_INDEX)).sum()
        return loss, correct, (targets != IGNORE_INDEX).sum()  # on the device: the caller reads them once

    # ------------------------------------------------------------------------- generation

    def cache_dtype(self) -> torch.dtype:
        p = self.transformer.wte.weight
        return torch.get_autocast_dtype(p.device.type) if torch.is_autocast_enabled(p.device.type) else p.dtype

    def new_cache(self, batch_size: int, max_len: int, pad=None) -> KVCache:
        return KVCache(self.config, batch_size, max_len, self.transformer.wte.weight.device, self.cache_dtype(), pad)

    def check_room(self, prompt_len: int, max_new_tokens: int) -> None:
        """Fail with one line when a prompt and its continuation cannot fit the context."""
        if prompt_len + max_new_tokens > self.config.block_size:
            raise UserError(f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                            f"model's context of {self.config.block_size} tokens")

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, greedy: bool = False, stop_token: int | None = None,
                 use_cache: bool = True, generator: torch.Generator | None = None, pad=None):
        """Continue every row of idx (B, T) by up to max_new_tokens tokens; returns (B, T + n).

        Prompts of different lengths are padded on the left, `pad[b]` positions in row b.
        A row that produces `stop_token` is finished and padded with it from then on; the loop
        ends when every row is finished. With use_cache=False each step re-reads the whole
        sequence: slower, the same tokens.
        """
        B, T = idx.shape
        self.check_room(T, max_new_tokens)
        cache = self.new_cache(B, T + max_new_tokens, pad) if use_cache else None
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)
        step_input = idx
        for _ in range(max_new_tokens):
            if use_cache:
                x = self.hidden_states(step_input, cache)
            else:  # a fresh cache each step only carries the padding mask
                x = self.hidden_states(idx, self.new_cache(B, idx.size(1), pad) if pad is not None else None)
            logits = self.logits(x[:, -1]).float()
            nxt = pick_next_tokens(logits, temperature, top_k, top_p, greedy, generator)
            if stop_token is not None:
                nxt = nxt.masked_fill(done, stop_token)
                done |= nxt == stop_token
            idx = torch.cat([idx, nxt[:, None]], dim=1)
            step_input = nxt[:, None]
            if done.all():
                break
        return idx

    # ------------------------------------------------------------------------- weights

    def save(self, path) -> None:
        """Weights as safetensors, with the config in the file's metadata (the head is tied: not stored)."""
        from safetensors.torch import save_file

        state = {k: v.contiguous() for k, v in self.state_dict().items() if k != "lm_head.weight"}
        save_file(state, str(path), metadata={"gpt_config": json.dumps(self.config.architecture())})

    @classmethod
    def from_file(cls, path, **overrides) -> "GPT":
        """A model saved by `save`; `overrides` set runtime fields such as dropout or attn_impl."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            state = load_file(str(path))
        except Exception as e:  # a truncated or foreign file: safetensors says why in its own words
            raise UserError(f"{path} is not a readable safetensors file ({str(e).splitlines()[0][:120]})") from None
        if "gpt_config" not in meta:
            raise UserError(f"{path} is not a model saved by this project (no gpt_config in its metadata)")
        # a file from before vocab_multiple holds vocab_size rows
        model = cls(GPTConfig(**{"vocab_multiple": 1, **json.loads(meta["gpt_config"]), **overrides}))
        load_weights(model, state, str(path))
        return model


def pick_next_tokens(logits, temperature=1.0, top_k=None, top_p=None, greedy=False, generator=None):
    """Pick one token per row of logits (B, vocab): argmax, or a sample after temperature,
    top-k (keep the k likeliest) and top-p (keep the smallest set with probability ≥ p)."""
    if greedy or temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # tokens after the nucleus is complete
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


# ----------------------------------------------------------------------------- loading

def load_weights(model: nn.Module, state: dict, source: str) -> None:
    """Load `state` into `model` (tied head excepted), or fail with one line saying what differs."""
    expected = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if wrong:
        k = wrong[0]
        raise UserError(f"checkpoint {source} does not fit the model: {k} is {tuple(state[k].shape)} there, "
                        f"{tuple(expected[k].shape)} in the model ({len(wrong)} tensors differ)")
    if missing or extra:
        what = f"{len(missing)} tensors missing (e.g. {missing[0]})" if missing else ""
        what += ("; " if missing and extra else "") + (f"{len(extra)} unexpected (e.g. {extra[0]})" if extra else "")
        raise UserError(f"checkpoint {source} does not fit the model: {what}")
    model.load_state_dict(state, strict=False)
