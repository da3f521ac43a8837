"""`fer train fit`: the projection W trained on cached pairs (docs/method.md).

Student I = L2(W clip_embedding), teacher E = the cached (L2-normalised) teacher feature, loss the
symmetric InfoNCE `0.5*CE(s*I@E.T, arange(N)) + 0.5*CE(s*E@I.T, arange(N))` with s = 100; SGD with
the paper's settings; only W (a bias-free Linear, PyTorch's default init) is trained. A seeded
fraction of the pairs is held out to report validation loss and top-1 retrieval (teacher <-> student
within held-out batches of `batch_size`). The result is saved in this project's projection format with
the config, the cache's fingerprint and the metrics inside, so the file says how it was made.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from model.projection import save_projection
from model.train.cache import PairCache
from model.train.config import FitConfig

log = logging.getLogger(__name__)


@dataclass
class FitResult:
    projection: str
    train_pairs: int
    val_pairs: int
    first_loss: float
    history: list[dict] = field(default_factory=list)  # one entry per epoch

    @property
    def final(self) -> dict:
        return self.history[-1] if self.history else {}


def symmetric_infonce(student: torch.Tensor, teacher: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """Row i of each is the same image; every other row of the batch is a negative."""
    logits = logit_scale * student @ teacher.T
    target = torch.arange(len(student), device=student.device)
    return 0.5 * F.cross_entropy(logits, target) + 0.5 * F.cross_entropy(logits.T, target)


def split_rows(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (train, held-out) row numbers; no held-out set when it would be under 2 pairs."""
    order = np.random.default_rng(seed).permutation(n)
    n_val = int(n * val_fraction)
    if n_val < 2:
        if val_fraction > 0:
            log.warning("%d pairs are too few to hold out %.1f%%: no validation", n, 100 * val_fraction)
        n_val = 0
    if n - n_val < 2:
        raise ValueError(f"need at least 2 training pairs, the cache gives {n - n_val}")
    return order[n_val:], order[:n_val]


@torch.no_grad()
def evaluate(head: torch.nn.Linear, cache: PairCache, rows: np.ndarray, cfg: FitConfig) -> dict:
    """Held-out loss and top-1 retrieval both ways, over batches of `batch_size` held-out pairs."""
    device = head.weight.device
    loss_sum = s2t = t2s = 0.0
    for start in range(0, len(rows), cfg.batch_size):
        clip, teacher = cache.gather(rows[start : start + cfg.batch_size])
        student, teacher = F.normalize(head(clip.to(device)), dim=-1), teacher.to(device)
        target = torch.arange(len(student), device=device)
        similarity = student @ teacher.T
        loss_sum += float(symmetric_infonce(student, teacher, cfg.logit_scale)) * len(student)
        s2t += float((similarity.argmax(dim=1) == target).sum())
        t2s += float((similarity.argmax(dim=0) == target).sum())
    n = len(rows)
    return {
        "val_loss": loss_sum / n,
        "val_top1_student_to_teacher": s2t / n,
        "val_top1_teacher_to_student": t2s / n,
    }


def fit(cache_dir: Path, out_path: Path, cfg: FitConfig, device: str = "cpu") -> FitResult:
    cache = PairCache(cache_dir)
    clip_settings = cache.settings["clip"]
    train_rows, val_rows = split_rows(len(cache), cfg.val_fraction, cfg.seed)
    log.info(
        "fitting W %d -> %d on %d pairs (%d held out)",
        cache.clip_dim,
        cache.teacher_dim,
        len(cache),
        len(val_rows),
    )

    torch.manual_seed(cfg.seed)
    head = torch.nn.Linear(cache.clip_dim, cache.teacher_dim, bias=False).to(device)
    optimiser = torch.optim.SGD(
        head.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    rng = np.random.default_rng(cfg.seed)
    result = FitResult(str(out_path), len(train_rows), len(val_rows), first_loss=math.nan)
    steps_per_epoch = math.ceil(len(train_rows) / cfg.batch_size)
    step = 0
    for epoch in range(1, cfg.epochs + 1):
        order = rng.permutation(train_rows)
        loss_sum = 0.0
        bar = tqdm(range(0, len(order), cfg.batch_size), desc=f"epoch {epoch}/{cfg.epochs}", unit="step")
        for start in bar:
            clip, teacher = cache.gather(order[start : start + cfg.batch_size])
            student = F.normalize(head(clip.to(device)), dim=-1)
            loss = symmetric_infonce(student, teacher.to(device), cfg.logit_scale)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            value = loss.item()
            if step == 0:
                result.first_loss = value
            loss_sum += value * len(clip)
            step += 1
            bar.set_postfix(loss=f"{value:.4f}")
            if step % cfg.log_interval == 0:
                log.info("epoch %d step %d/%d loss %.4f", epoch, step, steps_per_epoch * cfg.epochs, value)
        record = {"epoch": epoch, "train_loss": loss_sum / len(order)}
        if len(val_rows):
            record |= evaluate(head, cache, val_rows, cfg)
        log.info("epoch %d: %s", epoch, ", ".join(f"{k} {v:.4f}" for k, v in record.items() if k != "epoch"))
        result.history.append(record)

    training = {
        "config": asdict(cfg),
        "data": {
            "cache": str(cache_dir),
            "fingerprint": cache.fingerprint,
            "pairs": len(cache),
            "train_pairs": len(train_rows),
            "val_pairs": len(val_rows),
            "settings": cache.settings,
        },
        "first_loss": result.first_loss,
        "history": result.history,
    }
    save_projection(
        out_path,
        head.weight,
        clip_model=clip_settings["clip_model"],
        preprocess=clip_settings["preprocess"],
        training=training,
    )
    log.info("saved the projection to %s", out_path)
    return result
