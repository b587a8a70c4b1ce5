"""The one entry point that remakes the toy world, with fixed seeds:

    python -m rast_engine.toy.train --out DIR

writes DIR/{small,large,small_rl,large_rl}/ (HF Qwen2, safetensors, tokenizer), DIR/problems.jsonl
(the held-out set, never seen in training) and DIR/train_report.json (timings and the accuracy table).
Ship by pointing --out at engine/assets/toy."""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from transformers import Qwen2ForCausalLM

from rast_engine.toy.evaluate import table
from rast_engine.toy.models import LARGE, SMALL, build_model, n_params
from rast_engine.toy.pretrain import PretrainConfig, pretrain
from rast_engine.toy.rl import RLConfig, rl_tune
from rast_engine.toy.task import heldout_problems
from rast_engine.toy.tokenizer import build_tokenizer

HELDOUT_SEED, HELDOUT_COUNT = 20240607, 200
CAREFUL_SHARE = 0.2
PRETRAIN = {
    "small": PretrainConfig(steps=1500, batch=64, lr=3e-3, careful_share=CAREFUL_SHARE, seed=11),
    "large": PretrainConfig(steps=800, batch=64, lr=1.5e-3, careful_share=CAREFUL_SHARE, seed=12),
}
RL = {
    "small_rl": RLConfig(steps=60, prompts=16, group=8, lr=1e-4, seed=21),
    "large_rl": RLConfig(steps=40, prompts=8, group=8, lr=5e-5, seed=22),
}


def save(model, tokenizer, out: Path) -> None:
    """Weights ship in bfloat16 (half the bytes; training and the reported table run in float32 on
    the bf16-rounded weights, see evaluate.table)."""
    out.mkdir(parents=True, exist_ok=True)
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))


def done(out: Path) -> bool:
    return (out / "model.safetensors").exists()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False, description="Train the toy RAST world (S, M, R = RL(S), RL(M)).")
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--resume", action="store_true", help="load stages already saved in --out instead of retraining")
    ap.add_argument("--eval-n", type=int, default=4, help="samples per held-out problem in the final table")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    heldout = heldout_problems(HELDOUT_COUNT, HELDOUT_SEED)
    exclude = {(p.a, p.b) for p in heldout}
    with open(out / "problems.jsonl", "w") as fh:
        for i, p in enumerate(heldout):
            fh.write(json.dumps({"id": f"toy-{i:03d}", "problem": p.prompt, "answer": p.answer}) + "\n")

    report: dict = {"seconds": {}, "params": {}}
    models = {}
    for name, shape, seed in (("small", SMALL, 1), ("large", LARGE, 2)):
        t0 = time.time()
        if args.resume and done(out / name):
            models[name] = Qwen2ForCausalLM.from_pretrained(str(out / name), dtype=torch.float32).eval()
            report["params"][name] = n_params(models[name])
            print(f"== {name}: loaded from {out / name}", flush=True)
            continue
        model = build_model(shape, seed)
        report["params"][name] = n_params(model)
        print(f"== pretrain {name}: {n_params(model):,} parameters", flush=True)
        pretrain(model, tok, PRETRAIN[name], exclude, log=lambda s: print(s, flush=True))
        save(model, tok, out / name)
        models[name] = model
        report["seconds"][name] = round(time.time() - t0, 1)
    for name, base in (("small_rl", "small"), ("large_rl", "large")):
        t0 = time.time()
        report["params"][name] = report["params"][base]  # RL changes weights, never shapes
        if args.resume and done(out / name):
            print(f"== {name}: already in {out / name}", flush=True)
            continue
        model = copy.deepcopy(models[base])
        print(f"== RL {name} from {base}", flush=True)
        rl_tune(model, tok, RL[name], exclude, log=lambda s: print(s, flush=True))
        save(model, tok, out / name)
        report["seconds"][name] = round(time.time() - t0, 1)
    t0 = time.time()
    print(f"== held-out table: {HELDOUT_COUNT} problems x {args.eval_n} samples, T=1", flush=True)
    report["table"] = table(out, heldout, n=args.eval_n, seed=0, log=lambda s: print(s, flush=True))
    report["seconds"]["eval"] = round(time.time() - t0, 1)
    previous = out / "train_report.json"
    if args.resume and previous.exists():  # keep the timings of stages this run did not redo
        old = json.loads(previous.read_text())
        report["seconds"] = {**old.get("seconds", {}), **report["seconds"]}
    (out / "train_report.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
