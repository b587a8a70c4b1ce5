"""The toy task's generator and checker against integer arithmetic, and the toy tokenizer's
round-trip through its saved HF files."""
from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from rast_engine.toy.task import (
    N_DIGITS,
    Problem,
    extract_answer,
    heldout_problems,
    is_careful,
    is_correct,
    parse_prompt,
    sample_problem,
)


def _replay_careful(problem: Problem, completion: str) -> int:
    """Independent check of a careful trace: every step must be digit + digit + carry = its sum, in
    column order from the units up, and the trace must spell a + b."""
    body = completion[1 : completion.index("]")]
    digits, carry = [], 0
    for col, step in enumerate(body.split(",")):
        lhs, total = step.split("=")
        x, y, c = (int(v) for v in lhs.split("+"))
        assert x == problem.a // 10**col % 10 and y == problem.b // 10**col % 10
        assert c == carry and int(total) == x + y + c
        digits.append(int(total) % 10)
        carry = int(total) // 10
    return carry * 10 ** len(digits) + sum(d * 10**i for i, d in enumerate(digits))


def test_solutions_are_correct_and_checkable() -> None:
    rng = random.Random(7)
    for _ in range(500):
        p = sample_problem(rng)
        assert int(p.answer) == p.a + p.b
        assert is_correct(p, p.direct()) and is_correct(p, p.careful())
        assert is_careful(p.careful()) and not is_careful(p.direct())
        assert _replay_careful(p, p.careful()) == p.a + p.b
        assert parse_prompt(p.prompt) == p


def test_checker_rejects_wrong_and_malformed() -> None:
    p = Problem(99999, 10001)
    assert p.answer == "110000"
    assert not is_correct(p, "110001")
    assert not is_correct(p, "")
    assert not is_correct(p, "[9+1+0=10")  # careful path never closed
    assert not is_correct(p, p.careful() + "0")
    assert not is_correct(p, "11000O")
    assert extract_answer("[x]123") == "123"
    with pytest.raises(ValueError):
        Problem(1234, 56789)
    with pytest.raises(ValueError):
        parse_prompt("12345-67890=")


def test_heldout_is_distinct_and_deterministic() -> None:
    a, b = heldout_problems(300, seed=3), heldout_problems(300, seed=3)
    assert a == b and len({(p.a, p.b) for p in a}) == 300
    c = heldout_problems(50, seed=4, exclude={(p.a, p.b) for p in a})
    assert not {(p.a, p.b) for p in c} & {(p.a, p.b) for p in a}
    assert all(len(str(p.a)) == len(str(p.b)) == N_DIGITS for p in a)


def test_tokenizer_round_trip(tmp_path) -> None:
    from transformers import AutoTokenizer

    from rast_engine.toy.tokenizer import build_tokenizer, vocab_size

    from rast_engine.toy.demo import ASSETS
    from rast_engine.toy.tokenizer import save_tokenizer

    # beside a qwen2 config.json, as in every shipped model folder: no unk token added (a 19th id)
    (tmp_path / "config.json").write_text('{"model_type": "qwen2"}')
    save_tokenizer(build_tokenizer(), tmp_path)
    assert (tmp_path / "tokenizer.json").exists() and (tmp_path / "tokenizer_config.json").exists()
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    assert len(tok) == vocab_size()
    for shipped in ("large", "large_rl", "small", "small_rl"):
        assert len(AutoTokenizer.from_pretrained(str(ASSETS / shipped))) == vocab_size(), shipped
    assert len({tok.pad_token_id, tok.bos_token_id, tok.eos_token_id}) == 3
    rng = random.Random(1)
    for _ in range(50):
        p = sample_problem(rng)
        text = p.prompt + p.careful()
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id and len(ids) == len(text) + 1  # one token per character
        assert tok.decode(ids, skip_special_tokens=True) == text
        assert tok.convert_ids_to_tokens(ids[1:]) == list(text)


def test_sampler_matches_exact_distribution() -> None:
    """The toy sampler draws the first token from softmax(Σ wᵢ·logitsᵢ) over the shared vocab prefix of
    models with different vocab widths: frequencies over many draws match the exact probabilities."""
    from rast_engine.toy.models import ToyShape, build_model
    from rast_engine.toy.sampling import sample
    from rast_engine.toy.tokenizer import build_tokenizer

    tok = build_tokenizer()
    small = ToyShape(hidden=32, intermediate=64, layers=1, heads=2, kv_heads=1, vocab_width=32)
    large = ToyShape(hidden=32, intermediate=64, layers=1, heads=2, kv_heads=1, vocab_width=64)
    m, r, s = build_model(large, 0).eval(), build_model(small, 1).eval(), build_model(small, 2).eval()
    for mod in (m, r, s):  # random init is near-uniform; sharpen so the check has power
        mod.lm_head.weight.data *= 40
    prompt = torch.tensor([tok(Problem(12345, 67890).prompt)["input_ids"]])
    members, v = [(m, 1.0), (r, 1.5), (s, -1.5)], len(tok)
    with torch.no_grad():
        logits = sum(w * mod(input_ids=prompt).logits[0, -1, :v] for mod, w in members)
    exact = torch.softmax(logits / 0.8, -1)
    draws = 4000
    roll = sample(members, prompt.expand(draws, -1), eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                  max_new_tokens=1, temperature=0.8, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(roll.tokens[:, prompt.shape[1]], minlength=v).double() / draws
    assert (freq - exact.double()).abs().max() < 4 * (0.25 / draws) ** 0.5


def test_shipped_assets_are_consistent() -> None:
    """The shipped world: four Qwen2 safetensors checkpoints sharing one tokenizer, the large pair
    padded to a wider vocab than the small pair, and a held-out set whose answers are a + b."""
    import json
    from pathlib import Path

    import rast_engine
    from rast_engine.toy.evaluate import load_problems
    from rast_engine.toy.tokenizer import vocab_size

    root = Path(rast_engine.__file__).resolve().parent / "assets" / "toy"
    widths = {}
    for name in ("small", "small_rl", "large", "large_rl"):
        d = root / name
        cfg = json.loads((d / "config.json").read_text())
        assert cfg["model_type"] == "qwen2" and (d / "model.safetensors").exists()
        assert json.loads((d / "tokenizer.json").read_text()) == json.loads((root / "small" / "tokenizer.json").read_text())
        widths[name] = cfg["vocab_size"]
    assert widths["small"] == widths["small_rl"] < widths["large"] == widths["large_rl"]
    assert widths["small"] >= vocab_size()
    problems = load_problems(root / "problems.jsonl")  # raises on a wrong answer
    assert len(problems) >= 100 and len({p for _, p in problems}) == len(problems)


def test_the_documented_example_is_what_the_task_writes() -> None:
    """The example in the module docstring (and docs/toy.md) had a wrong carry in the thousands column."""
    import re

    import rast_engine.toy.task as task

    problem = Problem(47256, 38691)
    assert f'``"{problem.prompt}"``' in task.__doc__
    assert f'``"{problem.careful()}"``' in task.__doc__ and f'``"{problem.direct()}"``' in task.__doc__
    doc = Path(task.__file__).parents[2] / "docs" / "toy.md"
    if doc.is_file():  # a source checkout
        assert re.search(re.escape(f"`{problem.careful()}`"), doc.read_text())
