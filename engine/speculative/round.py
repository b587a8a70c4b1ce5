"""One speculative round over a decode batch, on the model runner's units and pools (see __init__.py).

Inputs are built once on the host (last tokens, positions, block tables); each draft step's and the
verify's metadata are derived from them on the device, so the round reads nothing back until its tokens.
Invariant on entry (the scheduler's lookahead): every sequence's blocks cover its last token's position
P and the γ positions after it, writable; on exit the cache holds valid K/V up to P + accepted, the rest
is overwritten by later rounds before anything reads it (attention reads keys below context_lens only).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence as Seq

import torch

import rast_kernels
from rast_engine.attention.metadata import AttentionMetadata
from rast_engine.draws import Draw, draw_logprobs, row_params
from rast_engine.pending import DrawLogprobs, DrawResult
from rast_engine.sequence import Sequence, SequenceGroup, SequenceStatus
from rast_engine.speculative.accept import ACCEPT_SALT, DRAFT_SALT, RESIDUAL_SALT, accept_drafts, salted

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

    done = False  # never on the host before wait(): the engine does not schedule ahead of a round

    def wait(self) -> list[list[DrawResult]]:
        if self._runs is None:
            if self._event is not None:
                self._event.synchronize()
            tokens, counts = self._tokens.tolist(), self._counts.tolist()
            if any(row[c - 1] < 0 for row, c in zip(tokens, counts)):
                raise RuntimeError("the sampler found no admissible token (non-finite logits in every column)")
            flat = [DrawResult(t, None) for row in tokens for t in row]
            if self._logprobs is not None:
                self._logprobs.fill(flat)
            width = len(tokens[0]) if tokens else 0
            self._runs = [flat[i * width:i * width + c] for i, c in enumerate(counts)]
        return self._runs


def _meta(tables: torch.Tensor, start: torch.Tensor, q_len: int, max_start: int, block_size: int,
          is_prefill: bool) -> tuple[torch.Tensor, AttentionMetadata]:
    """Positions [B * q_len] and metadata for q_len new tokens per sequence at start .. start + q_len - 1."""
    bsz = tables.shape[0]
    step = torch.arange(q_len, device=start.device, dtype=torch.int64)
    positions = (start[:, None] + step).reshape(-1)
    seq = torch.arange(bsz, device=start.device).repeat_interleave(q_len)
    slots = tables[seq, positions // block_size].to(torch.int64) * block_size + positions % block_size
    return positions, AttentionMetadata(
        is_prefill=is_prefill, slot_mapping=slots, block_tables=tables,
        context_lens=(start + q_len).to(torch.int32),
        cu_seqlens_q=(torch.arange(bsz + 1, device=start.device, dtype=torch.int32) * q_len),
        max_seqlen_q=q_len, max_seqlen_k=max_start + q_len, block_size=block_size)


def _draft_inputs(rl: list[torch.Tensor], base: list[torch.Tensor], weights: torch.Tensor, draft: str
                  ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]], object]:
    """rast_sample / rast_probs's (logits, deltas, weights) of the draft: R alone, or S + λ·(R − S)."""
    if draft == "rl":
        return rl[0], [], 1.0
    return base[0], list(zip(rl, base)), weights


def run_round(runner: ModelRunner, seqs: Seq[Sequence], draws: Seq[Draw], gamma: int, draft: str,
              method: str = "coupled") -> PendingRound:
    """Draft γ tokens per sequence with the small models, verify them with the large one, accept/reject
    (under the caller's inference mode). Draw i belongs to sequence i."""
    to_dev, bs, vocab = runner._to_device, runner.block_size, runner.vocab_size
    bsz, pairs = len(seqs), runner.pairs
    width = max(len(s.block_table) for s in seqs)
    tables = to_dev(torch.tensor([s.block_table + [0] * (width - len(s.block_table)) for s in seqs],
                                 dtype=torch.int32))
    starts = [len(s.token_ids) - 1 for s in seqs]
    start = to_dev(torch.tensor(starts, dtype=torch.int64))
    last = to_dev(torch.tensor([s.token_ids[-1] for s in seqs], dtype=torch.int64))
    params = row_params(draws, to_dev)
    weights = to_dev(torch.tensor([d.weights for d in draws], dtype=torch.float32).reshape(bsz, pairs))
    offset = to_dev(torch.tensor([d.offset for d in draws], dtype=torch.int64))
    # coupled: the plain sampler's own seed, so a draft and the target's draw share their noise
    salts = (0,) if method == "coupled" else (DRAFT_SALT, ACCEPT_SALT, RESIDUAL_SALT)
    seeds = {salt: to_dev(torch.tensor(salted([d.seed for d in draws], salt), dtype=torch.int64)) for salt in salts}
    large_copies = runner.units[0].copies
    small_units, small_pools = runner.units[1:], runner.kv.pools[1:]
    small_roles = [r - large_copies for r in runner.roles[1:]]  # rl, base per pair among the small logits
    per_step: list[list[torch.Tensor]] = []  # [j] -> per small role, logits [B, width]
    drafts: list[torch.Tensor] = []
    ids = last
    for j in range(gamma + 1):
        positions, meta = _meta(tables, start + j, 1, max(starts) + j, bs, is_prefill=False)
        out = runner.streams.forward(small_units, small_pools, ids, positions, meta, None)
        per_step.append([out[r] for r in small_roles])
        if j == gamma:
            break
        logits, deltas, w = _draft_inputs(per_step[-1][0::2], per_step[-1][1::2], weights, draft)
        ids = rast_kernels.rast_sample(logits, deltas, weights=w, **params, seed=seeds[salts[0]],
                                       offset=offset + j, vocab_size=vocab, backend=runner.sampler)
        # -1 (the draft admits no token) becomes token 0: read as an input, then rejected (q = 0 there, or
        # no draw of the target's is -1)
        ids = ids.clamp(min=0)
        drafts.append(ids)
    tokens_in = torch.stack([last] + drafts, dim=1)  # [B, γ + 1]: the large model's inputs
    positions, meta = _meta(tables, start, gamma + 1, max(starts), bs, is_prefill=True)
    large = runner.streams.forward(runner.units[:1], runner.kv.pools[:1], tokens_in.reshape(-1), positions, meta,
                                   None)[0]
    # rows in (sequence, position) order: row b * (γ + 1) + j
    small = [torch.stack([step[r] for step in per_step], dim=1).flatten(0, 1) for r in range(2 * pairs)]
    drafted = tokens_in[:, 1:]
    rep = {k: v.repeat_interleave(gamma + 1) for k, v in params.items()}
    target = dict(weights=weights.repeat_interleave(gamma + 1, dim=0), **rep, vocab_size=vocab, backend=runner.sampler)
    pos = torch.arange(gamma + 1, device=runner.device)
    if method == "coupled":
        # every position's target draw with the plain sampler's seed and offset: a draft passes iff it is
        # that draw, so the run is the plain sampler's tokens whatever the rounds
        drawn = rast_kernels.rast_sample(large, list(zip(small[0::2], small[1::2])), **target,
                                         seed=seeds[0].repeat_interleave(gamma + 1),
                                         offset=(offset[:, None] + pos).reshape(-1)).view(bsz, gamma + 1)
        accepted = (drafted == drawn[:, :gamma]).to(torch.int64).cumprod(1).sum(1)
        tokens = torch.where(pos <= accepted[:, None], drawn, torch.full_like(drawn, -1))
    else:
        accepted, tokens = _rejection(large, small, target, drafted, params, weights, draft, seeds, offset, gamma)
    logprobs = None
    if any(d.params.logprobs is not None for d in draws):
        # every position's row, its token the one emitted there (-1 past the run: clamped, never read)
        row_draws = [Draw(i * (gamma + 1) + j, d.params, d.weights, d.seed, d.offset + j)
                     for i, d in enumerate(draws) for j in range(gamma + 1)]
        logprobs = draw_logprobs([large] + small, row_draws, tokens.reshape(-1).clamp(min=0), to_dev, vocab,
                                 runner.sampler)
    counts, event = accepted + 1, None
    if runner.pin:  # copies queued now, read by wait() after the event
        tokens, counts = tokens.to("cpu", non_blocking=True), counts.to("cpu", non_blocking=True)
        logprobs = None if logprobs is None else logprobs.to_host()
        event = torch.cuda.Event()
        event.record()
    return PendingRound(tokens, counts, logprobs, event)


def _rejection(large: torch.Tensor, small: list[torch.Tensor], target: dict, drafted: torch.Tensor, params: dict,
               weights: torch.Tensor, draft: str, seeds: dict, offset: torch.Tensor, gamma: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling's accept/reject on the full distributions (accept.py): (accepted, tokens)."""
    bsz = drafted.shape[0]
    p = rast_kernels.rast_probs(large, list(zip(small[0::2], small[1::2])), **target).view(bsz, gamma + 1, -1)
    if gamma:
        rows = [t.view(bsz, gamma + 1, -1)[:, :gamma].flatten(0, 1) for t in small]
        logits, deltas, w = _draft_inputs(rows[0::2], rows[1::2], weights.repeat_interleave(gamma, dim=0), draft)
        q = rast_kernels.rast_probs(logits, deltas, weights=w, **{k: v.repeat_interleave(gamma) for k, v in params.items()},
                                    vocab_size=target["vocab_size"], backend=target["backend"]).view(bsz, gamma, -1)
    else:
        q = p[:, :0]
    accepted, nxt = accept_drafts(p, q, drafted, seeds[ACCEPT_SALT], seeds[RESIDUAL_SALT], offset)
    pos = torch.arange(gamma + 1, device=drafted.device)
    padded = torch.cat([drafted, nxt[:, None]], dim=1)
    return accepted, torch.where(pos < accepted[:, None], padded, torch.where(pos == accepted[:, None], nxt[:, None], -1))


def commit_round(engine: LLMEngine, seqs: Seq[Sequence], runs: list[list[DrawResult]], gamma: int
                 ) -> dict[str, SequenceGroup]:
    """Take a round's tokens: each sequence appends its run one token at a time with every stop rule
    checked after each, so it stops at the token where plain decoding would (the rest of the run is
    dropped). Each appended token makes the one before it computed. Returns the requests that progressed."""
    progressed: dict[str, SequenceGroup] = {}
    for seq, run in zip(seqs, runs):
        if seq.status is not SequenceStatus.RUNNING:  # finished or aborted while the round ran
            continue
        engine.spec_counts.drafted += gamma
        engine.spec_counts.accepted += len(run) - 1
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
