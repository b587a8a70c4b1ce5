"""The host-side plan of CUDA-graph decoding, which needs no GPU: which buckets exist, which bucket a
batch replays (or none: eager), the order they are captured in, the config knob that caps them, and
the runner's dispatch on a stand-in for DecodeGraphs (the real graphs are tested in test_gpu_engine)."""
from __future__ import annotations

import pytest

from rast_engine import SamplingParams
from rast_engine.config import EngineConfig
from rast_engine.cuda_graph import DecodeGraphs, batch_buckets, pick_bucket
from rast_engine.errors import RastError
from fast_path_util import generate, make_engine, prompts


@pytest.mark.parametrize("cap", [1, 3, 8, 20, 64])
def test_pick_bucket_is_the_smallest_that_holds_the_batch(cap: int) -> None:
    buckets = batch_buckets(cap)
    for rows in range(1, 2 * cap + 2):
        holding = [b for b in buckets if b >= rows]
        assert pick_bucket(buckets, rows) == (min(holding) if holding else None)
    assert pick_bucket(buckets, cap) == cap and pick_bucket(buckets, cap + 1) is None


def test_capture_all_takes_every_bucket_once_largest_first() -> None:
    graphs = object.__new__(DecodeGraphs)  # no CUDA here: only the order of the ensure calls is checked
    graphs.buckets, graphs.stages = batch_buckets(40), ()
    order: list[int] = []
    graphs.ensure = order.append
    graphs.capture_all()
    assert order == sorted(batch_buckets(40), reverse=True)


@pytest.mark.parametrize("bad", [0, -4, 2.5, True, "8"])
def test_cuda_graph_max_batch_must_be_a_positive_int(bad: object) -> None:
    with pytest.raises(RastError, match="cuda_graph_max_batch"):
        EngineConfig(model="m", cuda_graph_max_batch=bad)


def test_cuda_graph_max_batch_accepts_none_and_caps() -> None:
    assert EngineConfig(model="m").cuda_graph_max_batch is None
    assert EngineConfig(model="m", max_num_seqs=8, cuda_graph_max_batch=32).cuda_graph_max_batch == 32


class StepGraphs:
    """DecodeGraphs' contract without CUDA: a replay runs the captured step function on the bucket's
    static rows as they are, which is what the graph does."""

    def __init__(self, runner, max_rows: int) -> None:  # noqa: ANN001
        self.buckets, self.step, self.forward = batch_buckets(max_rows), runner._decode_step, runner._decode_forward
        self.ensured: list[int] = []
        self.replayed: list[int] = []

    def bucket(self, rows: int):  # noqa: ANN201
        return pick_bucket(self.buckets, rows)

    def ensure(self, rows: int) -> None:
        self.ensured.append(rows)

    def replay(self, rows: int, stages: int | None = None) -> object:
        self.replayed.append(rows)
        return self.forward(rows) if stages == 1 else self.step(rows)


def test_runner_replays_padded_buckets_and_decodes_larger_batches_eagerly(qwen2_triple: tuple) -> None:
    """The runner's dispatch with a graph cap of 4: a batch of 3 replays bucket 4 (one padding row), a
    batch of 6 runs eagerly on its 6 rows; both equal an engine without graphs."""
    eager = make_engine(qwen2_triple, max_num_seqs=8)
    capped = make_engine(qwen2_triple, max_num_seqs=8)
    graphs = capped.runner.graphs = StepGraphs(capped.runner, max_rows=4)
    params = SamplingParams(temperature=0.9, top_k=20, max_tokens=4, ignore_eos=True, seed=2)
    assert generate(capped, prompts(3, seed=1), params) == generate(eager, prompts(3, seed=1), params)
    assert graphs.replayed == [4] * (params.max_tokens - 1) and graphs.ensured == graphs.replayed
    assert generate(capped, prompts(6, seed=2), params) == generate(eager, prompts(6, seed=2), params)
    assert graphs.replayed == [4] * (params.max_tokens - 1)  # no bucket holds 6 rows: nothing replayed
