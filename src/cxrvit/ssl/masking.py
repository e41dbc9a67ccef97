"""Which patch tokens each method hides: MAE's random masking and I-JEPA's multi-block masking.

Both return index tensors (``[B, n]``, positions in the row-major patch grid) that
:func:`cxrvit.ssl.encoder.encode` gathers, so the encoder only ever computes visible tokens.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def random_masking(batch: int, num_patches: int, ratio: float, gen: torch.Generator):
    """MAE: keep a uniformly random ``1 - ratio`` of the patches per sample.

    Returns ``(keep [B, n_keep], masked [B, N - n_keep])``, both sorted so a token's order in the
    sequence follows the image (irrelevant to attention, but it makes debugging readable).
    """
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"mask ratio must be in (0, 1), got {ratio}")
    # MAE's `len_keep = int(L * (1 - mask_ratio))`: floor (196 patches at 0.9 keep 19; until 6 December, 20).
    n_keep = max(1, int(num_patches * (1 - ratio)))
    order = torch.rand(batch, num_patches, generator=gen).argsort(dim=1)
    keep, masked = order[:, :n_keep].sort(dim=1).values, order[:, n_keep:].sort(dim=1).values
    return keep, masked


@dataclass
class MultiBlockMasker:
    """I-JEPA's masks: ``n_targets`` rectangular target blocks and one large context block minus them.

    As in I-JEPA, the block *sizes* are drawn once per batch (so every sample predicts the same
    number of tokens and the batch stays rectangular) and the *positions* per sample; contexts are
    truncated to the shortest one in the batch for the same reason.
    """
    grid: int
    n_targets: int = 4
    target_scale: tuple[float, float] = (0.15, 0.2)
    target_aspect: tuple[float, float] = (0.75, 1.5)
    context_scale: tuple[float, float] = (0.85, 1.0)
    min_context: int = 4
    max_tries: int = 20

    def _block_size(self, scale, aspect, gen) -> tuple[int, int]:
        s = scale[0] + (scale[1] - scale[0]) * float(torch.rand(1, generator=gen))
        la, lb = math.log(aspect[0]), math.log(aspect[1])
        a = math.exp(la + (lb - la) * float(torch.rand(1, generator=gen)))
        area = s * self.grid * self.grid
        h = max(1, min(self.grid, int(round(math.sqrt(area * a)))))
        w = max(1, min(self.grid, int(round(math.sqrt(area / a)))))
        return h, w

    def _place(self, h: int, w: int, gen) -> torch.Tensor:
        top = int(torch.randint(0, self.grid - h + 1, (1,), generator=gen))
        left = int(torch.randint(0, self.grid - w + 1, (1,), generator=gen))
        m = torch.zeros(self.grid, self.grid, dtype=torch.bool)
        m[top:top + h, left:left + w] = True
        return m.flatten()

    def __call__(self, batch: int, gen: torch.Generator):
        """Returns ``(context [B, n_ctx], targets [B, n_targets, n_tgt])`` patch indices."""
        th, tw = self._block_size(self.target_scale, self.target_aspect, gen)
        ch, cw = self._block_size(self.context_scale, (1.0, 1.0), gen)
        targets, contexts = [], []
        for _ in range(batch):
            # Re-draw targets and context together until enough context survives the target removal
            # (on small grids four targets can cover nearly everything).
            for _ in range(self.max_tries):
                blocks = [self._place(th, tw, gen) for _ in range(self.n_targets)]
                union = torch.stack(blocks).any(dim=0)
                ctx = self._place(ch, cw, gen) & ~union
                if int(ctx.sum()) >= self.min_context:
                    break
            else:
                ctx = ~union
            targets.append(torch.stack([b.nonzero().squeeze(1) for b in blocks]))
            contexts.append(ctx.nonzero().squeeze(1))
        n_ctx = min(len(c) for c in contexts)
        if n_ctx < 1:
            raise ValueError(f"I-JEPA masking left no context tokens on a {self.grid}x{self.grid} grid; "
                             "lower ijepa.target_scale or n_targets")
        context = torch.stack([c[torch.randperm(len(c), generator=gen)[:n_ctx].sort().values] for c in contexts])
        return context, torch.stack(targets)
