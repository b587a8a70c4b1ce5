"""`rast eval`: n samples per problem on the engine, saved as they come, graded, scored and plotted.

A problem's samples are drawn by requests of up to PIECE samples each: a request prefills its prompt
once and its samples share the prompt's KV blocks (see PIECE). Requests stream through the engine's step loop (a finished problem makes room for the next)
and every finished request is appended to samples.jsonl at once (the engine loop: sampling.py; several
engines: parallel.py); a rerun with the same --out draws the sample indices still missing (the settings
that shape the samples must match run.json). A request's seed is a function of (seed, problem id, its
first sample index), so a problem draws the same samples whatever batch or resume it lands in, and a
resumed run never repeats a saved sample's seed.
"""
from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rast_engine.errors import RastError
from rast_engine.lora_modules import checked_lora_modules
from rast_engine.logits_processors import load_processor
from rast_engine.sampling_params import MAX_LAM, SamplingParams, is_lam
from rast_engine.evaluation.data import Problem, load_problems
from rast_engine.evaluation.grading import is_equivalent
from rast_engine.evaluation.metrics import GradedSample, compute_metrics
from rast_engine.evaluation.plots import draw_plots
from rast_engine.evaluation.sampling import Item, sample
from rast_engine.evaluation.templates import load_template
from rast_engine.evaluation.variants import variant_config, variants

SAMPLES_FILE, RUN_FILE, METRICS_FILE = "samples.jsonl", "run.json", "metrics.json"
# The settings that shape the samples; a resumed run must agree on all of them.
_SAMPLE_KEYS = ("model", "small_rl", "small_base", "lam", "template", "n", "temperature", "top_p", "top_k",
                "min_p", "max_tokens", "stop", "seed", "quantization", "kv_cache_dtype", "plausibility_alpha",
                "logits_processors", "template_text")
# sample settings added after runs were saved: a run.json without them drew with these values
_ADDED_KEYS = {"quantization": None, "kv_cache_dtype": "auto", "plausibility_alpha": 0.0, "logits_processors": None}
# recorded since, and unknown for older runs, so not compared there: the template's own text (an edited
# template file keeps its path)
_UNRECORDED = ("template_text",)


# Samples per engine request. A request's samples are saved when its last one finishes, so small
# requests save sooner and a crash loses less; each prefills the prompt once per PIECE samples (with
# prefix caching, only the prompt's last partial block is computed again). No slot idles at any size:
# the engine admits a request of n samples into one slot (scheduler.py). Changing PIECE changes the
# seeds of new samples and how a resume cuts its requests.
PIECE = 4


def pieces(missing: list[int]) -> list[tuple[int, int]]:
    """(first index, count) of the requests that draw the ``missing`` sample indices (sorted): every
    run of consecutive indices cut into pieces of at most PIECE, from the run's start. A saved request's
    indices are a piece, or a prefix of one (a torn write), so no new piece starts where a saved one did."""
    out: list[tuple[int, int]] = []
    for i in missing:
        first, count = out[-1] if out else (-1, 0)
        if out and i == first + count and count < PIECE:
            out[-1] = (first, count + 1)
        else:
            out.append((i, 1))
    return out


@dataclass
class EvalConfig:
    model: str
    data: str
    out: str
    small_rl: str | None = None
    small_base: str | None = None
    lam: float = 1.0
    template: str = "a"
    n: int = 32
    temperature: float = 1.0
    top_p: float = 0.95
    top_k: int = 0
    min_p: float = 0.0
    max_tokens: int = 16384
    stop: tuple[str, ...] = ()
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0
    max_inflight: int | None = None  # problems in the engine at once; None: enough for ~512 sequences
    limit: int | None = None
    name: str | None = None  # the dataset's name in metrics.json; defaults to the data file's stem
    plots: bool = True
    # speculative decoding's drafts a round (0: off): the same distribution, other tokens for a seed, so
    # not a sample setting (a resumed run may mix both)
    speculative_tokens: int = 0
    # "fp8": the large model's projections in FP8 (engine/models/fp8.py); other weights, other samples
    quantization: str | None = None
    kv_cache_dtype: str = "auto"  # "fp8": every model's KV cache in float8_e4m3fn (a sample setting too)
    # > 0: contrastive decoding's plausibility mask on the large model's own distribution (plausibility.py)
    plausibility_alpha: float = 0.0
    logits_processors: tuple[str, ...] | None = None  # qualified names (logits_processors.py), loaded per process
    # engines in processes of their own (one a GPU), problems handed to whichever has room; a sample's
    # seed does not depend on where it is drawn, so not a sample setting
    data_parallel_size: int = 1
    # several variants in one engine (variants.py), each saved in OUT/<variant>/ as its single run: a λ
    # sweep, and RL adapters over small_base chosen per request ({name: adapter directory})
    lams: tuple[float, ...] | None = None
    lora_modules: dict[str, str] | None = None
    # several full checkpoints of R (directories of one architecture) over small_base, one after another in
    # one engine that loads M once and replaces R's weights between them (LLMEngine.load_weights); each a
    # variant saved in OUT/<directory name>/ as the single run with that small_rl
    rl_checkpoints: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.rl_checkpoints is not None:
            self.rl_checkpoints = tuple(map(str, self.rl_checkpoints))
            if self.small_base is None or self.small_rl is not None or self.lora_modules is not None:
                raise RastError("--rl-checkpoints are checkpoints of R over --small-base, one run each: give "
                                "--small-base, and neither --small-rl nor --lora-modules")
            names = [Path(c).name for c in self.rl_checkpoints]
            if not names or len(set(names)) != len(names) or not all(n and n not in (".", "..") for n in names):
                raise RastError(f"--rl-checkpoints must be directories of distinct names (each names a run folder), "
                                f"got {list(self.rl_checkpoints)}")
        elif self.lora_modules is not None:
            self.lora_modules = checked_lora_modules(self.lora_modules)
            if self.small_base is None or self.small_rl is not None:
                raise RastError("--lora-modules are RL adapters over --small-base, one run each: give --small-base "
                                "and no --small-rl")
            bad = [n for n in self.lora_modules if n in (".", "..") or "/" in n or "\\" in n]
            if bad:  # each names a folder of OUT
                raise RastError(f"--lora-modules names {bad} cannot name a run folder (no '/', '\\', '.' or '..')")
        elif (self.small_rl is None) != (self.small_base is None):
            raise RastError("--small-rl and --small-base go together (ΔR = R − S needs both)")
        if self.lams is not None:
            self.lams = tuple(self.lams)
            if self.small_base is None:
                raise RastError("--lams sweeps λ, the strength of ΔR = R − S: give --small-rl and --small-base")
            if not self.lams or not all(map(is_lam, self.lams)) or len(set(map(float, self.lams))) != len(self.lams):
                raise RastError(f"--lams must be distinct numbers with |λ| <= {MAX_LAM:g}, got {list(self.lams)}")
            if len({f"{x:g}" for x in self.lams}) != len(self.lams):  # the folders lam<λ:g>
                raise RastError(f"--lams {list(self.lams)} would share run folders (lam<λ> to 6 significant digits)")
        if self.n < 1 or self.max_tokens < 1:
            raise RastError("--n and --max-tokens must be >= 1")
        if not 0.0 <= self.plausibility_alpha <= 1.0:
            raise RastError(f"--plausibility-alpha must be in [0, 1], got {self.plausibility_alpha}")
        if self.logits_processors is not None:  # a bad name fails before the models load
            if self.speculative_tokens:
                raise RastError("--logits-processors cannot run in speculative rounds: drop --speculative-tokens")
            self.logits_processors = tuple(self.logits_processors)
            SamplingParams(logits_processors=[load_processor(name) for name in self.logits_processors])
        if self.max_inflight is None:
            # twice the engine's default batch of 256 sequences: a queue that refills it at once
            self.max_inflight = max(4, -(-512 // self.n))
        if self.max_inflight < 1:
            raise RastError("--max-inflight must be >= 1")
        if self.limit is not None and self.limit < 1:
            raise RastError("--limit must be >= 1")
        if isinstance(self.data_parallel_size, bool) or not isinstance(self.data_parallel_size, int) \
                or self.data_parallel_size < 1:
            raise RastError(f"--data-parallel-size must be an integer >= 1, got {self.data_parallel_size!r}")
        self.stop = tuple(self.stop)
        if self.name is None:
            self.name = Path(self.data).stem

    def sample_settings(self) -> dict[str, Any]:
        d = {**asdict(self), "template_text": load_template(self.template).text}
        return {k: list(d[k]) if k in ("stop", "logits_processors") and d[k] is not None else d[k]
                for k in _SAMPLE_KEYS}


def load_saved(path: Path) -> dict[str, list[dict]]:
    """Saved samples by problem id. A torn last line (a crash mid-write) is cut off the file; a broken
    line elsewhere means the file is not ours to guess about."""
    saved: dict[str, list[dict]] = {}
    if not path.exists():
        return saved
    data = path.read_bytes()
    lines = data.split(b"\n")  # bytes: only "\n" ends a record (json may hold U+2028 and friends)
    good = 0  # the byte offset where line i starts: everything before it is whole records
    for i, line in enumerate(lines):
        if not line.strip():
            good += len(line) + 1
            continue
        try:
            rec = json.loads(line)
            if not (isinstance(rec["index"], int) and isinstance(rec["text"], str)
                    and isinstance(rec["num_tokens"], int) and "answer" in rec and "correct" in rec):
                raise TypeError("not a sample record")  # what resuming reads of it, checked here
            saved.setdefault(str(rec["id"]), []).append(rec)
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            if i == len(lines) - 1:
                with path.open("r+b") as fh:
                    fh.truncate(good)
                return saved
            raise RastError(f"{path}:{i + 1} is not a saved sample; use a fresh --out") from None
        good += len(line) + 1
    if data and not data.endswith(b"\n"):  # a whole last record that lost its newline
        with path.open("ab") as fh:
            fh.write(b"\n")
    return saved


def _check_run_file(out: Path, cfg: EvalConfig, has_samples: bool) -> None:
    """Samples already saved must have been drawn with this run's settings; with none saved yet (say a
    first attempt died on a mistyped model path) the settings are simply (re)written."""
    run_file = out / RUN_FILE
    settings = cfg.sample_settings()
    if has_samples and run_file.exists():
        before = json.loads(run_file.read_text(encoding="utf-8"))
        diff = [k for k in _SAMPLE_KEYS if (k in before or k not in _UNRECORDED)
                and before.get(k, _ADDED_KEYS.get(k)) != settings[k]]
        if diff:
            raise RastError(f"{out} holds samples drawn with different {', '.join(diff)}; resume with the "
                            "same settings or use a fresh --out")
    else:
        run_file.write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")


def _generate(cfg: EvalConfig, todo: list[Item], samples_paths: list[Path], log: Any) -> None:
    """Samples ``todo`` into each variant's samples.jsonl: in this process, or across data_parallel_size
    engines."""
    from contextlib import ExitStack

    from tqdm import tqdm

    bar = tqdm(total=sum(c for _, parts, _ in todo for _, c in parts), desc=f"eval {cfg.name}", unit="sample",
               file=log)
    with ExitStack() as stack:
        files = [stack.enter_context(path.open("a", encoding="utf-8")) for path in samples_paths]

        def save(v: int, records: list[dict[str, Any]]) -> None:
            files[v].write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
            files[v].flush()
            bar.update(len(records))

        if cfg.data_parallel_size == 1:
            queue = iter(todo)
            sample(cfg, lambda: next(queue, None), save)
        else:
            from rast_engine.evaluation.parallel import sample_in_parallel

            sample_in_parallel(cfg, todo, save)
    bar.close()


def _still_correct(rec: dict, problem: Problem) -> bool:
    if rec.get("truth") == problem.answer:
        return bool(rec["correct"])
    return is_equivalent(rec["answer"], problem.answer)


def run_eval(cfg: EvalConfig, log: Any = sys.stderr) -> dict:
    """Generates what is missing, then writes metrics.json (and plots); returns the metrics (with several
    variants: each variant's, by its name)."""
    problems = load_problems(cfg.data, cfg.limit)
    runs = variants(cfg)
    cfgs = [cfg] if runs is None else [variant_config(cfg, v) for v in runs]
    plans = [_plan(c, problems) for c in cfgs]
    # a problem's variants side by side: its λ variants share the prompt's prefix cache
    todo = [(p, parts[p.id], v) for p in problems for v, parts in enumerate(plans) if p.id in parts]
    if cfg.rl_checkpoints:  # one checkpoint's problems after another: the engine replaces R once each
        todo.sort(key=lambda item: cfg.rl_checkpoints.index(runs[item[2]].small_rl))
    if todo:
        done = len(problems) * len(plans) - len(todo)
        print(f"rast eval: {len(problems)} problems x {len(plans)} run(s), {done} already complete, sampling "
              f"{len(todo)}", file=log)
        _generate(cfg, todo, [Path(c.out) / SAMPLES_FILE for c in cfgs], log)
    else:
        print(f"rast eval: all {len(problems)} problems already sampled; scoring", file=log)
    metrics = [_score(c, problems, load_saved(Path(c.out) / SAMPLES_FILE), log) for c in cfgs]
    return metrics[0] if runs is None else {v.name: m for v, m in zip(runs, metrics)}


def _plan(cfg: EvalConfig, problems: list[Problem]) -> dict[str, list[tuple[int, int]]]:
    """The requests each problem of a run still needs, its folder made and checked against its saved
    settings first."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise RastError(f"--out {str(out)!r} is a file; it must name a run directory")
    out.mkdir(parents=True, exist_ok=True)
    saved = load_saved(out / SAMPLES_FILE)
    _check_run_file(out, cfg, bool(saved))
    todo = {}
    for p in problems:
        have = {int(r["index"]) for r in saved.get(p.id, [])}
        missing = [i for i in range(cfg.n) if i not in have]
        if missing:
            todo[p.id] = pieces(missing)
    return todo


def _score(cfg: EvalConfig, problems: list[Problem], saved: dict[str, list[dict]], log: Any) -> dict:
    out = Path(cfg.out)
    graded = []
    for p in problems:
        recs = sorted(saved[p.id], key=lambda r: r["index"])[:cfg.n]
        # a sample saved against another reference answer (the data file was fixed since) is regraded
        graded.append([GradedSample(r["text"], r["answer"], _still_correct(r, p), int(r["num_tokens"]))
                       for r in recs])
    metrics = {"dataset": cfg.name, **compute_metrics(graded, [p.id for p in problems]), "data": str(cfg.data),
               "settings": cfg.sample_settings()}
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    if cfg.plots:
        paths = draw_plots(metrics, out)
        print(f"rast eval: plots {', '.join(map(str, paths))}" if paths
              else "rast eval: matplotlib is not installed; no plots drawn", file=log)
    return metrics
