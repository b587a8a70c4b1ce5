"""LLM: the offline entry point (vLLM-style). Builds an LLMEngine and drives it to completion."""
from __future__ import annotations

import itertools
from dataclasses import fields, replace
from typing import Any, Iterable, Optional, Sequence, Union

import torch
from tqdm.auto import tqdm

from rast_engine.beam_search import BeamSearchOutput, BeamSearchParams, beam_search
from rast_engine.config import EngineConfig
from rast_engine.errors import RastError
from rast_engine.llm_engine import LLMEngine
from rast_engine.lora_modules import LoraChoice
from rast_engine.outputs import RequestOutput, ScoreOutput
from rast_engine.requests import chat_template_variables, is_one_prompt_of_ids, render_conversation
from rast_engine.sampling_params import SamplingParams

Prompt = Union[str, list[int], dict]  # text, token ids, or vLLM's {"prompt": ...} / {"prompt_token_ids": ...}
Params = Optional[Union[SamplingParams, Sequence[SamplingParams]]]


class LLM:
    def __init__(self, model: str, small_rl: Optional[str] = None, small_base: Optional[str] = None, *,
                 lam: float = 1.0, experts: Optional[Sequence[tuple[str, str, float]]] = None,
                 device: str = "auto", dtype: str = "auto", max_num_seqs: int = 256,
                 max_model_len: Optional[int] = None, block_size: int = 16, kv_cache_blocks: Optional[int] = None,
                 kv_cache_memory: Optional[int] = None, attention_backend: str = "auto",
                 enforce_eager: bool = False, seed: int = 0, **engine_kwargs: Any) -> None:
        """engine_kwargs: any other EngineConfig field, as vLLM's LLM takes engine arguments
        (max_num_batched_tokens, enable_prefix_caching, model_streams, stack_small_models, cuda_graph_max_batch,
        async_output, async_scheduling, load_format)."""
        known = {f.name for f in fields(EngineConfig) if f.init}
        unknown = sorted(set(engine_kwargs) - known)
        if unknown:
            raise RastError(f"unknown LLM argument(s) {unknown}; EngineConfig takes {sorted(known)}")
        config = EngineConfig(
            model=str(model), small_rl=None if small_rl is None else str(small_rl),
            small_base=None if small_base is None else str(small_base), lam=lam, experts=experts,
            device=device, dtype=dtype, max_num_seqs=max_num_seqs, max_model_len=max_model_len,
            block_size=block_size, kv_cache_blocks=kv_cache_blocks, kv_cache_memory=kv_cache_memory,
            attention_backend=attention_backend, enforce_eager=enforce_eager, seed=seed, **engine_kwargs,
        )
        self.llm_engine = LLMEngine(config)
        self._ids = itertools.count()

    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams with the generation config's fields (EngineConfig.generation_config), what
        generate and chat use when given none."""
        return SamplingParams(**self.llm_engine.sampling_defaults)

    def get_tokenizer(self):  # noqa: ANN201 - an HF tokenizer
        return self.llm_engine.tokenizer

    def generate(self, prompts: Union[Prompt, Sequence[Prompt]], sampling_params: Params = None,
                 use_tqdm: bool = True, priority: Optional[Sequence[int]] = None,
                 lora_request: Union[LoraChoice, Sequence[LoraChoice]] = None) -> list[RequestOutput]:
        """``priority``: vLLM's, one per prompt (lower first), with scheduling_policy="priority";
        ``lora_request``: vLLM's, one for all prompts or one per prompt: the RL model's adapter among the
        engine's lora_modules (a LoRARequest or its name; None: M alone). Requests for more path adapters
        than max_loras wait for slots as the others end (docs/lora.md)."""
        if isinstance(prompts, (str, dict)) or is_one_prompt_of_ids(prompts):
            prompts = [prompts]  # one prompt (text, token ids or a dict prompt), not a batch
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        if isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise RastError(f"got {len(params)} sampling_params for {len(prompts)} prompts")
        priorities = [0] * len(prompts) if priority is None else list(priority)
        if len(priorities) != len(prompts):
            raise RastError(f"got {len(priorities)} priorities for {len(prompts)} prompts", param="priority")
        loras = list(lora_request) if isinstance(lora_request, (list, tuple)) else [lora_request] * len(prompts)
        if len(loras) != len(prompts):
            raise RastError(f"got {len(loras)} lora_requests for {len(prompts)} prompts", param="lora_request")
        # only final outputs are returned: the engine need not build one at every step (output_kind)
        params = [replace(p, output_kind="final_only") if isinstance(p, SamplingParams) else p for p in params]
        ids = [f"gen-{next(self._ids)}" for _ in prompts]
        seeds = self.llm_engine.seed_rng.getstate()
        try:
            for rid, prompt, p, rank, lora in zip(ids, prompts, params, priorities, loras):
                self.llm_engine.add_request(rid, prompt, p, priority=rank, lora_request=lora)
        except BaseException:  # a rejected prompt (or a tokenizer's error): the batch is admitted whole or not at all,
            for rid in ids:     # and the seeds its admitted requests drew are drawn again by the next call
                self.llm_engine.abort_request(rid)
            self.llm_engine.seed_rng.setstate(seeds)
            raise
        return self._run(ids, use_tqdm)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        wanted = set(ids)
        try:
            with tqdm(total=len(ids), desc="generate", unit="req", disable=not use_tqdm) as bar:
                while len(done) < len(ids):
                    for out in self.llm_engine.step():
                        if out.finished and out.request_id in wanted:
                            done[out.request_id] = out
                            bar.update(1)
        except BaseException:  # an error or Ctrl-C: the abandoned requests must not hold the engine
            for rid in ids:
                self.llm_engine.abort_request(rid)
            raise
        return [done[i] for i in ids]

    def chat(self, messages: Union[list[dict], list[list[dict]]], sampling_params: Params = None,
             use_tqdm: bool = True, *, chat_template: Optional[str] = None, add_generation_prompt: bool = True,
             continue_final_message: bool = False, chat_template_kwargs: Optional[dict] = None,
             tools: Optional[list[dict]] = None,
             lora_request: Union[LoraChoice, Sequence[LoraChoice]] = None) -> list[RequestOutput]:
        """Applies the chat template (the tokenizer's, or ``chat_template``, with ``chat_template_kwargs``'
        variables and ``tools``, OpenAI's function specs, for the template to list) to one conversation
        (``messages``) or a list of them, as vLLM's LLM.chat: with the assistant's generation prompt, or
        continuing the final message; each output's ``prompt`` is the templated text."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        tokenizer = self.get_tokenizer()
        variables = chat_template_variables(tokenizer, chat_template_kwargs)
        if chat_template is None and getattr(tokenizer, "chat_template", None) is None:
            raise RastError("the tokenizer has no chat template; pass chat_template= or use generate() with a "
                            "formatted prompt")
        if add_generation_prompt and continue_final_message:
            raise RastError("continue_final_message continues the last message; it excludes add_generation_prompt")
        texts = []
        for conv in conversations:
            texts.append(render_conversation(tokenizer, [_text_message(m) for m in conv], "a conversation", variables,
                                             chat_template=chat_template, add_generation_prompt=add_generation_prompt,
                                             continue_final_message=continue_final_message, tools=tools))
        # the template writes any BOS itself, so the text is encoded without adding special tokens
        prompts = [list(tokenizer.encode(text, add_special_tokens=False)) for text in texts]
        outputs = self.generate(prompts, sampling_params, use_tqdm=use_tqdm, lora_request=lora_request)
        for out, text in zip(outputs, texts):
            out.prompt = text
        return outputs

    def beam_search(self, prompts: Union[Prompt, Sequence[Prompt]], params: BeamSearchParams,
                    lora_request: LoraChoice = None) -> list[BeamSearchOutput]:
        """vLLM's: the beam_width best continuations of each prompt under the combined distribution
        (engine/beam_search.py has the rule); ``lora_request``: as generate's, for every prompt."""
        if isinstance(prompts, (str, dict)) or is_one_prompt_of_ids(prompts):
            prompts = [prompts]
        engine = self.llm_engine
        tokenizer = engine.tokenizer
        return beam_search(lambda batch, step: self.generate(batch, step, use_tqdm=False, lora_request=lora_request),
                           list(prompts), params, engine.scheduler.stops.eos_token_ids, engine.max_model_len,
                           None if tokenizer is None else tokenizer.decode)

    def score(self, sequences: list[list[int]], *, output: str = "logprobs",
              lora_request: LoraChoice = None) -> list[ScoreOutput]:
        """Teacher-forced per-position scores; see ScoreOutput. ``lora_request``: as generate's, for
        every sequence."""
        return self.llm_engine.score(sequences, output, lora_request)

    def load_weights(self, weights: Optional[Iterable[tuple[str, torch.Tensor]]] = None, *,
                     path: Optional[str] = None, role: str = "small_rl") -> int:
        """Replace a loaded model's weights in place, M staying loaded: LLMEngine.load_weights
        (engine/weight_updates.py); how many tensors were written."""
        return self.llm_engine.load_weights(weights, path=path, role=role)

    def reset_prefix_cache(self) -> bool:
        """vLLM's: forget the prefix cache's blocks; False while requests hold blocks."""
        return self.llm_engine.reset_prefix_cache()

    def sleep(self, level: int = 1) -> None:
        """vLLM's: give the device memory of the weights (level 1: kept in host memory; level 2: discarded)
        and of the KV cache back (engine/sleep_mode.py)."""
        self.llm_engine.sleep(level)

    def wake_up(self, tags: Optional[Sequence[str]] = None) -> None:
        """vLLM's: take it again, "weights" and "kv_cache" (None: both)."""
        self.llm_engine.wake_up(tags)


def _text_message(message: Any) -> Any:
    """A message whose content is OpenAI's list of parts gets its text parts joined by newlines, as vLLM
    gives chat templates that expect a string (the server does the same); other part types are refused."""
    if not isinstance(message, dict) or not isinstance(message.get("content"), list):
        return message
    parts = message["content"]
    if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in parts):
        raise RastError(f"message content parts must be {{'type': 'text', 'text': str}}; got {parts!r}")
    return {**message, "content": "\n".join(p["text"] for p in parts)}
