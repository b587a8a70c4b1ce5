"""Pretraining on the mixed corpus: every example is one problem with either its direct answer or
(rarer, probability ``careful_share``) its careful solution. The loss covers the completion only —
operand digits are uniform noise — and starts at the path-choice token, so a model's unprompted
P("[") after "=" learns the careful share of the mix."""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass

import torch

from rast_engine.toy.task import Problem, sample_problems


@dataclass(frozen=True)
class PretrainConfig:
    steps: int
    batch: int
    lr: float
    careful_share: float
    seed: int
    warmup: int = 50
    weight_decay: float = 0.01

    def __post_init__(self) -> None:
        if not 0 < self.careful_share < 1:
            raise ValueError(f"careful_share must be in (0, 1), got {self.careful_share}")
        if self.steps <= self.warmup or self.batch < 2:
            raise ValueError("need steps > warmup and batch >= 2")


def encode_rows(tokenizer, problems: list[Problem], completions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, L] ids (<bos> prompt completion <eos>, right-padded) and a mask of completion targets."""
    rows, masks = [], []
    for p, c in zip(problems, completions):
        prompt = tokenizer(p.prompt)["input_ids"]
        full = prompt + tokenizer(c, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(full)
        masks.append([False] * len(prompt) + [True] * (len(full) - len(prompt)))
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (r, m) in enumerate(zip(rows, masks)):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(m)] = torch.tensor(m)
    return ids, mask


def token_nll(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL over positions whose target is in ``mask``."""
    logits = model(input_ids=ids[:, :-1]).logits.float()
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    return (nll * mask[:, 1:]).sum()


def lr_at(step: int, cfg: PretrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / (cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def pretrain(model, tokenizer, cfg: PretrainConfig, exclude: set[tuple[int, int]], log=print) -> None:
    rng = random.Random(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98), weight_decay=cfg.weight_decay)
    n_careful = max(1, round(cfg.batch * cfg.careful_share))
    model.train()
    t0 = time.time()
    for step in range(cfg.steps):
        problems = sample_problems(rng, cfg.batch, exclude)
        # Two length-homogeneous sub-batches (short direct rows, long careful rows) avoid padding
        # every direct row to careful length; the summed loss is the same as one mixed batch.
        careful, direct = problems[:n_careful], problems[n_careful:]
        parts = [encode_rows(tokenizer, careful, [p.careful() for p in careful]),
                 encode_rows(tokenizer, direct, [p.direct() for p in direct])]
        n_targets = sum(int(m[:, 1:].sum()) for _, m in parts)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for ids, mask in parts:
            loss = token_nll(model, ids, mask) / n_targets
            loss.backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == cfg.steps - 1:
            log(f"pretrain step {step:5d} loss {total:.4f} lr {lr_at(step, cfg):.2e} {time.time() - t0:6.1f}s")
    model.eval()
