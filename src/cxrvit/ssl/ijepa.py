"""I-JEPA (Assran et al., 2023): predict the *representations* of hidden blocks from a context block.

A context encoder (the ViT being trained) sees one large block of the image with the target
blocks cut out; a narrow predictor, told where each target block is (mask tokens plus their
positions), predicts the target encoder's features there. The target encoder is an EMA of the
context encoder and sees the whole image; its outputs are layer-normed, as in the paper. No
pixels are reconstructed and no hand-made view augmentations are needed beyond a crop.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from cxrvit.data.preprocess import Preprocessing
from cxrvit.model.vit import Block, VisionTransformer, sincos_pos_embed
from cxrvit.ssl.encoder import ema_update, encode, init_sincos_pos_embed
from cxrvit.ssl.masking import MultiBlockMasker
from cxrvit.ssl.views import random_resized_crop

#: The target encoder's momentum runs linearly from ``momentum_teacher`` to 1 over 1.25x the run's steps: 1.25 is the
#: default of the reference's ``init_opt(ipe_scale=...)``; its shipped configs set 1.0 (docs/ssl.md: a deviation,
#: kept). cxrvit's lr and weight-decay schedules span exactly the run, as the reference's do at 1.0.
IPE_SCALE = 1.25


def fix_init_weight(blocks) -> None:
    """I-JEPA's ``fix_init_weight``: after the trunc-normal init, divide each block's residual-branch output
    weights (``attn.proj``, ``mlp.fc2``) by ``sqrt(2 * layer_id)``, ``layer_id`` = block index + 1, so deeper
    blocks start closer to the identity. I-JEPA only (its encoder and predictor): DINO and MAE do not."""
    with torch.no_grad():
        for layer_id, blk in enumerate(blocks, start=1):
            blk.attn.proj.weight.div_(math.sqrt(2.0 * layer_id))
            blk.mlp.fc2.weight.div_(math.sqrt(2.0 * layer_id))


@dataclass
class IJepaConfig:
    size: int = 224
    scale: list[float] = field(default_factory=lambda: [0.4, 1.0])   # crop before masking
    n_targets: int = 4
    target_scale: list[float] = field(default_factory=lambda: [0.15, 0.2])
    target_aspect: list[float] = field(default_factory=lambda: [0.75, 1.5])
    context_scale: list[float] = field(default_factory=lambda: [0.85, 1.0])
    predictor_dim: int = 192
    predictor_depth: int = 6
    predictor_heads: int = 6
    momentum_teacher: float = 0.996  # linear towards 1.0, reaching 1 at IPE_SCALE x the run (I-JEPA's schedule)


class Predictor(nn.Module):
    def __init__(self, enc_dim: int, dim: int, depth: int, heads: int):
        super().__init__()
        self.embed = nn.Linear(enc_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.proj = nn.Linear(dim, enc_dim)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.apply(VisionTransformer._init_weights)
        fix_init_weight(self.blocks)

    def forward(self, ctx: torch.Tensor, ctx_idx: torch.Tensor, tgt_idx: torch.Tensor, grid: int) -> torch.Tensor:
        """``ctx [B, 1+Nc, D]`` encoded context, ``tgt_idx [B, M, Nt]`` -> predictions ``[B*M, Nt, D]``."""
        b, m, nt = tgt_idx.shape
        x = self.embed(ctx)
        d = x.shape[-1]
        pos = sincos_pos_embed(d, grid).to(x.device, x.dtype).expand(b, -1, -1)   # CLS position first
        gather = lambda idx: torch.gather(pos, 1, idx.unsqueeze(-1).expand(-1, -1, d))  # noqa: E731
        cls_idx = torch.zeros(b, 1, dtype=torch.long, device=x.device)
        x = x + gather(torch.cat((cls_idx, ctx_idx + 1), dim=1))
        # One predictor pass per target block, batched: the context is repeated M times.
        x = x.repeat_interleave(m, dim=0)
        # In the tokens' dtype: an fp32 parameter plus bf16 positions promotes the queries to fp32, and
        # the cat below would then promote the whole sequence, so the predictor's residual stream left bf16.
        queries = self.mask_token.to(x.dtype) + gather(tgt_idx.reshape(b, m * nt) + 1).reshape(b * m, nt, d)
        x = torch.cat((x, queries), dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.proj(self.norm(x[:, -nt:]))


class IJEPA(nn.Module):
    method = "ijepa"
    clip_mode = "global"  # `optim.clip_grad` (0 in the recipe; I-JEPA's reference does not clip) bounds the total norm
    cls_token_note = ("learnt through attention only: I-JEPA has no CLS token, so cxrvit carries DINO's "
                      "CLS token (trunc-normal init) through both encoders; no loss reads it, fine-tuning trains it")

    def __init__(self, encoder: VisionTransformer, cfg: IJepaConfig, preprocessing: Preprocessing):
        super().__init__()
        self.cfg = cfg
        self.pre = preprocessing
        init_sincos_pos_embed(encoder)
        fix_init_weight(encoder.blocks)   # before the copy: the target encoder starts equal to the context one
        self.context_encoder = encoder
        self.target_encoder = copy.deepcopy(encoder)
        for blk in self.target_encoder.blocks:
            blk.drop_path.drop_prob = 0.0
        for p in self.target_encoder.parameters():
            p.requires_grad_(False)
        self.predictor = Predictor(encoder.embed_dim, cfg.predictor_dim, cfg.predictor_depth, cfg.predictor_heads)
        grid = cfg.size // encoder.patch_size
        self.masker = MultiBlockMasker(grid, cfg.n_targets, tuple(cfg.target_scale), tuple(cfg.target_aspect),
                                       tuple(cfg.context_scale))

    def train(self, mode: bool = True):
        super().train(mode)
        self.target_encoder.eval()
        return self

    @property
    def momentum_base(self) -> float:
        return self.cfg.momentum_teacher

    def momentum_at(self, step: int, total: int) -> float:
        """I-JEPA's target-encoder momentum (its ``src/train.py``): linear from ``momentum_teacher`` towards 1 over
        ``IPE_SCALE * total`` steps, so it ends the run at ~0.9992 (0.996 -> 1 over 1.25x the run), not at 1 as the
        reference's configs (``ipe_scale: 1.0``) do."""
        m0 = self.cfg.momentum_teacher
        return m0 + step * (1.0 - m0) / (total * IPE_SCALE)

    def step_kwargs(self, epoch: float) -> dict:
        return {}

    def make_inputs(self, x: torch.Tensor, gen: torch.Generator) -> tuple:
        grey = random_resized_crop(x, self.cfg.size, self.cfg.scale, (0.75, 1.3333333), gen)
        ctx_idx, tgt_idx = self.masker(len(grey), gen)
        return grey, ctx_idx.to(grey.device), tgt_idx.to(grey.device)

    def forward(self, grey: torch.Tensor, ctx_idx: torch.Tensor, tgt_idx: torch.Tensor):
        x = self.pre.normalize(grey)
        b, m, nt = tgt_idx.shape
        with torch.no_grad():
            h = encode(self.target_encoder, x)[:, 1:].float()
            h = F.layer_norm(h, h.shape[-1:])
            d = h.shape[-1]
            target = torch.gather(h, 1, tgt_idx.reshape(b, m * nt, 1).expand(-1, -1, d)).reshape(b * m, nt, d)
        ctx = encode(self.context_encoder, x, ctx_idx)
        pred = self.predictor(ctx, ctx_idx, tgt_idx, grey.shape[-1] // self.context_encoder.patch_size).float()
        loss = F.smooth_l1_loss(pred, target)
        # A collapsed target encoder maps every patch to the same vector: its spread goes to 0.
        return loss, {"target_std": float(h.std(dim=1).mean()), "context_tokens": ctx_idx.shape[1]}

    def after_backward(self, epoch: float) -> None:
        pass

    def after_step(self, momentum: float) -> None:
        ema_update(self.target_encoder, self.context_encoder, momentum)

    def export_encoder(self) -> VisionTransformer:
        return self.target_encoder  # I-JEPA evaluates the target encoder
