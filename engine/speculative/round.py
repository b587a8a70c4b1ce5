"""One speculative round over a decode batch, on the model runner's units and pools (see __init__.py).

Inputs (RoundInputs: last tokens, positions, block tables, sampling parameters) are built once on the
host, or, for a round of the engine's full γ whose batch fits a graph bucket, written into the runner's
DecodeBuffers for the captured round to read; each draft step's and the verify's metadata are derived
from them on the device. ``round_core`` reads nothing back, so it replays from a CUDA graph (padding rows
inert: slot -1, context 0), and the host reads the round's tokens once.
Invariant on entry (the scheduler's lookahead): every sequence's blocks cover its last token's position
P and the γ positions after it, writable; on exit the cache holds valid K/V up to P + accepted, the rest
is overwritten by later rounds before anything reads it (attention reads keys below context_lens only).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional, Sequence as Seq

import torch

import rast_kernels
from rast_engine.attention.metadata import AttentionMetadata
from rast_engine.draws import Draw, draw_logprobs, row_params
from rast_engine.errors import NoAdmissibleToken
from rast_engine.pending import DrawLogprobs, DrawResult
from rast_engine.sequence import Sequence, SequenceGroup, SequenceStatus
from rast_engine.sampling_params import signed64
from rast_engine.speculative.accept import ACCEPT_SALT, DRAFT_SALT, RESIDUAL_SALT, accept_drafts
from rast_engine.speculative.adjust import RoundAdjust, with_pair
from rast_engine.step_inputs import lora_slots

if TYPE_CHECKING:
    from rast_engine.llm_engine import LLMEngine
    from rast_engine.model_runner import ModelRunner


@dataclass
class SpecCounts:
    drafted: int = 0
    accepted: int = 0


class PendingRound:
    """A round's tokens per sequence: the accepted drafts, then the one token that follows them."""

    def __init__(self, tokens: torch.Tensor, counts: torch.Tensor, logprobs: Optional[DrawLogprobs],
                 event: Optional[torch.cuda.Event] = None) -> None:
        self._tokens, self._counts, self._logprobs, self._event = tokens, counts, logprobs, event
        self._runs: Optional[list[list[DrawResult]]] = None
        self.cut: list[bool] = []  # per run, after wait(): it stopped before a position with no token

    done = False  # never on the host before wait(): the engine does not schedule ahead of a round

    def wait(self, counted: Callable[[list[int]], list[int]] = list) -> list[list[DrawResult]]:
        """Each sequence's run. A run that ends in no token stops before it: the sequence may well stop
        earlier (max_tokens, a stop string), as plain decoding would without ever drawing there, and if it
        does not, its next round fails at its first position. NoAdmissibleToken for sequences whose very
        next token has none, those ``counted`` keeps of them (as PendingStep.wait)."""
        if self._runs is None:
            if self._event is not None:
                self._event.synchronize()
            tokens, counts = self._tokens.tolist(), self._counts.tolist()
            failed = [i for i, (row, c) in enumerate(zip(tokens, counts)) if c == 1 and row[0] < 0]
            if failed and (failed := counted(failed)):  # rows are sequences here: the engine reads them as such
                raise NoAdmissibleToken(failed)
            flat = [DrawResult(t, None) for row in tokens for t in row]
            if self._logprobs is not None:
                self._logprobs.fill(flat)
            width = len(tokens[0]) if tokens else 0
            self.cut = [row[c - 1] < 0 for row, c in zip(tokens, counts)]  # every token of a cut run is a draft
            self._runs = [flat[i * width:i * width + c - cut] for i, (c, cut) in enumerate(zip(counts, self.cut))]
        return self._runs


@dataclass
class RoundInputs:
    """A round's inputs, all on the device: R rows (a graph bucket's rows include inert padding)."""
    last: torch.Tensor  # [R] int64: each sequence's last token, the small models' first input
    start: torch.Tensor  # [R] int64: its position
    tables: torch.Tensor  # [R, W] int32 block tables
    live: Optional[torch.Tensor]  # [R] bool, False on padding rows (no KV write, empty context); None: all live
    params: dict[str, torch.Tensor]  # temperature, top_k, top_p, min_p [R]
    weights: torch.Tensor  # [R, K] λ per pair
    seed: torch.Tensor  # [R] int64: the plain sampler's seed of each sequence
    offset: torch.Tensor  # [R] int64: tokens the sequence has generated
    max_context: int  # >= every start + γ + 1 (attention metadata's max_seqlen_k)
    lora_slots: Optional[torch.Tensor] = None  # [R] int32: each row's LoRA adapter slot (AttentionMetadata's)

    @classmethod
    def from_host(cls, runner: ModelRunner, seqs: Seq[Sequence], draws: Seq[Draw], gamma: int) -> RoundInputs:
        to_dev = runner._to_device
        width = max(len(s.block_table) for s in seqs)
        starts = [len(s.token_ids) - 1 for s in seqs]
        return cls(last=to_dev(torch.tensor([s.token_ids[-1] for s in seqs], dtype=torch.int64)),
                   start=to_dev(torch.tensor(starts, dtype=torch.int64)),
                   tables=to_dev(torch.tensor([s.block_table + [0] * (width - len(s.block_table)) for s in seqs],
                                              dtype=torch.int32)),
                   live=None, params=row_params(draws, to_dev),
                   weights=to_dev(torch.tensor([d.weights for d in draws], dtype=torch.float32)
                                  .reshape(len(draws), runner.pairs)),
                   seed=to_dev(torch.tensor([d.seed for d in draws], dtype=torch.int64)),
                   offset=to_dev(torch.tensor([d.offset for d in draws], dtype=torch.int64)),
                   max_context=max(starts) + gamma + 1, lora_slots=lora_slots(seqs, to_dev))

    @classmethod
    def from_buffers(cls, runner: ModelRunner, rows: int) -> RoundInputs:
        """The first ``rows`` rows of the runner's DecodeBuffers, as DecodeBuffers.fill wrote them (a
        padding row has context length 0): what a captured round reads."""
        b = runner.buffers
        meta, sampling = b.meta(rows, runner.max_model_len), b.sampling(rows)
        return cls(last=b.input_ids(rows), start=b.positions(rows), tables=meta.block_tables,
                   live=meta.context_lens > 0,
                   params={k: sampling[k] for k in ("temperature", "top_k", "top_p", "min_p")},
                   weights=sampling["weights"], seed=sampling["seed"], offset=sampling["offset"],
                   max_context=runner.max_model_len, lora_slots=meta.lora_slots)

    def meta(self, start: torch.Tensor, q_len: int, block_size: int, is_prefill: bool
             ) -> tuple[torch.Tensor, AttentionMetadata]:
        """Positions [R * q_len] and metadata for q_len new tokens a row at start .. start + q_len - 1."""
        bsz = self.tables.shape[0]
        step = torch.arange(q_len, device=start.device, dtype=torch.int64)
        positions = (start[:, None] + step).reshape(-1)
        seq = torch.arange(bsz, device=start.device).repeat_interleave(q_len)
        slots = self.tables[seq, positions // block_size].to(torch.int64) * block_size + positions % block_size
        context = (start + q_len).to(torch.int32)
        if self.live is not None:
            slots = torch.where(self.live[seq], slots, -1)
            context = torch.where(self.live, context, 0)
        return positions, AttentionMetadata(
            is_prefill=is_prefill, slot_mapping=slots, block_tables=self.tables, context_lens=context,
            cu_seqlens_q=(torch.arange(bsz + 1, device=start.device, dtype=torch.int32) * q_len),
            max_seqlen_q=q_len, max_seqlen_k=self.max_context, block_size=block_size,
            lora_slots=None if self.lora_slots is None else self.lora_slots[seq])


def _draft_inputs(rl: list[torch.Tensor], base: list[torch.Tensor], weights: torch.Tensor, draft: str
                  ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]], object]:
    """rast_sample / rast_probs's (logits, deltas, weights) of the draft: R alone, or S + λ·(R − S)."""
    if draft == "rl":
        return rl[0], [], 1.0
    return base[0], list(zip(rl, base)), weights


def _stacked(drafts: list[torch.Tensor], last: torch.Tensor) -> torch.Tensor:
    """[R, j] int64: the drafts so far (j = 0: an empty column)."""
    return torch.stack(drafts, dim=1) if drafts else last[:, None][:, :0]


RoundOutput = tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]  # tokens, accepted, large, small


def round_core(runner: ModelRunner, inp: RoundInputs, gamma: int, draft: str, method: str,
               adjust: Optional[RoundAdjust] = None) -> RoundOutput:
    """The round on the device, with no host sync (so a CUDA graph can capture it unless ``adjust`` is
    given): tokens [R, γ + 1] (-1 past each row's run), accepted drafts [R], and the verify's logits (large
    [R * (γ + 1), V], then the small models' in role order, then with ``adjust`` the target's adjustment
    pair), rows in (sequence, position) order."""
    bs, vocab, pairs = runner.block_size, runner.vocab_size, runner.pairs
    params, weights, offset = inp.params, inp.weights, inp.offset
    # coupled: the plain sampler's own seed, so a draft and the target's draw share their noise
    seeds = {0: inp.seed} if method == "coupled" else \
        {salt: torch.bitwise_xor(inp.seed, signed64(salt)) for salt in (DRAFT_SALT, ACCEPT_SALT, RESIDUAL_SALT)}
    draft_seed = next(iter(seeds.values()))
    large_copies = runner.units[0].copies
    small_units, small_pools = runner.units[1:], runner.kv.pools[1:]
    small_roles = [r - large_copies for r in runner.roles[1:]]  # rl, base per pair among the small logits

    def small_step(ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> list[torch.Tensor]:
        out = runner.streams.forward(small_units, small_pools, ids, positions, meta, None)
        return [out[r] for r in small_roles]

    per_step: list[list[torch.Tensor]] = []  # [j] -> per small role, logits [R, width]
    drafts: list[torch.Tensor] = []
    ids = inp.last
    for j in range(gamma):
        per_step.append(small_step(ids, *inp.meta(inp.start + j, 1, bs, is_prefill=False)))
        logits, deltas, w = _draft_inputs(per_step[-1][0::2], per_step[-1][1::2], weights, draft)
        if adjust is not None:  # position j, after the drafts so far
            deltas, w = adjust.extend(logits, deltas, w, j, 1, _stacked(drafts, inp.last), keep=True)
        ids = rast_kernels.rast_sample(logits, deltas, weights=w, **params, seed=draft_seed, offset=offset + j,
                                       vocab_size=vocab, backend=runner.sampler)
        # -1 (the draft admits no token) becomes token 0: read as an input, then rejected (q = 0 there, or
        # no draw of the target's is -1)
        ids = ids.clamp(min=0)
        drafts.append(ids)
        if adjust is not None:
            adjust.note_draft(ids)
    tokens_in = torch.stack([inp.last] + drafts, dim=1)  # [R, γ + 1]: the large model's inputs

    # the small pair's last step (the target's terms at the last position) draws no draft, so it runs
    # beside M's verify, on the side stream. Both steps' inputs are made here, on main, before the side
    # stream waits for it, and stay referenced until the streams join.
    verify_in = (tokens_in.reshape(-1), *inp.meta(inp.start, gamma + 1, bs, is_prefill=True))
    last_in = (ids, *inp.meta(inp.start + gamma, 1, bs, is_prefill=False))
    large, last_step = runner.streams.overlap(
        lambda: runner.streams.forward(runner.units[:1], runner.kv.pools[:1], *verify_in, None)[0],
        lambda: small_step(*last_in))
    per_step.append(last_step)
    small = [torch.stack([step[r] for step in per_step], dim=1).flatten(0, 1) for r in range(2 * pairs)]
    drafted = tokens_in[:, 1:]
    rep = {k: v.repeat_interleave(gamma + 1) for k, v in params.items()}
    pairs_t, weights_t = list(zip(small[0::2], small[1::2])), weights.repeat_interleave(gamma + 1, dim=0)
    if adjust is not None:
        pairs_t, weights_t = adjust.extend(large, pairs_t, weights_t, 0, gamma + 1, drafted)
        small = small + list(pairs_t[-1])
    target = dict(weights=weights_t, **rep, vocab_size=vocab, backend=runner.sampler)
    pos = torch.arange(gamma + 1, device=inp.start.device)
    if method == "coupled":
        # every position's target draw with the plain sampler's seed and offset: a draft passes iff it is
        # that draw, so the run is the plain sampler's tokens whatever the rounds
        drawn = rast_kernels.rast_sample(large, pairs_t, **target,
                                         seed=inp.seed.repeat_interleave(gamma + 1),
                                         offset=(offset[:, None] + pos).reshape(-1)).view(-1, gamma + 1)
        accepted = (drafted == drawn[:, :gamma]).to(torch.int64).cumprod(1).sum(1)
        tokens = torch.where(pos <= accepted[:, None], drawn, torch.full_like(drawn, -1))
    else:
        accepted, tokens = _rejection(large, small[:2 * pairs], pairs_t, target, drafted, params, weights, draft, seeds,
                                      offset, gamma, adjust)
    return tokens, accepted, large, small


def run_round(runner: ModelRunner, seqs: Seq[Sequence], draws: Seq[Draw], gamma: int, draft: str,
              method: str = "coupled") -> PendingRound:
    """Draft γ tokens per sequence with the small models, verify them with the large one, accept/reject
    (under the caller's inference mode). Draw i belongs to sequence i. A round of the runner's full γ
    whose batch fits a graph bucket replays that bucket's captured round (ModelRunner.round_graphs), unless
    a draw is adjusted (adjust.py): that round runs eagerly."""
    n, graphs = len(seqs), runner.round_graphs
    adjust = RoundAdjust.build(seqs, draws, runner.vocab_size, runner.device, runner._to_device)
    bucket = graphs.bucket(n) if graphs is not None and gamma == runner.max_lookahead and adjust is None else None
    if bucket is None:
        tokens, accepted, large, small = round_core(runner, RoundInputs.from_host(runner, seqs, draws, gamma), gamma,
                                                    draft, method, adjust)
    else:
        graphs.ensure(bucket)  # a guard (all were captured at start); before fill: capture pads rows
        runner.fill_buffers(seqs, draws, bucket)
        tokens, accepted, large, small = graphs.replay(bucket)
        # the next replay overwrites these: read before it (the host copies below are queued first; on the
        # CPU emulator the host reads them later, so it keeps its own)
        tokens, accepted = (t[:n] if runner.pin else t[:n].clone() for t in (tokens, accepted))
        large, small = large[:n * (gamma + 1)], [t[:n * (gamma + 1)] for t in small]
    logprobs = None
    if any(d.params.logprobs is not None for d in draws):
        # every position's row, its token the one emitted there (-1 past the run: clamped, never read)
        # small holds the adjustment pair last (weight 1): the raw logprobs are the combination's without it
        adjusted = adjust is not None and not runner.raw_logprobs
        extra, small = ([1.0], small) if adjusted else ([], small[:-2] if adjust is not None else small)
        row_draws = [Draw(i * (gamma + 1) + j, d.params, d.weights + extra, d.seed, d.offset + j)
                     for i, d in enumerate(draws) for j in range(gamma + 1)]
        logprobs = draw_logprobs([large] + small, row_draws, tokens.reshape(-1).clamp(min=0), runner._to_device,
                                 runner.vocab_size, runner.sampler, runner.raw_logprobs)
    counts, event = accepted + 1, None
    if runner.pin:  # copies queued now, read by wait() after the event
        tokens, counts = tokens.to("cpu", non_blocking=True), counts.to("cpu", non_blocking=True)
        logprobs = None if logprobs is None else logprobs.to_host()
        event = torch.cuda.Event()
        event.record()
    return PendingRound(tokens, counts, logprobs, event)


def _rejection(large: torch.Tensor, small: list[torch.Tensor], pairs_t: list, target: dict, drafted: torch.Tensor,
               params: dict, weights: torch.Tensor, draft: str, seeds: dict, offset: torch.Tensor, gamma: int,
               adjust: Optional[RoundAdjust]) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling's accept/reject on the full distributions (accept.py): (accepted, tokens). q
    is the distribution each draft was drawn from: with its draft step's adjustment pair."""
    bsz = drafted.shape[0]
    p = rast_kernels.rast_probs(large, pairs_t, **target).view(bsz, gamma + 1, -1)
    if gamma:
        rows = [t.view(bsz, gamma + 1, -1)[:, :gamma].flatten(0, 1) for t in small]
        logits, deltas, w = _draft_inputs(rows[0::2], rows[1::2], weights.repeat_interleave(gamma, dim=0), draft)
        if adjust is not None:
            deltas, w = with_pair(deltas, w, bsz * gamma, adjust.draft_pair(), logits.device)
        q = rast_kernels.rast_probs(logits, deltas, weights=w, **{k: v.repeat_interleave(gamma) for k, v in params.items()},
                                    vocab_size=target["vocab_size"], backend=target["backend"]).view(bsz, gamma, -1)
    else:
        q = p[:, :0]
    accepted, nxt = accept_drafts(p, q, drafted, seeds[ACCEPT_SALT], seeds[RESIDUAL_SALT], offset)
    pos = torch.arange(gamma + 1, device=drafted.device)
    padded = torch.cat([drafted, nxt[:, None]], dim=1)
    return accepted, torch.where(pos < accepted[:, None], padded, torch.where(pos == accepted[:, None], nxt[:, None], -1))


def commit_round(engine: LLMEngine, seqs: Seq[Sequence], runs: list[list[DrawResult]], gamma: int,
                 cut: Seq[bool]) -> dict[str, SequenceGroup]:
    """Take a round's tokens: each sequence appends its run one token at a time with every stop rule
    checked after each, so it stops at the token where plain decoding would (the rest of the run is
    dropped). Each appended token makes the one before it computed. Returns the requests that progressed."""
    progressed: dict[str, SequenceGroup] = {}
    for seq, run, drafts_only in zip(seqs, runs, cut):
        if seq.status is not SequenceStatus.RUNNING:  # finished or aborted while the round ran
            continue
        engine.spec_counts.drafted += gamma
        engine.spec_counts.accepted += len(run) - (not drafts_only)  # a run ends in the target's own token
        for result in run:
            seq.num_computed_tokens += 1
            seq.append_token(result.token_id, result.logprobs)
            engine.block_manager.register_computed(seq)  # before a stop frees the blocks
            engine._generation_tokens += 1
            engine._read_text(seq)
            if seq.status is not SequenceStatus.RUNNING:
                break
        progressed[seq.group.request_id] = seq.group
    return progressed
