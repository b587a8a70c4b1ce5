"""`rast eval` end to end on a tiny triple (checked against a greedy RAST decode in HF transformers),
resume, refusal of mismatched settings, `rast eval compare`, and the prompt templates."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rast_engine.cli import main
from rast_engine.errors import RastError
from rast_engine.evaluation import extract_answer, pass_at_k
from rast_engine.evaluation import runner, sampling
from rast_engine.evaluation.templates import BOXED_INSTRUCTION, TEMPLATE_B, load_template

LAM = 0.5
MAX_TOKENS = 8
TEMPLATE = "Q: {input}\nA:"
PROBLEMS = ["what is 3 + 5?", "the cat sat on the mat. what is 2 * 4?", "add 12 and 9."]


@torch.no_grad()
def hf_rast_greedy(models: list, prompt_ids: list[int], vocab: int, eos: int) -> list[int]:
    """argmax of z_M + λ (z_R − z_S) over the tokenizer's vocabulary, step by step, up to EOS."""
    ids = list(prompt_ids)
    for _ in range(MAX_TOKENS):
        large, rl, base = (m(torch.tensor([ids])).logits[0, -1, :vocab].double() for m in models)
        token = int((large + LAM * (rl - base)).argmax())
        ids.append(token)
        if token == eos:
            break
    return ids[len(prompt_ids):]


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_eval_end_to_end_resume_and_settings_guard(qwen2_triple, tmp_path: Path, monkeypatch, capsys) -> None:
    large, rl, base = qwen2_triple
    monkeypatch.setattr(runner, "PIECE", 1)  # each problem's two samples are two requests
    tok = AutoTokenizer.from_pretrained(str(large))
    vocab = len(tok)
    models = [AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval() for d in qwen2_triple]
    expected = []
    for problem in PROBLEMS:
        ids = hf_rast_greedy(models, tok(TEMPLATE.replace("{input}", problem))["input_ids"], vocab,
                             tok.eos_token_id)
        expected.append(tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False))
    first_answer = extract_answer(expected[0])
    assert first_answer is not None  # the fixture's greedy text holds a number: problem 0 can be right
    data = tmp_path / "tiny.jsonl"
    truths = [first_answer, r"\frac{1}{7}", r"\frac{2}{7}"]
    data.write_text("".join(json.dumps({"id": f"p{i}", "problem": p, "answer": t}) + "\n"
                            for i, (p, t) in enumerate(zip(PROBLEMS, truths))))
    template = tmp_path / "template.txt"
    template.write_text(TEMPLATE)
    out = tmp_path / "run"
    argv = ["eval", "--model", str(large), "--small-rl", str(rl), "--small-base", str(base), "--lam", str(LAM),
            "--data", str(data), "--template", str(template), "--n", "2", "--temperature", "0",
            "--max-tokens", str(MAX_TOKENS), "--device", "cpu", "--dtype", "float32", "--out", str(out)]

    assert main(argv + ["--limit", "2"]) == 0
    samples = out / runner.SAMPLES_FILE
    recs = _records(samples)
    assert [(r["id"], r["index"]) for r in recs] == [("p0", 0), ("p0", 1), ("p1", 0), ("p1", 1)]
    for r in recs:
        assert r["text"] == expected[int(r["id"][1])]
        assert r["answer"] == extract_answer(r["text"])

    # A crash mid-run: p1's second sample lost and a torn line left behind. The rerun keeps what was
    # saved, draws p1's missing sample and p2's two (one problem in flight at a time, so p2 enters the
    # engine only when p1 is done), and leaves the saved lines untouched. It decodes speculatively (not a
    # sample setting: greedy texts are the same).
    kept = samples.read_text().splitlines(keepends=True)[:3]
    samples.write_text("".join(kept) + '{"id": "p1", "ind')
    assert main(argv + ["--max-inflight", "1", "--speculative-tokens", "2"]) == 0
    lines = samples.read_text().splitlines(keepends=True)
    assert lines[:3] == kept
    recs = _records(samples)
    assert [(r["id"], r["index"]) for r in recs[3:]] == [("p1", 1), ("p2", 0), ("p2", 1)]
    assert sorted((r["id"], r["index"]) for r in recs) == [(f"p{i}", j) for i in range(3) for j in range(2)]
    for r in recs:
        assert r["text"] == expected[int(r["id"][1])]
        assert r["num_tokens"] <= MAX_TOKENS
        assert r["correct"] == (r["id"] == "p0")

    metrics = json.loads((out / runner.METRICS_FILE).read_text())
    assert metrics["dataset"] == "tiny" and metrics["n"] == 2 and metrics["num_problems"] == 3
    assert metrics["avg_pass@1"] == pytest.approx(1 / 3)
    assert metrics["pass@k"] == pytest.approx({"1": 1 / 3, "2": pass_at_k(2, 2, 2) / 3})
    assert metrics["maj@k"] == pytest.approx({"1": 1 / 3, "2": 1 / 3})
    assert metrics["mean_response_tokens"] == pytest.approx(sum(r["num_tokens"] for r in recs) / 6)
    assert set(metrics["reasoning_words"]) == {"branching_out", "backtracking", "self_verification"}
    pytest.importorskip("matplotlib")
    assert (out / "pass_at_k.png").stat().st_size > 0 and (out / "maj_at_k.png").stat().st_size > 0

    # Everything is saved now: a rerun scores without building an engine.
    def no_engine(cfg: runner.EvalConfig) -> None:
        raise AssertionError("a complete run must not build an engine")

    monkeypatch.setattr(sampling, "_build_llm", no_engine)
    (out / runner.METRICS_FILE).unlink()
    assert main(argv) == 0
    assert json.loads((out / runner.METRICS_FILE).read_text())["avg_pass@1"] == pytest.approx(1 / 3)
    # A corrected data file regrades the saved samples against the new reference answers.
    data.write_text(data.read_text().replace(json.dumps(first_answer), json.dumps(r"\frac{3}{7}"), 1))
    assert main(argv) == 0
    assert json.loads((out / runner.METRICS_FILE).read_text())["avg_pass@1"] == 0.0

    capsys.readouterr()
    assert main([a if a != "2" else "3" for a in argv]) == 2  # --n 3 into a folder sampled with n = 2
    assert "different n" in capsys.readouterr().err
    # FP8 weights or an FP8 KV cache draw other samples: not resumed into this folder
    assert main(argv + ["--quantization", "fp8"]) == 2
    assert "different quantization" in capsys.readouterr().err
    assert main(argv + ["--kv-cache-dtype", "fp8"]) == 2
    assert "different kv_cache_dtype" in capsys.readouterr().err
    # a run.json written before those settings existed resumes with their defaults
    run_json = out / runner.RUN_FILE
    settings = json.loads(run_json.read_text())
    run_json.write_text(json.dumps({k: v for k, v in settings.items() if k not in ("quantization", "kv_cache_dtype")}))
    assert main(argv) == 0


def test_a_resume_refuses_an_edited_template_file(tmp_path: Path) -> None:
    template, out = tmp_path / "t.txt", tmp_path / "run"
    template.write_text("Q: {input}\nA:")
    out.mkdir()
    cfg = runner.EvalConfig(model="m", data="d", out=str(out), template=str(template))
    runner._check_run_file(out, cfg, has_samples=False)
    runner._check_run_file(out, cfg, has_samples=True)
    template.write_text("Question: {input}\nAnswer:")
    with pytest.raises(RastError, match="different template_text"):
        runner._check_run_file(out, cfg, has_samples=True)
    run_json = out / runner.RUN_FILE  # a run saved before the text was recorded: its template is unknown
    run_json.write_text(json.dumps({k: v for k, v in json.loads(run_json.read_text()).items() if k != "template_text"}))
    runner._check_run_file(out, cfg, has_samples=True)


def test_samples_are_drawn_in_pieces_and_a_resume_never_repeats_a_seed() -> None:
    """A request draws at most PIECE samples (a crash loses at most a piece's unsaved samples); sample j
    of the request starting at index f draws with (f, j). Whatever a crash left saved (whole requests,
    or a prefix of one's records), the requests of a resume draw fresh (f, j) pairs only and cover
    exactly the missing indices."""
    import random

    assert runner.pieces(list(range(10))) == [(0, 4), (4, 4), (8, 2)]
    assert runner.pieces([0, 1, 5, 6, 7, 8, 9]) == [(0, 2), (5, 4), (9, 1)]
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randrange(1, 20)
        saved: dict[int, tuple[int, int]] = {}  # index -> the (first, j) that drew it
        for _ in range(rng.randrange(1, 4)):  # a crash, then resumes that crash again
            missing = [i for i in range(n) if i not in saved]
            for first, count in runner.pieces(missing):
                kept = rng.choice([0, count, rng.randrange(count + 1)])  # lost, saved, or torn
                assert all(first + j not in saved and (first, j) not in saved.values() for j in range(count))
                saved.update({first + j: (first, j) for j in range(kept)})
        assert all(c <= runner.PIECE for _, c in runner.pieces([i for i in range(n) if i not in saved]))


def _write_metrics(path: Path, dataset: str, acc: float, **more: object) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / runner.METRICS_FILE).write_text(json.dumps({"dataset": dataset, "avg_pass@1": acc, **more}))


def test_compare_prints_recovery_rates(tmp_path: Path, capsys) -> None:
    accs = {"math500": (0.2, 0.5, 0.6), "gsm8k": (0.5, 0.55, 0.5), "aime24": (0.1, 0.1, 0.3)}
    for i, who in enumerate(("base", "rast", "rl")):
        for name, triple in accs.items():
            _write_metrics(tmp_path / who / name, name, triple[i])
    _write_metrics(tmp_path / "rl" / "extra", "minerva", 0.4)
    assert main(["eval", "compare", str(tmp_path / "base"), str(tmp_path / "rast"), str(tmp_path / "rl")]) == 0
    table = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:6]]
            for line in table.splitlines() if line.startswith("| ")}
    assert rows["math500"] == ["20.0", "50.0", "60.0", "75.0"]   # (0.5 − 0.2) / (0.6 − 0.2)
    assert rows["aime24"] == ["10.0", "10.0", "30.0", "0.0"]
    assert rows["gsm8k"][3] == "n/a"                               # RL does not beat the base
    assert rows["**Average**"] == ["26.7", "38.3", "46.7", "37.5"]  # mean RR of the defined rates
    assert "minerva" in table.split("Skipped")[1]
    cells = [line.split("|")[6].strip() for line in table.splitlines()
             if line.startswith("| ") and "Dataset" not in line and "Average" not in line]
    assert cells == ["n/a"] * 3  # metrics without per-problem counts: nothing to pair

    # paired by problem: differences 0.5, 0 and 0.25 (of n = 4 each), mean 25 points, s.e. 0.25 / sqrt(3)
    _write_metrics(tmp_path / "pb" / "m", "m", 0.25, n=4, correct_by_problem={"a": 1, "b": 2, "c": 0})
    _write_metrics(tmp_path / "pr" / "m", "m", 0.5, n=4, correct_by_problem={"a": 3, "b": 2, "c": 1})
    _write_metrics(tmp_path / "pl" / "m", "m", 0.75)
    assert main(["eval", "compare", str(tmp_path / "pb"), str(tmp_path / "pr"), str(tmp_path / "pl")]) == 0
    (row,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| m ")]
    assert row.split("|")[6].strip() == "+25.0 ± 14.4"
    _write_metrics(tmp_path / "pr" / "m", "m", 0.5, n=4, correct_by_problem={"a": 3, "b": 2, "z": 1})
    assert main(["eval", "compare", str(tmp_path / "pb"), str(tmp_path / "pr"), str(tmp_path / "pl")]) == 0
    assert "| n/a |" in capsys.readouterr().out  # other problems: nothing to pair

    assert main(["eval", "compare", str(tmp_path / "nope"), str(tmp_path / "rast"), str(tmp_path / "rl")]) == 2
    assert "neither a metrics file nor a folder" in capsys.readouterr().err
    # a dataset that names nothing, an accuracy that is none: one line each, no traceback, no 300 % rate
    for bad in ({"dataset": ["x"], "avg_pass@1": 0.5}, {"dataset": "x", "avg_pass@1": True},
                {"dataset": "x", "avg_pass@1": float("nan")}, {"dataset": None, "avg_pass@1": 0.5}):
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        assert main(["eval", "compare", str(tmp_path / "bad.json"), str(tmp_path / "rast"), str(tmp_path / "rl")]) == 2
        assert "is not a metrics file written by rast eval" in capsys.readouterr().err


def test_a_saved_sample_missing_a_field_is_refused(tmp_path: Path) -> None:
    """Resuming reads each saved sample's index, text and token count: a record without them is refused
    when the file is read, where it was a KeyError deep in the resume."""
    good = {"id": "p", "index": 0, "answer": "2", "truth": "2", "correct": True, "num_tokens": 3,
            "finish_reason": "stop", "text": "2"}
    for drop in ("index", "text", "num_tokens"):
        rec = {k: v for k, v in good.items() if k != drop}
        f = tmp_path / f"no-{drop}.jsonl"
        f.write_text(json.dumps(rec) + "\n" + json.dumps(good) + "\n")
        with pytest.raises(RastError, match="is not a saved sample"):
            runner.load_saved(f)
    f.write_text(json.dumps(good) + "\n")
    assert runner.load_saved(f) == {"p": [good]}


def test_eval_usage_errors(tmp_path: Path, capsys) -> None:
    assert main(["eval", "--data", "x.jsonl"]) == 2
    assert "--model" in capsys.readouterr().err
    with pytest.raises(RastError, match="go together"):
        runner.EvalConfig(model="m", data="d", out="o", small_rl="r")
    data, taken = tmp_path / "d.jsonl", tmp_path / "taken"
    data.write_text('{"problem": "1+1", "answer": 2}\n')
    taken.write_text("")
    assert main(["eval", "--model", "m", "--data", str(data), "--out", str(taken)]) == 2
    assert "is a file" in capsys.readouterr().err


def test_templates(qwen2_triple, tmp_path: Path) -> None:
    tok = AutoTokenizer.from_pretrained(str(qwen2_triple[0]))
    chat_ids = load_template("a").render("what is 1 + 1?", tok)
    text = tok.apply_chat_template([{"role": "user", "content": f"what is 1 + 1?\n{BOXED_INSTRUCTION}"}],
                                   tokenize=False, add_generation_prompt=True)
    assert chat_ids == tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(chat_ids).endswith("<|assistant|>")
    b = load_template("b")
    assert b.render("2 + 2?", tok) == tok("Question:\n2 + 2?\nAnswer:\nLet's think step by step.")["input_ids"]
    assert TEMPLATE_B.replace("{input}", "x") == "Question:\nx\nAnswer:\nLet's think step by step."
    custom = tmp_path / "t.txt"
    custom.write_text(r"Solve $\frac{a}{b}$ style: {input} => \boxed{}")
    assert load_template(str(custom)).render("1 + 1", tok) == tok(r"Solve $\frac{a}{b}$ style: 1 + 1 => \boxed{}")[
        "input_ids"]
    custom.write_text("no placeholder")
    with pytest.raises(RastError, match="placeholder"):
        load_template(str(custom))
    with pytest.raises(RastError, match="neither"):
        load_template(str(tmp_path / "missing.txt"))
