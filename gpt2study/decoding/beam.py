"""Beam search over many prompts at once, with a KV cache and continuous batching."""

import math

import torch
import torch.nn.functional as F

from gpt2study.tokenizer import EOT
from model import UserError

from .batch import check_prompts, eval_mode, left_pad, strip_after
from .beam_cache import BeamCache

# 'transformers': GenerationMixin's rule (2K candidates, finished beams replaced, its stopping
# heuristic); 'paper': the LoRA paper's E2E decoder (microsoft/LoRA, gpt2_beam.py). See beam_search.
BEAM_RULES = ("transformers", "paper")
# Beam search on a CPU projects the vocabulary a chunk at a time: of about HEAD_CHUNK weights of the LM
# head (8 MB in float32), at most VOCAB_CHUNK entries (measured best for 128 to 1024 dims on 2 cores).
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
    memory for the log-softmax, and again for the top-k (for the 128-dim model, a third of the
    projection's own time).
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


@torch.inference_mode()
def beam_search(model, prompts: list[list[int]], beam_size: int = 10, length_penalty: float = 0.8,
                no_repeat_ngram_size: int = 4, max_new_tokens: int = 64, eos: int = EOT,
                beam_rule: str = "transformers", max_live: int | None = None, on_done=None) -> list[list[int]]:
    """The best continuation of each prompt under beam search, EOT stripped, in input order.

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

    Batching: up to `max_live` prompts (default: all) are decoded side by side, each at its own
    step; when one is done, its cache rows go to the next prompt in line, so that the batch
    stays full to the end instead of running on with fewer and fewer rows (continuous batching).
    `on_done(n)` hears of every n prompts done, for a progress bar.

    No-repeat n-gram: a beam may not repeat an n-gram of its own continuation; the prompt does
    not count (as in the paper; transformers counts it), so that an output can copy a multi-token
    name such as "Crowne Plaza Hotel" from the MR. 0 turns the rule off.
    """
    K, lp = beam_size, length_penalty
    if K < 1 or max_new_tokens < 1:
        raise UserError(f"beam_size ({beam_size}) and max_new_tokens ({max_new_tokens}) must be at least 1")
    if beam_rule not in BEAM_RULES:
        raise UserError(f"unknown beam_rule {beam_rule!r}; choose one of {', '.join(BEAM_RULES)}")
    paper = beam_rule == "paper"
    check_prompts(prompts)
    longest = max(map(len, prompts))
    model.check_room(longest, max_new_tokens)
    max_live = len(prompts) if max_live is None else max_live
    if max_live < 1:
        raise UserError(f"max_live must be at least 1, not {max_live}")
    # with LoRA on the head: its effective weight, computed once; the rows past vocab_size are padding, no token
    weight = model.lm_head.weight[:model.config.vocab_size]
    device = weight.device
    outputs: list[list[int]] = [[] for _ in prompts]
    waiting = list(range(len(prompts)))[::-1]  # next prompt last
    n_cand = K if paper else 2 * K  # candidates per prompt and step

    def gather_beams(x, index):  # x (A, M) or (A, M, L): the beams `index` (A, J) of each group
        return x.gather(1, index) if x.dim() == 2 else x.gather(1, index[..., None].expand(-1, -1, x.size(2)))

    def grow(x, n, fill, *shape):  # x with n groups more, filled with `fill`
        return torch.cat([x, torch.full((n, *shape), fill, dtype=x.dtype, device=device)])

    with eval_mode(model):
        # Columns: the longest prompt and its continuation, and as many again, so that the
        # columns that no row uses any more are given back only every max_new_tokens steps or so.
        cache = BeamCache(model, min(max_live, len(prompts)) * K, longest + 2 * max_new_tokens, group=K)
        # Group a decodes prompt live[a] with K beams (cache rows a·K to a·K+K-1), of which
        # steps[a] tokens are generated; finished hypotheses are kept best first.
        live = torch.zeros(0, dtype=torch.long, device=device)
        steps = torch.zeros_like(live)
        beam_scores = torch.zeros(0, K, device=device)
        fin_scores = torch.zeros(0, K, device=device)
        seqs = torch.zeros(0, K, max_new_tokens, dtype=torch.long, device=device)
        fin_seqs = seqs.clone()
        h = None  # the last hidden state of every cache row

        while True:
            new = [waiting.pop() for _ in range(min(len(waiting), max_live - live.numel()))]
            n_new = len(new)
            if new:  # read the new prompts, and give each K rows of the cache
                idx, pad = left_pad([prompts[i] for i in new], eos, device)
                fresh = model.new_cache(n_new, idx.size(1), pad)
                h_new = model.hidden_states(idx, fresh)[:, -1]
                cache.insert(fresh, n_new)
                h = h_new if h is None else torch.cat([h, h_new])
                live = torch.cat([live, torch.tensor(new, device=device)])
                steps, fin_scores = grow(steps, n_new, 0), grow(fin_scores, n_new, -math.inf, K)
                seqs = grow(seqs, n_new, eos, K, max_new_tokens)
                fin_seqs = grow(fin_seqs, n_new, eos, K, max_new_tokens)
                beam_scores = grow(beam_scores, n_new, -math.inf, K)
                beam_scores[-n_new:, 0] = 0.0
            A = live.numel()
            if A == 0:
                break

            # h has a row per beam of the running groups, and one per new group: a new group's
            # K beams start alike, and its one row of candidates serves them all.
            t_max = int(steps.max())  # tokens generated by the group furthest on
            generated, lengths = seqs.view(A * K, max_new_tokens)[:, :t_max], steps.repeat_interleave(K)
            old = (A - n_new) * K
            if new:
                first = torch.cat([torch.arange(old, device=device), torch.arange(old, A * K, K, device=device)])
                generated, lengths = generated[first], lengths[first]
            logp, ids = top_next_tokens(weight, h, n_cand, generated, lengths, no_repeat_ngram_size, ban_first=paper)
            if new:
                expand = torch.cat([torch.arange(old, device=device),
                                    torch.arange(old, old + n_new, device=device).repeat_interleave(K)])
                logp, ids = logp[expand], ids[expand]
            # The best n_cand of a group's K x V candidates are among the best n_cand of each beam's row.
            M = logp.size(1)
            top, j = (beam_scores.view(-1, 1) + logp).view(A, K * M).topk(min(n_cand, K * M))
            src, tok = j // M, ids.view(A, K * M).gather(1, j)  # the beam each candidate extends, and its token
            cand = gather_beams(seqs, src)
            cand.scatter_(2, steps.view(A, 1, 1).expand(A, tok.size(1), 1), tok[..., None])

            last = steps == max_new_tokens - 1
            divisor = (steps + 1).float().pow(lp)[:, None]
            ends = (tok == eos) | last[:, None]
            ends[:, K:] = False
            fin_scores, pick = torch.cat([fin_scores, torch.where(ends, top / divisor, -math.inf)], 1).topk(K)
            fin_seqs = gather_beams(torch.cat([fin_seqs, cand], 1), pick)

            running = torch.where(tok == eos, -math.inf, top)
            keep = running.topk(K).indices
            keep = gather_beams(keep, stay_in_place(gather_beams(src, keep)))
            beam_scores, src, tok, seqs = (gather_beams(x, keep) for x in (running, src, tok, cand))
            # Only the columns of the tokens each group generated differ between its beams.
            cache.reorder((torch.arange(A, device=device)[:, None] * K + src).view(-1), generated=steps)
            steps = steps + 1

            alive = beam_scores.max(1).values
            done = last | (alive == -math.inf) if paper else last | (fin_scores[:, -1] >= alive / divisor[:, 0])
            if done.any():
                for i, best in zip(live[done].tolist(), fin_seqs[done, 0].tolist()):
                    outputs[i] = strip_after(best, eos)
                if on_done is not None:
                    on_done(int(done.sum()))
                order = fill_holes(done)
                live, steps, beam_scores, fin_scores, seqs, fin_seqs, tok = (
                    x[order] for x in (live, steps, beam_scores, fin_scores, seqs, fin_seqs, tok))
                cache.reorder((order[:, None] * K + torch.arange(K, device=device)).view(-1))
            h = model.hidden_states(tok.view(-1, 1), cache)[:, -1] if live.numel() else None

    return outputs
