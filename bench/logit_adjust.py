"""Cost of a step's logit adjustments (engine/logit_adjust.py: logit_bias, min_tokens, penalties, token
masks, structured outputs), the work an adjusted batch adds before the fused sampler.

    python bench/logit_adjust.py            # table, and bench/results/logit-adjust-<device>-<sha>.json
    python bench/logit_adjust.py --quick    # smoke run, small shapes (on the CPU)

Each row decodes ``rows`` adjusted sequences (prompt and output lengths as given, every sequence one new
token a step, as in decoding) and times what the engine does for them at each step: adjustment() per
sequence (host: ban lists, bad-word tails, the grammar matcher's next-token bitmask) and then
with_adjustments on bf16 logits of one small pair. `host_us` is the Python time of a step (on CUDA the
device work is only enqueued then), `us` the median wall time with the device work done (CUDA events).
The floor is the bytes the dense part must move over the measured copy bandwidth: the three models'
logits rows read once (bf16), the output counts read once (penalties, float32), a [rows, V] mask read
once (masks and json, bool), the [rows, V] bias written once (float32).
Kinds: `bias` (300 logit_bias entries and min_tokens masking 2 ids), `penalties` (repetition, frequency
and presence), `both`, `masks` (1000 allowed_token_ids and 16 bad words of 1 to 3 tokens), `json` (a JSON
schema through xgrammar, over a synthetic byte-level vocabulary of V tokens; each sequence's output is a
random walk the grammar allows, the same for every row, so each matcher does a real step's work; its
output so far is capped at JSON_OUTPUT tokens to keep the walk's setup short; skipped without xgrammar),
`processor` (a logits processor reading every model's logits, README's entropy gate: a Python call a row,
the parts copied to float32; its floor adds those copies written and read, and z read and written once).
Mode `round` (every kind but `processor`, which speculative rounds refuse) times the same adjustments inside a
speculative round of GAMMA drafts (engine/speculative/
adjust.py: each draft step's pair on the draft's S + λ(R − S), then the verify's over GAMMA + 1 positions
a row, counts and bad words over the drafts on the device, json's matchers walked over the drafts on the
host, engine/speculative/grammar.py); its floor is those dense passes' bytes.
"""
from __future__ import annotations

import importlib.util
import random
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import (copy_bandwidth, device_name, import_engine, quick_args, sync, table, time_us,  # noqa: E402
                          keeps_results, write_results)

KINDS = ("bias", "penalties", "both", "masks", "json", "processor")
GAMMA = 4  # drafts a round in mode `round`
SCHEMA = {"type": "object", "properties": {"steps": {"type": "array", "items": {"type": "string"}},
                                           "answer": {"type": "integer"}}, "required": ["steps", "answer"]}
EOS = 2
JSON_OUTPUT = 200


def params_of(kind: str, vocab: int) -> dict:
    rng = random.Random(0)
    kw: dict = {}
    if kind in ("bias", "both"):
        kw.update(logit_bias={t: rng.choice([-100.0, 2.0]) for t in rng.sample(range(vocab), min(300, vocab))},
                  min_tokens=10**6, max_tokens=10**6, stop_token_ids=[0, 1])
    if kind in ("penalties", "both"):
        kw.update(repetition_penalty=1.1, frequency_penalty=0.2, presence_penalty=0.1)
    if kind == "masks":
        kw.update(allowed_token_ids=rng.sample(range(vocab), min(1000, vocab)), bad_words=["placeholder"])
    if kind == "json":
        kw.update(structured_outputs={"json": SCHEMA})
    if kind == "processor":
        kw.update(logits_processors=[entropy_gate])
    return kw


def entropy_gate(output_ids: list[int], z: torch.Tensor, *, parts: object) -> torch.Tensor:
    """README's example processor: ΔR where the large model is unsure, the large model alone elsewhere."""
    logp = parts.large.log_softmax(-1)
    return z if -(logp.exp() * logp).nansum() > 2.0 else parts.large


def byte_level_tokenizer(vocab: int) -> object:
    """An HF fast tokenizer of ``vocab`` byte-level tokens: the 256 bytes, then distinct random pieces of
    text (letters, digits, JSON punctuation, half of them after a space), EOS at id 2. Only its vocabulary
    matters here: it is what xgrammar precomputes its token masks over."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    byte = _bytes_to_unicode()
    pieces = {byte[b]: b for b in range(256)}
    rng, alphabet = random.Random(0), "abcdefghijklmnopqrstuvwxyz0123456789" + '{}[]":, .-'
    while len(pieces) < vocab - 1:
        text = (" " if rng.random() < 0.5 else "") + "".join(rng.choices(alphabet, k=rng.randint(2, 8)))
        pieces.setdefault("".join(byte[b] for b in text.encode()), len(pieces))
    pieces["</s>"] = len(pieces)
    order = sorted(pieces, key=pieces.get)
    order[EOS], order[-1] = order[-1], order[EOS]  # EOS at id 2, as the engine's eos set below says
    tok = Tokenizer(models.BPE({piece: i for i, piece in enumerate(order)}, []))
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: printable bytes stand for themselves, the others for 256 + n."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return {b: chr(b if b in keep else next(extra)) for b in range(256)}


def make_seqs(kind: str, rows: int, vocab: int, prompt: int, output: int, steps: int, device: torch.device
              ) -> tuple[list, list[list[int]]]:
    """``rows`` sequences with ``output`` tokens so far, and the ``steps`` tokens each takes next."""
    engine = import_engine()
    from rast_engine.sequence import Sequence, SequenceGroup

    params = engine.SamplingParams(**params_of(kind, vocab))
    grammar = None
    if kind == "masks":
        params.set_bad_words_token_ids([[(7 * i + j) % vocab for j in range(1 + i % 3)] for i in range(16)])
    if kind == "json":
        from rast_engine.structured import Grammars, RequestGrammar

        grammars = Grammars(byte_level_tokenizer(vocab), vocab, [EOS])
        grammar = RequestGrammar(grammars, grammars.compile(params.structured_outputs))
    rng = random.Random(rows)
    shared = grammar_walk(grammar, output + steps, rng) if grammar else None
    seqs, upcoming = [], []
    for r in range(rows):
        walk = shared or [rng.randrange(vocab) for _ in range(output + steps)]
        ids = [rng.randrange(vocab) for _ in range(prompt)] + walk[:output]
        group = SequenceGroup(request_id=f"r{r}", prompt=None, prompt_token_ids=ids[:prompt], params=params,
                              request_seed=r, arrival=r, weights=[0.7], grammar=grammar)
        seqs.append(Sequence(group=group, index=0, token_ids=ids, seed=r))
        upcoming.append(walk[output:])
    return seqs, upcoming


def grammar_walk(grammar: object, n: int, rng: random.Random) -> list[int]:
    """``n`` tokens the grammar allows one after another, each drawn uniformly among the allowed ones other
    than EOS (EOS once nothing else is)."""
    from rast_engine.structured import SequenceMatcher, bitmasks, unpack

    matcher, ids = SequenceMatcher(grammar, []), []  # no prompt: the walk is the whole output
    for _ in range(n):
        mask = bitmasks(grammar.grammars, [matcher.advance(ids, 0)])
        allowed = unpack(mask, grammar.grammars.vocab)[0].nonzero().flatten().tolist()
        ids.append(rng.choice([t for t in allowed if t != EOS] or allowed))
    return ids


def bytes_moved(kind: str, rows: int, vocab: int, models: int = 3) -> int:
    """A dense pass over ``rows`` rows: ``models`` bf16 logits rows read, the counts and the mask read,
    the bias written."""
    counts = 4 if kind in ("penalties", "both") else 0
    mask = 1 if kind in ("masks", "json") else 0
    parts = models * 4 * 2 + 4 * 2 if kind == "processor" else 0
    return rows * vocab * (models * 2 + counts + mask + parts + 4)


def round_bytes(kind: str, rows: int, vocab: int, gamma: int) -> int:
    """A round's dense passes: gamma draft steps over the small pair's logits, then the verify's."""
    return gamma * bytes_moved(kind, rows, vocab, models=2) + bytes_moved(kind, rows * (gamma + 1), vocab)


def _timed(step: Callable[[], None], device: torch.device, host_steps: int, skip: int, warmup: int, iters: int
           ) -> tuple[float, float]:
    """(the median Python time of a step after ``skip`` warm ones, the median wall time with the device
    work done), in microseconds. Every call of ``step`` moves the sequences on."""
    host = []
    for _ in range(host_steps):
        sync(device)
        t0 = time.perf_counter()
        step()
        host.append((time.perf_counter() - t0) * 1e6)
    sync(device)
    rest = sorted(host[skip:])
    return rest[len(rest) // 2], time_us(step, device, warmup=warmup, iters=iters)


def measure(kind: str, rows: int, vocab: int, prompt: int, output: int, device: torch.device) -> dict:
    from rast_engine.draws import Draw
    from rast_engine.logit_adjust import adjustment, with_adjustments

    host_steps, warmup, iters = 13, 2, 10
    output = min(output, JSON_OUTPUT) if kind == "json" else output
    seqs, upcoming = make_seqs(kind, rows, vocab, prompt, output, host_steps + warmup + iters + 1, device)
    g = torch.Generator().manual_seed(rows)
    logits = [(torch.randn(rows, vocab, generator=g) * 3).to(torch.bfloat16).to(device) for _ in range(3)]
    to_device = lambda t: t.to(device, non_blocking=True)  # noqa: E731
    taken = [0]

    def step() -> None:
        draws = []
        for r, seq in enumerate(seqs):  # one new token each, as a decode step adds
            seq.token_ids.append(upcoming[r][taken[0]])
            draws.append(Draw(r, seq.params, [0.7], r, seq.num_generated, adjustment(seq, False, [EOS])))
        taken[0] += 1
        with_adjustments(logits, draws, to_device, vocab)

    host_us, us = _timed(step, device, host_steps, 3, warmup, iters)
    return dict(kind=kind, mode="step", gamma=0, rows=rows, vocab=vocab, prompt=prompt, output=output,
                host_us=host_us, us=us, bytes=bytes_moved(kind, rows, vocab))


def measure_round(kind: str, rows: int, vocab: int, prompt: int, output: int, device: torch.device) -> dict:
    """One speculative round's adjustments (mode `round`), GAMMA + 1 tokens a sequence per round."""
    from rast_engine.draws import Draw
    from rast_engine.logit_adjust import adjustment
    from rast_engine.speculative.adjust import RoundAdjust

    host_steps, warmup, iters = 7, 1, 5
    output = min(output, JSON_OUTPUT) if kind == "json" else output
    seqs, upcoming = make_seqs(kind, rows, vocab, prompt, output, (host_steps + warmup + iters + 1) * (GAMMA + 1),
                               device)
    g = torch.Generator().manual_seed(rows)
    width = rows * (GAMMA + 1)
    large, rl, base = ((torch.randn(width, vocab, generator=g) * 3).to(torch.bfloat16).to(device) for _ in range(3))
    weights = torch.full((rows, 1), 0.7, device=device)
    to_device = lambda t: t.to(device, non_blocking=True)  # noqa: E731
    taken = [0]

    def step() -> None:
        draws = [Draw(r, seq.params, [0.7], r, seq.num_generated, adjustment(seq, False, [EOS]))
                 for r, seq in enumerate(seqs)]
        drafts = to_device(torch.tensor([u[taken[0] + 1:taken[0] + 1 + GAMMA] for u in upcoming]))
        adjust = RoundAdjust(seqs, draws, vocab, device, to_device)
        for j in range(GAMMA):  # draft j's rows are the small pair's at position j
            adjust.extend(base[j::GAMMA + 1], [(rl[j::GAMMA + 1], base[j::GAMMA + 1])], weights, j, 1, drafts[:, :j],
                          keep=True)
            adjust.note_draft(drafts[:, j])  # json: the matchers' walk reads it for position j + 1
        adjust.extend(large, [(rl, base)], weights.repeat_interleave(GAMMA + 1, dim=0), 0, GAMMA + 1, drafts)
        for r, seq in enumerate(seqs):  # every draft accepted, and the token after them
            seq.token_ids += upcoming[r][taken[0]:taken[0] + GAMMA + 1]
        taken[0] += GAMMA + 1

    host_us, us = _timed(step, device, host_steps, 2, warmup, iters)
    return dict(kind=kind, mode="round", gamma=GAMMA, rows=rows, vocab=vocab, prompt=prompt, output=output,
                host_us=host_us, us=us, bytes=round_bytes(kind, rows, vocab, GAMMA))


def main() -> None:
    args = quick_args(__doc__, "CPU smoke run: small shapes")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    # Qwen2.5's vocabulary, a 4000-token prompt and 1000 tokens of output so far
    grid = [(1, 1000, 64, 32), (4, 1000, 64, 32)] if args.quick else [(r, 152064, 4000, 1000) for r in (1, 8, 32)]
    bw = copy_bandwidth(device)
    rows = []
    for n, vocab, prompt, output in grid:
        for kind in KINDS:
            if kind == "json" and importlib.util.find_spec("xgrammar") is None:
                print("json: skipped, xgrammar is not installed")
                continue
            for run in (measure, measure_round) if kind != "processor" else (measure,):
                row = run(kind, n, vocab, prompt, output, device)
                row["floor_us"] = row["bytes"] / bw * 1e6
                rows.append(row)
    print(f"device: {device_name(device)}; copy bandwidth {bw / 1e9:.0f} GB/s")
    print(table(rows, ["kind", "mode", "rows", "vocab", "prompt", "output", "host_us", "us", "floor_us"]))
    if keeps_results(args.out, device, args.quick):
        path = write_results("logit-adjust", device, rows, {"copy_gbs": bw / 1e9}, args.out)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
