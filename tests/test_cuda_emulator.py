"""The CPU CUDA emulator (tests/cuda_emulator.py) catches what a GPU would: each check here is a mistake
the emulator must reject, next to its correct twin that it must accept. The engine's own fast path runs
under it in test_emulated_fast_path.py."""
from __future__ import annotations

import os

import pytest
import torch

from cuda_emulator import CudaEmulator, EmulatorError, emulated_cuda
from cuda_races import aten_accesses

# the emulator runs Triton kernels in the interpreter on CPU tensors (conftest turns it on without CUDA)
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU runs only (Triton interpreter)")


@pytest.fixture
def emu(monkeypatch: pytest.MonkeyPatch) -> CudaEmulator:
    with emulated_cuda(monkeypatch) as e:
        yield e


def _capture(fn, stream: object = None) -> torch.cuda.CUDAGraph:  # noqa: ANN001
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream or torch.cuda.Stream()):
        fn()
    return graph


def test_replay_freezes_host_values_and_reads_static_tensors_as_they_are(emu: CudaEmulator) -> None:
    x, out = torch.arange(4.0), torch.zeros(4)
    scale = [2.0]
    graph = _capture(lambda: out.copy_(x * scale[0] + 1))
    scale[0] = 100.0  # a Python value: baked into the graph at capture
    x.fill_(3.0)  # a static tensor: the replay reads its bytes as they are now
    graph.replay()
    assert out.tolist() == [7.0] * 4


def test_replay_does_not_run_the_python_that_captured(emu: CudaEmulator) -> None:
    calls, out = [], torch.zeros(2)

    def step() -> None:
        calls.append(1)
        out.add_(1)

    graph = _capture(step)
    for _ in range(3):
        graph.replay()
    assert len(calls) == 1 and out.tolist() == [4.0, 4.0]  # capture executed once here, then 3 replays


@pytest.mark.parametrize("inference", [False, True])
def test_a_converting_to_is_replayed_and_its_result_fresh(emu: CudaEmulator, inference: bool) -> None:
    """aten::to's schema says its result may alias the input; one that converts copies. A replay must
    compute that copy again (it once kept the capture's values), and its bytes start with no history."""
    x, out = torch.arange(4), torch.zeros(4, dtype=torch.int32)
    with torch.inference_mode(inference):
        graph = _capture(lambda: out.copy_(x.int() * 2))
        x.fill_(5)
        graph.replay()
    assert out.tolist() == [10] * 4
    y = x.int()
    assert aten_accesses(torch.ops.aten.to.dtype, (x, torch.int32), {}, y) == ([x], [], [y])
    assert aten_accesses(torch.ops.aten.to.dtype, (x, torch.int64), {}, x) == ([], [], [])  # no conversion: x


@pytest.mark.parametrize("read", [lambda t: t.sum().item(), lambda t: t.tolist(), lambda t: int(t[0]),
                                  lambda t: torch.tensor([1, 2]), lambda t: t.nonzero(),
                                  lambda t: torch.cuda.synchronize()])
@pytest.mark.parametrize("inference", [False, True])  # the engine steps under inference_mode
def test_a_host_read_during_capture_raises(emu: CudaEmulator, read, inference: bool) -> None:  # noqa: ANN001
    t = torch.ones(3)
    read(t)  # allowed outside a capture
    with torch.inference_mode(inference), pytest.raises(EmulatorError, match="capture"):
        _capture(lambda: read(t))


def test_capture_needs_a_side_stream_and_every_fork_joined(emu: CudaEmulator) -> None:
    with pytest.raises(EmulatorError, match="default stream"):
        _capture(lambda: None, stream=torch.cuda.current_stream())
    side, x = torch.cuda.Stream(), torch.ones(2)

    def fork(join: bool) -> None:
        main = torch.cuda.current_stream()
        side.wait_stream(main)
        with torch.cuda.stream(side):
            x.mul_(2)
        if join:
            main.wait_stream(side)

    _capture(lambda: fork(True))
    with pytest.raises(EmulatorError, match="never joined"):
        _capture(lambda: fork(False))
    other = torch.cuda.Stream()  # never waited on the capture: outside it

    def stray() -> None:
        with torch.cuda.stream(other):
            x.add_(1)

    with pytest.raises(EmulatorError, match="outside the open capture"):
        _capture(stray)


@pytest.mark.parametrize("wait", ["stream", "event", None])
def test_cross_stream_access_needs_a_wait(emu: CudaEmulator, wait: str) -> None:
    main, side = torch.cuda.current_stream(), torch.cuda.Stream()
    x = torch.zeros(8)
    side.wait_stream(main)  # side has seen x's allocation
    x[2:6] = 1.0  # a later write on main
    if wait == "stream":
        side.wait_stream(main)
    elif wait == "event":
        side.wait_event(main.record_event())
    with torch.cuda.stream(side):
        if wait is None:
            with pytest.raises(EmulatorError, match="race"):
                x[4:].sum()  # overlaps main's write
            x[:2].sum()  # disjoint bytes: no conflict
        else:
            x[4:].sum()


def test_reads_on_two_streams_do_not_conflict_but_a_later_write_must_wait_for_both(emu: CudaEmulator) -> None:
    main, side = torch.cuda.current_stream(), torch.cuda.Stream()
    x = torch.ones(4)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        y = x * 2  # reads x on side
    x.sum()  # reads x on main, concurrently: fine
    with pytest.raises(EmulatorError, match="race"):
        x.zero_()  # main overwrites x while side may still read it
    main.wait_stream(side)
    x.zero_()
    assert y.tolist() == [2.0] * 4


def test_host_data_lands_in_fresh_bytes_even_at_a_reused_address(emu: CudaEmulator) -> None:
    """torch.tensor(data) allocates outside any op (the dispatcher sees only lift_fresh, a view): its
    bytes must start with no history, or a tensor the host just built would inherit the accesses of a
    dead tensor that held its address on another stream (reported as a race between the two, at random
    depending on the allocator: the flaky report of session 11)."""
    side, reused = torch.cuda.Stream(), 0
    for _ in range(500):
        old = torch.empty(64, dtype=torch.int32)
        old.fill_(1)  # written on main, which side never waits for
        address = old.untyped_storage().data_ptr()
        del old
        with torch.cuda.stream(side):
            new = torch.tensor(range(64), dtype=torch.int32)
            if new.untyped_storage().data_ptr() == address:
                reused += 1
                new + 1  # noqa: B018 (reads the fresh bytes on side: no race)
        if reused >= 3:
            break
    assert reused >= 3, "the allocator never reused an address: the case was not exercised"
    with pytest.raises(EmulatorError, match="race"):
        new.zero_()  # main overwriting what side just built and read is still a race


def test_triton_launches_are_recorded_and_their_writes_tracked(emu: CudaEmulator) -> None:
    import rast_kernels

    logits = torch.randn(2, 64)
    temperature = torch.ones(2)
    ids = torch.empty(2, dtype=torch.int64)
    graph = _capture(lambda: ids.copy_(rast_kernels.rast_sample(logits, temperature=temperature, top_k=5,
                                                                backend="triton")))
    logits.copy_(torch.randn(2, 64))
    temperature.zero_()  # greedy from now on, through the static tensor
    graph.replay()
    assert ids.tolist() == logits.argmax(1).tolist()
    out = rast_kernels.rast_sample(logits, backend="triton")  # written by a kernel, on main
    side = torch.cuda.Stream()
    with torch.cuda.stream(side), pytest.raises(EmulatorError, match="that triton .* wrote on stream default"):
        out + 1
