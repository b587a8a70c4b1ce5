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

On CPU the "device" tensors are the staging tensors themselves unless ``staging=True`` asks for separate
ones (tests use it to run the copy path without a GPU).
"""
from __future__ import annotations

from typing import Optional, Sequence as Seq

import torch

from rast_engine.attention.metadata import AttentionMetadata
from rast_engine.sequence import Sequence

I64_ROWS = ("input_ids", "positions", "slot_mapping", "seed", "offset")
I32_ROWS = ("context_lens", "top_k")
F32_ROWS = ("temperature", "top_p", "min_p")
PAD_VALUES = {"slot_mapping": -1, "top_p": 1.0}  # every other field pads with 0


class DecodeBuffers:
    def __init__(self, max_rows: int, max_blocks: int, pairs: int, block_size: int, device: torch.device,
                 staging: Optional[bool] = None) -> None:
        self.max_rows, self.max_blocks, self.pairs, self.block_size = max_rows, max_blocks, pairs, block_size
        self.device = device
        pin = device.type == "cuda"
        separate = pin if staging is None else staging
        shapes = dict(i64=((len(I64_ROWS), max_rows), torch.int64), i32=((len(I32_ROWS), max_rows), torch.int32),
                      f32=((len(F32_ROWS), max_rows), torch.float32),
                      weights=((max_rows, max(pairs, 1)), torch.float32),
                      tables=((max_rows, max_blocks), torch.int32))
        self.host = {k: torch.zeros(s, dtype=d, pin_memory=pin) for k, (s, d) in shapes.items()}
        # the host writes staging through numpy views of the same memory: a step's dozen small writes
        # then cost a few µs instead of a torch dispatch (and index arithmetic) each, on the path
        # between one step's end and the next step's launch, where the GPU idles
        self._np = {k: t.numpy() for k, t in self.host.items()}
        self.dev = ({k: torch.zeros(s, dtype=d, device=device) for k, (s, d) in shapes.items()}
                    if separate else self.host)
        self.cu_seqlens = torch.arange(max_rows + 1, dtype=torch.int32, device=device)  # one token per row
        self._owners: list[Optional[tuple[list[int], int, int]]] = [None] * max_rows
        self.pad(0, max_rows)

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
             rows: int) -> None:
        """Write the batch into rows [0, len(seqs)), pad up to ``rows``, and send rows [0, rows)."""
        n, bs = len(seqs), self.block_size
        if not 0 < n <= rows <= self.max_rows:
            raise ValueError(f"a decode batch of {n} sequences padded to {rows} rows; at most {self.max_rows}")
        tables = self._np["tables"]
        for i, s in enumerate(seqs):  # per sequence, only when its table changed; never per block
            t, owner = s.block_table, self._owners[i]
            if owner is None or owner[0] is not t:
                tables[i] = 0
                tables[i, :len(t)] = t
            elif owner[1] != len(t) or owner[2] != t[-1]:
                start = owner[1] - 1
                tables[i, start:len(t)] = t[start:]
            self._owners[i] = (t, len(t), t[-1])
        pos = [len(s.token_ids) - 1 for s in seqs]  # the new token's position; its slot is in the table
        i64, i32, f32 = self._np["i64"], self._np["i32"], self._np["f32"]
        i64[:, :n] = [[s.token_ids[-1] for s in seqs], pos,
                      [s.block_table[p // bs] * bs + p % bs for s, p in zip(seqs, pos)], seeds, offsets]
        i32[:, :n] = [[p + 1 for p in pos], top_k]
        f32[:, :n] = [temperature, top_p, min_p]
        if self.pairs:
            self._np["weights"][:n, :self.pairs] = weights
        self.pad(n, rows)
        self.send(rows)

    def send(self, rows: int) -> None:
        if self.dev is self.host:
            return
        for key in ("i64", "i32", "f32"):  # a few KB each: whole tensors, one contiguous copy apiece
            self.dev[key].copy_(self.host[key], non_blocking=True)
        for key in ("weights", "tables"):
            self.dev[key][:rows].copy_(self.host[key][:rows], non_blocking=True)

    def release_rows(self) -> None:
        """Forget the cached table rows (their sequences may be gone); the next fill rewrites them."""
        self._owners = [None] * self.max_rows

    # ---- views of the first ``rows`` rows, as the step reads them ---------------------------------
    def input_ids(self, rows: int) -> torch.Tensor:
        return self._row("i64", I64_ROWS, "input_ids")[:rows]

    def positions(self, rows: int) -> torch.Tensor:
        return self._row("i64", I64_ROWS, "positions")[:rows]

    def meta(self, rows: int, max_seqlen_k: int) -> AttentionMetadata:
        return AttentionMetadata(
            is_prefill=False, slot_mapping=self._row("i64", I64_ROWS, "slot_mapping")[:rows],
            block_tables=self.dev["tables"][:rows], context_lens=self._row("i32", I32_ROWS, "context_lens")[:rows],
            cu_seqlens_q=self.cu_seqlens[:rows + 1], max_seqlen_q=1, max_seqlen_k=max_seqlen_k,
            block_size=self.block_size)

    def sampling(self, rows: int) -> dict[str, torch.Tensor]:
        """rast_sample keyword arguments: per-row parameter tensors."""
        out = {name: self._row("f32", F32_ROWS, name)[:rows] for name in F32_ROWS}
        out["top_k"] = self._row("i32", I32_ROWS, "top_k")[:rows]
        out["seed"] = self._row("i64", I64_ROWS, "seed")[:rows]
        out["offset"] = self._row("i64", I64_ROWS, "offset")[:rows]
        out["weights"] = self.dev["weights"][:rows, :self.pairs]
        return out
