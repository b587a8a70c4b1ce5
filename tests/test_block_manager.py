"""BlockManager: reference counts, copy-on-write after a fork, prefix caching by chained block hash."""
from __future__ import annotations

import pytest
import torch

from rast_engine.block_manager import BlockManager
from rast_engine.sampling_params import SamplingParams
from rast_engine.sequence import Sequence, SequenceGroup

BS = 4


def make_seq(tokens: list[int], n: int = 1) -> Sequence:
    group = SequenceGroup(request_id=str(id(tokens)), prompt=None, prompt_token_ids=list(tokens),
                          params=SamplingParams(n=n), request_seed=0, arrival=0, weights=[])
    seq = Sequence(group=group, index=0, token_ids=list(tokens), seed=0)
    group.seqs.append(seq)
    return seq


def computed(bm: BlockManager, seq: Sequence) -> None:
    """What the engine does after a step: every current token now has its K/V in the cache."""
    seq.num_computed_tokens = len(seq.token_ids)
    bm.register_computed(seq)


def test_allocate_and_free_count_blocks() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS)
    seq = make_seq(list(range(10)))  # 10 tokens -> 3 blocks
    assert bm.can_allocate(seq)
    bm.allocate(seq)
    assert len(seq.block_table) == 3 and len(set(seq.block_table)) == 3
    assert bm.num_used_blocks == 3 and bm.num_free_blocks == 5
    assert all(bm.ref_counts[b] == 1 for b in seq.block_table)
    bm.free(seq)
    assert bm.num_used_blocks == 0 and seq.block_table == []
    assert bm.ref_counts == [0] * 8


def test_can_allocate_refuses_when_short() -> None:
    bm = BlockManager(num_blocks=2, block_size=BS)
    seq = make_seq(list(range(9)))  # needs 3 blocks
    assert not bm.can_allocate(seq)
    with pytest.raises(RuntimeError):
        bm.allocate(seq)
    assert bm.num_free_blocks == 2


def test_append_slot_takes_a_new_block_only_at_a_boundary() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS)
    seq = make_seq([1, 2, 3])
    bm.allocate(seq)
    computed(bm, seq)
    seq.token_ids.append(4)  # position 3: still block 0
    assert bm.append_slot(seq) is None and len(seq.block_table) == 1
    computed(bm, seq)
    seq.token_ids.append(5)  # position 4: needs block 1
    assert bm.can_append(seq)
    assert bm.append_slot(seq) is None and len(seq.block_table) == 2
    assert bm.num_used_blocks == 2


def test_fork_shares_blocks_and_copy_on_write() -> None:
    bm = BlockManager(num_blocks=16, block_size=BS)
    parent = make_seq(list(range(6)), n=3)  # one full block + a partial one
    bm.allocate(parent)
    computed(bm, parent)
    children = [Sequence(group=parent.group, index=i, token_ids=list(parent.token_ids), seed=i) for i in (1, 2)]
    for child in children:
        bm.fork(parent, child)
    assert all(bm.ref_counts[b] == 3 for b in parent.block_table)
    assert bm.num_used_blocks == 2
    full, partial = parent.block_table
    for seq in [parent, *children]:
        seq.token_ids.append(0)
    # the three writers of the shared partial block copy it twice (the last keeps it), in any order; one
    # writer of a block another holds copies it
    assert bm.append_need_all([parent, *children]) == 2 and bm.append_need_all([children[0]]) == 1
    for seq in [parent, *children]:
        seq.token_ids.pop()
    copies = []
    for i, seq in enumerate([parent, *children]):
        seq.token_ids.append(100 + i)  # position 6 lands in the shared partial block
        copies.append(bm.append_slot(seq))
    # the first two writers copy the partial block; the last one owns it and writes in place
    assert copies[0] is not None and copies[0][0] == partial
    assert copies[1] is not None and copies[1][0] == partial
    assert copies[2] is None
    assert len({s.block_table[1] for s in [parent, *children]}) == 3
    assert all(s.block_table[0] == full for s in [parent, *children])
    assert bm.ref_counts[full] == 3 and all(bm.ref_counts[s.block_table[1]] == 1 for s in [parent, *children])
    for seq in [parent, *children]:
        bm.free(seq)
    assert bm.num_used_blocks == 0 and bm.ref_counts == [0] * 16


def test_prefix_cache_hits_reuse_computed_blocks() -> None:
    bm = BlockManager(num_blocks=16, block_size=BS)
    first = make_seq(list(range(10)))  # blocks [0..3] [4..7] full, [8, 9] partial
    bm.allocate(first)
    computed(bm, first)
    second = make_seq(list(range(8)) + [50, 51, 52])
    bm.allocate(second)
    assert second.block_table[:2] == first.block_table[:2]
    assert second.block_table[2] != first.block_table[2]
    assert second.num_computed_tokens == 8 and bm.prefix_hits == 2
    assert (first.group.num_cached_tokens, second.group.num_cached_tokens) == (0, 8)
    # preempted and admitted again, it reads its own computed blocks: the request's figure is its first
    computed(bm, first)
    bm.free(first)
    bm.allocate(first)
    assert first.num_computed_tokens == 8 and first.group.num_cached_tokens == 0
    assert bm.ref_counts[first.block_table[0]] == 2
    # a different first block breaks the chain even if later blocks match
    third = make_seq([99, 1, 2, 3] + list(range(4, 8)) + [7])
    bm.allocate(third)
    assert third.num_computed_tokens == 0 and not set(third.block_table) & set(first.block_table)


def test_prompt_of_full_hit_blocks_recomputes_its_last_block() -> None:
    bm = BlockManager(num_blocks=16, block_size=BS)
    first = make_seq(list(range(8)))
    bm.allocate(first)
    computed(bm, first)
    again = make_seq(list(range(8)))
    bm.allocate(again)
    # one token must be computed for logits, and never inside a shared block
    assert again.num_computed_tokens == 4
    assert again.block_table[0] == first.block_table[0] and again.block_table[1] != first.block_table[1]


def test_freed_cached_blocks_are_revived_then_evicted_lru() -> None:
    bm = BlockManager(num_blocks=3, block_size=BS)
    first = make_seq(list(range(9)))  # 3 blocks, 2 full ones hashed
    bm.allocate(first)
    computed(bm, first)
    kept = list(first.block_table)
    bm.free(first)
    assert bm.num_free_blocks == 3
    again = make_seq(list(range(8)) + [42])
    assert bm.can_allocate(again)  # 2 revived + 1 fresh = every free block
    bm.allocate(again)
    assert again.block_table[:2] == kept[:2] and again.num_computed_tokens == 8
    bm.free(again)
    # a new prompt takes every block: the cache entries of reused blocks must go
    other = make_seq([7] * 12)
    bm.allocate(other)
    assert bm.cached == {} and bm.hash_of == {}
    bm.free(other)
    fresh = make_seq(list(range(9)))
    bm.allocate(fresh)
    assert fresh.num_computed_tokens == 0


def test_prefix_caching_can_be_disabled() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    first = make_seq(list(range(9)))
    bm.allocate(first)
    computed(bm, first)
    second = make_seq(list(range(9)))
    bm.allocate(second)
    assert second.num_computed_tokens == 0 and not set(second.block_table) & set(first.block_table)


def test_lookahead_slots_and_a_fork_that_shares_them() -> None:
    """A speculative round's lookahead: blocks through the last token's position + lookahead, the last
    token's shared block copied, and shared blocks past it (a fork after a step that took lookahead)
    replaced by fresh ones without a copy, for each sharer but the last."""
    bm = BlockManager(num_blocks=16, block_size=BS)
    parent = make_seq(list(range(6)))  # the last token at position 5: block 1
    bm.allocate(parent)
    parent.num_computed_tokens = 5
    assert bm._append_need(parent, 6) == 1  # positions 5..11: blocks 1 and 2, one new
    assert bm.append_slot(parent, 6) is None and len(parent.block_table) == 3
    child = make_seq(list(range(6)))
    bm.fork(parent, child)
    last, ahead = parent.block_table[1], parent.block_table[2]
    assert bm._append_need(child, 6) == 2  # the last token's block and the lookahead block, both shared
    assert bm.append_slot(child, 6) == (last, child.block_table[1])  # only the first needs its K/V copied
    assert child.block_table[0] == parent.block_table[0] and ahead not in child.block_table
    assert bm.ref_counts[last] == bm.ref_counts[ahead] == 1
    assert bm._append_need(parent, 6) == 0 and bm.append_slot(parent, 6) is None  # its own again
    assert len({*parent.block_table[1:], *child.block_table[1:]}) == 4
    bm.free(parent)
    bm.free(child)
    assert bm.ref_counts == [0] * 16


def test_replacing_shared_blocks_reassigns_the_table_so_static_rows_follow() -> None:
    """DecodeBuffers caches each row's block table and rewrites it only when the list is new, grew, or
    its last entry changed. A round's lookahead can replace shared blocks that are not the last entry
    (here the parent's, forked after a step that took lookahead), so append_slot gives the sequence a new
    list: its static row must then equal the table, or the round writes into the sibling's blocks."""
    from rast_engine.decode_buffers import DecodeBuffers

    bm = BlockManager(num_blocks=16, block_size=BS)
    buffers = DecodeBuffers(max_rows=2, max_blocks=4, pairs=0, block_size=BS, device=torch.device("cpu"))
    parent = make_seq(list(range(6)))
    bm.allocate(parent)
    parent.num_computed_tokens = 5
    bm.append_slot(parent, 6)

    def fill() -> list[int]:
        buffers.fill([parent], [0.0], [0], [1.0], [0.0], [0], [0], [[]], rows=1)
        return buffers.dev["tables"][0, :len(parent.block_table)].tolist()

    assert fill() == parent.block_table
    child = make_seq(list(range(6)))
    bm.fork(parent, child)
    before = parent.block_table
    assert bm.append_slot(parent, 6) is not None  # the parent first: both its blocks 1 and 2 are shared
    assert parent.block_table is not before and parent.block_table[1:] != before[1:]
    assert fill() == parent.block_table
