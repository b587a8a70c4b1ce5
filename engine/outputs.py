"""What the engine hands back: generation results (vLLM shapes), teacher-forced scores, engine stats."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

import torch


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: Optional[str]  # "stop" | "length" | None while running
    # vLLM's stop_reason: the stop string or the stop_token_ids id that ended the output (a generation
    # config's eos ids count as those); None for the model's EOS, for length, and while running
    stop_reason: Optional[Union[int, str]] = None
    cumulative_logprob: Optional[float] = None  # set when the request asked for logprobs
    # one dict per generated token: {token_id: logprob} holding the chosen token and the top-k
    # alternatives, under the distribution the token was drawn from (temperature 1 for greedy rows)
    logprobs: Optional[list[dict[int, float]]] = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    # SamplingParams.prompt_logprobs: [None, {token: logprob}, ...], one entry per prompt token; in a delta
    # output only the first one carries it
    prompt_logprobs: Optional[list[Optional[dict[int, float]]]] = None
    # beside prompt_logprobs: each prompt token's rank in its distribution (vLLM's Logprob.rank: how many
    # tokens are at least as likely; None for the first)
    prompt_logprob_ranks: Optional[list[Optional[int]]] = None
    num_cached_tokens: Optional[int] = None  # vLLM's: prompt tokens read from the prefix cache, not computed


@dataclass
class ScoreOutput:
    """Teacher-forced per-position scores of one sequence of length L; row t scores token t+1.

    All float32 on CPU with V the engine's vocabulary; "logits" or log-softmax "logprobs".
    ``combined`` is Eq. 3 before temperature: large + sum_k w_k (rl_k - base_k), with the engine's λ."""
    large: torch.Tensor  # [L, V]
    deltas: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (rl, base) per pair
    combined: Optional[torch.Tensor] = None  # [L, V]


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int  # sequences waiting for a slot: queued requests and samples that found none
    kv_blocks_used: int
    kv_blocks_total: int
    prompt_tokens_total: int
    generation_tokens_total: int
    last_step_s: float
    # speculative decoding: drafts made (γ a sequence a round, also past a stop that cuts the run) and
    # drafts the verify accepted (a stop rule may then drop some)
    spec_draft_tokens_total: int = 0
    spec_accepted_tokens_total: int = 0
    num_preemptions_total: int = 0  # sequences preempted by recompute
    # LoRA adapters chosen per request (engine/lora_registry.py): the slots, and the adapters of the running
    # and of the waiting sequences, those waiting for their adapter's slot included (vLLM's lora_requests_info)
    max_loras: int = 0
    lora_running: tuple[str, ...] = ()
    lora_waiting: tuple[str, ...] = ()
