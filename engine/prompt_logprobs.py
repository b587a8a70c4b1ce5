"""Prompt logprobs (vLLM's SamplingParams.prompt_logprobs): for each prompt token after the first, its
log-probability under RAST's combined distribution given the tokens before it, log_softmax(z) with
z = M + Σ λ_k (R_k − S_k) and the request's λ, raw (no temperature, filters or adjustments, as vLLM V1
reports them), plus the top k tokens there. RequestOutput.prompt_logprobs is [None, {token: logprob},
...], one entry per prompt token.

How: the request's own prefill computes them. A prefill chunk of such a sequence asks the forward for
the logits of its positions besides the sampling rows (model_runner.launch); they are combined and
reduced to the chosen token, its rank and top k on the device, and reach the host with the step's ids. So its
prompt is never served from the prefix cache while they are incomplete (BlockManager._prefix_hits): a
cached position has no logits. Filling is by position, so a chunk computed again (preemption, an undone
step) changes nothing. On CUDA the values travel to pinned host memory by copies queued with the step,
ending in their own event: reading device tensors in fill() would wait for every step queued since
(async scheduling launches the next one first), so the host could not prepare the one after.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional, Sequence as Seq

import torch

from rast_engine.logit_adjust import combined

if TYPE_CHECKING:
    from rast_engine.sequence import Sequence, SequenceGroup

ToDevice = Callable[[torch.Tensor], torch.Tensor]


def pending(group: SequenceGroup) -> bool:
    """Whether the request asked for prompt logprobs and does not have them all yet."""
    return group.params.prompt_logprobs is not None and (
        group.prompt_logprobs is None or len(group.prompt_logprobs) < len(group.prompt_token_ids))


@dataclass
class PromptSlice:
    """Positions [start, start + count) of one request's prompt, scored by one step."""
    group: SequenceGroup
    start: int
    count: int


def prompt_rows(seqs: Seq[Sequence]) -> tuple[list[int], list[PromptSlice]]:
    """The flat token indices of a prefill step (ModelRunner.prepare's order) whose logits score prompt
    tokens (position p scores token p + 1, so a prompt's last position is not among them), and what
    they score."""
    rows: list[int] = []
    slices: list[PromptSlice] = []
    offset = 0
    for seq in seqs:
        a = seq.num_computed_tokens
        e = a + seq.num_scheduled_tokens
        last = min(e, len(seq.group.prompt_token_ids) - 1)
        if pending(seq.group) and a < last:
            rows.extend(range(offset, offset + last - a))
            slices.append(PromptSlice(seq.group, a, last - a))
        offset += e - a
    return rows, slices


class PromptLogprobs:
    """A step's prompt logprobs on the device; fill() writes them into their requests on the host."""

    def __init__(self, logits: list[torch.Tensor], slices: list[PromptSlice], vocab: int, to_device: ToDevice) -> None:
        weights = [s.group.weights for s in slices for _ in range(s.count)]
        nxt = [t for s in slices for t in s.group.prompt_token_ids[s.start + 1:s.start + 1 + s.count]]
        w = to_device(torch.tensor(weights, dtype=torch.float32).reshape(len(nxt), -1))
        lp = torch.log_softmax(combined(logits, w, vocab), dim=-1)
        ids = to_device(torch.tensor(nxt, dtype=torch.int64))
        chosen = lp.gather(1, ids[:, None])[:, 0]
        # vLLM's rank: how many tokens are at least as likely as the prompt's (1: the most likely)
        rank = (lp >= chosen[:, None]).sum(-1)
        k = max(s.group.params.prompt_logprobs for s in slices)
        top_v, top_i = lp.topk(k, dim=-1) if k else (chosen[:0], rank[:0])
        self._values = [chosen, rank, top_v, top_i]
        self._copied: Optional[torch.cuda.Event] = None
        if lp.is_cuda:
            self._values = [t.to("cpu", non_blocking=True) for t in self._values]
            self._copied = torch.cuda.Event()
            self._copied.record()
        self.slices, self.next_ids = slices, nxt

    def fill(self) -> None:
        if self._copied is not None:
            self._copied.synchronize()
        chosen, rank, top_v, top_i = (t.tolist() for t in self._values)
        i = 0
        for s in self.slices:
            k, out = s.group.params.prompt_logprobs, s.group.prompt_logprobs
            for p in range(s.start, s.start + s.count):
                if len(out) == p + 1:  # the entry of token p + 1 (entry 0, the first token's, is None)
                    entry = {top_i[i][j]: top_v[i][j] for j in range(k)} if k else {}
                    entry[self.next_ids[i]] = chosen[i]
                    out.append(entry)
                    s.group.prompt_logprob_ranks.append(rank[i])
                i += 1
