"""Accuracy of a model or a logit combination on toy problems: average pass@1 over n samples per
problem, plus how often the careful path is taken and how accurate each path is (the "why")."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rast_engine.toy.sampling import decode_completions, sample
from rast_engine.toy.task import Problem, is_careful, is_correct

MAX_NEW_TOKENS = 64  # the longest careful completion is 57 characters plus <eos>


@dataclass(frozen=True)
class Score:
    accuracy: float
    careful_rate: float
    careful_accuracy: float | None
    direct_accuracy: float | None
    samples: int

    def row(self) -> str:
        fmt = lambda x: "  -  " if x is None else f"{x:.3f}"
        return (f"acc {self.accuracy:.3f}  careful-rate {self.careful_rate:.3f}  "
                f"acc|careful {fmt(self.careful_accuracy)}  acc|direct {fmt(self.direct_accuracy)}")


def prompt_batch(tokenizer, problems: list[Problem]) -> torch.Tensor:
    return torch.tensor([tokenizer(p.prompt)["input_ids"] for p in problems], dtype=torch.long)


def score(members, tokenizer, problems: list[Problem], n: int, seed: int,
          temperature: float = 1.0, batch: int = 256) -> Score:
    gen = torch.Generator().manual_seed(seed)
    flat = [p for p in problems for _ in range(n)]
    correct = careful = careful_correct = 0
    for start in range(0, len(flat), batch):
        chunk = flat[start : start + batch]
        roll = sample(members, prompt_batch(tokenizer, chunk), eos_id=tokenizer.eos_token_id,
                      pad_id=tokenizer.pad_token_id, max_new_tokens=MAX_NEW_TOKENS,
                      temperature=temperature, generator=gen)
        for p, text in zip(chunk, decode_completions(roll, tokenizer)):
            ok, c = is_correct(p, text), is_careful(text)
            correct += ok
            careful += c
            careful_correct += ok and c
    total = len(flat)
    direct = total - careful
    return Score(
        accuracy=correct / total,
        careful_rate=careful / total,
        careful_accuracy=careful_correct / careful if careful else None,
        direct_accuracy=(correct - careful_correct) / direct if direct else None,
        samples=total,
    )


LAMBDAS = (0.5, 1.0, 1.5)


def load_problems(path) -> list[tuple[str, Problem]]:
    import json

    from rast_engine.toy.task import parse_prompt

    out = []
    with open(path) as fh:
        for line in fh:
            rec = json.loads(line)
            problem = parse_prompt(rec["problem"])
            if problem.answer != rec["answer"]:
                raise ValueError(f"{path}: answer of {rec['id']} is {rec['answer']}, expected {problem.answer}")
            out.append((rec["id"], problem))
    return out


def table(root, problems: list[Problem], n: int, seed: int, log=print) -> dict[str, dict]:
    """The miniature Table 1: S, R, M, M + λ·(R − S) and the RL-tuned M on the same problems."""
    from pathlib import Path

    from transformers import AutoTokenizer, Qwen2ForCausalLM

    root = Path(root)
    tok = AutoTokenizer.from_pretrained(str(root / "small"))
    m = {k: Qwen2ForCausalLM.from_pretrained(str(root / k), dtype=torch.float32).eval() for k in ("small", "small_rl", "large", "large_rl")}
    rows: dict[str, list] = {
        "small": [(m["small"], 1.0)],
        "small_rl": [(m["small_rl"], 1.0)],
        "large": [(m["large"], 1.0)],
        **{f"large+delta@{lam:g}": [(m["large"], 1.0), (m["small_rl"], lam), (m["small"], -lam)] for lam in LAMBDAS},
        "large_rl": [(m["large_rl"], 1.0)],
    }
    out = {}
    for name, members in rows.items():
        s = score(members, tok, problems, n=n, seed=seed)
        log(f"{name:18s} {s.row()}")
        out[name] = s.__dict__
    for lam in LAMBDAS:
        rec = recovery(out, f"large+delta@{lam:g}")
        log(f"recovery rate at lambda {lam:g}: {'n/a' if rec is None else f'{rec:.3f}'}")
        out[f"large+delta@{lam:g}"]["recovery"] = rec
    out["pcr_small_rl_through_large"] = path_coverage(m["small_rl"], m["large"], tok, problems)
    out["pcr_small_rl_through_small"] = path_coverage(m["small_rl"], m["small"], tok, problems)
    log(f"PCR of R through M {out['pcr_small_rl_through_large']:.4f}, through S {out['pcr_small_rl_through_small']:.4f}")
    return out


@torch.no_grad()
def path_coverage(rl_model, base_model, tokenizer, problems: list[Problem]) -> float:
    """PCR (paper eq. 2): the share of tokens of the RL model's greedy completions that the base model's
    greedy next-token choice reproduces when fed the RL path; sample-averaged, <eos> included."""
    width = len(tokenizer)
    roll = sample([(rl_model, 1.0)], prompt_batch(tokenizer, problems), eos_id=tokenizer.eos_token_id,
                  pad_id=tokenizer.pad_token_id, max_new_tokens=MAX_NEW_TOKENS, temperature=0.0,
                  generator=torch.Generator())
    pred = base_model(input_ids=roll.tokens[:, :-1]).logits[..., :width].argmax(-1)
    mask = roll.completion_mask[:, 1:]
    hits = ((pred == roll.tokens[:, 1:]) & mask).sum(1).float() / mask.sum(1)
    return float(hits.mean())


def recovery(result: dict[str, dict], key: str) -> float | None:
    """(acc(M + ΔR) − acc(M)) / (acc(RL-tuned M) − acc(M)); None when RL did not improve M."""
    gap = result["large_rl"]["accuracy"] - result["large"]["accuracy"]
    return (result[key]["accuracy"] - result["large"]["accuracy"]) / gap if gap > 0 else None


def main(argv: list[str] | None = None) -> None:
    import argparse
    import json
    from pathlib import Path

    ap = argparse.ArgumentParser(allow_abbrev=False,
                                 description="Accuracy table of the toy checkpoints (own sampler, not the engine).")
    ap.add_argument("--models", default=str(Path(__file__).resolve().parent.parent / "assets" / "toy"))
    ap.add_argument("--n", type=int, default=4, help="samples per problem (temperature 1)")
    ap.add_argument("--limit", type=int, default=None, help="first N problems only")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    problems = [p for _, p in load_problems(Path(args.models) / "problems.jsonl")][: args.limit]
    result = table(args.models, problems, n=args.n, seed=args.seed)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
