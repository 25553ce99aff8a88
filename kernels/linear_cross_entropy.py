"""The language-model loss without the full logits: cross-entropy of x @ weightᵀ, a chunk of rows at a time.

The (positions, 50257) logits are the largest tensor of a training step; here no more than one
chunk of them exists, and each chunk's gradient is formed while its logits are at hand.
The weight may have more rows than the vocabulary (padded to an aligned size): those columns of
the logits are left out of the softmax, so the loss and gradients are the unpadded weight's.
"""

import torch

IGNORE_INDEX = -100  # target value excluded from the loss (prompt and padding positions)
LOSS_CHUNK = 1024  # positions per chunk of logits: 1024 x 50257 floats is 200 MB


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of logits = x @ weightᵀ, one chunk of rows at a time.

    Each chunk's gradient is formed in the forward pass and folded into the gradients of x and
    weight, so the backward only scales them.
    """

    @staticmethod
    def forward(ctx, x, weight, targets, label_smoothing, vocab, need_grad_x, need_grad_w):
        valid = targets != IGNORE_INDEX
        n = valid.sum().clamp(min=1)
        # matmuls in autocast's dtype when it is on (bf16 training), else the weight's
        cdt = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else weight.dtype
        w = weight.to(cdt)
        acc = torch.promote_types(cdt, torch.float32)  # the softmax in float32 at least (float64 stays float64)
        # a frozen head (LoRA fine-tuning) needs no weight gradient: a third of the work saved
        grad_w = torch.zeros(weight.shape, device=weight.device, dtype=acc) if need_grad_w else None
        # On a CPU only the scored rows go through the head (half of an E2E pair's positions are its
        # prompt); on a GPU that data-dependent shape would cost a host sync every step.
        rows = valid.nonzero().squeeze(1) if x.device.type == "cpu" else None
        xs, ts, oks = (x, targets, valid) if rows is None else (x[rows], targets[rows], valid[rows])
        grad_xs = torch.empty_like(xs) if need_grad_x else None
        total = torch.zeros((), device=x.device, dtype=acc)
        for s in range(0, xs.size(0), LOSS_CHUNK):
            xc, t, ok = xs[s:s + LOSS_CHUNK].to(cdt), ts[s:s + LOSS_CHUNK].clamp(min=0), oks[s:s + LOSS_CHUNK]
            logits = (xc @ w.t()).to(acc)
            logits[:, vocab:] = -torch.inf  # padding rows: no token (exp gives them probability and gradient 0)
            lse = logits.logsumexp(-1)
            nll = lse - logits.gather(1, t[:, None]).squeeze(1)
            # label smoothing: the target is (1 - ε) one-hot + ε uniform over the vocabulary
            if label_smoothing:
                loss = (1 - label_smoothing) * nll + label_smoothing * (lse - logits[:, :vocab].mean(-1))
            else:
                loss = nll
            total += (loss * ok).sum()
            if need_grad_x or need_grad_w:
                g = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                g.scatter_add_(1, t[:, None], g.new_full((g.size(0), 1), -(1 - label_smoothing)))
                if label_smoothing:
                    g[:, :vocab].sub_(label_smoothing / vocab)
                g.mul_((ok.to(acc) / n)[:, None])
                g = g.to(cdt)
                if need_grad_x:
                    grad_xs[s:s + LOSS_CHUNK] = g @ w
                if need_grad_w and cdt == acc:
                    grad_w.addmm_(g.t(), xc)  # in place: no (vocab, n_embd) temporary per chunk
                elif need_grad_w:
                    grad_w += g.t() @ xc
        grad_x = grad_xs if rows is None or not need_grad_x else torch.zeros_like(x).index_copy_(0, rows, grad_xs)
        ctx.save_for_backward(grad_x, grad_w)
        ctx.weight_dtype = weight.dtype
        return total / n

    @staticmethod
    def backward(ctx, grad_out):
        grad_x, grad_w = ctx.saved_tensors
        return (grad_x * grad_out if grad_x is not None else None,
                (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None, None, None, None, None,
                None)


def linear_cross_entropy(x, weight, targets, label_smoothing: float = 0.0, vocab: int | None = None):
    """cross_entropy((x @ weightᵀ)[:, :vocab], targets, ignore_index=IGNORE_INDEX, label_smoothing), memory-lean.
    x (N, C), weight (V, C) with V ≥ vocab (default: V), targets (N,)."""
    grad = torch.is_grad_enabled()
    vocab = weight.size(0) if vocab is None else vocab
    return _LinearCrossEntropy.apply(x, weight, targets, label_smoothing, vocab, grad and x.requires_grad,
                                     grad and weight.requires_grad)
