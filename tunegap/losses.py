"""The vocabulary projection and cross-entropy fused and chunked, so the [tokens x vocab] logits never exist.

Why: with a 49k vocabulary the loss side of a small model is heavy on a CPU. The plain path,
`F.cross_entropy(head(h).float(), y)`, writes the bf16 logits, an fp32 copy, the log-softmax, a zero-filled
gradient and its fp32 -> bf16 cast, each as large as tokens x vocab: about 0.3 GB of memory traffic and
peak memory for 400 loss tokens, for work that is not a matmul at all. Here each chunk of rows computes its
logits, their log-sum-exp and, in the same pass, the gradient of the summed loss with respect to those
logits (softmax minus one-hot, Goodfellow et al. 2016, Eq. 6.30), which is immediately multiplied back through
the head: only the [tokens x hidden] input gradient (and the head's weight gradient, if it trains) outlives
the chunk. The same idea as Liger Kernel's FusedLinearCrossEntropy (Hsu et al. 2024) and Apple's Cut Cross-
Entropy (Wijmans et al. 2024), in plain PyTorch ops so it runs on any device.

FLOPs are those of the unfused path, no more: the forward matmul (2·n·d·V), the input gradient (2·n·d·V) and,
when the head trains, its weight gradient (2·n·d·V). They run in the forward pass, so a FlopCounterMode
around forward+backward counts the same total as before.
"""

from __future__ import annotations

IGNORE_INDEX = -100  # the one home of the no-loss label (PyTorch's cross_entropy default ignore_index)
CHUNK_ROWS = 256  # 256 x 49,152 fp32 logits = 50 MB alive at once, against 80 MB per copy for 400 full rows


def _compute_dtype(hidden):
    import torch

    device = hidden.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype


def _chunks(n: int, size: int):
    return [(s, min(n, s + size)) for s in range(0, n, size)]


def _chunk_loss(h, w, y):
    """Summed cross-entropy of one chunk in fp32, and the fp32 logits it used (for the gradient)."""
    import torch

    logits = (h @ w.t()).float()  # bf16 matmul under autocast, as the unfused head; the softmax is fp32
    lse = torch.logsumexp(logits, dim=-1)
    valid = y != IGNORE_INDEX
    safe = torch.where(valid, y, torch.zeros_like(y))
    picked = logits.gather(1, safe[:, None]).squeeze(1)
    return ((lse - picked) * valid).sum(), logits, lse, valid, safe


class _LinearCrossEntropy:
    """Autograd function (built lazily so importing tunegap does not import torch)."""

    fn = None

    @classmethod
    def get(cls):
        if cls.fn is None:
            import torch

            class LinearCrossEntropy(torch.autograd.Function):
                @staticmethod
                def forward(ctx, hidden, weight, targets, dtype, chunk_rows):
                    h, w = hidden.to(dtype), weight.to(dtype)
                    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
                    grad_h = torch.empty_like(hidden)
                    grad_w = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
                    for s, e in _chunks(h.shape[0], chunk_rows):
                        loss, logits, lse, valid, safe = _chunk_loss(h[s:e], w, targets[s:e])
                        total += loss
                        # d(sum loss)/d(logits) = softmax - onehot, zero on ignored rows; built in place
                        grad = logits.sub_(lse[:, None]).exp_()
                        grad[torch.arange(e - s, device=grad.device), safe] -= 1.0
                        grad.mul_(valid[:, None])
                        grad = grad.to(dtype)
                        grad_h[s:e] = grad @ w
                        if grad_w is not None:
                            grad_w += (grad.t() @ h[s:e]).float()
                    ctx.save_for_backward(grad_h, grad_w if grad_w is not None else torch.empty(0))
                    ctx.has_grad_w = grad_w is not None
                    ctx.weight_dtype = weight.dtype
                    return total

                @staticmethod
                def backward(ctx, grad_out):
                    grad_h, grad_w = ctx.saved_tensors
                    gh = grad_h * grad_out.to(grad_h.dtype)
                    gw = (grad_w * grad_out).to(ctx.weight_dtype) if ctx.has_grad_w else None
                    return gh, gw, None, None, None

            cls.fn = LinearCrossEntropy
        return cls.fn


def linear_cross_entropy(hidden, weight, targets, *, chunk_rows: int = CHUNK_ROWS):
    """Summed cross-entropy (fp32 scalar) of `hidden @ weight.T` against `targets` (IGNORE_INDEX rows count zero).

    `hidden` [n, d], `weight` [V, d] (a head's weight), `targets` [n]. Under autocast the matmuls run in the
    autocast dtype, the log-sum-exp in fp32, exactly as `F.cross_entropy(F.linear(h, w).float(), y)` would.
    Without gradients (evaluation) no gradient is built, just the chunked loss.
    """
    import torch

    dtype = _compute_dtype(hidden)
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    if hidden.shape[0] == 0:
        return (hidden.sum() * 0.0).float() + (weight.sum() * 0.0 if weight.requires_grad else 0.0)
    with torch.autocast(hidden.device.type, enabled=False):
        if not needs_grad:
            h, w = hidden.to(dtype), weight.to(dtype)
            return sum(_chunk_loss(h[s:e], w, targets[s:e])[0] for s, e in _chunks(h.shape[0], chunk_rows))
        return _LinearCrossEntropy.get().apply(hidden, weight, targets, dtype, chunk_rows)


def _token_logp_chunk(h, w, y, temperature: float, want_grad: bool):
    """log softmax(h @ w.T / T)[y] per row in fp32, and (want_grad) d logp / d h per row: each row's log-prob
    depends on its own hidden state only, so its gradient is one [d] row, (onehot - softmax) @ w / T."""
    import torch

    logits = (h @ w.t()).float().div_(temperature)
    lse = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(1, y[:, None]).squeeze(1) - lse
    if not want_grad:
        return logp, None
    grad = logits.sub_(lse[:, None]).exp_().neg_()  # -softmax, in place
    grad[torch.arange(len(y), device=grad.device), y] += 1.0
    return logp, (grad.div_(temperature).to(h.dtype) @ w)


class _LinearTokenLogprobs:
    """Autograd function (built lazily so importing tunegap does not import torch)."""

    fn = None

    @classmethod
    def get(cls):
        if cls.fn is None:
            import torch

            class LinearTokenLogprobs(torch.autograd.Function):
                @staticmethod
                def forward(ctx, hidden, weight, targets, dtype, chunk_rows, temperature):
                    h, w = hidden.to(dtype), weight.to(dtype)
                    logp = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
                    jac = torch.empty_like(hidden)
                    for s, e in _chunks(h.shape[0], chunk_rows):
                        logp[s:e], rows = _token_logp_chunk(h[s:e], w, targets[s:e], temperature, True)
                        jac[s:e] = rows
                    ctx.save_for_backward(jac)
                    return logp

                @staticmethod
                def backward(ctx, grad_out):
                    (jac,) = ctx.saved_tensors
                    return jac * grad_out[:, None].to(jac.dtype), None, None, None, None, None

            cls.fn = LinearTokenLogprobs
        return cls.fn


def linear_token_logprobs(hidden, weight, targets, *, temperature: float = 1.0, chunk_rows: int = CHUNK_ROWS):
    """log softmax(hidden @ weight.T / temperature)[targets] per row (fp32 [n]): a policy's log-probabilities of
    its sampled tokens (RL objectives), with the [rows x vocab] logits alive one chunk at a time.

    The same idea as `linear_cross_entropy`, for a loss that weights each token differently: the per-row
    gradient (onehot - softmax) @ weight is built in the forward pass, so the FLOPs are the unfused path's
    (forward and input gradient, 2·n·d·V each). The head must be frozen (a trained head's weight gradient
    would need every row's softmax kept until backward); callers use the plain path when it trains."""
    import torch

    if weight.requires_grad and torch.is_grad_enabled():
        raise ValueError("linear_token_logprobs: the head trains; use the plain path (head(h).log_softmax)")
    dtype = _compute_dtype(hidden)
    with torch.autocast(hidden.device.type, enabled=False):
        if not (torch.is_grad_enabled() and hidden.requires_grad):
            h, w = hidden.to(dtype), weight.to(dtype)
            parts = [_token_logp_chunk(h[s:e], w, targets[s:e], temperature, False)[0]
                     for s, e in _chunks(h.shape[0], chunk_rows)]
            return torch.cat(parts) if parts else torch.zeros(0, device=hidden.device)
        return _LinearTokenLogprobs.get().apply(hidden, weight, targets, dtype, chunk_rows, temperature)
