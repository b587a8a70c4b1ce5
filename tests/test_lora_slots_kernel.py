"""rast_kernels.lora_slots: LoRA deltas per token's adapter slot. Oracle: float64 math on each slot's own
adapters (A_p, B_p per part, rank up to R), laid out as rast_engine's slot views lay them; the kernel and the
torch spec must match it to float32 accumulation error (then the dtype's roundings), read nothing of the
slots no token uses nor of B's off-diagonal blocks (NaN there changes nothing), and leave rows of no slot
bit for bit as they were."""
from __future__ import annotations

import pytest
import torch

from rast_kernels import lora_slots as kernel
from rast_kernels.lora_slots import lora_slots_add_, lora_slots_add_torch

HAS_CUDA = torch.cuda.is_available()
_interp = pytest.mark.skipif(HAS_CUDA, reason="with CUDA the kernels compile natively instead")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BACKENDS = [pytest.param("cpu", "triton", id="interp", marks=_interp), pytest.param("cpu", "torch", id="torch"),
            pytest.param("cuda", "triton", id="cuda", marks=pytest.mark.gpu)]


class Layout:
    """max_loras slots of parts · rank columns over a projection of output rows split at ``starts``; slot s
    holds adapters[s] (per part (A [r, K], B [rows, r]) in float64) or nothing."""

    def __init__(self, k: int, starts: list[int], n: int, max_loras: int, rank: int, used: list[int], seed: int):
        g = torch.Generator().manual_seed(seed)
        self.k, self.starts, self.n, self.max_loras, self.rank = k, starts, n, max_loras, rank
        self.bounds = list(zip(starts, [*starts[1:], n]))
        width = len(starts) * rank
        # every slot and off-diagonal block NaN unless written: the kernel must never read them
        self.a = torch.full((max_loras * width, k), float("nan"), dtype=torch.float64)
        self.b = torch.full((n, max_loras * width), float("nan"), dtype=torch.float64)
        self.adapters: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for s in used:
            self.a[s * width:(s + 1) * width] = 0
            self.b[:, s * width:(s + 1) * width] = float("nan")
            parts = []
            for p, (lo, hi) in enumerate(self.bounds):
                r = int(torch.randint(1, rank + 1, (1,), generator=g))  # ranks below R leave zero columns
                a, b = torch.randn(r, k, generator=g, dtype=torch.float64) / k ** 0.5, \
                    torch.randn(hi - lo, r, generator=g, dtype=torch.float64)
                col = s * width + p * rank
                self.a[col:col + r] = a
                self.b[lo:hi, col:col + rank] = 0
                self.b[lo:hi, col:col + r] = b
                parts.append((a, b))
            self.adapters[s] = parts

    def expected(self, y: torch.Tensor, x: torch.Tensor, slots: list[int]) -> torch.Tensor:
        out = y.double().clone()
        for t, s in enumerate(slots):
            for (lo, hi), (a, b) in zip(self.bounds, self.adapters.get(s, [])):
                out[t, lo:hi] += (x[t].double() @ a.t()) @ b.t()
        return out


def _case(device: str, dtype: torch.dtype, t: int, k: int, starts: list[int], n: int, max_loras: int, rank: int,
          slots: list[int], seed: int):
    lay = Layout(k, starts, n, max_loras, rank, sorted({s for s in slots if 0 <= s < max_loras}), seed)
    g = torch.Generator().manual_seed(seed + 1)
    x, y = torch.randn(t, k, generator=g).to(dtype), torch.randn(t, n, generator=g).to(dtype)
    args = (lay.a.to(device=device, dtype=dtype), lay.b.to(device=device, dtype=dtype),
            torch.tensor(slots, dtype=torch.int32, device=device))
    return lay, x.to(device), y.to(device), args


CASES = [  # (T, K, part starts, N, max_loras, R, slots): none a multiple of every tile
    (1, 40, [0], 24, 1, 4, [0]),
    (3, 64, [0, 16], 40, 2, 8, [1, -1, 1]),
    (5, 96, [0, 24, 36], 48, 4, 16, [2, 0, -1, 2, 9]),  # 9: out of range, no delta
    (37, 72, [0, 20, 30], 44, 3, 8, [(i * 7) % 4 - 1 for i in range(37)]),
    (20, 50, [0, 33], 70, 2, 32, [-1] * 20),  # no token has an adapter: nothing read, y as it was
]


@pytest.mark.parametrize("device, backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"T{c[0]}-P{len(c[2])}-S{c[4]}")
def test_each_token_gets_its_own_slots_delta(device: str, backend: str, case) -> None:
    t, k, starts, n, max_loras, rank, slots = case
    lay, x, y, args = _case(device, torch.float32, t, k, starts, n, max_loras, rank, slots, seed=t)
    before = y.clone()
    out = lora_slots_add_(y, x, *args, max_loras=max_loras, part_starts=starts, backend=backend)
    assert out is y and torch.isfinite(y).all()
    want = lay.expected(before.cpu(), x.cpu(), slots)
    torch.testing.assert_close(y.cpu().double(), want, rtol=1e-5, atol=1e-5)
    none = torch.tensor([not 0 <= s < max_loras for s in slots])
    assert torch.equal(y[none.to(y.device)], before[none.to(y.device)])  # bit for bit


@pytest.mark.parametrize("device, backend", [p for p in BACKENDS if p.id != "torch"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_rounds_as_the_spec(device: str, backend: str, dtype: torch.dtype) -> None:
    """h rounds to the dtype, y + delta rounds once: the kernel equals the torch spec up to float32 summation
    order (an ulp of h or of y), and both are within the dtype's roundings of the float64 oracle."""
    t, k, starts, n, slots = 9, 80, [0, 32, 40], 48, [0, 1, 1, -1, 0, 2, 2, 0, 1]
    lay, x, y, args = _case(device, dtype, t, k, starts, n, 3, 16, slots, seed=5)
    spec = lora_slots_add_torch(y.clone().cpu(), x.cpu(), *(a.cpu() for a in args), 3, starts)
    out = lora_slots_add_(y.clone(), x, *args, max_loras=3, part_starts=starts, backend=backend)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(out.cpu().float(), spec.float(), rtol=4 * eps, atol=4 * eps)
    rounded = Layout(k, starts, n, 3, 16, [0, 1, 2], seed=5)  # the same adapters, rounded as the model holds them
    for s, parts in rounded.adapters.items():
        rounded.adapters[s] = [(a.to(dtype).double(), b.to(dtype).double()) for a, b in parts]
    want = rounded.expected(y.cpu(), x.cpu(), slots)
    torch.testing.assert_close(out.cpu().double(), want, rtol=16 * eps, atol=16 * eps)


@_interp
def test_split_k_under_an_h100_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    """With 132 SMs one token's shrink splits K across programs; the splits' sums must add up."""
    monkeypatch.setattr(kernel, "sm_count", lambda device: 132)
    t, k, starts, n, slots = 2, 200, [0, 8], 24, [1, 0]
    assert kernel.plan(t, 16, 8, k, torch.float32, 132)[3] < k  # the launch really splits
    lay, x, y, args = _case("cpu", torch.float32, t, k, starts, n, 2, 8, slots, seed=11)
    want = lay.expected(y, x, slots)
    lora_slots_add_(y, x, *args, max_loras=2, part_starts=starts)
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device, backend", BACKENDS)
def test_writes_only_its_rows_of_a_larger_output(device: str, backend: str) -> None:
    """The engine's stacked pair adds R's deltas into R's half of one [2T, N] output, in place."""
    t, k, starts, n, slots = 4, 48, [0, 16], 32, [0, -1, 1, 0]
    lay, x, y, args = _case(device, torch.float32, t, k, starts, n, 2, 8, slots, seed=3)
    both = torch.cat([y, y + 1])
    lora_slots_add_(both[t:], x, *args, max_loras=2, part_starts=starts, backend=backend)
    assert torch.equal(both[:t], y)
    torch.testing.assert_close(both[t:].cpu().double(), lay.expected((y + 1).cpu(), x.cpu(), slots),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device, backend", BACKENDS)
def test_strided_slots_read_as_their_values(device: str, backend: str) -> None:
    """A column of a [T, 2] table of slots (stride 2) is read by value, not at unit stride."""
    t, k, starts, n, slots = 4, 48, [0, 16], 32, [0, 1, -1, 0]
    lay, x, y, args = _case(device, torch.float32, t, k, starts, n, 2, 8, slots, seed=9)
    table = torch.stack([args[2], args[2].flip(0)], dim=1)
    want = lay.expected(y.cpu(), x.cpu(), slots)
    lora_slots_add_(y, x, args[0], args[1], table[:, 0], max_loras=2, part_starts=starts, backend=backend)
    torch.testing.assert_close(y.cpu().double(), want, rtol=1e-5, atol=1e-5)


def test_refuses_what_does_not_fit_the_layout() -> None:
    x, y, slots = torch.zeros(2, 8), torch.zeros(2, 12), torch.zeros(2, dtype=torch.int32)
    a, b = torch.zeros(2 * 6, 8), torch.zeros(12, 2 * 6)
    with pytest.raises(ValueError, match="part_starts"):
        lora_slots_add_(y, x, a, b, slots, max_loras=2, part_starts=[0, 4, 4])
    with pytest.raises(ValueError, match="part_starts"):
        lora_slots_add_(y, x, a, b, slots, max_loras=2, part_starts=[0, 3, 6, 9])  # four parts
    with pytest.raises(ValueError, match="do not split"):
        lora_slots_add_(y, x, a, b, slots, max_loras=3, part_starts=[0, 6, 9])  # 4 columns a slot, 3 parts
    with pytest.raises(ValueError, match="lora_a must be"):
        lora_slots_add_(y, x, a, b, slots, max_loras=5, part_starts=[0])
    with pytest.raises(ValueError, match="slots must be"):
        lora_slots_add_(y, x, a, b, slots[:1], max_loras=2, part_starts=[0])
    with pytest.raises(ValueError, match="share one of"):
        lora_slots_add_(y.double(), x, a, b, slots, max_loras=2, part_starts=[0])
    with pytest.raises(ValueError, match="lora_a must be"):  # K = 0
        lora_slots_add_(y, x[:, :0], a[:, :0], b, slots, max_loras=2, part_starts=[0])
    with pytest.raises(ValueError, match="backend"):
        lora_slots_add_(y, x, a, b, slots, max_loras=2, part_starts=[0], backend="cuda")


@pytest.mark.parametrize("compiler", ["eager", "aot_eager"])
def test_compiles_as_one_op_that_writes_y_before_it_is_read(compiler: str) -> None:
    """Traced, the kernel is rast_kernels::lora_slots_add declaring its write to y, so the product that
    reads y after it sees the deltas (fullgraph: no graph break)."""
    torch._dynamo.reset()
    dev = "cuda" if HAS_CUDA else "cpu"
    lay, x, y, args = _case(dev, torch.float32, 3, 32, [0, 8], 16, 2, 8, [1, 0, -1], seed=2)
    w = torch.randn(16, 32, device=dev)

    def step(x: torch.Tensor) -> torch.Tensor:
        out = x @ w.t()
        lora_slots_add_(out, x, *args, max_loras=2, part_starts=[0, 8])
        return out * 2

    torch.testing.assert_close(torch.compile(step, backend=compiler, fullgraph=True)(x), step(x))
    torch.testing.assert_close(step(x).cpu().double() / 2, lay.expected((x @ w.t()).cpu(), x.cpu(), [1, 0, -1]),
                               rtol=1e-5, atol=1e-5)
