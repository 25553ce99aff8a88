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


def check_prompts(prompts) -> None:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise UserError("decoding needs at least one prompt, and every prompt needs at least one token")


def left_pad(prompts, fill: int, device):
    """(B, T) long tensor of the prompts padded on the left with `fill`, and the (B,) padding per
    row, or None when every prompt has the same length (the cache then needs no mask)."""
    check_prompts(prompts)
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


def repeated_ngrams(generated, lengths, n: int):
    """The tokens that would repeat an n-gram, per row of generated (R, L), whose row r holds its
    continuation so far in its first lengths[r] columns: (tokens, hit), each (R, L-n+1), where
    hit marks the tokens banned; None when the rows are too short for any n-gram.

    An earlier n-gram whose first n-1 tokens equal the row's last n-1 tokens bans its last token.
    """
    L = generated.size(1)
    if n <= 0 or n > L:
        return None
    grams = generated.unfold(1, n, 1)  # (R, L-n+1, n): every n-gram of the columns
    steps = torch.arange(max(L - n + 1, n - 1), device=generated.device)
    suffix = generated.gather(1, (lengths[:, None] - n + 1 + steps[:n - 1]).clamp(min=0))
    complete = steps[:L - n + 1] <= lengths[:, None] - n  # the n-gram lies within the continuation
    return grams[:, :, -1], (grams[:, :, :-1] == suffix[:, None]).all(-1) & complete


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


def top_next_tokens(weight, h, k: int, generated, lengths, no_repeat_ngram_size: int):
    """Each row's k likeliest next tokens, as (log-probs, token ids), float32 (R, k) each.

    weight (V, C) is the LM head and h (R, C) the rows' last hidden states; tokens that would
    repeat an n-gram of a row's continuation (`repeated_ngrams` of generated and lengths) are
    banned (-inf) after the log-softmax, so they still count in its normaliser. On a CPU the
    head works through the vocabulary a chunk at a time, each chunk reduced to its log-sum-exp
    and its top k while still in cache: a whole (R, V) block of logits would go through main
    memory for the log-softmax, and again for the top-k (for the 128-dim model, a third of the
    projection's own time).
    """
    V = weight.size(0)
    chunk = V if h.is_cuda else max(1, min(VOCAB_CHUNK, HEAD_CHUNK // weight.size(1)))
    repeats = repeated_ngrams(generated, lengths, no_repeat_ngram_size)  # once, for all chunks
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


def fill_holes(done):
    """The groups to keep when the groups marked done (A,) leave: the first slots keep their
    group where it goes on, and the last groups that go on move into the places of those done,
    so that only their cache rows are copied."""
    n = int((~done).sum())
    order = torch.arange(n, device=done.device)
    order[done[:n].nonzero().squeeze(1)] = (~done[n:]).nonzero().squeeze(1) + n
    return order


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
                no_repeat_ngram_size: int = 4, max_new_tokens: int = 64, eos: int = EOT,
                max_live: int | None = None, on_done=None) -> list[list[int]]:
    """The best continuation of each prompt under beam search, EOT stripped, in input order.

    Score: a finished hypothesis of n generated tokens (its EOT included) scores
    sum_logprob / n**length_penalty; one that reaches max_new_tokens without EOT is finished too.
    Each prompt keeps its best `beam_size` finished hypotheses.

    Step: the log-softmax (float32) of every running beam's next token, plus the beam's
    sum_logprob, gives beam_size × vocab candidates per prompt. Of the best 2·beam_size, those
    ending in EOT (or all of them, at the last step) are finished if they rank among the first
    beam_size (transformers' rule, which makes beam_size=1 exactly greedy), and the best
    beam_size that do not end in EOT run on. At a prompt's first step only one of its beams is
    live, so that the beams are distinct.

    Stopping rule (transformers' early_stopping=False heuristic): after generating t tokens, a
    prompt is done when the worst of its kept finished hypotheses scores at least
    best_running_sum_logprob / t**length_penalty. Until it holds beam_size finished hypotheses
    its worst is -inf, so it goes on unless no running beam is left (all at -inf). With
    length_penalty > 0 a longer continuation could still score higher: a heuristic, not a bound.

    Batching: up to `max_live` prompts (default: all) are decoded side by side, each at its own
    step; when one is done, its cache rows go to the next prompt in line, so that the batch
    stays full to the end instead of running on with fewer and fewer rows (continuous batching).
    `on_done(n)` hears of every n prompts done, for a progress bar.

    No-repeat n-gram: a beam may not repeat an n-gram of its own continuation; the prompt does
    not count (unlike transformers), so that an output can copy a multi-token name such as
    "Crowne Plaza Hotel" from the MR. 0 turns the rule off.
    """
    K, N, lp = beam_size, max_new_tokens, length_penalty
    if K < 1 or N < 1:
        raise UserError(f"beam_size ({beam_size}) and max_new_tokens ({max_new_tokens}) must be at least 1")
    check_prompts(prompts)
    longest = max(map(len, prompts))
    model.check_room(longest, N)
    max_live = len(prompts) if max_live is None else max_live
    if max_live < 1:
        raise UserError(f"max_live must be at least 1, not {max_live}")
    weight = model.lm_head.weight  # with LoRA on the head: its effective weight, computed once
    device = weight.device
    outputs: list[list[int]] = [[] for _ in prompts]
    waiting = list(range(len(prompts)))[::-1]  # next prompt last

    def gather_beams(x, index):  # x (A, M) or (A, M, N): the beams `index` (A, J) of each group
        return x.gather(1, index) if x.dim() == 2 else x.gather(1, index[..., None].expand(-1, -1, x.size(2)))

    def grow(x, n, fill, *shape):  # x with n groups more, filled with `fill`
        return torch.cat([x, torch.full((n, *shape), fill, dtype=x.dtype, device=device)])

    with _eval_mode(model):
        # Columns: the longest prompt and its continuation, and as many again, so that the
        # columns that no row uses any more are given back only every N steps or so.
        cache = model.new_cache(min(max_live, len(prompts)) * K, longest + 2 * N,
                                torch.zeros(0, dtype=torch.long, device=device), rows=0, group=K)
        # Group a decodes prompt live[a] with K beams (cache rows a·K to a·K+K-1), of which
        # steps[a] tokens are generated; finished hypotheses are kept best first.
        live = torch.zeros(0, dtype=torch.long, device=device)
        steps = torch.zeros_like(live)
        beam_scores = torch.zeros(0, K, device=device)
        fin_scores = torch.zeros(0, K, device=device)
        seqs = torch.zeros(0, K, N, dtype=torch.long, device=device)
        fin_seqs = seqs.clone()
        h = None  # the last hidden state of every cache row

        while True:
            new = [waiting.pop() for _ in range(min(len(waiting), max_live - live.numel()))]
            if new:  # read the new prompts, and give each K rows of the cache
                idx, pad = left_pad([prompts[i] for i in new], eos, device)
                fresh = model.new_cache(len(new), idx.size(1), pad)
                h_new = model.hidden_states(idx, fresh)[:, -1]
                cache.insert(fresh, copies=K)
                h = h_new if h is None else torch.cat([h, h_new])
                B = len(new)
                live = torch.cat([live, torch.tensor(new, device=device)])
                steps, fin_scores = grow(steps, B, 0), grow(fin_scores, B, -math.inf, K)
                seqs, fin_seqs = grow(seqs, B, eos, K, N), grow(fin_seqs, B, eos, K, N)
                beam_scores = grow(beam_scores, B, -math.inf, K)
                beam_scores[-B:, 0] = 0.0
            A = live.numel()
            if A == 0:
                break

            # h has a row per beam of the running groups, and one per new group: a new group's
            # K beams start alike, and its one row of candidates serves them all.
            t_max = int(steps.max())  # tokens generated by the group furthest on
            generated, lengths = seqs.view(A * K, N)[:, :t_max], steps.repeat_interleave(K)
            old = (A - len(new)) * K
            if new:
                first = torch.cat([torch.arange(old, device=device), torch.arange(old, A * K, K, device=device)])
                generated, lengths = generated[first], lengths[first]
            logp, ids = top_next_tokens(weight, h, 2 * K, generated, lengths, no_repeat_ngram_size)
            if new:
                expand = torch.cat([torch.arange(old, device=device),
                                    torch.arange(old, old + len(new), device=device).repeat_interleave(K)])
                logp, ids = logp[expand], ids[expand]
            # The best 2K of a group's K x V candidates are among the best 2K of each beam's row.
            M = logp.size(1)
            top, j = (beam_scores.view(-1, 1) + logp).view(A, K * M).topk(min(2 * K, K * M))
            src, tok = j // M, ids.view(A, K * M).gather(1, j)  # the beam each candidate extends, and its token
            cand = gather_beams(seqs, src)
            cand.scatter_(2, steps.view(A, 1, 1).expand(A, tok.size(1), 1), tok[..., None])

            last = steps == N - 1
            divisor = (steps + 1).float().pow(lp)[:, None]
            ends = (tok == eos) | last[:, None]
            ends[:, K:] = False
            fin_scores, pick = torch.cat([fin_scores, torch.where(ends, top / divisor, -math.inf)], 1).topk(K)
            fin_seqs = gather_beams(torch.cat([fin_seqs, cand], 1), pick)

            running = torch.where(tok == eos, -math.inf, top)
            keep = running.topk(K).indices
            keep = gather_beams(keep, stay_in_place(gather_beams(src, keep)))
            beam_scores, src, tok, seqs = (gather_beams(x, keep) for x in (running, src, tok, cand))
            # A group's beams share the columns before its generated tokens.
            cache.own = t_max
            cache.reorder((torch.arange(A, device=device)[:, None] * K + src).view(-1),
                          start=cache.len - steps.repeat_interleave(K))
            steps = steps + 1

            done = last | (fin_scores[:, -1] >= beam_scores.max(1).values / divisor[:, 0])
            if done.any():
                for i, best in zip(live[done].tolist(), fin_seqs[done, 0].tolist()):
                    outputs[i] = _strip(best, eos)
                if on_done is not None:
                    on_done(int(done.sum()))
                order = fill_holes(done)
                live, steps, beam_scores, fin_scores, seqs, fin_seqs, tok = (
                    x[order] for x in (live, steps, beam_scores, fin_scores, seqs, fin_seqs, tok))
                cache.reorder((order[:, None] * K + torch.arange(K, device=device)).view(-1))
            h = model.hidden_states(tok.view(-1, 1), cache)[:, -1] if live.numel() else None

    return outputs


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
    Prompts go in by length, longest first, so that rows side by side carry little padding and
    the first ones show the peak memory. batch_size counts prompts decoded side by side
    (default: `default_batch_size`); beam search takes the next prompt as soon as one is done,
    greedy decoding and sampling go a batch at a time.
    """
    from tqdm import tqdm

    if method not in METHODS:
        raise UserError(f"unknown decoding method {method!r}; choose one of {', '.join(METHODS)}")
    if batch_size is None:
        batch_size = default_batch_size(model, method, kw.get("beam_size", 10))
    if batch_size < 1:
        raise UserError(f"batch_size must be at least 1, not {batch_size}")
    check_prompts(prompts)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    ordered = [prompts[i] for i in order]
    outputs: list[list[int]] = [[] for _ in prompts]
    with tqdm(total=len(prompts), desc=f"{method} decoding", unit="prompt", disable=not progress) as bar:
        if method == "beam":
            results = beam_search(model, ordered, max_live=batch_size, on_done=bar.update, **kw)
        else:
            results = []
            for start in range(0, len(ordered), batch_size):
                batch = ordered[start:start + batch_size]
                results += sample(model, batch, greedy=method == "greedy", **kw)
                bar.update(len(batch))
    for i, r in zip(order, results):
        outputs[i] = r
    return outputs
