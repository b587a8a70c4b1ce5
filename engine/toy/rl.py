"""GRPO-style RL from the base model ("RL from scratch"): for each prompt, sample a group at T = 1,
reward 1 for a correct final answer and 0 otherwise, and use the group-normalised reward as every
token's advantage. One on-policy gradient step per batch, so the importance ratio is 1 and needs no
clipping; there is no KL term — the only pull toward the base is the small learning rate and step count.
Nothing in the reward mentions the careful path: RL has to find it by itself."""
from __future__ import annotations

import random
import time
from dataclasses import dataclass

import torch

from rast_engine.toy.evaluate import MAX_NEW_TOKENS, prompt_batch
from rast_engine.toy.sampling import decode_completions, sample
from rast_engine.toy.task import is_careful, is_correct, sample_problems


@dataclass(frozen=True)
class RLConfig:
    steps: int
    prompts: int
    group: int
    lr: float
    seed: int

    def __post_init__(self) -> None:
        if self.group < 2:
            raise ValueError("a group baseline needs group >= 2")
        if self.steps < 1 or self.prompts < 1 or self.lr <= 0:
            raise ValueError(f"bad RL config {self}")


def group_advantages(rewards: torch.Tensor, group: int) -> torch.Tensor:
    """(r − mean) / (std + eps) within each consecutive group; all-equal groups get 0."""
    r = rewards.view(-1, group)
    adv = (r - r.mean(dim=1, keepdim=True)) / (r.std(dim=1, keepdim=True) + 1e-4)
    return adv.view(-1)


def rl_tune(model, tokenizer, cfg: RLConfig, exclude: set[tuple[int, int]], log=print) -> None:
    rng = random.Random(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    t0 = time.time()
    for step in range(cfg.steps):
        problems = sample_problems(rng, cfg.prompts, exclude)
        flat = [p for p in problems for _ in range(cfg.group)]
        model.eval()
        roll = sample([(model, 1.0)], prompt_batch(tokenizer, flat), eos_id=tokenizer.eos_token_id,
                      pad_id=tokenizer.pad_token_id, max_new_tokens=MAX_NEW_TOKENS, temperature=1.0,
                      generator=gen)
        texts = decode_completions(roll, tokenizer)
        rewards = torch.tensor([float(is_correct(p, t)) for p, t in zip(flat, texts)])
        adv = group_advantages(rewards, cfg.group)
        model.train()
        logits = model(input_ids=roll.tokens[:, :-1]).logits.float()
        logp = torch.log_softmax(logits, dim=-1).gather(-1, roll.tokens[:, 1:, None]).squeeze(-1)
        mask = roll.completion_mask[:, 1:].float()
        loss = -(adv[:, None] * logp * mask).sum() / mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 5 == 0 or step == cfg.steps - 1:
            careful = sum(is_careful(t) for t in texts) / len(texts)
            log(f"rl step {step:4d} reward {rewards.mean():.3f} careful {careful:.3f} "
                f"{time.time() - t0:6.1f}s")
    model.eval()
