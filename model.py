"""GPT-2, written out in one file.

The architecture is OpenAI's GPT-2 (Radford et al., 2019): learned token and position
embeddings, a stack of pre-LayerNorm transformer blocks (causal self-attention, then a
GELU MLP, each added back onto a residual stream), a final LayerNorm, and a language-model
head that shares its weight with the token embedding. Module names follow Hugging Face's
GPT2LMHeadModel so that OpenAI's released weights load by name.
"""

import json
import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from common import UserError

IGNORE_INDEX = -100  # target value excluded from the loss (prompt and padding positions)


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest sequence the position embedding covers
    vocab_size: int = 50257  # GPT-2's BPE: 50,000 merges + 256 bytes + <|endoftext|>
    n_layer: int = 6
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linear layers and LayerNorms, as in GPT-2
    attn_impl: str = "auto"  # 'triton' (our kernel), 'sdpa' (PyTorch), 'auto': triton on CUDA

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise UserError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        if self.attn_impl not in ("auto", "triton", "sdpa"):
            raise UserError(f"attn_impl must be 'auto', 'triton' or 'sdpa', not {self.attn_impl!r}")

    # The fields that decide the shapes of the weights; attn_impl and dropout do not.
    def architecture(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in ("dropout", "attn_impl")}


# ----------------------------------------------------------------------------- attention

_warned = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)


def attention(q, k, v, mask, dropout_p: float, impl: str, shared=(1, 0)):
    """softmax(q kᵀ / √d + mask) v for q (B, H, Tq, D) and k, v (B, H, Tk, D).

    `mask` is None for plain causal attention over equal-length q and k (training, or the
    first step of generation), or a boolean (B, 1, Tq, Tk) tensor of allowed positions.
    `shared` = (g, S): the first S keys and values are the same in each group of g rows
    (beam search: the beams of one prompt share it), so one query per row can read them once
    per group. Our Triton kernel covers the plain causal case without dropout; PyTorch's SDPA
    the rest.
    """
    causal = mask is None and q.size(2) > 1
    if (impl == "triton" or (impl == "auto" and q.is_cuda)) and causal and q.size(2) == k.size(2):
        from kernels import causal_attention, triton_available

        if not triton_available(q):
            _warn_once("attn_impl='triton' needs a CUDA tensor (or TRITON_INTERPRET=1): using PyTorch SDPA")
        elif dropout_p > 0:
            _warn_once("the Triton attention kernel has no dropout: using PyTorch SDPA while attention dropout is on")
        else:
            return causal_attention(q, k, v)
    if q.size(2) == 1 and not q.is_cuda and dropout_p == 0:
        return _one_query_attention(q, k, v, mask, *shared)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal)


def _one_query_attention(q, k, v, mask, g: int, S: int):
    # Decoding on a CPU: for one query per row, matmuls take ~40 % less time than SDPA's
    # kernel. Keys and values that a group of g rows shares are read once, by the group's g
    # queries side by side.
    B, H, _, D = q.shape

    def per_row(x, n):  # (B/g, H, g, n): a group's rows side by side -> (B, H, 1, n)
        return x.transpose(1, 2).reshape(B, H, 1, n)

    S = S if g > 1 else 0
    scores = q @ k[:, :, S:].transpose(-1, -2)
    if S:
        side_by_side = q.reshape(B // g, g, H, D).transpose(1, 2)
        scores = torch.cat([per_row(side_by_side @ k[::g, :, :S].transpose(-1, -2), S), scores], -1)
    scores = scores.float() * D ** -0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, -math.inf)
    p = scores.softmax(-1).to(v.dtype)
    y = p[..., S:] @ v[:, :, S:]
    if S:
        y = y + per_row(p[..., :S].reshape(B // g, g, H, S).transpose(1, 2) @ v[::g, :, :S], D)
    return y


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
        shared = (1, 0)
        if cache is not None:
            shared = cache.shared_columns()
            k, v = cache.store(layer, k, v)
        y = attention(q, k, v, mask, self.dropout if self.training else 0.0, self.impl, shared)
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

    The buffers hold up to `batch_size` rows of `max_len` columns; the first `rows` are in use.
    Rows may hold sequences of different lengths, aligned on the right (the next token of
    every row goes in column `len`): row b's first `pad[b]` columns are padding, never
    attended to, and its positions count from its first real token. Beam search keeps rows
    at different stages side by side: it drops or permutes rows (`reorder`) and appends new
    prompts (`insert`). Columns before `lo` are padding in every row: attention skips them,
    and they are given back when the buffers run out of columns (`make_room`). Beam search
    also says which columns a prompt's beams share (`group`, `own`), so that decoding
    attention reads them once per prompt instead of once per beam.
    """

    def __init__(self, cfg: GPTConfig, batch_size: int, max_len: int, device, dtype, pad=None,
                 rows: int | None = None, group: int = 1):
        shape = (cfg.n_layer, batch_size, cfg.n_head, max_len, cfg.n_embd // cfg.n_head)
        # zeros, not empty: masked columns still enter attention's products with weight 0, and 0 x NaN is NaN
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.rows = batch_size if rows is None else rows
        self.len = 0  # columns filled
        self._set_pad(pad)  # (rows,) long tensor, or None: no padding
        # Beam search: rows come in groups of `group` (one prompt's beams) that differ only in
        # their last `own` columns (the tokens generated so far; the caller keeps it up to date).
        self.group, self.own = group, 0

    def shared_columns(self) -> tuple[int, int]:
        """(group, S): of the columns attention reads, the first S are the same in every row of a group."""
        return self.group, max(0, self.len - self.own - self.lo)

    def _set_pad(self, pad) -> None:
        self.pad = pad
        self.lo = 0 if pad is None else int(pad.min()) if pad.numel() else self.len

    def store(self, layer: int, k, v):
        """Write the keys and values of the next positions; return all those attended to."""
        end = self.len + k.size(2)
        self.k[layer, :self.rows, :, self.len:end] = k
        self.v[layer, :self.rows, :, self.len:end] = v
        return self.k[layer, :self.rows, :, self.lo:end], self.v[layer, :self.rows, :, self.lo:end]

    def positions(self, T: int, device):
        pos = torch.arange(self.len, self.len + T, device=device)
        return pos if self.pad is None else (pos - self.pad[:, None]).clamp(min=0)

    def mask(self, T: int, device):
        """Allowed (query, key) pairs for the next T positions, or None for the plain causal case."""
        if self.pad is None and (T == 1 or self.len == 0):
            return None
        q = torch.arange(self.len, self.len + T, device=device)[:, None]
        kpos = torch.arange(self.lo, self.len + T, device=device)[None, :]
        allowed = kpos <= q
        if self.pad is not None:
            # Padding is never a key, except to itself: a query with no key at all gives NaN.
            real = kpos >= self.pad[:, None, None]
            allowed = allowed & (real | (kpos == q))
        return allowed.unsqueeze(-3) if allowed.dim() == 3 else allowed

    def make_room(self, T: int) -> None:
        """Free columns for T more positions by dropping those that are padding in every row."""
        if self.len + T > self.k.size(3):
            self._shift(-self.lo)
        if self.len + T > self.k.size(3):
            raise RuntimeError(f"KV cache of {self.k.size(3)} columns is full ({self.len} used, {T} more asked)")

    def _shift(self, offset: int) -> None:
        """Move the columns in use `offset` columns to the right (left if negative)."""
        if offset == 0:
            return
        src, dst = slice(self.lo, self.len), slice(self.lo + offset, self.len + offset)
        for buf in (self.k, self.v):
            for layer in range(buf.size(0)):
                buf[layer, :self.rows, :, dst] = buf[layer, :self.rows, :, src].clone()  # the ranges may overlap
        pad = torch.zeros(self.rows, dtype=torch.long, device=self.k.device) if self.pad is None else self.pad
        self.len += offset
        self._set_pad(pad + offset)

    def reorder(self, index, start=0) -> None:
        """Keep rows `index`, in that order (beam search: continue the surviving hypotheses).

        Rows move within the buffers, only those that change and only their columns from
        `start` on (one column for all rows, or a tensor of one per row): the caller vouches
        that a row and the row it takes agree before it (beam search: a prompt's beams share
        the prompt's keys and values). Copying whole rows would cost more than a step.
        """
        moved = (index != torch.arange(index.numel(), device=index.device)).nonzero().squeeze(1)
        src = index[moved]
        starts = (start[moved] if torch.is_tensor(start) else torch.full_like(moved, start)).clamp(min=self.lo)
        if not self.k.is_cuda and set(moved.tolist()).isdisjoint(src.tolist()):
            # On a CPU, row by row, straight from source to destination: a third of the time of
            # indexing, which gathers the rows into a temporary first.
            for d, s, c in zip(moved.tolist(), src.tolist(), starts.tolist()):
                for buf in (self.k, self.v):
                    buf[:, d, :, c:self.len] = buf[:, s, :, c:self.len]
        elif moved.numel():  # gathered first: one copy per layer, and rows may be read and overwritten
            c = int(starts.min())
            for layer in range(self.k.size(0)):  # a layer at a time, so the gathered rows stay in cache
                for buf in (self.k, self.v):
                    buf[layer, moved, :, c:self.len] = buf[layer, src, :, c:self.len]
        self.rows = index.numel()
        self._set_pad(None if self.pad is None else self.pad[index])

    def insert(self, other: "KVCache", copies: int = 1) -> None:
        """Append the rows of `other` (new prompts, read into a cache of their own), each `copies`
        times, aligned so that they end where this cache's rows do."""
        n = other.len
        if n > self.len:
            self._shift(n - self.len)
        index = torch.arange(other.rows, device=self.k.device).repeat_interleave(copies)
        rows = slice(self.rows, self.rows + index.numel())
        for layer in range(self.k.size(0)):
            self.k[layer, rows, :, self.len - n:self.len] = other.k[layer, index, :, :n]
            self.v[layer, rows, :, self.len - n:self.len] = other.v[layer, index, :, :n]
        zeros = index.new_zeros
        old = zeros(self.rows) if self.pad is None else self.pad
        new = (zeros(index.numel()) if other.pad is None else other.pad[index]) + self.len - n
        self.rows = rows.stop
        self._set_pad(torch.cat([old, new]))


# ----------------------------------------------------------------------------- the model


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
            wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
            drop=nn.Dropout(cfg.dropout),
            h=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)),
            ln_f=nn.LayerNorm(cfg.n_embd, bias=cfg.bias),
        ))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying
        self.apply(self._init_weights)
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
        """The final LayerNorm's output (B, T, n_embd): what the LM head turns into logits."""
        B, T = idx.shape
        if cache is not None:
            cache.make_room(T)
        longest = T if cache is None else cache.len - cache.lo + T  # the row with the least padding
        if longest > self.config.block_size:
            raise UserError(f"sequence of {longest} tokens is longer than the model's context "
                            f"({self.config.block_size})")
        if cache is None:
            pos, mask = torch.arange(T, device=idx.device), None
        else:
            pos, mask = cache.positions(T, idx.device), cache.mask(T, idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for layer, block in enumerate(self.transformer.h):
            x = block(x, cache, layer, mask)
        if cache is not None:
            cache.len += T
        return self.transformer.ln_f(x)

    def forward(self, idx, targets=None, label_smoothing: float = 0.0):
        """Without targets: logits (B, T, vocab), None. With targets (B, T): None, mean loss.

        Targets equal to IGNORE_INDEX do not count. The loss is computed a chunk of positions
        at a time, so the full (B, T, vocab) logits, the largest tensor of a training step,
        never exist.
        """
        x = self.hidden_states(idx)
        if targets is None:
            return self.lm_head(x), None
        loss = linear_cross_entropy(x.flatten(0, 1), self.lm_head.weight, targets.flatten(), label_smoothing)
        return None, loss

    @torch.no_grad()
    def score(self, idx, targets):
        """(summed loss, correct next-token predictions, counted tokens) for evaluation."""
        x = self.hidden_states(idx).flatten(0, 1)
        targets = targets.flatten()
        loss, correct = x.new_zeros((), dtype=torch.float64), 0
        for s in range(0, x.size(0), LOSS_CHUNK):
            logits = self.lm_head(x[s:s + LOSS_CHUNK]).float()
            t = targets[s:s + LOSS_CHUNK]
            loss += F.cross_entropy(logits, t, ignore_index=IGNORE_INDEX, reduction="sum").double()
            correct += ((logits.argmax(-1) == t) & (t != IGNORE_INDEX)).sum().item()
        return loss.item(), correct, (targets != IGNORE_INDEX).sum().item()

    # ------------------------------------------------------------------------- generation

    def new_cache(self, batch_size: int, max_len: int, pad=None, rows: int | None = None,
                  group: int = 1) -> KVCache:
        p = self.transformer.wte.weight
        dtype = torch.get_autocast_dtype(p.device.type) if torch.is_autocast_enabled(p.device.type) else p.dtype
        return KVCache(self.config, batch_size, max_len, p.device, dtype, pad, rows, group)

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
            logits = self.lm_head(x[:, -1]).float()
            nxt = sample_next(logits, temperature, top_k, top_p, greedy, generator)
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

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if "gpt_config" not in meta:
            raise UserError(f"{path} is not a model saved by this project (no gpt_config in its metadata)")
        model = cls(GPTConfig(**json.loads(meta["gpt_config"]), **overrides))
        load_weights(model, load_file(str(path)), str(path))
        return model

    @classmethod
    def from_pretrained(cls, name_or_dir: str, **overrides) -> "GPT":
        """OpenAI's GPT-2 from Hugging Face weights: a local folder (config.json plus
        model.safetensors or pytorch_model.bin) or, when online, a hub name such as gpt2-medium."""
        from common import hf_model_dir

        folder = hf_model_dir(name_or_dir)
        hf = json.loads((folder / "config.json").read_text())
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
            raise UserError(f"{folder}/config.json uses activation {act!r}; GPT-2 uses the tanh GELU (gelu_new)")
        cfg = GPTConfig(block_size=hf["n_positions"], vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
                        n_head=hf["n_head"], n_embd=hf["n_embd"], bias=True, **overrides)
        model = cls(cfg)
        load_weights(model, _hf_to_ours(_read_hf_weights(folder)), f"{folder} (config.json: n_layer={cfg.n_layer}, "
                     f"n_head={cfg.n_head}, n_embd={cfg.n_embd}, vocab_size={cfg.vocab_size})")
        return model


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, greedy=False, generator=None):
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


# ----------------------------------------------------------------------------- the loss

LOSS_CHUNK = 1024  # positions per chunk of logits: 1024 x 50257 floats is 200 MB


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of logits = x @ weightᵀ, one chunk of rows at a time.

    Each chunk's gradient is formed in the forward pass, while its logits are at hand, and
    folded into the gradients of x and weight, so no more than one chunk of logits exists.
    """

    @staticmethod
    def forward(ctx, x, weight, targets, label_smoothing, need_grad_x, need_grad_w):
        valid = targets != IGNORE_INDEX
        n = valid.sum().clamp(min=1)
        vocab = weight.size(0)
        # matmuls in autocast's dtype when it is on (bf16 training), else the weight's
        cdt = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else weight.dtype
        w = weight.to(cdt)
        total = torch.zeros((), device=x.device, dtype=torch.float32)
        grad_x = torch.empty_like(x) if need_grad_x else None
        # a frozen head (LoRA fine-tuning) needs no weight gradient: a third of the work saved
        grad_w = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if need_grad_w else None
        for s in range(0, x.size(0), LOSS_CHUNK):
            xc, t, ok = x[s:s + LOSS_CHUNK], targets[s:s + LOSS_CHUNK], valid[s:s + LOSS_CHUNK]
            xc = xc.to(cdt)
            logits = (xc @ w.t()).float()
            lse = logits.logsumexp(-1)
            t = t.clamp(min=0)
            nll = lse - logits.gather(1, t[:, None]).squeeze(1)
            # label smoothing: the target is (1 - ε) one-hot + ε uniform over the vocabulary
            loss = (1 - label_smoothing) * nll + label_smoothing * (lse - logits.mean(-1)) if label_smoothing else nll
            total += (loss * ok).sum()
            if need_grad_x or need_grad_w:
                g = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                g.scatter_add_(1, t[:, None], g.new_full((g.size(0), 1), -(1 - label_smoothing)))
                if label_smoothing:
                    g.sub_(label_smoothing / vocab)
                g.mul_((ok / n)[:, None])
                g = g.to(cdt)
                if need_grad_x:
                    grad_x[s:s + LOSS_CHUNK] = g @ w
                if need_grad_w and cdt == torch.float32:
                    grad_w.addmm_(g.t(), xc)  # in place: no (vocab, n_embd) temporary per chunk
                elif need_grad_w:
                    grad_w += g.t() @ xc
        ctx.save_for_backward(grad_x, grad_w)
        ctx.weight_dtype = weight.dtype
        return total / n

    @staticmethod
    def backward(ctx, grad_out):
        grad_x, grad_w = ctx.saved_tensors
        return (grad_x * grad_out if grad_x is not None else None,
                (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None, None, None, None, None)


def linear_cross_entropy(x, weight, targets, label_smoothing: float = 0.0):
    """cross_entropy(x @ weightᵀ, targets, ignore_index=-100, label_smoothing), memory-lean."""
    grad = torch.is_grad_enabled()
    return _LinearCrossEntropy.apply(x, weight, targets, label_smoothing, grad and x.requires_grad,
                                     grad and weight.requires_grad)


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


def _read_hf_weights(folder: Path) -> dict:
    if (folder / "model.safetensors").exists():
        from safetensors.torch import load_file

        return load_file(str(folder / "model.safetensors"))
    if (folder / "pytorch_model.bin").exists():
        return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise UserError(f"{folder} has no model.safetensors or pytorch_model.bin")


def _hf_to_ours(hf: dict) -> dict:
    """Rename Hugging Face GPT-2 tensors and transpose its Conv1D weights (stored in × out)."""
    out = {}
    for k, v in hf.items():
        k = k.removeprefix("transformer.")
        if k.endswith((".attn.bias", ".attn.masked_bias")) or k == "lm_head.weight":
            continue  # causal-mask buffers of old checkpoints; the head is tied to wte
        if k.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            v = v.t()
        out[k if k.startswith("lm_head") else f"transformer.{k}"] = v.contiguous()
    return out
