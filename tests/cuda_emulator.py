"""A CPU stand-in for the CUDA features the decode fast path uses (streams, events, CUDA graphs) that
keeps the semantics correctness depends on, so CI can check them without a GPU.

- Capture records every aten op and every Triton launch the captured code issues, with the very tensor
  objects and Python values it passed; replay re-issues exactly those, without running the Python that
  issued them. As in a CUDA graph, host values are frozen at capture and tensors keep their addresses.
  Unlike a CUDA graph, capture also executes the ops (their outputs feed the Python being captured), so
  code under capture must leave state as it would be anyway (DecodeGraphs captures inert padding rows).
- A host read during capture (item(), tolist(), numpy(), torch.tensor(data), a data-dependent shape)
  raises, as CUDA's "operation not permitted when stream is capturing" does; so does an op on a stream
  that is not part of the capture, and a capture that ends before every forked stream joined back.
- Streams carry vector clocks: wait_stream / wait_event merge them. Every op's reads and writes (from
  the aten schema; for a Triton launch, every tensor argument is read and the ones whose bytes changed
  were written) are checked against the earlier accesses of the same bytes on other streams: an access
  that conflicts (one of the two writes) with one the stream has not waited for is a race and raises.
  Inside a capture the accesses are checked among themselves; a replay runs the whole graph on the
  replaying stream and is checked against everything else.
- A freshly allocated tensor starts with no history (the allocator hazard of memory freed on one stream
  and reused on another is outside this model).

Streams run in issue order on the CPU, so results equal a sequential run; the clocks check that the
real device, which may run them in any order the waits allow, would compute the same.
"""
from __future__ import annotations

import contextlib
import itertools
from typing import Any, Iterator, Optional

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from cuda_races import AccessLog, EmulatorError, aliases, aten_accesses, is_view, same_bytes, tensors

# ops whose result the host must read (a sync on a GPU), or that copy host data to the device
# (under inference_mode, int(t) and t.item() dispatch aten::item itself, not _local_scalar_dense)
HOST_READS = {"_local_scalar_dense", "item", "nonzero", "lift_fresh", "lift_fresh_copy", "masked_select", "unique",
              "_unique2", "unique_consecutive", "equal", "is_nonzero"}


class Stream:
    _ids = itertools.count()

    def __init__(self, emu: "CudaEmulator", name: str) -> None:
        self.emu, self.id, self.name = emu, next(self._ids), name
        self.clock: dict[int, int] = {self.id: 0}
        self.capture: Optional[Graph] = None  # the graph this stream is capturing into

    def __repr__(self) -> str:
        return f"stream {self.name}"

    def _merge(self, clock: dict[int, int], capture: Optional["Graph"]) -> None:
        for k, v in clock.items():
            self.clock[k] = max(self.clock.get(k, 0), v)
        if capture is not None and capture.open:
            self.capture = capture  # waiting on a capturing stream forks this stream into the capture

    def wait_stream(self, other: "Stream") -> None:
        self._merge(other.clock, other.capture)

    def wait_event(self, event: "Event") -> None:
        self._merge(event.clock, event.capture)

    def record_event(self, event: Optional["Event"] = None) -> "Event":
        event = event or Event()
        event.record(self)
        return event

    def synchronize(self) -> None:
        self.emu.host_sync()

    def query(self) -> bool:
        return True


class Event:
    emu: "CudaEmulator"

    def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False) -> None:
        self.clock: dict[int, int] = {}
        self.capture: Optional[Graph] = None

    def record(self, stream: Optional[Stream] = None) -> None:
        stream = stream or self.emu.current
        self.clock, self.capture = dict(stream.clock), stream.capture

    def wait(self, stream: Optional[Stream] = None) -> None:
        (stream or self.emu.current).wait_event(self)

    def synchronize(self) -> None:
        self.emu.host_sync()

    def query(self) -> bool:
        return True


class Graph:
    emu: "CudaEmulator"

    def __init__(self, keep_graph: bool = False) -> None:
        self.ops: list[tuple] = []
        self.open = False
        self._pool = object()

    def pool(self) -> object:
        return self._pool

    def replay(self) -> None:
        self.emu.replay(self)


class CudaEmulator(TorchDispatchMode):
    """Install with ``install(monkeypatch)``; active (tracking ops) inside ``with emulator:``."""

    def __init__(self) -> None:
        super().__init__()
        self.default = Stream(self, "default")
        self.stack: list[Stream] = [self.default]
        self.streams: list[Stream] = [self.default]
        self.races = AccessLog()
        self.capturing: Optional[Graph] = None
        self.capture_stream: Optional[Stream] = None  # torch.cuda.graph's default stream, made on first use
        self.in_kernel = False  # the Triton interpreter reads its arguments on the host
        self.replays = 0

    @property
    def current(self) -> Stream:
        return self.stack[-1]

    # ---- torch.cuda stand-ins ---------------------------------------------------------------------
    def install(self, monkeypatch: pytest.MonkeyPatch) -> "CudaEmulator":
        import triton.runtime.interpreter as interp

        emu = self

        def new_stream(device: Any = None, priority: int = 0) -> Stream:
            s = Stream(emu, f"s{len(emu.streams)}")
            emu.streams.append(s)
            return s

        Event.emu = Graph.emu = self
        monkeypatch.setattr(torch.cuda, "Stream", new_stream)
        monkeypatch.setattr(torch.cuda, "Event", Event)
        monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: emu.current)
        monkeypatch.setattr(torch.cuda, "stream", self.use_stream)
        monkeypatch.setattr(torch.cuda, "graph", self.graph)
        monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: emu.host_sync())
        launch = interp.InterpretedFunction.run

        def run(fn: Any, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> Any:
            if warmup:
                return launch(fn, *args, grid=grid, warmup=warmup, **kwargs)
            return emu.launch(launch, fn, args, dict(kwargs, grid=grid, warmup=False))

        monkeypatch.setattr(interp.InterpretedFunction, "run", run)
        for name in ("tolist", "numpy"):
            host = getattr(torch.Tensor, name)

            def guarded(t: torch.Tensor, *a: Any, _host: Any = host, _name: str = name, **k: Any) -> Any:
                emu.no_capture(f"Tensor.{_name}()")
                return _host(t, *a, **k)

            monkeypatch.setattr(torch.Tensor, name, guarded)
        return self

    @contextlib.contextmanager
    def use_stream(self, stream: Optional[Stream]) -> Iterator[None]:
        if stream is None:
            yield
            return
        self.stack.append(stream)
        try:
            yield
        finally:
            self.stack.pop()

    @contextlib.contextmanager
    def graph(self, graph: Graph, pool: Any = None, stream: Optional[Stream] = None,
              capture_error_mode: str = "global") -> Iterator[None]:
        if stream is None:  # torch captures on a side stream of its own by default
            self.capture_stream = stream = self.capture_stream or torch.cuda.Stream()
        origin = stream
        if origin is self.default:
            raise EmulatorError("CUDA graphs cannot be captured on the default stream")
        if self.capturing is not None:
            raise EmulatorError("a capture began while another was open")
        # a capture executes nothing on a GPU: its accesses are ordered among themselves here, and
        # against everything else at each replay, where the whole graph runs on the replaying stream
        outside, self.races = self.races, AccessLog()
        graph.open, origin.capture, self.capturing = True, graph, graph
        try:
            with self.use_stream(origin):
                yield
            for s in self.streams:
                if s is not origin and s.capture is graph and s.clock[s.id] > origin.clock.get(s.id, 0):
                    raise EmulatorError(f"{s} forked into the capture and never joined back into {origin}")
        finally:
            graph.open, self.capturing, self.races = False, None, outside
            for s in self.streams:
                if s.capture is graph:
                    s.capture = None

    def host_sync(self) -> None:
        self.no_capture("a host synchronisation")

    def no_capture(self, what: str) -> None:
        if self.capturing is not None and not self.in_kernel:
            raise EmulatorError(f"{what} during CUDA-graph capture (a host sync or a copy of host data, "
                                "which capture forbids)")

    # ---- ops --------------------------------------------------------------------------------------
    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        kwargs = kwargs or {}
        stream = self.current
        if self.capturing is not None:
            if func._schema.name.split("::")[-1] in HOST_READS:
                self.no_capture(str(func))
            if stream.capture is not self.capturing:
                raise EmulatorError(f"{func} ran on {stream}, outside the open capture")
        out = func(*args, **kwargs)
        self._track_aten(func, args, kwargs, out, stream)
        if stream.capture is not None:
            stream.capture.ops.append(("aten", func, args, kwargs, out))
        return out

    def launch(self, run: Any, fn: Any, args: tuple, kwargs: dict) -> Any:
        stream = self.current
        if self.capturing is not None and stream.capture is not self.capturing:
            raise EmulatorError(f"Triton kernel {fn.__name__} ran on {stream}, outside the open capture")
        result = self._track_triton(run, fn, args, kwargs, stream)
        if stream.capture is not None:
            stream.capture.ops.append(("triton", run, fn, args, kwargs))
        return result

    def replay(self, graph: Graph) -> None:
        """Re-issue the captured ops on the current stream: views already alias their bases, mutating
        ops mutate the captured tensors, other ops write their results into the captured outputs."""
        if graph.open or not graph.ops:
            raise EmulatorError("replay of a graph that was never captured")
        self.replays += 1
        stream = self.current
        with _disable_current_modes(), torch.inference_mode():
            for op in graph.ops:
                if op[0] == "triton":
                    self._track_triton(*op[1:], stream)
                    continue
                _, func, args, kwargs, out = op
                if is_view(func) and aliases(args, kwargs, out):
                    continue
                new = func(*args, **kwargs)
                if not func._schema.is_mutable:
                    for dst, src in zip(tensors(out), tensors(new)):
                        dst.copy_(src)
                self._track_aten(func, args, kwargs, out, stream)

    # ---- race detection ---------------------------------------------------------------------------
    def _track_aten(self, func: Any, args: tuple, kwargs: dict, out: Any, stream: Stream) -> None:
        self.races.access(str(func), stream, *aten_accesses(func, args, kwargs, out))

    def _track_triton(self, run: Any, fn: Any, args: tuple, kwargs: dict, stream: Stream) -> Any:
        inputs = tensors((args, kwargs))
        with _disable_current_modes():
            before = [t.detach().clone() for t in inputs]
            self.in_kernel = True
            try:
                result = run(fn, *args, **kwargs)
            finally:
                self.in_kernel = False
            written = [t for t, b in zip(inputs, before) if not same_bytes(t, b)]
        self.races.access(f"triton {fn.__name__}", stream, inputs, written, [])
        return result

@contextlib.contextmanager
def emulated_cuda(monkeypatch: pytest.MonkeyPatch) -> Iterator[CudaEmulator]:
    emu = CudaEmulator().install(monkeypatch)
    with emu:
        yield emu
