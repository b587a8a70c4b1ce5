"""`rast analyze`: PCR, token KLD, ΔR cosine and draft acceptance on a tiny triple, each checked against
the same quantity computed directly with HF transformers (greedy decoding and teacher forcing done by
hand)."""
from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rast_engine.analysis.accept import acceptance, coupled_acceptance, expected_tokens, speedup_bound
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
        assert traj["large_argmax"] == rows["large"].argmax(-1).tolist()  # where M alone would have gone
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


# ---- draft acceptance (speculative decoding) ----------------------------------------------------------
def test_acceptance_and_expected_tokens_by_hand() -> None:
    p, q = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]]), torch.tensor([[0.25, 0.25, 0.5], [0.0, 0.0, 1.0]])
    assert acceptance(p, q).tolist() == [0.5, 0.0]  # 1 - total variation distance
    assert acceptance(q, q).tolist() == [1.0, 1.0]
    # a round yields at most the tokens left: t=0 has one draft left (1 + .5), t=1 none (1)
    assert expected_tokens([0.5, 1.0], 2) == pytest.approx(1.25)
    assert expected_tokens([0.5, 0.25], 1) == pytest.approx((1.5 + 1.0) / 2)
    assert expected_tokens([0.9], 8) == 1.0  # a one-token path: one token, whatever γ
    assert expected_tokens([0.3] * 5, 0) == 1.0
    a, g = 0.8, 3  # far from the end, a constant α gives the geometric sum (1 - α^(γ+1)) / (1 - α)
    interior = (1 - a ** (g + 1)) / (1 - a)
    # the last g starts have k < g drafts left: 1 + a + ... + a^k
    tail = sum(sum(a ** j for j in range(k + 1)) for k in range(g))
    assert expected_tokens([a] * 100, g) == pytest.approx(((100 - g) * interior + tail) / 100)
    # against the round process itself: k of γ drafts accepted with probability Π_{i<k} α (1 - α_k), and a
    # round from t emits min(k + 1, L - t) tokens (a draft past the path's end is never made)
    alpha = [0.9, 0.3, 0.7, 1.0, 0.5, 0.8, 0.6]
    for gamma in range(6):
        rounds = []
        for t in range(len(alpha)):
            # past the path's end any α will do (the cap decides); after γ drafts the round stops
            drafts = (alpha[t:t + gamma] + [0.5] * gamma)[:gamma] + [0.0]
            rounds.append(sum(math.prod(drafts[:k]) * (1 - drafts[k]) * min(k + 1, len(alpha) - t)
                              for k in range(gamma + 1)))
        assert expected_tokens(alpha, gamma) == pytest.approx(sum(rounds) / len(alpha))
    # 2 tokens a round for M's 10 bytes plus the pair's 2 bytes three times: (10 + 2) * 2 / (10 + 6)
    assert speedup_bound(2.0, 2, 10, 2) == pytest.approx(1.5)


def _coupled_by_brute_force(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Σ_i 1 / Σ_j max(p_j / p_i, q_j / q_i) over every token with p_i, q_i > 0, the full [V, V] matrix."""
    p, q = p.double(), q.double()
    ok = (p > 0) & (q > 0)
    ratio = torch.maximum(p[:, None, :] / p[:, :, None], q[:, None, :] / q[:, :, None])  # [n, i, j]
    return torch.where(ok, 1 / ratio.sum(-1), torch.zeros_like(p)).sum(-1)


def test_coupled_acceptance_against_shared_gumbel_draws() -> None:
    """The closed form against the definition: two Gumbel-max draws from p and q with the same noise agree
    as often as it says (Monte Carlo, 200,000 noise draws), and it lies between the Gumbel-coupling bound
    (1 - TV) / (1 + TV) and the optimal 1 - TV; exact on equal or disjoint rows."""
    gen = torch.Generator().manual_seed(3)
    p, q = torch.softmax(torch.randn(3, 9, generator=gen) * 2, -1), torch.softmax(torch.randn(3, 9, generator=gen) * 2, -1)
    value, left_out = coupled_acceptance(p, q, top=4)
    exact, _ = coupled_acceptance(p, q)
    assert torch.allclose(exact, _coupled_by_brute_force(p, q), rtol=1e-12)
    assert torch.all(value <= exact + 1e-12) and torch.all(exact - value <= left_out + 1e-12)
    g = -torch.log(-torch.log(torch.rand(200_000, 9, generator=gen, dtype=torch.float64)))
    for r in range(3):
        agree = ((p[r].double().log() + g).argmax(-1) == (q[r].double().log() + g).argmax(-1)).double().mean()
        assert agree.item() == pytest.approx(exact[r].item(), abs=4e-3)
    tv_free = acceptance(p, q)
    assert torch.all(exact <= tv_free + 1e-12) and torch.all(exact >= (tv_free / (2 - tv_free)) - 1e-12)
    one_hot = torch.eye(4)
    assert coupled_acceptance(one_hot[[1, 2]], one_hot[[1, 3]])[0].tolist() == [1.0, 0.0]


def _filtered_probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """softmax(z / T) with HF's top-p by a full sort: the test's own reading of the spec."""
    probs = torch.softmax(logits / temperature, dim=-1)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    before = sorted_p.cumsum(-1) - sorted_p  # the mass strictly ahead of each token
    keep = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, before < top_p)
    probs = torch.where(keep, probs, torch.zeros_like(probs))
    return probs / probs.sum(-1, keepdim=True)


def test_accept_against_hf(setup: dict) -> None:
    d, lam, temperature, top_p = setup["dirs"], 0.7, 0.8, 0.9
    out = setup["root"] / "accept.json"
    assert main(["analyze", "accept", "--model", str(d["large"]), "--small-rl", str(d["rl"]), "--small-base",
                 str(d["base"]), "--lam", str(lam), "--temperature", str(temperature), "--top-p", str(top_p),
                 "--max-gamma", "3", "--data", str(setup["data"]), "--template", str(setup["template"]),
                 "--max-tokens", str(MAX_TOKENS), "--device", "cpu", "--dtype", "float32", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    pooled = {f"{d}/{m}": [] for d in ("rl", "small") for m in ("coupled", "rejection")}
    for prompt, traj in zip(setup["prompts"], report["trajectories"]):
        path = traj["completion_ids"]  # sampled by the engine; scored here by HF forwards
        rows = {n: hf_logits(m, prompt + path, setup["vocab"])[len(prompt) - 1:-1] for n, m in setup["hf"].items()}
        delta = rows["rl"] - rows["base"]
        target = _filtered_probs(rows["large"] + lam * delta, temperature, top_p)
        for name, draft in (("rl", rows["rl"]), ("small", rows["base"] + lam * delta)):
            q = _filtered_probs(draft, temperature, top_p)
            for method, want in (("rejection", torch.minimum(target, q).sum(-1)),
                                 ("coupled", _coupled_by_brute_force(target, q))):
                got = traj["acceptance"][f"{name}/{method}"]
                assert got == pytest.approx(want.tolist(), abs=1e-5 + report["coupled_slack"])
                pooled[f"{name}/{method}"].append(got)
    assert report["coupled_slack"] < 1e-3  # top-p leaves fewer tokens than the exact sum takes
    sizes = {n: sum(p.numel() * 4 for p in m.parameters()) for n, m in setup["hf"].items()}
    assert report["weight_bytes"] == {"large": sizes["large"], "pair": sizes["rl"] + sizes["base"]}
    for name, paths in pooled.items():
        got = report["drafts"][name]
        alphas = [a for path in paths for a in path]
        assert got["mean_acceptance"] == pytest.approx(sum(alphas) / len(alphas))
        assert 0 < got["mean_acceptance"] < 1
        for row in got["by_gamma"]:
            e = sum(expected_tokens(path, row["gamma"]) * len(path) for path in paths) / len(alphas)
            assert row["tokens_per_round"] == pytest.approx(e)
            assert row["speedup_bound"] == pytest.approx(speedup_bound(e, row["gamma"], sizes["large"],
                                                                       sizes["rl"] + sizes["base"]))


@pytest.mark.parametrize("analysis", ["kld", "accept", "cosine", "pcr"])
def test_bad_out_and_template_fail_before_any_model_loads(setup: dict, analysis: str, tmp_path,  # noqa: ANN001
                                                          monkeypatch: pytest.MonkeyPatch, capsys) -> None:  # noqa: ANN001
    """An --out that is a directory, or a template file that is not UTF-8, is a one-line error before a
    model loads (the report was written after hours of decoding and scoring, and lost; the template gave a
    traceback)."""
    import rast_engine

    def no_model(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(rast_engine, "LLM", no_model)
    d = setup["dirs"]
    models = {"pcr": ["--rl", str(d["rl"]), "--base", str(d["base"])],
              "cosine": ["--model", str(d["large"]), "--delta", str(d["rl"]), str(d["base"]),
                         "--delta", str(d["rl"]), str(d["base"])]}.get(
        analysis, ["--model", str(d["large"]), "--small-rl", str(d["rl"]), "--small-base", str(d["base"])])
    latin1 = tmp_path / "template.txt"
    latin1.write_bytes("Problème: {problem}\n".encode("latin-1"))
    common = ["analyze", analysis, *models, "--data", str(setup["data"]), "--device", "cpu"]
    assert main([*common, "--template", str(setup["template"]), "--out", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
    assert main([*common, "--template", str(latin1)]) == 2
    err = capsys.readouterr().err
    assert "is not UTF-8 text" in err and "Traceback" not in err
