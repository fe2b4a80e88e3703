"""Stage-2 training loss."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def positive_cross_entropy(x0_hat: Tensor, mask: Tensor, tau: float = 100.0) -> Tensor:
    """Cross-entropy of softmax(tau * x0_hat) over the valid candidates against index 0.

    x0_hat [B, K] predicted clean scores, mask [B, K] bool valid candidates -> scalar (mean over B).
    For the one-hot target this equals KL(target || prediction); we name it for what it computes.
    """
    logits = (tau * x0_hat.float()).masked_fill(~mask, float("-inf"))
    return -F.log_softmax(logits, dim=-1)[:, 0].mean()
