"""Evaluation: top-1, top-5 and loss of a model, each member, or the members' ensemble."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Tally:
    """Running sums of correct predictions and loss; exact over any batching or sharding."""

    def __init__(self) -> None:
        self.top1 = self.top5 = 0
        self.loss = 0.0
        self.count = 0

    def add(self, logits: Tensor, labels: Tensor) -> None:
        logits = logits.float()
        self.loss += F.cross_entropy(logits, labels, reduction="sum").item()
        k = min(5, logits.shape[-1])
        top = logits.topk(k, dim=-1).indices
        hit = top == labels[:, None]
        self.top1 += int(hit[:, 0].sum())
        self.top5 += int(hit.any(dim=1).sum())
        self.count += labels.numel()

    def as_tensor(self) -> Tensor:
        return torch.tensor([self.top1, self.top5, self.loss, self.count], dtype=torch.float64)

    def load_tensor(self, t: Tensor) -> None:
        self.top1, self.top5, self.loss, self.count = (int(t[0]), int(t[1]), float(t[2]),
                                                       int(t[3]))

    def result(self) -> dict[str, Any]:
        n = max(self.count, 1)
        return {"top1": self.top1 / n, "top5": self.top5 / n, "loss": self.loss / n,
                "count": self.count}


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], members: int,
             grown: bool, reduce: Any = None) -> dict[str, Any]:
    """Metrics of a grown net, or of each member and their ensemble (mean of logits).

    Returns {"top1", "top5", "loss", "count"} for a grown net; for members the ensemble's
    numbers at the top level plus "members": [per-member dicts]. `reduce`, if given, sums
    tallies across processes (DDP) so counts are exact over the whole split.
    """
    was_training = model.training
    model.eval()
    main, each = Tally(), [Tally() for _ in range(0 if grown else members)]
    for x, y in batches:
        logits = model(x)
        if grown:
            main.add(logits, y)
            continue
        for m, t in enumerate(each):
            t.add(logits[m], y)
        main.add(logits.float().mean(0), y)
    model.train(was_training)
    if reduce is not None:
        for t in [main, *each]:
            t.load_tensor(reduce(t.as_tensor()))
    out = main.result()
    if not grown:
        out["members"] = [t.result() for t in each]
    return out
