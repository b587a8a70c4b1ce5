"""bench/logit_adjust.py end to end on the CPU, and its byte counts against the tensors the dense pass
reads and writes."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from bench_runs import load_bench, run_bench


def test_quick_run_writes_every_kind(tmp_path: Path) -> None:
    result, _, out = run_bench("logit_adjust.py", tmp_path, "--quick", pattern="logit-adjust-*.json")
    assert result["commit"] and result["device"] and result["copy_gbs"] > 0
    rows = result["rows"]
    kinds = ["bias", "penalties", "both", "masks"] + (["json"] if importlib.util.find_spec("xgrammar") else [])
    assert {(r["kind"], r["rows"]) for r in rows} == {(k, n) for k in kinds + ["processor"] for n in (1, 4)}
    # speculative rounds: every kind but processor, which they refuse (json's matchers walk the drafts)
    assert {(r["kind"], r["rows"]) for r in rows if r["mode"] == "round"} == {(k, n) for k in kinds for n in (1, 4)}
    for r in rows:
        assert r["us"] > 0 and r["host_us"] > 0
        assert r["floor_us"] == pytest.approx(r["bytes"] / (result["copy_gbs"] * 1e3))
    assert "floor_us" in out


@pytest.mark.parametrize("kind", ["bias", "penalties", "both", "masks", "json", "processor"])
def test_bytes_are_the_dense_pass(kind: str) -> None:
    """bytes_moved counts the logits read, the output counts read (penalties), the mask read (masks,
    json) and the bias written; the sequences are adjusted as their kind says, and a json walk is one
    the grammar accepts."""
    if kind == "json":
        pytest.importorskip("xgrammar")
    bench = load_bench("logit_adjust.py")
    rows, vocab = 3, 300
    logits = 3 * rows * vocab * torch.finfo(torch.bfloat16).bits // 8
    counts = rows * vocab * 4 if kind in ("penalties", "both") else 0
    mask = rows * vocab if kind in ("masks", "json") else 0
    parts = rows * vocab * (3 * 4 * 2 + 4 * 2) if kind == "processor" else 0  # float32 parts; z read and written
    assert bench.bytes_moved(kind, rows, vocab) == logits + counts + mask + parts + rows * vocab * 4
    # a round (not for processors, which rounds refuse): gamma draft passes over the small pair's logits, then
    # the verify's over gamma + 1 positions
    draft = rows * vocab * 2 * 2 + counts + mask + rows * vocab * 4
    assert kind == "processor" or \
        bench.round_bytes(kind, rows, vocab, 4) == 4 * draft + 5 * bench.bytes_moved(kind, rows, vocab)
    seqs, upcoming = bench.make_seqs(kind, rows, vocab, 20, 10, 5, torch.device("cpu"))
    assert all(len(s.token_ids) == 30 and len(u) == 5 for s, u in zip(seqs, upcoming))
    params = seqs[0].params
    assert params.penalized == (kind in ("penalties", "both"))
    assert (params.logit_bias is not None) == (kind in ("bias", "both"))
    assert (params.allowed_token_ids is not None) == (kind == "masks")
    assert (params.processors is not None) == (kind == "processor")
    if kind == "json":
        import xgrammar

        matcher = xgrammar.GrammarMatcher(seqs[0].group.grammar.compiled)
        assert all(matcher.accept_token(t) for t in seqs[0].token_ids[20:] + upcoming[0])
