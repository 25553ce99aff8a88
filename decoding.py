"""Decoding many prompts at once: beam search with a KV cache, greedy, and sampling.

E2E outputs are decoded with beam search (beam 10, length penalty 0.8, no repeated 4-gram,
at most 64 new tokens, stop at end-of-text), as in the LoRA paper's E2E setup:

    from decoding import decode
    outputs = decode(model, prompts)  # continuation ids per prompt, EOT stripped, in input order

Prompts of different lengths share a batch by padding on the left (KVCache's `pad`), so that
every row's next token sits in the last column.
"""

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from common import UserError
from tokenizer import EOT

METHODS = ("beam", "greedy", "sample")
ROWS_PER_BATCH = {"cpu": 100, "cuda": 512}  # sequences decoded side by side (prompts × beams)
# Beam search on a CPU projects the vocabulary a chunk at a time: of about HEAD_CHUNK weights of the LM
# head (8 MB in float32), at most VOCAB_CHUNK entries (measured best for 128 to 1024 dims on 2 cores).
HEAD_CHUNK, VOCAB_CHUNK = 2**21, 8192


def left_pad(prompts, fill: int, device):
    """(B, T) long tensor of the prompts padded on the left with `fill`, and the (B,) padding per
    row, or None when every prompt has the same length (the cache then needs no mask)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise UserError("decoding needs at least one prompt, and every prompt needs at least one token")
    T = max(map(len, prompts))
    pads = [T - len(p) for p in prompts]
    idx = torch.tensor([[fill] * n + list(p) for n, p in zip(pads, prompts)], dtype=torch.long, device=device)
    return idx, (torch.tensor(pads, device=device) if any(pads) else None)


def _strip(tokens: list[int], eos: int) -> list[int]:
    return tokens[:tokens.index(eos)] if eos in tokens else tokens


@contextmanager
def _eval_mode(model):
    # Dropout would make decoding random; the caller's mode comes back afterwards.
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def repeated_ngrams(generated, n: int):
    """The tokens that would repeat an n-gram, per row of generated (R, t): (tokens, hit), each
    (R, t-n+1), where hit marks the tokens banned, or None while no n-gram is complete.

    An earlier n-gram whose first n-1 tokens equal the row's last n-1 tokens bans its last token.
    """
    t = generated.size(1)
    if n <= 0 or t < n:
        return None
    grams = generated.unfold(1, n, 1)  # (R, t-n+1, n): every complete n-gram so far
    return grams[:, :, -1], (grams[:, :, :-1] == generated[:, None, t - n + 1:]).all(-1)


def ban_repeated_ngrams(logprobs, repeats, offset: int = 0):
    """Set to -inf, in place, the tokens `repeated_ngrams` banned in each row of logprobs (R, V).
    logprobs may be a slice of the vocabulary: its column j is token offset + j."""
    if repeats is None:
        return logprobs
    tokens, hit = repeats
    col = tokens - offset
    hit = hit & (col >= 0) & (col < logprobs.size(1))
    # A min-scatter of -inf (hit) or +inf (no hit): a token listed twice in a row, once hit and
    # once not, still ends at -inf, which a plain scatter would not guarantee.
    return logprobs.scatter_reduce_(1, col.clamp(0, logprobs.size(1) - 1), torch.where(hit, -math.inf, math.inf),
                                    reduce="amin")


def top_next_tokens(weight, h, k: int, generated, no_repeat_ngram_size: int):
    """Each row's k likeliest next tokens, as (log-probs, token ids), float32 (R, k) each.

    weight (V, C) is the LM head and h (R, C) the rows' last hidden states; tokens that would
    repeat an n-gram of `generated` (R, t) are banned (-inf) after the log-softmax, so they
    still count in its normaliser. On a CPU the head works through the vocabulary a chunk at a
    time, each chunk reduced to its log-sum-exp and its top k while still in cache: a whole
    (R, V) block of logits would go through main memory for the log-softmax, and again for the
    top-k (for the 128-dim model, a third of the projection's own time).
    """
    V = weight.size(0)
    chunk = V if h.is_cuda else max(1, min(VOCAB_CHUNK, HEAD_CHUNK // weight.size(1)))
    repeats = repeated_ngrams(generated, no_repeat_ngram_size)  # once, for all chunks
    maxes, sums, values, ids = [], [], [], []
    for start in range(0, V, chunk):
        logits = F.linear(h, weight[start:start + chunk]).float()
        m = logits.amax(-1, keepdim=True)
        maxes.append(m)
        sums.append((logits - m).exp_().sum(-1, keepdim=True))
        ban_repeated_ngrams(logits, repeats, start)
        v, i = logits.topk(min(k, logits.size(1)))
        values.append(v)
        ids.append(i + start)
    # log-sum-exp of the whole row from the chunks' maxima and sums
    m = torch.cat(maxes, 1)
    top = m.amax(1, keepdim=True)
    lse = top + (torch.cat(sums, 1) * (m - top).exp()).sum(1, keepdim=True).log()
    v, j = torch.cat(values, 1).topk(min(k, V))
    return v - lse, torch.cat(ids, 1).gather(1, j)


def stay_in_place(parents):
    """A permutation of each prompt's new beams that leaves as many as possible in their parent's row.

    parents (A, K): the row (beam within its prompt) each new beam extends. Returns order (A, K):
    row r takes new beam order[:, r]. A parent's first child takes the parent's row; the other
    children take, in turn, the rows of parents without a child. Reordering the cache then only
    needs to move the rows of those other children.
    """
    A, K = parents.shape
    earlier = torch.ones(K, K, dtype=torch.bool, device=parents.device).tril(-1)  # [j, i]: i < j
    first = ~((parents[:, :, None] == parents[:, None, :]) & earlier).any(-1)
    has_child = torch.zeros_like(first).scatter_(1, parents, True)
    childless = has_child.to(torch.int8).argsort(dim=1, stable=True)  # rows without a child first, in order
    later_rank = ((~first).cumsum(1) - 1).clamp(min=0)  # the m-th other child takes the m-th childless row
    row = torch.where(first, parents, childless.gather(1, later_rank))
    return torch.empty_like(row).scatter_(1, row, torch.arange(K, device=parents.device).expand(A, K))


@torch.inference_mode()
def beam_search(model, prompts: list[list[int]], beam_size: int = 10, length_penalty: float = 0.8,
                no_repeat_ngram_size: int = 4, max_new_tokens: int = 64, eos: int = EOT) -> list[list[int]]:
    """The best continuation of each prompt under beam search, EOT stripped, all prompts in one batch.

    Score: a finished hypothesis of n generated tokens (its EOT included) scores
    sum_logprob / n**length_penalty; one that reaches max_new_tokens without EOT is finished too.
    Each prompt keeps its best `beam_size` finished hypotheses.

    Step: the log-softmax (float32) of every running beam's next token, plus the beam's
    sum_logprob, gives beam_size × vocab candidates per prompt. Of the best 2·beam_size, those
    ending in EOT (or all of them, at the last step) are finished if they rank among the first
    beam_size (transformers' rule, which makes beam_size=1 exactly greedy), and the best
    beam_size that do not end in EOT run on. At the first step only one beam per prompt is live,
    so that the beams are distinct.

    Stopping rule (transformers' early_stopping=False heuristic): after generating t tokens, a
    prompt is done when the worst of its kept finished hypotheses scores at least
    best_running_sum_logprob / t**length_penalty. Until it holds beam_size finished hypotheses
    its worst is -inf, so it goes on unless no running beam is left (all at -inf). With
    length_penalty > 0 a longer continuation could still score higher: a heuristic, not a bound.
    Done prompts leave the batch (their cache rows are dropped); decoding ends when every
    prompt is done, or at max_new_tokens.

    No-repeat n-gram: a beam may not repeat an n-gram of its own continuation; the prompt does
    not count (unlike transformers), so that an output can copy a multi-token name such as
    "Crowne Plaza Hotel" from the MR. 0 turns the rule off.
    """
    K, N, lp = beam_size, max_new_tokens, length_penalty
    if K < 1 or N < 1:
        raise UserError(f"beam_size ({beam_size}) and max_new_tokens ({max_new_tokens}) must be at least 1")
    weight = model.lm_head.weight  # with LoRA on the head: its effective weight, computed once
    device = weight.device
    idx, pad = left_pad(prompts, eos, device)
    B, T = idx.shape
    model.check_room(T, N)

    def gather_beams(x, index):  # x (A, M) or (A, M, N): the beams `index` (A, J) of each prompt
        return x.gather(1, index) if x.dim() == 2 else x.gather(1, index[..., None].expand(-1, -1, x.size(2)))

    with _eval_mode(model):
        cache = model.new_cache(B, T + N, pad)
        # Read each prompt once, then copy its cache rows to its K beams.
        h = model.hidden_states(idx, cache)[:, -1]
        rows = torch.arange(B, device=device).repeat_interleave(K)
        cache.reorder(rows)

        # Running beams of the prompts still live (group a is prompt live[a]), in no particular order.
        live = torch.arange(B, device=device)
        beam_scores = torch.full((B, K), -math.inf, device=device)
        beam_scores[:, 0] = 0.0
        seqs = torch.full((B, K, N), eos, dtype=torch.long, device=device)  # generated tokens
        # Finished hypotheses of every prompt, best first.
        fin_scores = torch.full((B, K), -math.inf, device=device)
        fin_seqs = seqs.clone()

        for t in range(N):
            A = live.numel()
            generated = seqs.view(A * K, N)[:, :t] if t else seqs[:, 0, :0]  # one row per row of h
            logp, ids = top_next_tokens(weight, h, 2 * K, generated, no_repeat_ngram_size)
            if t == 0:  # the K beams of a prompt start alike: its one row of candidates serves them all
                logp, ids = logp[rows], ids[rows]
            # The best 2K of a prompt's K x V candidates are among the best 2K of each beam's row.
            M = logp.size(1)
            top, j = (beam_scores.view(-1, 1) + logp).view(A, K * M).topk(min(2 * K, K * M))
            src, tok = j // M, ids.view(A, K * M).gather(1, j)  # the beam each candidate extends, and its token
            cand = gather_beams(seqs, src)
            cand[:, :, t] = tok

            ends = (tok == eos) | (t == N - 1)
            ends[:, K:] = False
            new = torch.where(ends, top / (t + 1) ** lp, -math.inf)
            fin_top, pick = torch.cat([fin_scores[live], new], 1).topk(K)
            fin_scores[live] = fin_top
            fin_seqs[live] = gather_beams(torch.cat([fin_seqs[live], cand], 1), pick)
            if t == N - 1:
                break

            running = torch.where(tok == eos, -math.inf, top)
            keep = running.topk(K).indices
            keep = gather_beams(keep, stay_in_place(gather_beams(src, keep)))
            beam_scores, src, tok, seqs = (gather_beams(x, keep) for x in (running, src, tok, cand))

            groups, shared = torch.arange(A, device=device), T  # a prompt's beams share its T positions
            done = fin_top[:, -1] >= beam_scores.max(1).values / (t + 1) ** lp
            if done.any():
                groups, shared = (~done).nonzero().squeeze(1), 0  # rows now also move between prompts
                if groups.numel() == 0:
                    break
                live, beam_scores, seqs, src, tok = (x[groups] for x in (live, beam_scores, seqs, src, tok))
            cache.reorder((groups[:, None] * K + src).view(-1), start=shared)
            h = model.hidden_states(tok.view(-1, 1), cache)[:, -1]

    return [_strip(s, eos) for s in fin_seqs[:, 0].tolist()]


@torch.inference_mode()
def sample(model, prompts: list[list[int]], max_new_tokens: int = 64, eos: int = EOT, greedy: bool = False,
           temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None) -> list[list[int]]:
    """Greedy or sampled continuations of all prompts in one batch (`model.generate`), EOT stripped."""
    idx, pad = left_pad(prompts, eos, model.lm_head.weight.device)
    with _eval_mode(model):
        out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                             greedy=greedy, stop_token=eos, generator=generator, pad=pad)
    return [_strip(s, eos) for s in out[:, idx.size(1):].tolist()]


def default_batch_size(model, method: str = "beam", beam_size: int = 10) -> int:
    """Prompts per batch: about ROWS_PER_BATCH sequences side by side (each beam is one)."""
    rows = ROWS_PER_BATCH["cuda" if model.lm_head.weight.is_cuda else "cpu"]
    return max(1, rows // (beam_size if method == "beam" else 1))


def decode(model, prompts: list[list[int]], method: str = "beam", batch_size: int | None = None,
           progress: bool = True, **kw) -> list[list[int]]:
    """Continuations of all prompts, EOT stripped, in input order.

    method: 'beam' (keywords of `beam_search`), 'greedy' or 'sample' (keywords of `sample`).
    Prompts are batched by length, longest first, so that batches carry little padding and
    the first batch shows the peak memory. batch_size counts prompts (default:
    `default_batch_size`).
    """
    from tqdm import tqdm

    if method not in METHODS:
        raise UserError(f"unknown decoding method {method!r}; choose one of {', '.join(METHODS)}")
    if batch_size is None:
        batch_size = default_batch_size(model, method, kw.get("beam_size", 10))
    if batch_size < 1:
        raise UserError(f"batch_size must be at least 1, not {batch_size}")
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    outputs: list[list[int]] = [[] for _ in prompts]
    with tqdm(total=len(prompts), desc=f"{method} decoding", unit="prompt", disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            ids = order[start:start + batch_size]
            batch = [prompts[i] for i in ids]
            if method == "beam":
                results = beam_search(model, batch, **kw)
            else:
                results = sample(model, batch, greedy=method == "greedy", **kw)
            for i, r in zip(ids, results):
                outputs[i] = r
            bar.update(len(ids))
    return outputs
