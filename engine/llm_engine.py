"""LLMEngine: requests in, one scheduled step at a time, RequestOutputs out (of each request's
output_kind).

The synchronous core that LLM, the server's async loop and the eval tools drive; its parts are built in
build.py, its batches launched by launcher.py. add_request validates everything before it touches any
state, so a rejected request leaves the engine exactly as it was.
"""
from __future__ import annotations

import functools
import itertools
import random
import time
from typing import Iterable, Optional, Union

import torch

from rast_engine.block_manager import BlockManager
from rast_engine.build import build_parts
from rast_engine.commit import commit_step
from rast_engine.config import EngineConfig
from rast_engine.detokenizer import IncrementalDetokenizer
from rast_engine.errors import NoAdmissibleToken, RastError
from rast_engine.generation_config import sampling_defaults
from rast_engine.kv_cache import KVCache
from rast_engine.launcher import Launcher
from rast_engine.model_runner import ModelRunner
from rast_engine.outputs import EngineStats, RequestOutput, ScoreOutput
from rast_engine.pausing import Pausing
from rast_engine.pending import DrawResult, InFlight
from rast_engine.lora_modules import LoraChoice
from rast_engine.lora_adapters import LoraAdapters
from rast_engine.lora_registry import PendingLora
from rast_engine.requests import check_priority, checked_request, prompt_of, prompt_salt
from rast_engine.sampling_params import SamplingParams, sample_seed
from rast_engine.scheduler import Scheduler
from rast_engine.scoring import score_sequences
from rast_engine.sleep_mode import SleepMode
from rast_engine.sequence import Sequence, SequenceGroup, SequenceStatus
from rast_engine.structured import Grammars
from rast_engine.speculative.round import PendingRound, SpecCounts, commit_round
from rast_engine.triple import ModelSet, resolve_device
from rast_engine.weak_callback import weak_method
from rast_engine.weight_updates import WeightUpdates


class LLMEngine(LoraAdapters, Launcher, WeightUpdates, Pausing, SleepMode):
    def __init__(self, config: EngineConfig) -> None:
        t0 = time.perf_counter()
        self.config = config
        # the generation config's sampling fields, read before any model is loaded (generation_config.py)
        self.sampling_defaults = sampling_defaults(config.generation_config, config.model)
        self.device = resolve_device(config.device)
        if self.device.type == "cuda":  # streams, events and Triton launches follow the current device
            torch.cuda.set_device(self.device)
        self.async_output = self.device.type == "cuda" if config.async_output is None else config.async_output
        ahead = self.async_output and not config.speculative_tokens  # a round's length must reach the host
        self.async_scheduling = ahead if config.async_scheduling is None else config.async_scheduling
        if self.async_scheduling and not self.async_output:  # before any model is loaded
            raise RastError("async_scheduling=True needs async_output, which is off on this device by default: "
                            "give async_output=True (--async-output) too")
        parts = build_parts(config, self.device, self.async_scheduling, t0)
        self.model_set: ModelSet = parts.model_set
        self.max_model_len: int = parts.max_model_len
        self.kv: KVCache = parts.kv
        self.block_manager: BlockManager = parts.block_manager
        self.scheduler: Scheduler = parts.scheduler
        self.runner: ModelRunner = parts.runner
        self.tokenizer = self.model_set.tokenizer
        self.vocab_size = self.model_set.vocab_size
        self.groups: dict[str, SequenceGroup] = {}
        self._arrivals = itertools.count()
        # draws the seed of each request that sets none; a rejected batch rewinds it (LLM.generate)
        self.seed_rng = random.Random(config.seed)
        self._prompt_tokens = 0
        self._generation_tokens = 0
        self._last_step_s = 0.0
        self._in_flight: Optional[InFlight] = None
        self._undelivered: list[RequestOutput] = []  # built by a step that then raised; see step()
        self.spec_counts = SpecCounts()
        self.grammars: Optional[Grammars] = None  # structured outputs' compiler, built by the first such request
        if self.model_set.lora is not None:  # adapters that requests wait for load as the scheduler admits them
            # held weakly: the engine holds both (weak_callback.py)
            self.scheduler.can_load_lora = weak_method(self.can_load_waiting_lora)
            self.scheduler.load_lora = weak_method(self.load_waiting_lora)
            self.model_set.lora.queued = weak_method(self._lora_queued)
            self.model_set.lora.loaded = weak_method(self.scheduler.lora_loaded)

    # ---- requests ----------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: Union[str, list[int], dict], params: SamplingParams,
                    priority: int = 0, lora_request: LoraChoice = None) -> None:
        """``prompt``: text, token ids, or vLLM's dict prompt of either (requests.prompt_of); ``priority``:
        vLLM's, lower first, with scheduling_policy="priority" only; ``lora_request``: the RL model's
        adapter among the engine's lora_modules (a LoRARequest or its name; None: M alone). A LoRARequest
        whose adapter finds no free slot is read and checked now, and waits in the queue for a slot."""
        priority = check_priority(priority, self.config.scheduling_policy)
        salt, prompt = prompt_salt(prompt), prompt_of(prompt)
        ids, weights, params, grammar = checked_request(self, request_id, prompt, params)
        lora = self.lora_choice(lora_request, wait=True)  # last: it may load an adapter
        pending = lora if isinstance(lora, PendingLora) else None
        lora_slot, cache_root = (-1, b"") if pending is not None else lora
        request_seed = params.seed if params.seed is not None else self.seed_rng.getrandbits(63)
        group = SequenceGroup(request_id=request_id, prompt=prompt if isinstance(prompt, str) else None,
                              prompt_token_ids=ids, params=params, request_seed=request_seed,
                              arrival=next(self._arrivals), weights=weights, grammar=grammar, priority=priority,
                              prompt_logprobs=None if params.prompt_logprobs is None else [None],
                              prompt_logprob_ranks=None if params.prompt_logprobs is None else [None],
                              lora_slot=lora_slot, cache_root=cache_root, cache_salt=salt,
                              weights_root=self.weights_root)
        group.seqs.append(self._new_sequence(group, 0, list(ids)))
        self.wait_for_lora(group, pending)
        self.groups[request_id] = group
        self.scheduler.add(group.seqs[0])

    def _new_sequence(self, group: SequenceGroup, index: int, token_ids: list[int]) -> Sequence:
        return Sequence(group=group, index=index, token_ids=token_ids,
                        seed=sample_seed(group.request_seed, index),
                        detok=None if self.tokenizer is None
                        else IncrementalDetokenizer(self.tokenizer, group.prompt_token_ids,
                                                    skip_special_tokens=group.params.skip_special_tokens))

    def abort_request(self, request_id: Union[str, Iterable[str]]) -> None:
        """Abort one request or several (vLLM's forms); an id not running (finished, unknown) is a no-op.
        Nothing more is returned for an aborted request, outputs a failed step kept included."""
        many = isinstance(request_id, Iterable) and not isinstance(request_id, str)
        ids = list(request_id) if many else [request_id]
        if not all(isinstance(r, str) for r in ids):
            raise RastError(f"abort_request takes a request id (str) or an iterable of them, got {request_id!r}")
        for rid in ids:
            if (group := self.groups.pop(rid, None)) is not None:
                self.scheduler.abort(group.seqs)
                self.forget_lora(group)
        self._undelivered = [o for o in self._undelivered if o.request_id not in ids]

    def has_unfinished_requests(self) -> bool:
        return bool(self.groups or self._undelivered)

    def step_refusal(self) -> Optional[str]:
        """Why step() would raise now (paused, asleep), or None."""
        return self._paused_refusal() or self._asleep_refusal()

    # ---- the step ----------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one batch to its sampled tokens (a speculative round: 1 to γ + 1 tokens a sequence, see
        speculative/); the outputs of every request that progressed. A prompt longer than the token
        budget takes several steps; only its last chunk samples, so a step may return no output.
        With async_output (CUDA by default) a step waits for the batch in flight, takes its tokens,
        launches the next batch and only then detokenises, checks stop strings and builds outputs, so
        host work overlaps the GPU. A sequence stopped by a stop string then is in the next batch: that
        token is computed and discarded. Freeing its blocks meanwhile is safe: the batch writes only
        its unhashed blocks, and any later user of them is queued behind it on the device.
        With async_scheduling (on with async_output, off when speculating) the step after a batch (a
        decode step, or a prefill admitting waiting requests) is launched before the batch's ids are
        waited for, the device feeding each sampled id into it, so the GPU runs back to back while the
        host takes one step's tokens and prepares the next. It falls back to the order above whenever
        the next batch needs the host to know the tokens: a preemption (scheduler.py), a prompt still
        prefilled in chunks, or a first draw forking n > 1.
        If the runner raises (or is interrupted) its batch is undone: no sequence takes a token and the
        batch is requeued for recompute, so stepping on gives the outputs of a run that never failed.
        A step that raises after taking its batch's tokens (the next launch failed) keeps the outputs it
        built, and the next step returns them first. An error after the runner (detokenising, stop
        checks) is not undone; the server declares the engine dead on any step error, LLM.generate
        aborts its requests. While paused (pausing.py) a step lands the batch on the device and launches
        nothing; with none there, it raises, as it does while the engine sleeps (sleep_mode.py)."""
        refusal = self.step_refusal()
        if refusal is not None:
            raise RastError(refusal)
        undelivered, self._undelivered = self._undelivered, []
        try:
            outputs, launch_error = self._step()
        except BaseException:
            self._undelivered = undelivered
            raise
        outputs = undelivered + outputs
        if launch_error is not None:
            self._undelivered = outputs  # its tokens stand: a delta output is never built twice
            raise launch_error
        return outputs

    def _step(self) -> tuple[list[RequestOutput], Optional[BaseException]]:
        """step()'s outputs, and the error of a launch that failed after the batch's tokens were taken."""
        t0 = time.perf_counter()
        if self.device.type == "cuda" and torch.cuda.current_device() != self.device.index:
            # the server steps on its own thread, whose current device is cuda:0: Triton launches and
            # the step's events follow the current device, not the tensors'
            torch.cuda.set_device(self.device)
        if self._in_flight is None:
            self._in_flight = self._launch()
            if self._in_flight is None:
                if self.groups:  # unreachable while capacity >= max_model_len; never spin silently
                    raise RuntimeError("the scheduler cannot make progress: no request fits in the KV cache")
                return [], None
        batch, self._in_flight = self._in_flight, None
        launch_error = None
        if batch.holds_pending and not self._paused:
            try:
                self._in_flight = self._launch_ahead(batch)
            except BaseException as e:  # its sequences are requeued; this batch's other tokens stand
                launch_error = e
        try:
            results = batch.step.wait(functools.partial(self._running_rows, batch))
        except BaseException as e:
            # the batch ahead reads this batch's tokens: it is undone with them (after them in the queue,
            # the requests it admitted)
            ahead, self._in_flight = self._in_flight, None
            mine = set(batch.out.seqs)
            seqs = batch.out.seqs + ([s for s in ahead.out.seqs if s not in mine] if ahead else [])
            self.scheduler.requeue([s for s in seqs if s.status is SequenceStatus.RUNNING])
            if isinstance(e, NoAdmissibleToken):
                # the batch's own sequences: a request may have left self.groups since (aborted, finished)
                owners = self._row_owners(batch)
                groups = list({owners[r].group.request_id: owners[r].group for r in e.rows}.values())
                raise NoAdmissibleToken(e.rows, tuple(g.request_id for g in groups),
                                        tuple(g.request_id for g in groups if g.params.masks_tokens)) from None
            raise
        progressed, deferred = self._commit(batch, results)
        if self._in_flight is None and self.async_output and launch_error is None and not self._paused:
            try:
                self._in_flight = self._launch()
            except BaseException as e:  # the batch is requeued; this step's tokens stand
                launch_error = e
        outputs = self._outputs(progressed, deferred)
        self._last_step_s = time.perf_counter() - t0
        return outputs, launch_error

    def _commit(self, batch: InFlight, results: list[DrawResult]
                ) -> tuple[dict[str, SequenceGroup], list[Sequence]]:
        """Take a finished batch's tokens (commit.py, or speculative/round.py for a round)."""
        if isinstance(batch.step, PendingRound):
            return commit_round(self, batch.out.seqs, results, batch.out.lookahead, batch.step.cut), []
        return commit_step(self, batch, results)

    def _outputs(self, progressed: dict[str, SequenceGroup], deferred: list[Sequence]) -> list[RequestOutput]:
        for seq in deferred:
            if seq.status is not SequenceStatus.FINISHED:
                self._read_text(seq)
        outputs = []
        for g in progressed.values():
            finished = g.finished
            out = g.output() if finished or g.params.output_kind != "final_only" else None
            if out is not None:
                outputs.append(out)
            if finished:
                self.groups.pop(g.request_id, None)
        return outputs

    def _read_text(self, seq: Sequence) -> None:
        """Detokenise the newest token and apply every stop rule. As in vLLM, a token that stops the
        request (EOS, stop_token_ids) adds no text unless include_stop_str_in_output; its id stays. A
        sequence ending by its token takes the text the detokenizer still held (an incomplete character),
        before stop strings are matched in it."""
        prev_len = len(seq.output_text)
        shows_text = seq.params.include_stop_str_in_output or not self.scheduler.stops.stop_token(seq)
        if seq.detok is not None:  # without a tokenizer the outputs are token ids only
            end = seq.num_known if shows_text else seq.num_known - 1
            seq.output_text += seq.detok.step(seq.token_ids, end)
            if self.scheduler.stops.ends_by_token(seq):
                seq.output_text += seq.detok.flush(seq.token_ids, end)
        reason = self.scheduler.stops.check(seq, prev_len)
        if reason is not None:
            self.scheduler.finish(seq, reason)

    # ---- scoring and stats -------------------------------------------------------------------------
    def score(self, sequences: list[list[int]], output: str = "logprobs",
              lora_request: LoraChoice = None) -> list[ScoreOutput]:
        refusal = self._asleep_refusal()  # scoring runs the models now
        if refusal is not None:
            raise RastError(refusal)
        return score_sequences(self, sequences, output, lora_request)

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            kv_blocks_used=self.block_manager.num_used_blocks, kv_blocks_total=self.block_manager.num_blocks,
            prompt_tokens_total=self._prompt_tokens, generation_tokens_total=self._generation_tokens,
            last_step_s=self._last_step_s, spec_draft_tokens_total=self.spec_counts.drafted,
            spec_accepted_tokens_total=self.spec_counts.accepted, num_preemptions_total=self.scheduler.num_preemptions,
            **self.lora_stats())

    @property
    def dtype(self) -> torch.dtype:
        return self.model_set.models[0].dtype
