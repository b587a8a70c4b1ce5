"""One step on device: shared input preparation, every model's forward, one fused RAST sample.

Prefill: ``prepare`` builds the inputs every model shares (token ids, positions, slot mapping, block
tables: step_inputs.py) with tensor ops, not a loop per token; ``forward_logits`` runs the models (large
and small on two CUDA streams, see model_streams); ``sample`` makes the step's draws (draws.py: one
rast_sample call over per-row parameter tensors, one more per request forking n > 1 samples), whose ids
the caller reads later with one device-to-host copy.

Decode, the hot path: the batch is written into DecodeBuffers (static device tensors fed from pinned
staging by a few non_blocking copies), then the step runs forward_logits and rast_sample on them. On
CUDA without enforce_eager the step is captured as CUDA graphs per batch-size bucket (cuda_graph: the
forward, then the sampler), every bucket when the runner is built, and replayed on the batch padded to
its bucket; otherwise, and for batches above the largest bucket (``graph_max_batch``), it runs eagerly on
the batch's rows. A batch with adjusted draws (logit_adjust.py) runs the forward the same way, then
adjusts and samples eagerly. Either way the step's only device-to-host read is the sampled ids.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional, Sequence as Seq

import torch

import rast_kernels
from rast_engine.cuda_graph import DecodeGraphs, StepOutput
from rast_engine.decode_buffers import DecodeBuffers
from rast_engine.kv_cache import KVCache
from rast_engine.model_streams import ModelStreams
from rast_engine.models.stacked import ForwardUnit
from rast_engine.draws import Draw, draw_logprobs, sample_draws
from rast_engine.errors import RastError
from rast_engine.logit_adjust import with_adjustments
from rast_engine.prompt_logprobs import PromptLogprobs, prompt_rows
from rast_engine.pending import DrawLogprobs, DrawResult, PendingStep
from rast_engine.sequence import Sequence
from rast_engine.step_inputs import StepInputs, prepare_inputs
from rast_engine.speculative.round import PendingRound, RoundInputs, RoundOutput, round_core, run_round

# a round's graph holds (γ + 1) logits rows per model and row, some twice (about 2 GB at 256 rows, γ = 4,
# V = 152064; 3.4 GB with the rejection method's probabilities), and each bucket keeps its outputs (at
# buckets up to 64, (γ + 1) x 175 rows of every model's logits: 0.8 GB at γ = 4 in bf16, besides the
# shared pool); speculation pays at small batches, so larger ones run eagerly
ROUND_GRAPH_ROWS = 64


class ModelRunner:
    def __init__(self, units: list[ForwardUnit], roles: list[int], kv: KVCache, vocab_size: int, block_size: int,
                 device: torch.device, enforce_eager: bool = True, model_streams: bool = True,
                 max_num_seqs: int = 256, max_model_len: int = 2048,
                 graph_max_batch: Optional[int] = None, speculative_tokens: int = 0, speculative_draft: str = "small",
                 speculative_method: str = "coupled", raw_logprobs: bool = False) -> None:
        """units: the large model, then the small models' forwards, each giving ``copies`` models' logits;
        roles: per role (large, then rl and base per pair) the index of its logits among those;
        speculative_tokens (γ), speculative_draft, speculative_method: speculative rounds (speculative/);
        raw_logprobs: logprobs_mode "raw_logprobs" (draws.draw_logprobs)."""
        self.units, self.roles = units, roles
        self.raw_logprobs = raw_logprobs
        self.kv = kv
        self.vocab_size = vocab_size
        self.block_size = block_size
        self.device = device
        self.max_model_len = max_model_len
        self.sampler = rast_kernels.default_backend(device)
        self.pin = device.type == "cuda"
        self.streams = ModelStreams(device, model_streams)
        widths = [(u.config.vocab_size, u.dtype) for u in units for _ in range(u.copies)]  # per model
        self.pairs = (len(roles) - 1) // 2
        self.max_lookahead, self.speculative_draft, self.speculative_method = (speculative_tokens, speculative_draft,
                                                                            speculative_method)
        try:
            self.buffers = DecodeBuffers(max_num_seqs, -(-max_model_len // block_size), self.pairs, block_size, device)
            # every decode step's logits, one [max_num_seqs, width_m] buffer per model: graph buckets share
            # them instead of each holding its own outputs in the pool (about 2 GB at 256 rows, 3 x 152k vocab)
            self.step_logits = [torch.empty(max_num_seqs, width, dtype=dtype, device=device) for width, dtype in widths]
        except (torch.OutOfMemoryError, RuntimeError) as e:
            raise RastError(f"max_num_seqs={max_num_seqs}: the decode step's buffers of one row a sequence cannot be "
                            f"allocated on {device}: {str(e).splitlines()[0]}; give a smaller max_num_seqs") from None
        # CPU is always eager: graphs are a CUDA feature, and the CPU path is the reference. A speculative
        # engine captures its rounds of γ drafts; its other decode steps (first draws, the context's end)
        # are rare and run eagerly
        graph_rows = min(max_num_seqs, graph_max_batch or max_num_seqs)
        captured = not enforce_eager and device.type == "cuda"
        self.graphs = (DecodeGraphs((self._decode_forward, self._decode_sample), self._pad_all, device, graph_rows)
                       if captured and not speculative_tokens else None)
        self.round_graphs = (DecodeGraphs((self._round_step,), self._pad_all, device,
                                          min(graph_rows, ROUND_GRAPH_ROWS))
                             if captured and speculative_tokens else None)
        for graphs in (self.graphs, self.round_graphs):
            if graphs is not None:
                graphs.capture_all()  # now, not in the middle of serving
        # two halves, see _ids_later
        self.ids_host = torch.empty(2, max_num_seqs, dtype=torch.int64, pin_memory=self.pin)
        self._ids_half = 0

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        if self.pin:
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def prepare(self, seqs: Seq[Sequence], is_prefill: bool, feed: Optional[Seq[int]] = None) -> StepInputs:
        """The step's inputs on the device (step_inputs.prepare_inputs); ``feed``'s pending ids come from
        the previous step's sampled ids in the decode buffers."""
        return prepare_inputs(seqs, is_prefill, self.block_size, self._to_device, self.buffers.sampled_ids, feed)

    @torch.inference_mode()
    def forward_logits(self, inputs: StepInputs, rows: Optional[torch.Tensor],
                       outs: Optional[list[torch.Tensor]] = None) -> list[torch.Tensor]:
        """Each role's logits [N, width_m] at the token indices ``rows`` (None: every token); outs, one
        per model (not per role: a model filling two roles runs once), receive them when given."""
        logits = self.streams.forward(self.units, self.kv.pools, inputs.input_ids, inputs.positions,
                                      inputs.meta, rows, outs)
        return [logits[i] for i in self.roles]

    @torch.inference_mode()
    def execute(self, seqs: Seq[Sequence], is_prefill: bool, copies: Seq[tuple[int, int]],
                draws: Seq[Draw]) -> list[DrawResult]:
        """Compute each sequence's scheduled tokens and make the draws. A prefill chunk that does not
        finish its sequence has no draw, and its logits are not computed."""
        return self.launch(seqs, is_prefill, copies, draws).wait()

    @torch.inference_mode()
    def launch(self, seqs: Seq[Sequence], is_prefill: bool, copies: Seq[tuple[int, int]],
               draws: Seq[Draw], feed: Optional[Seq[int]] = None, lookahead: int = 0) -> PendingStep | PendingRound:
        """execute(), except that it returns once the step is queued: its ids (and logprobs) come back,
        on CUDA by asynchronous copies, when PendingStep.wait() is called. ``feed``: see prepare (and
        DecodeBuffers.fill for decode). ``lookahead`` > 0: a decode step is a speculative round of that
        many drafts a sequence, whose PendingRound gives each sequence's tokens."""
        self.kv.copy_blocks(copies)
        if lookahead:
            return run_round(self, seqs, draws, lookahead, self.speculative_draft, self.speculative_method)
        if not is_prefill and [d.row for d in draws] == list(range(len(seqs))):
            return self.decode(seqs, draws, feed)
        inputs = self.prepare(seqs, is_prefill, feed)
        needed = sorted({d.row for d in draws})
        rows = inputs.last_index
        if needed != list(range(len(seqs))):
            rows = rows.index_select(0, self._to_device(torch.tensor(needed, dtype=torch.int64)))
            remap = {r: i for i, r in enumerate(needed)}
            draws = [replace(d, row=remap[d.row]) for d in draws]
        last = inputs.input_ids.index_select(0, rows) if _after_pending(draws) else None
        extra, slices = prompt_rows(seqs) if is_prefill else ([], [])
        if extra:  # prompt logprobs: more rows of the same forward (prompt_logprobs.py)
            rows = torch.cat([rows, self._to_device(torch.tensor(extra, dtype=torch.int64))])
        logits = self.forward_logits(inputs, rows)
        prompt = None
        if extra:
            n = rows.shape[0] - len(extra)
            prompt = PromptLogprobs([t[n:] for t in logits], slices, self.vocab_size, self._to_device)
            logits = [t[:n] for t in logits]
        step = self.sample(logits, draws, last) if draws else PendingStep([])
        step.prompt = prompt
        return step

    # ---- decode: static buffers, optional CUDA graph ----------------------------------------------
    def _decode_forward(self, rows: int) -> list[torch.Tensor]:
        """Every role's logits on the first ``rows`` static rows, into the static step_logits; no host
        sync (graph-capturable: the decode graphs' first stage)."""
        b = self.buffers
        inputs = StepInputs(input_ids=b.input_ids(rows), positions=b.positions(rows),
                            meta=b.meta(rows, self.max_model_len))
        return self.forward_logits(inputs, None, [t[:rows] for t in self.step_logits])

    def _decode_sample(self, rows: int) -> StepOutput:
        """rast_sample over the logits _decode_forward left in step_logits, by the static sampling
        parameters; no host sync (graph-capturable: the second stage)."""
        b = self.buffers
        logits = [self.step_logits[i][:rows] for i in self.roles]
        ids = rast_kernels.rast_sample(logits[0], list(zip(logits[1::2], logits[2::2])), **b.sampling(rows),
                                       vocab_size=self.vocab_size, backend=self.sampler)
        b.store_sampled(ids)
        return ids, logits

    def _decode_step(self, rows: int) -> StepOutput:
        """The decode step, eagerly: both stages."""
        self._decode_forward(rows)
        return self._decode_sample(rows)

    def _round_step(self, rows: int) -> RoundOutput:
        """A speculative round of γ drafts on the first ``rows`` static rows (graph-capturable)."""
        return round_core(self, RoundInputs.from_buffers(self, rows), self.max_lookahead, self.speculative_draft,
                          self.speculative_method)

    def _pad_all(self, rows: int) -> None:
        self.buffers.pad(0, rows)
        self.buffers.send(rows)

    @torch.inference_mode()
    def decode(self, seqs: Seq[Sequence], draws: Seq[Draw], feed: Optional[Seq[int]] = None) -> PendingStep:
        """One decode step; draw i samples row i (sequence i)."""
        n = len(seqs)
        bucket = None if self.graphs is None else self.graphs.bucket(n)  # None: eager on n rows
        if bucket is not None:
            self.graphs.ensure(bucket)  # a guard (all were captured at start); before fill: capture pads rows
        rows = n if bucket is None else bucket
        self.fill_buffers(seqs, draws, rows, feed)
        if any(d.adjust is not None for d in draws):  # the forward's stage, then adjust and sample eagerly
            logits = self._decode_forward(rows) if bucket is None else self.graphs.replay(bucket, stages=1)
            # eager reads of the static logits, queued before any later replay can overwrite them
            return self.sample([t[:n] for t in logits], draws,
                               self.buffers.input_ids(rows)[:n] if _after_pending(draws) else None)
        ids_dev, logits = self._decode_step(rows) if bucket is None else self.graphs.replay(bucket)
        # a replay's outputs are overwritten by the next replay: on CUDA the copies queued now read them
        # first; elsewhere (the CUDA emulator) the host reads them later, so it keeps a copy
        ids = ids_dev[:n].clone() if bucket is not None and not self.pin else ids_dev[:n]
        logprobs = None
        if any(d.params.logprobs is not None for d in draws):
            logprobs = draw_logprobs([t[:n] for t in logits], draws, ids, self._to_device, self.vocab_size,
                                     self.sampler, self.raw_logprobs)
        return self._ids_later(ids, logprobs)

    def fill_buffers(self, seqs: Seq[Sequence], draws: Seq[Draw], rows: int, feed: Optional[Seq[int]] = None) -> None:
        """Write a decode batch (draw i samples sequence i) into the static buffers, padded to ``rows``."""
        p = [d.params for d in draws]
        self.buffers.fill(seqs, temperature=[x.temperature for x in p], top_k=[x.top_k for x in p],
                          top_p=[x.top_p for x in p], min_p=[x.min_p for x in p], seeds=[d.seed for d in draws],
                          offsets=[d.offset for d in draws], weights=[d.weights for d in draws], rows=rows,
                          feed=feed)

    def _ids_later(self, ids: torch.Tensor, logprobs: Optional[DrawLogprobs] = None) -> PendingStep:
        """The step's ids (and logprobs), read by PendingStep.wait(): on CUDA through asynchronous copies
        into pinned memory. Two steps may be in flight (the engine schedules ahead), so each step's ids
        land in the half of ``ids_host`` the previous step's did not use. A step forking requests of
        many samples can draw more ids than it has rows (max_num_seqs); it gets pinned memory of its own."""
        if not self.pin:
            return PendingStep(ids=ids, logprobs=logprobs)
        logprobs = None if logprobs is None else logprobs.to_host()
        if ids.shape[0] > self.ids_host.shape[1]:
            host = torch.empty(ids.shape[0], dtype=torch.int64, pin_memory=True)
        else:
            host = self.ids_host[self._ids_half, :ids.shape[0]]
            self._ids_half ^= 1
        host.copy_(ids, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        return PendingStep(ids=host, event=copied, logprobs=logprobs)

    def sample(self, logits: list[torch.Tensor], draws: Seq[Draw], inputs: Optional[torch.Tensor] = None
               ) -> PendingStep:
        """The draws' tokens (draws.py), read later by the caller's wait(); ``inputs``: each logits row's input
        token (with_adjustments)."""
        adjusted, adjusted_draws = with_adjustments(logits, draws, self._to_device, self.vocab_size, inputs)
        ids_dev = sample_draws(adjusted, adjusted_draws, self._to_device, self.vocab_size, self.sampler)
        self.buffers.store_sampled(ids_dev)  # a decode step launched ahead reads its input ids from them
        if not self.raw_logprobs:  # raw: the combination before the adjustments
            logits, draws = adjusted, adjusted_draws
        return self._ids_later(ids_dev, draw_logprobs(logits, draws, ids_dev, self._to_device, self.vocab_size,
                                                      self.sampler, self.raw_logprobs))


def _after_pending(draws: Seq[Draw]) -> bool:
    """Whether an adjusted draw follows a pending token (its adjustment reads the step's input there)."""
    return any(d.adjust is not None and d.adjust.pending for d in draws)
