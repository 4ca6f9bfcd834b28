"""The loss: next-token cross-entropy summed over target tokens (the loop normalises by the step's target count),
the chunked cross-entropy that never builds the (tokens x vocab) logits, and the loss / perplexity of a dataset
(used by the loop's validation and by `trainer eval`)."""

from __future__ import annotations

import math

import torch

from trainer.data import IGNORE, collate
from trainer.errors import UserError


def token_loss_sum(model, batch: dict, chunked: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of next-token cross-entropy over target tokens, number of target tokens) for one batch.

    A sum, not a mean: the loop divides by the target tokens of the whole optimizer step, so the loss and
    gradient do not depend on how samples are split into micro-batches, accumulation steps or ranks.
    `token_loss_stats` also counts the correctly predicted targets (token accuracy).
    """
    loss, n, _ = token_loss_stats(model, batch, chunked)
    return loss, n


def token_loss_stats(model, batch: dict, chunked: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss sum, target tokens, correct targets) for one batch: `token_loss_sum` plus the number of target
    tokens whose argmax logit is the label (token accuracy = correct / targets; no gradient flows through it).

    The count comes from the logits the loss already computes (each chunk's argmax in the chunked path), so it
    costs no extra memory. Ties go to the lowest token id, as `torch.argmax`. attention_mask stays None on
    purpose: position_ids restarts give the block-diagonal causal mask.
    """
    import torch.nn.functional as F

    targets = batch["labels"][:, 1:]
    head = plain_lm_head(model) if chunked else None
    with lm_head_input(head) as captured:
        out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    if captured:  # the model's logits were never built: cross-entropy from lm_head's input, in chunks
        mask = targets != IGNORE
        hidden = captured[0][:, :-1][mask]
        loss, correct = ChunkedCrossEntropy.apply(hidden, head.weight, targets[mask], torch.is_grad_enabled())
        return loss, mask.sum(), correct
    logits = out.logits[:, :-1]
    loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )
    mask = targets != IGNORE
    correct = (logits.detach().argmax(-1) == targets)[mask].sum()
    return loss, mask.sum(), correct


# ----------------------------------------------------------------------------------------------- chunked loss
# The (tokens x vocab) logits of small models with big vocabularies dominate training memory (SmolLM2: 49,152
# entries per token, 400 MB for 8 rows of 256 in fp32, about four such tensors alive around the loss). Instead the
# loss reads lm_head's input, keeps only the target positions (prompt tokens need no logits at all), and runs the
# vocabulary projection a chunk of rows at a time, computing each chunk's gradient right away: peak memory for the
# loss is one chunk of logits, and no FLOP is added (the softmax gradient is the usual one, just computed early).
# Recipe key model.chunked_loss: false turns it off (the model's own logits and F.cross_entropy).
CE_CHUNK_BYTES = 64 * 2**20  # fp32 logits alive at a time in the chunked cross-entropy
LOGIT_SCALING_KEYS = (
    "final_logit_softcapping",
    "logit_scale",
    "logits_scaling",
    "output_multiplier",
    "lm_head_multiplier",
    "attn_logit_softcapping_final",
)


def plain_lm_head(model):
    """The model's output layer when it is a plain Linear applied as-is (logits = lm_head(hidden)), else None.

    None (the full-logits path) for a LoRA-wrapped or quantized head, a head with a bias, or a model that scales or
    soft-caps its logits after the head (Gemma 2, Cohere, Granite, ...).
    """
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):  # DDP, DeepSpeed engine
        model = model.module
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return None
    cfg = getattr(model, "config", None)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    if any(getattr(cfg, k, None) not in (None, 1, 1.0) for k in LOGIT_SCALING_KEYS):
        return None
    return head


class lm_head_input:  # noqa: N801 - used as a context manager, like torch's
    """While active, lm_head(hidden) stores `hidden` and returns empty logits (its input cut to 0 positions).

    A pre-hook rather than calling the backbone ourselves: the model is still called through its wrappers
    (DDP's forward prepares gradient reduction), so only the logits change. Yields the list the input lands in;
    it stays empty when there is no head or the model never calls it as a module.
    """

    def __init__(self, head):
        self.head, self.captured, self.handle = head, [], None

    def _hook(self, module, args):
        self.captured.append(args[0])
        return (args[0][..., :0, :],) + tuple(args[1:])

    def __enter__(self):
        if self.head is not None:
            self.handle = self.head.register_forward_pre_hook(self._hook)
        return self.captured

    def __exit__(self, *exc):
        if self.handle is not None:
            self.handle.remove()
        if len(self.captured) > 1:  # called more than once: not the plain forward this expects
            raise UserError(
                "lm_head ran more than once in one forward, which the chunked loss does not support "
                "for this model; set model.chunked_loss: false in the recipe"
            )
        return False


class ChunkedCrossEntropy(torch.autograd.Function):
    """(sum_i CE(hidden_i @ weight.T, target_i), #{i: argmax_v (hidden_i @ weight.T)_v == target_i}) over (T, d)
    hidden rows, a chunk of rows at a time. The count (token accuracy's numerator, int64) has no gradient.

    The loss is a sum, so d(loss)/d(logits) = softmax - onehot is known in the forward: each chunk's gradients
    into hidden (and into weight when it trains) are computed there and only scaled by the incoming gradient
    in backward. Matmuls run in the ambient autocast dtype, log-softmax in fp32, like F.cross_entropy on
    `logits.float()`.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, grad_enabled: bool):
        need_h = grad_enabled and ctx.needs_input_grad[0]
        need_w = grad_enabled and ctx.needs_input_grad[1]
        rows = max(1, CE_CHUNK_BYTES // (4 * weight.shape[0]))
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        correct = torch.zeros((), dtype=torch.int64, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        for start in range(0, hidden.shape[0], rows):
            h, t = hidden[start : start + rows], targets[start : start + rows]
            logits = torch.matmul(h, weight.t()).float()
            lse = torch.logsumexp(logits, dim=-1)
            correct += (logits.argmax(dim=-1) == t).sum()  # before the in-place softmax below
            total += (lse - logits.gather(1, t.unsqueeze(1)).squeeze(1)).sum()
            if need_h or need_w:
                probs = logits.sub_(lse.unsqueeze(1)).exp_()  # softmax, in place of the logits
                probs[torch.arange(t.shape[0], device=t.device), t] -= 1.0
                if need_h:
                    grad_h[start : start + rows] = torch.matmul(probs.to(weight.dtype), weight).to(grad_h.dtype)
                if need_w:
                    grad_w += torch.matmul(probs.t().to(h.dtype), h).float()
        ctx.save_for_backward(*(g for g in (grad_h, grad_w) if g is not None))
        ctx.has = (need_h, need_w)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(correct)
        return total, correct

    @staticmethod
    def backward(ctx, grad_out, _grad_correct):
        saved = list(ctx.saved_tensors)
        grad_h = None
        if ctx.has[0]:
            g = saved.pop(0)
            grad_h = (g * grad_out).to(g.dtype)
        grad_w = (saved.pop(0) * grad_out).to(ctx.weight_dtype) if ctx.has[1] else None
        return grad_h, grad_w, None, None


@torch.no_grad()
def dataset_loss(
    model,
    rows,
    *,
    batch_size: int,
    pad_id: int,
    device,
    rank: int = 0,
    world: int = 1,
    reduce=None,
    max_batches: int | None = None,
) -> dict:
    """Mean next-token loss, perplexity and token accuracy over every target token of `rows` (rank r takes rows
    r, r+world, ...): {"loss", "ppl", "token_accuracy", "tokens"}.

    `reduce(tensor)` sums across ranks (accelerator.reduce); perplexity is exp(mean token loss); token accuracy is
    the share of target tokens whose argmax prediction is the label. Every rank runs the same number of forward
    passes, the most any rank needs: a rank whose rows ran out (fewer rows than processes, or an uneven split) runs
    a one-token batch with no target, which adds nothing to the sums, so a model wrapper that communicates inside
    forward cannot leave one rank waiting, and `reduce` is reached by all.
    """
    was_training = model.training
    model.eval()
    mine = list(range(rank, len(rows), world))
    n_batches = math.ceil(math.ceil(len(rows) / world) / batch_size)
    if max_batches is not None:
        mine, n_batches = mine[: max_batches * batch_size], min(n_batches, max_batches)
    empty = [{"input_ids": [pad_id], "labels": [IGNORE], "position_ids": [0]}]
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    for start in range(0, n_batches * batch_size, batch_size):
        part = mine[start : start + batch_size]
        batch = collate(rows.select(part) if part else empty, pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        loss_sum, n, correct = token_loss_stats(model, batch)
        totals += torch.stack([loss_sum.double(), n.double(), correct.double()])
    if reduce is not None:
        totals = reduce(totals)
    model.train(was_training)
    loss_sum, n, correct = totals.tolist()
    loss = loss_sum / n if n else float("nan")
    return {
        "loss": loss,
        "ppl": math.exp(min(loss, 50.0)) if n else float("nan"),
        "token_accuracy": correct / n if n else float("nan"),
        "tokens": int(n),
    }
