"""A small batched sampler with a KV cache, for RL rollouts and the toy's own accuracy table.

It decodes one or several HF causal LMs in lock-step and samples from softmax(Σ wᵢ·logitsᵢ / T) over
the tokenizer's vocabulary, which is a shared prefix of every model's (padded) embedding width. With
[(M, 1), (R, λ), (S, −λ)] this is RAST's M + λ·(R − S). Every prompt in a batch has the same length
(toy prompts are fixed-width), so no left padding or attention mask is needed."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rast_engine.toy.tokenizer import vocab_size


@dataclass(frozen=True)
class Rollout:
    tokens: torch.Tensor  # [B, L] prompt + completion, right-padded with pad_id after eos
    completion_mask: torch.Tensor  # [B, L] True on sampled tokens, eos included


@torch.no_grad()
def sample(
    members: list[tuple[torch.nn.Module, float]],
    prompt_ids: torch.Tensor,
    *,
    eos_id: int,
    pad_id: int,
    max_new_tokens: int,
    temperature: float,
    generator: torch.Generator,
) -> Rollout:
    if prompt_ids.dim() != 2:
        raise ValueError(f"prompt_ids must be [batch, length], got {tuple(prompt_ids.shape)}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    width = vocab_size()
    batch = prompt_ids.shape[0]
    caches: list = [None] * len(members)
    step_input = prompt_ids
    done = torch.zeros(batch, dtype=torch.bool)
    new_tokens, masks = [], []
    for _ in range(max_new_tokens):
        logits = torch.zeros(batch, width)
        for i, (model, weight) in enumerate(members):
            out = model(input_ids=step_input, past_key_values=caches[i], use_cache=True)
            caches[i] = out.past_key_values
            logits += weight * out.logits[:, -1, :width].float()
        if temperature == 0:
            nxt = logits.argmax(-1)
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        new_tokens.append(nxt)
        masks.append(~done)
        done = done | (nxt == eos_id)
        if bool(done.all()):
            break
        step_input = nxt[:, None]
    completion = torch.stack(new_tokens, dim=1)
    prompt_mask = torch.zeros_like(prompt_ids, dtype=torch.bool)
    return Rollout(
        tokens=torch.cat([prompt_ids, completion], dim=1),
        completion_mask=torch.cat([prompt_mask, torch.stack(masks, dim=1)], dim=1),
    )


def decode_completions(rollout: Rollout, tokenizer) -> list[str]:
    """The sampled text of each row, without <eos> or padding."""
    out = []
    for row, mask in zip(rollout.tokens, rollout.completion_mask):
        ids = [int(t) for t, m in zip(row, mask) if m and int(t) != tokenizer.eos_token_id]
        out.append(tokenizer.decode(ids, skip_special_tokens=True))
    return out
