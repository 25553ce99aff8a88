"""Beam search over many prompts at once, with a KV cache and continuous batching."""

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from gpt2study.tokenizer import EOT
from model import UserError

from .batch import check_prompts, eval_mode, left_pad, strip_after
from .beam_cache import BeamCache

# 'transformers': GenerationMixin's rule (2K candidates, finished beams replaced, its stopping
# heuristic); 'paper': the LoRA paper's E2E decoder (microsoft/LoRA, gpt2_beam.py). See beam_search.
BEAM_RULES = ("transformers", "paper")
# Beam search on a CPU projects the vocabulary a chunk at a time, of about HEAD_CHUNK weights of the LM
# head and at most VOCAB_CHUNK entries: small enough for a chunk's logits to stay in cache.
HEAD_CHUNK, VOCAB_CHUNK = 2**21, 8192


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


def top_next_tokens(weight, h, k: int, generated, lengths, no_repeat_ngram_size: int, ban_first: bool = False):
    """Each row's k likeliest next tokens, as (log-probs, token ids), float32 (R, k) each.

    weight (V, C) is the LM head and h (R, C) the rows' last hidden states; tokens that would
    repeat an n-gram of a row's continuation (`repeated_ngrams` of generated and lengths) are
    banned (-inf) after the log-softmax, so they still count in its normaliser, or, with
    ban_first, on the logits before it, so the others share their probability. On a CPU the
    head works through the vocabulary a chunk at a time, each chunk reduced to its log-sum-exp
    and its top k while still in cache: a whole (R, V) block of logits would go through main
    memory for the log-softmax, and again for the top-k.
    """
    V = weight.size(0)
    chunk = V if h.is_cuda else max(1, min(VOCAB_CHUNK, HEAD_CHUNK // weight.size(1)))
    repeats = repeated_ngrams(generated, lengths, no_repeat_ngram_size)  # once, for all chunks
    maxes, sums, values, ids = [], [], [], []
    for start in range(0, V, chunk):
        logits = F.linear(h, weight[start:start + chunk]).float()
        if ban_first:
            ban_repeated_ngrams(logits, repeats, start)
        m = logits.amax(-1, keepdim=True).clamp(min=torch.finfo(torch.float32).min)  # a chunk all banned
        maxes.append(m)
        sums.append((logits - m).exp_().sum(-1, keepdim=True))
        if not ban_first:
            ban_repeated_ngrams(logits, repeats, start)
        v, i = logits.topk(min(k, logits.size(1)))
        values.append(v)
        ids.append(i + start)
    # log-sum-exp of the whole row from the chunks' maxima and sums
    m = torch.cat(maxes, 1)
    top = m.amax(1, keepdim=True)
    lse = top + (torch.cat(sums, 1) * (m - top).exp()).sum(1, keepdim=True).log()
    v, j = torch.cat(values, 1).topk(min(k, V))
    return torch.where(v == -math.inf, -math.inf, v - lse), torch.cat(ids, 1).gather(1, j)


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


@dataclass
class Groups:
    """The prompts decoded side by side: group a decodes prompt `prompt[a]` with K beams, which
    live in cache rows a·K to a·K+K-1."""

    prompt: torch.Tensor  # (A,) the index of each group's prompt
    steps: torch.Tensor  # (A,) tokens generated so far
    scores: torch.Tensor  # (A, K) each running beam's sum_logprob; -inf: no beam
    seqs: torch.Tensor  # (A, K, max_new_tokens) each running beam's tokens
    last: torch.Tensor  # (A, K) each running beam's newest token: the model's next input
    fin_scores: torch.Tensor  # (A, K) the finished hypotheses' scores, best first; -inf: none yet
    fin_seqs: torch.Tensor  # (A, K, max_new_tokens)

    @classmethod
    def empty(cls, K: int, max_new_tokens: int, device) -> "Groups":
        def none(*shape, dtype=torch.long):
            return torch.zeros(0, *shape, dtype=dtype, device=device)

        return cls(prompt=none(), steps=none(), scores=none(K, dtype=None), seqs=none(K, max_new_tokens),
                   last=none(K), fin_scores=none(K, dtype=None), fin_seqs=none(K, max_new_tokens))

    def __len__(self) -> int:
        return self.prompt.numel()

    def add(self, prompts: list[int], eos: int) -> None:
        """New groups at the end: one live beam each (so that the beams will differ), nothing finished."""
        n, (K, L), device = len(prompts), self.seqs.shape[1:], self.prompt.device

        def grow(x, fill, *shape):
            return torch.cat([x, torch.full((n, *shape), fill, dtype=x.dtype, device=device)])

        scores = torch.full((n, K), -math.inf, device=device)
        scores[:, 0] = 0.0
        self.prompt = torch.cat([self.prompt, torch.tensor(prompts, device=device)])
        self.steps, self.scores = grow(self.steps, 0), torch.cat([self.scores, scores])
        self.seqs, self.last = grow(self.seqs, eos, K, L), grow(self.last, eos, K)
        self.fin_scores, self.fin_seqs = grow(self.fin_scores, -math.inf, K), grow(self.fin_seqs, eos, K, L)

    def keep(self, order: torch.Tensor) -> None:
        """Only the groups `order`, in that order."""
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name)[order])


def gather_beams(x, index):
    """The beams `index` (A, J) of each group of x (A, M) or (A, M, L)."""
    return x.gather(1, index) if x.dim() == 2 else x.gather(1, index[..., None].expand(-1, -1, x.size(2)))


def admit(model, cache: BeamCache, prompts: list[list[int]], eos: int):
    """Read new prompts (left-padded, in a cache of their own), give each K rows of the beam cache,
    and return each prompt's last hidden state: one row per prompt, which its K beams share."""
    idx, pad = left_pad(prompts, eos, cache.k.device)
    fresh = model.new_cache(len(prompts), idx.size(1), pad)
    h = model.hidden_states(idx, fresh)[:, -1]
    cache.insert(fresh, len(prompts))
    return h


def shared_rows(groups: Groups, n_new: int):
    """Rows of hidden states per group: K for a running group, 1 for each of the n_new groups just
    admitted, whose K beams start alike. Returns (first, expand): the beam rows those hidden states
    stand for (to pick their n-gram histories), and the indices that give each of the A·K beams
    its row of candidates."""
    A, K, device = len(groups), groups.seqs.size(1), groups.prompt.device
    old = (A - n_new) * K
    first = torch.cat([torch.arange(old, device=device), torch.arange(old, A * K, K, device=device)])
    expand = torch.cat([torch.arange(old, device=device),
                        torch.arange(old, old + n_new, device=device).repeat_interleave(K)])
    return first, expand


def next_tokens(weight, h, groups: Groups, n_new: int, n_cand: int, no_repeat_ngram_size: int, paper: bool):
    """Each beam's n_cand likeliest next tokens (`top_next_tokens`), as (log-probs, ids), (A·K, M) each."""
    A, K, L = groups.seqs.shape
    t_max = int(groups.steps.max())  # tokens generated by the group furthest on
    generated, lengths = groups.seqs.reshape(A * K, L)[:, :t_max], groups.steps.repeat_interleave(K)
    if n_new:
        first, expand = shared_rows(groups, n_new)
        generated, lengths = generated[first], lengths[first]
    logp, ids = top_next_tokens(weight, h, n_cand, generated, lengths, no_repeat_ngram_size, ban_first=paper)
    return (logp[expand], ids[expand]) if n_new else (logp, ids)


def penalties(finish_penalty, groups: Groups, cand, ends, eos: int):
    """What finish_penalty(prompt index, tokens without EOT) takes off each finishing candidate's
    score (A, n_cand); 0 for the others."""
    out = torch.zeros(ends.shape, device=ends.device)
    where = ends.nonzero()
    if len(where):
        a, k = where.unbind(1)
        n = (groups.steps[a] + 1).tolist()
        seqs = cand[a, k].tolist()
        out[a, k] = torch.tensor([finish_penalty(p, strip_after(s[:m], eos))
                                  for p, s, m in zip(groups.prompt[a].tolist(), seqs, n)], device=ends.device)
    return out


def extend(groups: Groups, logp, ids, n_cand: int, eos: int, length_penalty: float, paper: bool,
           finish_penalty=None):
    """One step of every group: the best candidates finish (those ending in EOT, or all at the last
    step; minus finish_penalty, if given) or run on as the K new beams. Returns each new beam's parent
    (A, K) and which groups are done."""
    A, K, L = groups.seqs.shape
    M = logp.size(1)
    # The best n_cand of a group's K x V candidates are among the best n_cand of each beam's row.
    top, j = (groups.scores.view(-1, 1) + logp).view(A, K * M).topk(min(n_cand, K * M))
    src, tok = j // M, ids.view(A, K * M).gather(1, j)  # the beam each candidate extends, and its token
    cand = gather_beams(groups.seqs, src)
    cand.scatter_(2, groups.steps.view(A, 1, 1).expand(A, tok.size(1), 1), tok[..., None])

    last_step = groups.steps == L - 1
    divisor = (groups.steps + 1).float().pow(length_penalty)[:, None]
    ends = (tok == eos) | last_step[:, None]
    ends[:, K:] = False  # only the best K candidates may finish
    finished = torch.where(ends, top / divisor, -math.inf)
    if finish_penalty is not None:
        finished = finished - penalties(finish_penalty, groups, cand, ends, eos)
    fin = torch.cat([groups.fin_scores, finished], 1)
    groups.fin_scores, pick = fin.topk(K)
    groups.fin_seqs = gather_beams(torch.cat([groups.fin_seqs, cand], 1), pick)

    running = torch.where(tok == eos, -math.inf, top)
    keep = running.topk(K).indices
    keep = gather_beams(keep, stay_in_place(gather_beams(src, keep)))
    groups.scores, src, groups.last, groups.seqs = (gather_beams(x, keep) for x in (running, src, tok, cand))
    groups.steps = groups.steps + 1

    alive = groups.scores.max(1).values
    if paper:
        return src, last_step | (alive == -math.inf)
    return src, last_step | (groups.fin_scores[:, -1] >= alive / divisor[:, 0])


def follow_parents(cache: BeamCache, src, steps) -> None:
    """Each beam's cache row becomes its parent's. A group's beams share every column but those of
    the tokens it generated (`steps`, before this step's), so only those are copied."""
    A, K = src.shape
    cache.reorder((torch.arange(A, device=src.device)[:, None] * K + src).view(-1), generated=steps)


def drop_groups(cache: BeamCache, groups: Groups, done) -> None:
    """Groups done leave, and the last groups move into their places (`fill_holes`), in the cache
    and in `groups`, so that only the moved groups' cache rows are copied."""
    order = fill_holes(done)
    K = groups.seqs.size(1)
    groups.keep(order)
    cache.reorder((order[:, None] * K + torch.arange(K, device=order.device)).view(-1))


@torch.inference_mode()
def beam_hypotheses(model, prompts: list[list[int]], beam_size: int = 10, length_penalty: float = 0.8,
                    no_repeat_ngram_size: int = 4, max_new_tokens: int = 64, eos: int = EOT,
                    beam_rule: str = "transformers", max_live: int | None = None,
                    on_done=None, finish_penalty=None) -> list[list[tuple[list[int], float]]]:
    """Every prompt's finished hypotheses under beam search, best first, each (tokens without EOT,
    score), in input order: the final beam that `beam_search` takes the first of."""
    K = beam_size
    if K < 1 or max_new_tokens < 1:
        raise UserError(f"beam_size ({beam_size}) and max_new_tokens ({max_new_tokens}) must be at least 1")
    if beam_rule not in BEAM_RULES:
        raise UserError(f"unknown beam_rule {beam_rule!r}; choose one of {', '.join(BEAM_RULES)}")
    check_prompts(prompts)
    longest = max(map(len, prompts))
    model.check_room(longest, max_new_tokens)
    max_live = len(prompts) if max_live is None else max_live
    if max_live < 1:
        raise UserError(f"max_live must be at least 1, not {max_live}")
    paper = beam_rule == "paper"
    n_cand = K if paper else 2 * K  # candidates per prompt and step
    # The LM head's rows past the vocabulary (padding, if any) are no tokens. With LoRA on the
    # head, reading the weight computes its effective weight: once here, not at every step.
    weight = model.lm_head.weight[:model.config.vocab_size]
    results: list[list[tuple[list[int], float]]] = [[] for _ in prompts]
    waiting = list(range(len(prompts)))[::-1]  # next prompt last
    with eval_mode(model):
        # Columns: the longest prompt and its continuation, and as many again, so that the
        # columns no row uses any more are given back only every max_new_tokens steps or so.
        cache = BeamCache(model, min(max_live, len(prompts)) * K, longest + 2 * max_new_tokens, group=K)
        groups = Groups.empty(K, max_new_tokens, weight.device)
        h = None  # the last hidden state of each cache row (one per group for groups just admitted)
        while True:
            new = [waiting.pop() for _ in range(min(len(waiting), max_live - len(groups)))]
            if new:
                h_new = admit(model, cache, [prompts[i] for i in new], eos)
                h = h_new if h is None else torch.cat([h, h_new])
                groups.add(new, eos)
            if len(groups) == 0:
                break
            logp, ids = next_tokens(weight, h, groups, len(new), n_cand, no_repeat_ngram_size, paper)
            steps = groups.steps
            src, done = extend(groups, logp, ids, n_cand, eos, length_penalty, paper, finish_penalty)
            follow_parents(cache, src, steps)
            if done.any():
                for i, seqs, scores in zip(groups.prompt[done].tolist(), groups.fin_seqs[done].tolist(),
                                           groups.fin_scores[done].tolist()):
                    results[i] = [(strip_after(s, eos), v) for s, v in zip(seqs, scores) if v > -math.inf]
                if on_done is not None:
                    on_done(int(done.sum()))
                drop_groups(cache, groups, done)
            h = model.hidden_states(groups.last.view(-1, 1), cache)[:, -1] if len(groups) else None
    return results


def beam_search(model, prompts: list[list[int]], **kw) -> list[list[int]]:
    """The best continuation of each prompt under beam search, EOT stripped, in input order.

    Keywords (beam_hypotheses): beam_size=10, length_penalty=0.8, no_repeat_ngram_size=4,
    max_new_tokens=64, eos=EOT, beam_rule='transformers', max_live=None (all), on_done=None,
    finish_penalty=None.

    Score: a finished hypothesis of n generated tokens (its EOT included) scores
    sum_logprob / n**length_penalty; one that reaches max_new_tokens without EOT is finished too.
    At a prompt's first step only one of its beams is live, so that the beams are distinct.

    beam_rule='transformers' (GenerationMixin's beam search with early_stopping=False): the
    log-softmax (float32) of every running beam's next token, plus the beam's sum_logprob, gives
    beam_size × vocab candidates per prompt. Of the best 2·beam_size, those ending in EOT (or all,
    at the last step) are finished if they rank among the first beam_size (which makes
    beam_size=1 exactly greedy), and the best beam_size that do not end in EOT run on. A prompt
    is done when the worst of its beam_size kept finished hypotheses scores at least
    best_running_sum_logprob / t**length_penalty after t tokens (a heuristic, not a bound: with
    length_penalty > 0 a longer continuation could still score higher), or when no beam runs.

    beam_rule='paper' (the LoRA paper's E2E decoder, microsoft/LoRA's gpt2_beam.py): repeated
    n-grams are banned on the logits, before the softmax; of the best beam_size candidates, those
    that end in EOT are finished and the others go on (fewer than beam_size for a step: the next
    step's best beam_size candidates fill the beam again); a beam that reaches max_new_tokens is
    finished as it stands. A prompt is done at max_new_tokens, or when all of a step's candidates
    end in EOT: no early stop.

    Batching: up to `max_live` prompts are decoded side by side, each at its own step; when one
    is done, its cache rows go to the next prompt in line, so that the batch stays full to the
    end instead of running on with fewer and fewer rows (continuous batching). `on_done(n)` hears
    of every n prompts done, for a progress bar.

    finish_penalty(prompt index, tokens) is subtracted from the score of each hypothesis as it
    finishes (E2E: a price per slot error against the prompt's MR). The beam then keeps looking
    while a running beam could still beat the penalised hypotheses: the search itself goes on
    for an output that says the MR, which a choice among the final beam cannot do.

    No-repeat n-gram: a beam may not repeat an n-gram of its own continuation; the prompt does
    not count (as in the paper; transformers counts it), so that an output can copy a multi-token
    name such as "Crowne Plaza Hotel" from the MR. 0 turns the rule off.
    """
    return [hyps[0][0] for hyps in beam_hypotheses(model, prompts, **kw)]
