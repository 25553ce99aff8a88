"""The KV cache of beam search: rows that move, prompts that come and go, prefixes read once.

Beam search keeps every live prompt's K beams in consecutive rows (a group). Each step it
reorders the rows (a beam continues another's hypothesis), drops the rows of finished
prompts, lets new prompts in (continuous batching), and attends with one query per row.
"""

import math

import torch

from model import KVCache


class BeamCache(KVCache):
    """A KVCache whose first `rows` rows are in use, in groups of `group` (one prompt's beams).

    A group's beams agree on every column but their last `generated` ones (the tokens beam
    search chose), so decoding attention on a CPU reads the shared columns once per group.
    Columns before `start` are padding in every row; when the buffers run out of columns they
    are given back (`make_room`).
    """

    def __init__(self, model, batch_size: int, max_len: int, group: int):
        p = model.transformer.wte.weight
        super().__init__(model.config, batch_size, max_len, p.device, model.cache_dtype(),
                         torch.zeros(0, dtype=torch.long, device=p.device))
        self.rows, self.group = 0, group
        self.generated = 0  # the most tokens any group has generated: columns its beams may not share

    def shared_columns(self) -> int:
        """Of the columns attention reads, how many come first and are the same in every row of a group."""
        return max(0, self.filled - 1 - self.generated - self.start)

    def append(self, T: int):
        if self.filled + T > self.k.size(3):
            self._shift(-self.start)  # give back the columns that are padding in every row
        return super().append(T)

    def attend(self, q, k, v, mask, impl: str):
        if q.size(2) == 1 and not q.is_cuda and self.group > 1:
            return grouped_one_query_attention(q, k, v, mask, self.group, self.shared_columns())
        return super().attend(q, k, v, mask, impl)

    def _shift(self, offset: int) -> None:
        """Move the columns in use `offset` columns to the right (left if negative)."""
        if offset == 0:
            return
        src, dst = slice(self.start, self.filled), slice(self.start + offset, self.filled + offset)
        for buf in (self.k, self.v):
            for layer in range(buf.size(0)):
                buf[layer, :self.rows, :, dst] = buf[layer, :self.rows, :, src].clone()  # the ranges may overlap
        self.filled += offset
        self.set_pad(self.pad + offset)

    def reorder(self, index, generated=None) -> None:
        """Keep rows `index`, in that order (the surviving hypotheses, or the groups that go on).

        generated (groups,): the tokens each group has generated; its beams share every column
        before them, so only those are copied. None: whole rows move (whole groups). Rows move
        within the buffers, and only those that change: most beams stay in their rows.
        """
        moved = (index != torch.arange(index.numel(), device=index.device)).nonzero().squeeze(1)
        src = index[moved]
        if generated is None:
            starts = torch.full_like(moved, self.start)
        else:
            self.generated = int(generated.max()) if generated.numel() else 0
            starts = (self.filled - generated.repeat_interleave(self.group))[moved].clamp(min=self.start)
        if not self.k.is_cuda and set(moved.tolist()).isdisjoint(src.tolist()):
            # On a CPU, row by row, straight from source to destination: indexing would gather the
            # rows into a temporary first, and copy them twice.
            for d, s, c in zip(moved.tolist(), src.tolist(), starts.tolist()):
                for buf in (self.k, self.v):
                    buf[:, d, :, c:self.filled] = buf[:, s, :, c:self.filled]
        elif moved.numel():  # gathered first: one copy per layer, and rows may be read and overwritten
            c = int(starts.min())
            for layer in range(self.k.size(0)):  # a layer at a time, so the gathered rows stay in cache
                for buf in (self.k, self.v):
                    buf[layer, moved, :, c:self.filled] = buf[layer, src, :, c:self.filled]
        self.rows = index.numel()
        self.set_pad(self.pad[index])

    def insert(self, other: KVCache, rows: int) -> None:
        """Append the `rows` rows of `other` (new prompts, read into a cache of their own), each
        `group` times, aligned so that they end where this cache's rows do."""
        n = other.filled
        if n > self.filled:
            self._shift(n - self.filled)
        index = torch.arange(rows, device=self.k.device).repeat_interleave(self.group)
        dst = slice(self.rows, self.rows + index.numel())
        for layer in range(self.k.size(0)):
            self.k[layer, dst, :, self.filled - n:self.filled] = other.k[layer, index, :, :n]
            self.v[layer, dst, :, self.filled - n:self.filled] = other.v[layer, index, :, :n]
        new = (index.new_zeros(index.numel()) if other.pad is None else other.pad[index]) + self.filled - n
        self.rows = dst.stop
        self.set_pad(torch.cat([self.pad, new]))


def grouped_one_query_attention(q, k, v, mask, g: int, S: int):
    """Attention of one query per row, q (B, 1, ...) as (B, H, 1, D), where the first S keys and
    values are the same in each group of g rows: those are read once per group, by the group's g
    queries side by side, in plain matrix products (on a CPU, faster than SDPA's kernel for one query)."""
    B, H, _, D = q.shape

    def per_row(x, n):  # (B/g, H, g, n): a group's rows side by side -> (B, H, 1, n)
        return x.transpose(1, 2).reshape(B, H, 1, n)

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
