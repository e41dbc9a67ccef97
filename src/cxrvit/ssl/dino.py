"""DINO (Caron et al., 2021): self-distillation between a student and an EMA teacher, no labels.

The student sees 2 global and several local crops, the teacher only the global ones; the student
is trained to match the teacher's (centred, sharpened) distribution over ``out_dim`` prototypes
for every pair of different crops. Centring stops one prototype from winning everything,
sharpening (a low teacher temperature) stops the uniform solution: the two together are what
prevents collapse, so both are monitored (``teacher_entropy``, ``teacher_batch_entropy``).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from cxrvit.data.preprocess import Preprocessing
from cxrvit.engine.optim import warmup_cosine
from cxrvit.model.vit import VisionTransformer
from cxrvit.ssl.encoder import ema_update
from cxrvit.ssl.views import Photometric, random_resized_crop


@dataclass
class DinoConfig:
    out_dim: int = 65536             # prototypes; DINO's ViT-S default
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    norm_last_layer: bool = True     # weight-normalised last layer with fixed norm: more stable for ViT-S
    global_size: int = 224
    local_size: int = 96
    n_local: int = 8
    # DINO's defaults: global crops keep most of the chest, local crops are small enough to
    # force local-to-global correspondence.
    global_scale: list[float] = field(default_factory=lambda: [0.4, 1.0])
    local_scale: list[float] = field(default_factory=lambda: [0.05, 0.4])
    ratio: list[float] = field(default_factory=lambda: [0.75, 1.3333333])
    hflip: float = 0.0
    photometric: Photometric = field(default_factory=Photometric)
    student_temp: float = 0.1
    teacher_temp: float = 0.07       # after the warm-up
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: float = 30.0
    center_momentum: float = 0.9
    momentum_teacher: float = 0.996  # cosine schedule to 1.0 over training
    freeze_last_layer_epochs: float = 1.0
    drop_path: float = 0.1


class DINOHead(nn.Module):
    """MLP -> L2-normalised bottleneck -> weight-normalised prototypes (DINO's head, no BN)."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 norm_last_layer: bool = True):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, hidden_dim),
                                 nn.GELU(), nn.Linear(hidden_dim, bottleneck_dim))
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        # weight_norm with g fixed to 1 is simply a row-normalised weight: written out, no hooks.
        self.last_direction = nn.Parameter(torch.empty(out_dim, bottleneck_dim))
        nn.init.trunc_normal_(self.last_direction, std=0.02)
        self.last_gain = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1)
        return F.linear(x, F.normalize(self.last_direction, dim=-1) * self.last_gain)


class DINOLoss(nn.Module):
    def __init__(self, out_dim: int, student_temp: float, center_momentum: float):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student_out: torch.Tensor, teacher_out: torch.Tensor, n_crops: int, teacher_temp: float):
        """Cross-entropy between every teacher global crop and every *other* student crop."""
        student = (student_out / self.student_temp).chunk(n_crops)
        teacher_prob = F.softmax((teacher_out - self.center) / teacher_temp, dim=-1).detach()
        teacher = teacher_prob.chunk(2)
        total, pairs = 0.0, 0
        for iq, q in enumerate(teacher):
            for v, s in enumerate(student):
                if v == iq:
                    continue  # same view: trivially matchable
                total = total + torch.sum(-q * F.log_softmax(s, dim=-1), dim=-1).mean()
                pairs += 1
        self.update_center(teacher_out)
        return total / pairs, teacher_prob

    @torch.no_grad()
    def update_center(self, teacher_out: torch.Tensor) -> None:
        batch_center = teacher_out.float().sum(dim=0, keepdim=True)
        count = torch.tensor(float(len(teacher_out)), device=teacher_out.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_center)
            dist.all_reduce(count)
        self.center.mul_(self.center_momentum).add_(batch_center / count, alpha=1 - self.center_momentum)


class DINO(nn.Module):
    method = "dino"
    cls_token_note = "trained: DINO's objective is computed on the CLS token (teacher weights exported)"
    #: DINO's utils.clip_gradients: `optim.clip_grad` bounds each student parameter's gradient norm on its own.
    clip_mode = "per_param"

    def __init__(self, encoder: VisionTransformer, cfg: DinoConfig, preprocessing: Preprocessing):
        super().__init__()
        self.cfg = cfg
        self.pre = preprocessing
        self.student = encoder
        self.student_head = DINOHead(encoder.embed_dim, cfg.out_dim, cfg.hidden_dim, cfg.bottleneck_dim,
                                     cfg.norm_last_layer)
        self.teacher = copy.deepcopy(encoder)
        for blk in self.teacher.blocks:  # stochastic depth is for the student only
            blk.drop_path.drop_prob = 0.0
        self.teacher_head = copy.deepcopy(self.student_head)
        for p in list(self.teacher.parameters()) + list(self.teacher_head.parameters()):
            p.requires_grad_(False)
        self.loss_fn = DINOLoss(cfg.out_dim, cfg.student_temp, cfg.center_momentum)

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()
        self.teacher_head.eval()
        return self

    @property
    def momentum_base(self) -> float:
        return self.cfg.momentum_teacher

    def momentum_at(self, step: int, total: int) -> float:
        """DINO's teacher momentum: cosine from ``momentum_teacher`` to 1 over the ``total`` steps."""
        return warmup_cosine(step, total, 0, self.cfg.momentum_teacher, 1.0)

    def step_kwargs(self, epoch: float) -> dict:
        """Teacher temperature: linear warm-up from ``warmup_teacher_temp``, then constant."""
        c = self.cfg
        if epoch < c.warmup_teacher_temp_epochs:
            t = c.warmup_teacher_temp + (c.teacher_temp - c.warmup_teacher_temp) * epoch / c.warmup_teacher_temp_epochs
        else:
            t = c.teacher_temp
        return {"teacher_temp": t}

    def make_inputs(self, x: torch.Tensor, gen: torch.Generator) -> tuple:
        return (self.make_views(x, gen),)

    def make_views(self, x: torch.Tensor, gen: torch.Generator) -> list[torch.Tensor]:
        """2 global + ``n_local`` local crops of ``x`` (float grey in [0, 1]), normalised for the ViT."""
        c, ph = self.cfg, self.cfg.photometric
        views = []
        for i in range(2):
            v = random_resized_crop(x, c.global_size, c.global_scale, c.ratio, gen, c.hflip)
            # DINO's asymmetry: the first global view is always blurred, the second sometimes solarised.
            v = ph(v, gen, blur_p=1.0 if i == 0 else 0.1, solarize_p=0.0 if i == 0 else 0.2)
            views.append(v)
        for _ in range(c.n_local):
            v = random_resized_crop(x, c.local_size, c.local_scale, c.ratio, gen, c.hflip)
            views.append(ph(v, gen, blur_p=0.5, solarize_p=0.0))
        return [self.pre.normalize(v) for v in views]

    @staticmethod
    def _multicrop(backbone: VisionTransformer, head: DINOHead, views: list[torch.Tensor]) -> torch.Tensor:
        # One backbone pass per resolution (globals together, locals together), as DINO does.
        feats, start = [], 0
        while start < len(views):
            end = start
            while end < len(views) and views[end].shape[-1] == views[start].shape[-1]:
                end += 1
            feats.append(backbone(torch.cat(views[start:end])))
            start = end
        return head(torch.cat(feats))

    def forward(self, views: list[torch.Tensor], teacher_temp: float):
        with torch.no_grad():
            teacher_out = self._multicrop(self.teacher, self.teacher_head, views[:2]).float()
        student_out = self._multicrop(self.student, self.student_head, views).float()
        loss, teacher_prob = self.loss_fn(student_out, teacher_out, len(views), teacher_temp)
        with torch.no_grad():
            log_k = math.log(teacher_prob.shape[-1])
            ent = -(teacher_prob * teacher_prob.clamp_min(1e-12).log()).sum(-1).mean() / log_k
            mean_p = teacher_prob.mean(0)
            batch_ent = -(mean_p * mean_p.clamp_min(1e-12).log()).sum() / log_k
        # Collapse signatures: to one prototype -> both entropies -> 0; to uniform -> per-sample -> 1.
        return loss, {"teacher_entropy": float(ent), "teacher_batch_entropy": float(batch_ent),
                      "teacher_temp": teacher_temp}

    def after_backward(self, epoch: float) -> None:
        if epoch < self.cfg.freeze_last_layer_epochs:
            # DINO: keep the prototypes fixed at first, or training tends to collapse early.
            self.student_head.last_direction.grad = None
            self.student_head.last_gain.grad = None

    def after_step(self, momentum: float) -> None:
        ema_update(self.teacher, self.student, momentum)
        ema_update(self.teacher_head, self.student_head, momentum)

    def export_encoder(self) -> VisionTransformer:
        return self.teacher  # DINO evaluates (and releases) the teacher: it is an ensemble of students
