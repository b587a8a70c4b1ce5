"""The one block table of the engine: block ids index every model's KV pool alike.

Invariants:
- a block with ref_count 0 sits in the free list; the list is LRU, so blocks freed long ago are reused
  first and a freed block keeps its prefix-cache entry until it is reused;
- only full blocks whose K/V has been computed are hashed; full blocks are never written again, so a
  hashed block may be shared by any number of sequences;
- a partial block is written only when its ref_count is 1: a shared one is first copied
  (copy-on-write), which happens after an n > 1 fork;
- a sequence's table may reach past its last token (a speculative round's lookahead): those blocks
  hold K/V of rejected drafts at most, overwritten before any read; shared by a fork, each sharer
  takes a fresh one before writing (no copy: nothing in them is computed).
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from typing import Optional

from rast_engine.prompt_logprobs import pending as prompt_logprobs_pending
from rast_engine.sequence import Sequence


def block_hash(parent: bytes, tokens: list[int]) -> bytes:
    """A hash of the block's tokens chained with every block before it (the whole prefix)."""
    return hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=16).digest()


def _check_root(seq: Sequence) -> None:
    """A request waiting for its LoRA adapter's load has no prefix-cache root yet (nor a slot): it is never
    given blocks nor hashed before the load, which would root its R's blocks at another adapter's."""
    if seq.group.lora_pending is not None:
        raise RuntimeError(f"request {seq.group.request_id} waits for its LoRA adapter's slot: no blocks yet")


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks and block_size must be positive, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.free_list: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.cached: dict[bytes, int] = {}  # hash -> block id
        self.hash_of: dict[int, bytes] = {}  # block id -> its hash while it is cached
        self.prefix_hits = 0  # blocks reused from the prefix cache, for stats and tests

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_list)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_list)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- prefill ------------------------------------------------------------------------------------
    def _prefix_hits(self, seq: Sequence) -> tuple[list[int], list[bytes]]:
        _check_root(seq)
        if not self.enable_prefix_caching or prompt_logprobs_pending(seq.group):  # a hit has no logits
            return [], []
        bs = self.block_size
        # at least one token must be computed to get the last position's logits, and it must not land
        # in a shared block: so a prompt that is all full hit blocks recomputes its last block
        max_blocks = (len(seq.token_ids) - 1) // bs
        blocks: list[int] = []
        hashes: list[bytes] = []
        parent = seq.group.hash_root
        for i in range(max_blocks):
            h = block_hash(parent, seq.token_ids[i * bs:(i + 1) * bs])
            block = self.cached.get(h)
            if block is None:
                break
            blocks.append(block)
            hashes.append(h)
            parent = h
        return blocks, hashes

    def uncached_tokens(self, seq: Sequence) -> int:
        """Tokens of a waiting sequence that allocate() leaves to compute: all but its prefix-cache hits."""
        return len(seq.token_ids) - len(self._prefix_hits(seq)[0]) * self.block_size

    def can_allocate(self, seq: Sequence, use_cache: bool = True, reserve: int = 0) -> bool:
        """Whether allocate() finds blocks for ``seq`` and leaves ``reserve`` free ones (for the running
        sequences' next slots)."""
        hits = self._prefix_hits(seq)[0] if use_cache else []
        fresh = self.blocks_needed(len(seq.token_ids)) - len(hits)
        revived = sum(1 for b in hits if self.ref_counts[b] == 0)  # cached but free: leaves the free list
        return fresh + revived + reserve <= self.num_free_blocks

    def allocate(self, seq: Sequence, use_cache: bool = True) -> None:
        """Give a waiting sequence blocks for all its tokens, reusing cached prefix blocks."""
        if seq.block_table:
            raise RuntimeError(f"sequence {seq.seq_id} already holds blocks")
        if not self.can_allocate(seq, use_cache):
            raise RuntimeError("allocate() without enough free blocks; call can_allocate() first")
        hits, hashes = self._prefix_hits(seq) if use_cache else ([], [])
        for b in hits:
            if self.ref_counts[b] == 0:
                del self.free_list[b]
            self.ref_counts[b] += 1
        self.prefix_hits += len(hits)
        fresh = [self._take_free() for _ in range(self.blocks_needed(len(seq.token_ids)) - len(hits))]
        seq.block_table = hits + fresh
        seq.block_hashes = hashes
        seq.num_computed_tokens = len(hits) * self.block_size
        if seq.group.num_cached_tokens is None:
            seq.group.num_cached_tokens = seq.num_computed_tokens

    def _take_free(self) -> int:
        block, _ = self.free_list.popitem(last=False)
        h = self.hash_of.pop(block, None)
        if h is not None:
            del self.cached[h]
        self.ref_counts[block] = 1
        return block

    # ---- decode -------------------------------------------------------------------------------------
    def _shared(self, seq: Sequence, lookahead: int) -> list[int]:
        """Indices of the shared blocks among those that hold the last token and the ``lookahead`` after it."""
        first = (len(seq.token_ids) - 1) // self.block_size
        last = min((len(seq.token_ids) - 1 + lookahead) // self.block_size, len(seq.block_table) - 1)
        return [i for i in range(first, last + 1) if self.ref_counts[seq.block_table[i]] > 1]

    def _new_blocks(self, seq: Sequence, lookahead: int) -> int:
        """Blocks past the table that the uncomputed last token's slot and the ``lookahead`` slots after
        it (a speculative round's drafts) need."""
        first = (len(seq.token_ids) - 1) // self.block_size
        if first > len(seq.block_table):
            raise RuntimeError(f"sequence {seq.seq_id} is more than one block ahead of its block table")
        return max((len(seq.token_ids) - 1 + lookahead) // self.block_size + 1 - len(seq.block_table), 0)

    def _append_need(self, seq: Sequence, lookahead: int = 0) -> int:
        """Free blocks that make those slots writable: new blocks, plus one for each shared block among
        them (copy-on-write)."""
        return self._new_blocks(seq, lookahead) + len(self._shared(seq, lookahead))

    def can_append(self, seq: Sequence, lookahead: int = 0) -> bool:
        return self._append_need(seq, lookahead) <= self.num_free_blocks

    def append_need_all(self, seqs: list[Sequence]) -> int:
        """Free blocks that every sequence taking its next slot needs, in any order: a block that k of
        them write into and r hold is copied min(k, r - 1) times (the last holder keeps it)."""
        writers: dict[int, int] = {}
        new = 0
        for seq in seqs:
            new += self._new_blocks(seq, 0)
            for i in self._shared(seq, 0):
                writers[seq.block_table[i]] = writers.get(seq.block_table[i], 0) + 1
        return new + sum(min(k, self.ref_counts[b] - 1) for b, k in writers.items())

    def can_append_all(self, seqs: list[Sequence]) -> bool:
        return self.append_need_all(seqs) <= self.num_free_blocks

    def append_slot(self, seq: Sequence, lookahead: int = 0) -> Optional[tuple[int, int]]:
        """Make the last token's slot and the ``lookahead`` after it writable; returns (src, dst) when the
        last token's block must be copied first. A shared block past it (a fork after a step that took
        lookahead blocks) holds no computed token, so it is replaced by a fresh one without a copy."""
        first = (len(seq.token_ids) - 1) // self.block_size
        copy = None
        replaced = self._shared(seq, lookahead)
        if replaced:  # a new list, not entries changed in place: DecodeBuffers rewrites the whole row then
            seq.block_table = list(seq.block_table)
        for i in replaced:
            shared, fresh = seq.block_table[i], self._take_free()
            self.ref_counts[shared] -= 1
            seq.block_table[i] = fresh
            if i == first:
                copy = (shared, fresh)
        while len(seq.block_table) <= (len(seq.token_ids) - 1 + lookahead) // self.block_size:
            seq.block_table.append(self._take_free())
        return copy

    # ---- sharing and release ------------------------------------------------------------------------
    def fork(self, parent: Sequence, child: Sequence) -> None:
        for b in parent.block_table:
            self.ref_counts[b] += 1
        child.block_table = list(parent.block_table)
        child.block_hashes = list(parent.block_hashes)
        child.num_computed_tokens = parent.num_computed_tokens

    def free(self, seq: Sequence) -> None:
        # tail blocks enter the LRU list first, so a shared prefix outlives the tail that follows it
        for b in reversed(seq.block_table):
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                self.free_list[b] = None
            elif self.ref_counts[b] < 0:
                raise RuntimeError(f"block {b} freed more often than it was taken")
        seq.block_table = []
        seq.block_hashes = []

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block (vLLM's reset_prefix_cache: after the weights change, none may be
        reused); False, with nothing changed, while any block is held by a sequence."""
        if any(self.ref_counts):
            return False
        self.cached.clear()
        self.hash_of.clear()
        return True

    def register_computed(self, seq: Sequence) -> None:
        """Hash the sequence's blocks that became full and computed, so later prompts can reuse them.
        Tokens counted as computed by a step still in flight (one per pending token, see sequence.py) are
        left out: that step may yet fail, and its block must not be found by a prompt then."""
        if not self.enable_prefix_caching:
            return
        _check_root(seq)
        bs = self.block_size
        for i in range(len(seq.block_hashes), (seq.num_computed_tokens - seq.num_pending) // bs):
            parent = seq.block_hashes[-1] if seq.block_hashes else seq.group.hash_root
            h = block_hash(parent, seq.token_ids[i * bs:(i + 1) * bs])
            seq.block_hashes.append(h)
            block = seq.block_table[i]
            if h not in self.cached and block not in self.hash_of:
                self.cached[h] = block
                self.hash_of[block] = h
