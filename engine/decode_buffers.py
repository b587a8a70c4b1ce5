"""Static decode-step inputs: device tensors at fixed addresses, filled from pinned host staging.

A decode step has one new token per sequence, so its inputs are per-row values: token id, position,
slot, context length, block-table row, and the row's sampling parameters. They live here in tensors
allocated once for ``max_rows`` rows; a step writes its rows into host staging (pinned on CUDA) and
sends each group to the device with one non_blocking copy. CUDA graphs read these tensors in place,
and the eager path reads views of their first rows, so both see the same layout.

Padding rows (a graph bucket larger than the batch) are inert: slot -1 stores nothing, context length
0 makes attention output zeros, temperature 0 makes the sampler take the cheap greedy path, weight 0.

Block-table rows are cached per row: a row is rewritten only when the sequence in it changes, or its
table grew or had its last entry replaced. That relies on BlockManager's invariant that a sequence's
block table changes only by reassignment (a new list), append, or replacement of its last entry
(copy-on-write of the block being written).

Token feedback (scheduling ahead): a step launched before the previous step's ids reached the host takes
a row's input token from the previous step's sampled ids on the device. Every step stores its ids in the
device-only ``sampled`` row of the i64 group, and reads its input ids by one gather through ``token_src``:
an index into that group seen flat, pointing at the row's host-written id or at a ``sampled`` entry. The
host-to-device copy covers the rows before ``sampled``, so it never overwrites it.

Staging is double-buffered (fills alternate between two sets): with two steps in flight, step t+1's rows
are written while step t's copies may still be queued. A set is rewritten for step t+2 only after the
engine has waited for step t's ids, which the device produced after it read that set, so no wait and
no event is needed here.

On CPU the "device" tensors are the staging tensors themselves unless ``staging=True`` asks for separate
ones (tests use it to run the copy path without a GPU).
"""
from __future__ import annotations

from typing import Optional, Sequence as Seq

import torch

from rast_engine.attention.metadata import AttentionMetadata
from rast_engine.sequence import Sequence

I64_ROWS = ("input_ids", "token_src", "positions", "slot_mapping", "seed", "offset")  # host-written
SAMPLED = len(I64_ROWS)  # the i64 group's extra, device-written row: the last step's sampled ids
I32_ROWS = ("context_lens", "top_k", "lora_slot")  # lora_slot: AttentionMetadata.lora_slots
F32_ROWS = ("temperature", "top_p", "min_p")
PAD_VALUES = {"slot_mapping": -1, "top_p": 1.0, "lora_slot": -1}  # every other field pads with 0


class DecodeBuffers:
    def __init__(self, max_rows: int, max_blocks: int, pairs: int, block_size: int, device: torch.device,
                 staging: Optional[bool] = None) -> None:
        self.max_rows, self.max_blocks, self.pairs, self.block_size = max_rows, max_blocks, pairs, block_size
        self.device = device
        pin = device.type == "cuda"
        separate = pin if staging is None else staging
        shapes = dict(i64=((len(I64_ROWS) + 1, max_rows), torch.int64), i32=((len(I32_ROWS), max_rows), torch.int32),
                      f32=((len(F32_ROWS), max_rows), torch.float32),
                      weights=((max_rows, max(pairs, 1)), torch.float32),
                      tables=((max_rows, max_blocks), torch.int32))
        self._hosts = [{k: torch.zeros(s, dtype=d, pin_memory=pin) for k, (s, d) in shapes.items()}
                       for _ in range(2 if separate else 1)]  # without separate device tensors, no copies
        # the host writes staging through numpy views of the same memory: a step's dozen small writes
        # then cost a few µs instead of a torch dispatch (and index arithmetic) each, on the path
        # between one step's end and the next step's launch, where the GPU idles
        self._nps = [{k: t.numpy() for k, t in host.items()} for host in self._hosts]
        self.dev = ({k: torch.zeros(s, dtype=d, device=device) for k, (s, d) in shapes.items()}
                    if separate else self._hosts[0])
        self.cu_seqlens = torch.arange(max_rows + 1, dtype=torch.int32, device=device)  # one token per row
        self._owner_sets: list[list[Optional[tuple[list[int], int, int]]]] = [[None] * max_rows for _ in self._hosts]
        self._turn = 0  # the staging set being written and sent
        for turn in range(len(self._hosts)):
            self._turn = turn
            self.pad(0, max_rows)

    @property
    def host(self) -> dict[str, torch.Tensor]:
        return self._hosts[self._turn]

    @property
    def _np(self) -> dict:
        return self._nps[self._turn]

    def _row(self, group: str, names: tuple[str, ...], name: str, which: str = "dev") -> torch.Tensor:
        return getattr(self, which)[group][names.index(name)]

    def pad(self, start: int, stop: int) -> None:
        """Make host rows [start, stop) inert padding (the device sees them at the next send)."""
        if start >= stop:
            return
        for group, names in (("i64", I64_ROWS), ("i32", I32_ROWS), ("f32", F32_ROWS)):
            for i, name in enumerate(names):
                self._np[group][i, start:stop] = PAD_VALUES.get(name, 0)
        self._np["weights"][start:stop] = 0.0

    def fill(self, seqs: Seq[Sequence], temperature: list[float], top_k: list[int], top_p: list[float],
             min_p: list[float], seeds: list[int], offsets: list[int], weights: list[list[float]],
             rows: int, feed: Optional[Seq[int]] = None) -> None:
        """Write the batch into rows [0, len(seqs)), pad up to ``rows``, and send rows [0, rows).
        ``feed[i]``: the row of the previous step whose sampled id is row i's input token (its last token
        is pending); None: every input token is known on the host."""
        n, bs = len(seqs), self.block_size
        if not 0 < n <= rows <= self.max_rows:
            raise ValueError(f"a decode batch of {n} sequences padded to {rows} rows; at most {self.max_rows}")
        fed = [s.num_pending > 0 for s in seqs]
        if feed is None and any(fed):
            raise RuntimeError("a decode batch has pending input tokens but no feed from the previous step")
        if feed is not None and (len(feed) != n or not all(fed) or not all(0 <= r < self.max_rows for r in feed)):
            raise RuntimeError(f"feed must give each of the {n} rows, all with a pending input token, a row of "
                               f"the previous step in [0, {self.max_rows})")
        self._turn = (self._turn + 1) % len(self._hosts)
        tables, owners = self._np["tables"], self._owner_sets[self._turn]
        for i, s in enumerate(seqs):  # per sequence, only when its table changed; never per block
            t, owner = s.block_table, owners[i]
            if owner is None or owner[0] is not t:
                tables[i] = 0
                tables[i, :len(t)] = t
            elif owner[1] != len(t) or owner[2] != t[-1]:
                start = owner[1] - 1
                tables[i, start:len(t)] = t[start:]
            owners[i] = (t, len(t), t[-1])
        pos = [len(s.token_ids) - 1 for s in seqs]  # the new token's position; its slot is in the table
        i64, i32, f32 = self._np["i64"], self._np["i32"], self._np["f32"]
        r = self.max_rows
        src = range(n) if feed is None else [SAMPLED * r + f for f in feed]
        i64[:len(I64_ROWS), :n] = [[0 if f else s.token_ids[-1] for s, f in zip(seqs, fed)], src, pos,
                                   [s.block_table[p // bs] * bs + p % bs for s, p in zip(seqs, pos)], seeds, offsets]
        i32[:, :n] = [[p + 1 for p in pos], top_k, [s.group.lora_slot for s in seqs]]
        f32[:, :n] = [temperature, top_p, min_p]
        if self.pairs:
            self._np["weights"][:n, :self.pairs] = weights
        self.pad(n, rows)
        self.send(rows)

    def send(self, rows: int) -> None:
        if self.dev is self.host:
            return
        host_rows = len(I64_ROWS)  # not SAMPLED: the device writes it
        self.dev["i64"][:host_rows].copy_(self.host["i64"][:host_rows], non_blocking=True)
        for key in ("i32", "f32"):  # a few KB each: whole tensors, one contiguous copy apiece
            self.dev[key].copy_(self.host[key], non_blocking=True)
        for key in ("weights", "tables"):
            self.dev[key][:rows].copy_(self.host[key][:rows], non_blocking=True)

    # ---- views of the first ``rows`` rows, as the step reads them ---------------------------------
    def input_ids(self, rows: int) -> torch.Tensor:
        """Each row's input token: host-written, or fed from the last step's sampled ids (one gather)."""
        return self.dev["i64"].view(-1).index_select(0, self._row("i64", I64_ROWS, "token_src")[:rows])

    def store_sampled(self, ids: torch.Tensor) -> None:
        """Keep this step's sampled ids on the device, for the next step's feed. A -1 (no admissible
        token) is stored as 0: the step launched ahead reads it before the host sees the -1, and on CUDA
        an embedding lookup of -1 is a device-side assert, which no later CUDA call survives. The host
        reads the raw ids, raises, and undoes both steps (LLMEngine.step). A step with more draws than
        rows (forks of many samples) keeps its first ``max_rows``: only those can be fed (see
        LLMEngine._launch_ahead)."""
        if ids.shape[0] > self.max_rows:
            ids = ids[:self.max_rows]
        torch.clamp(ids, min=0, out=self.dev["i64"][SAMPLED, :ids.shape[0]])  # one op, as a copy

    def sampled_ids(self, rows: torch.Tensor) -> torch.Tensor:
        """The last step's sampled ids at ``rows`` (a device index): a prefill step's fed input tokens."""
        return self.dev["i64"][SAMPLED].index_select(0, rows)

    def positions(self, rows: int) -> torch.Tensor:
        return self._row("i64", I64_ROWS, "positions")[:rows]

    def meta(self, rows: int, max_seqlen_k: int) -> AttentionMetadata:
        return AttentionMetadata(
            is_prefill=False, slot_mapping=self._row("i64", I64_ROWS, "slot_mapping")[:rows],
            block_tables=self.dev["tables"][:rows], context_lens=self._row("i32", I32_ROWS, "context_lens")[:rows],
            cu_seqlens_q=self.cu_seqlens[:rows + 1], max_seqlen_q=1, max_seqlen_k=max_seqlen_k,
            block_size=self.block_size, lora_slots=self._row("i32", I32_ROWS, "lora_slot")[:rows])

    def sampling(self, rows: int) -> dict[str, torch.Tensor]:
        """rast_sample keyword arguments: per-row parameter tensors."""
        out = {name: self._row("f32", F32_ROWS, name)[:rows] for name in F32_ROWS}
        out["top_k"] = self._row("i32", I32_ROWS, "top_k")[:rows]
        out["seed"] = self._row("i64", I64_ROWS, "seed")[:rows]
        out["offset"] = self._row("i64", I64_ROWS, "offset")[:rows]
        out["weights"] = self.dev["weights"][:rows, :self.pairs]
        return out
