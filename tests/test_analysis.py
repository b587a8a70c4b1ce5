"""`rast analyze`: PCR, token KLD and ΔR cosine on a tiny triple, each checked against the same quantity
computed directly with HF transformers (greedy decoding and teacher forcing done by hand)."""
from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rast_engine.analysis.cosine import CosineConfig, cosine_rows, mean_cosine, run_cosine
from rast_engine.analysis.kld import KldConfig, run_kld, token_kld
from rast_engine.analysis.pcr import path_coverage
from rast_engine.cli import main

MAX_TOKENS = 6
TEMPLATE = "Q: {input}\nA:"
PROBLEMS = ["what is 3 + 5?", "the dog sat on the log. what is 2 * 4?", "add 12 and 9."]


# ---- the math, on hand-built inputs ----------------------------------------------------------------
def test_path_coverage_counts_argmax_matches() -> None:
    rows = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 1.0], [0.0, 0.0, 5.0], [1.0, 1.0, 0.0]])
    assert path_coverage(rows, [1, 0, 0, 0]) == pytest.approx(3 / 4)  # row 3 ties: the lowest id wins
    assert path_coverage(rows, [2, 2, 1, 1]) == 0.0
    with pytest.raises(ValueError):
        path_coverage(rows[:0], [])


def test_token_kld_matches_the_definition() -> None:
    gen = torch.Generator().manual_seed(0)
    p, q = torch.randn(5, 11, generator=gen) * 3, torch.randn(5, 11, generator=gen) * 3
    got = token_kld(p, q)
    for i in range(5):
        pi, qi = torch.softmax(p[i].double(), 0), torch.softmax(q[i].double(), 0)
        assert got[i].item() == pytest.approx(sum(a * math.log(a / b) for a, b in zip(pi.tolist(), qi.tolist())),
                                              rel=1e-9)
    assert torch.all(got > 0)
    assert torch.equal(token_kld(p, q, chunk=2), got)
    assert token_kld(p, p).abs().max().item() < 1e-12
    masked = torch.tensor([[0.0, -math.inf, 1.0]])
    assert token_kld(masked, torch.zeros(1, 3)).item() > 0          # no mass on the masked token: finite
    assert token_kld(torch.zeros(1, 3), masked).item() == math.inf  # mass where q has none: +inf


def test_cosine_rows() -> None:
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(4, 9, generator=gen), torch.randn(4, 9, generator=gen)
    assert torch.allclose(cosine_rows(a, b), torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1))
    assert torch.equal(cosine_rows(a, b, chunk=3), cosine_rows(a, b))
    assert mean_cosine(a, -2 * a) == pytest.approx(-1.0)
    zero = torch.zeros(1, 9)
    assert cosine_rows(zero, a[:1]).item() == 0.0


# ---- on the engine, against HF transformers --------------------------------------------------------
@pytest.fixture(scope="module")
def setup(qwen2_triple, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("analysis")
    data = root / "tiny.jsonl"
    data.write_text("".join(json.dumps({"id": f"p{i}", "problem": p, "answer": "0"}) + "\n"
                            for i, p in enumerate(PROBLEMS)))
    template = root / "template.txt"
    template.write_text(TEMPLATE)
    tok = AutoTokenizer.from_pretrained(str(qwen2_triple[0]))
    hf = {name: AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
          for name, d in zip(("large", "rl", "base"), qwen2_triple)}
    prompts = [tok(TEMPLATE.replace("{input}", p))["input_ids"] for p in PROBLEMS]
    return {"root": root, "data": data, "template": template, "tok": tok, "hf": hf, "prompts": prompts,
            "vocab": len(tok), "dirs": dict(zip(("large", "rl", "base"), qwen2_triple))}


@torch.no_grad()
def hf_logits(model: torch.nn.Module, ids: list[int], vocab: int) -> torch.Tensor:
    return model(torch.tensor([ids])).logits[0, :, :vocab].double()


@torch.no_grad()
def hf_greedy(setup: dict, prompt: list[int], combine) -> list[int]:
    """Greedy decode of combine({name: last-position logits}) up to MAX_TOKENS or EOS."""
    ids = list(prompt)
    for _ in range(MAX_TOKENS):
        last = {n: hf_logits(m, ids, setup["vocab"])[-1] for n, m in setup["hf"].items()}
        ids.append(int(combine(last).argmax()))
        if ids[-1] == setup["tok"].eos_token_id:
            break
    return ids[len(prompt):]


def test_pcr_against_hf(setup: dict, capsys) -> None:
    d = setup["dirs"]
    report_file = setup["root"] / "pcr.json"
    assert main(["analyze", "pcr", "--rl", str(d["rl"]), "--base", str(d["base"]), "--data", str(setup["data"]),
                 "--template", str(setup["template"]), "--max-tokens", str(MAX_TOKENS), "--device", "cpu",
                 "--dtype", "float32", "--out", str(report_file)]) == 0
    assert "PCR (mean over trajectories)" in capsys.readouterr().out
    report = json.loads(report_file.read_text())
    rates, matched, total = [], 0, 0
    for prompt, traj in zip(setup["prompts"], report["trajectories"]):
        path = hf_greedy(setup, prompt, lambda z: z["rl"])
        assert traj["completion_ids"] == path
        base_rows = hf_logits(setup["hf"]["base"], prompt + path, setup["vocab"])[len(prompt) - 1:-1]
        hits = (base_rows.argmax(-1) == torch.tensor(path)).tolist()
        rates.append(sum(hits) / len(hits))
        matched, total = matched + sum(hits), total + len(hits)
        assert traj["pcr"] == pytest.approx(rates[-1])
    assert report["pcr"] == pytest.approx(sum(rates) / len(rates))
    assert report["token_pcr"] == pytest.approx(matched / total)
    assert report["num_tokens"] == total


def test_kld_against_hf(setup: dict) -> None:
    d, lam = setup["dirs"], 0.7
    report = run_kld(KldConfig(model=str(d["large"]), small_rl=str(d["rl"]), small_base=str(d["base"]),
                               data=str(setup["data"]), lam=lam, template=str(setup["template"]),
                               max_tokens=MAX_TOKENS, device="cpu", dtype="float32", top=3))
    everything = []
    for prompt, traj in zip(setup["prompts"], report["trajectories"]):
        path = hf_greedy(setup, prompt, lambda z: z["large"] + lam * (z["rl"] - z["base"]))
        assert traj["completion_ids"] == path
        rows = {n: hf_logits(m, prompt + path, setup["vocab"])[len(prompt) - 1:-1] for n, m in setup["hf"].items()}
        logp = torch.log_softmax(rows["large"] + lam * (rows["rl"] - rows["base"]), -1)
        logq = torch.log_softmax(rows["large"], -1)
        expected = (logp.exp() * (logp - logq)).sum(-1)
        assert traj["kld"] == pytest.approx(expected.tolist(), rel=1e-4, abs=1e-6)
        everything += list(zip(expected.tolist(), path))
    everything.sort(reverse=True)
    assert [p["token_id"] for p in report["top_positions"]] == [t for _, t in everything[:3]]
    assert report["mean_kld"] == pytest.approx(sum(k for k, _ in everything) / len(everything), rel=1e-4)


def test_cosine_against_hf(setup: dict) -> None:
    d = setup["dirs"]
    # Two different deltas from the three tiny models: ΔR1 = rl − base, ΔR2 = large − base.
    report = run_cosine(CosineConfig(model=str(d["large"]), deltas=[(str(d["rl"]), str(d["base"])),
                                                                  (str(d["large"]), str(d["base"]))],
                                     data=str(setup["data"]), template=str(setup["template"]),
                                     max_tokens=MAX_TOKENS, device="cpu", dtype="float32"))
    means = []
    for prompt, traj in zip(setup["prompts"], report["trajectories"]):
        path = hf_greedy(setup, prompt, lambda z: z["large"])  # weight-0 experts: the large model alone
        assert traj["completion_ids"] == path
        rows = {n: hf_logits(m, prompt + path, setup["vocab"])[len(prompt) - 1:-1] for n, m in setup["hf"].items()}
        cos = torch.nn.functional.cosine_similarity(rows["rl"] - rows["base"], rows["large"] - rows["base"], dim=-1)
        means.append(cos.mean().item())
        assert traj["mean_cosine"] == pytest.approx(means[-1], abs=1e-5)
    assert report["mean_cosine"] == pytest.approx(sum(means) / len(means), abs=1e-5)
