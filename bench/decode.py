"""Decode throughput and latency of RAST against its floor and its peers (issue 4 item 5).

    python bench/decode.py                      # CUDA: 7B+Δ1.5B, 14B+Δ7B, 32B+Δ7B, Qwen3-8B+Δ1.7B; batches 1 8 32 128
    python bench/decode.py --pairings 7b+1.5b --batches 1 32 --quick --profile --out $OUT
    python bench/decode.py --tiny               # CPU smoke run on tiny configs (automatic without CUDA)

Modes (bench/decode_modes.py): our engine from the large model alone (``base``) to RAST with every fast
path (``rast``), and ``hf-rast`` the peer (three HF transformers models run one after another). Weights
are random with the exact shapes of bench/configs/*.json. A step is the host interval between consecutive
returns of engine.step() (no sync in between, which would undo async outputs), so host overhead counts,
as a user sees it. The roofline is the bytes a decode step must
read (all weights once, every model's KV at the mean context) over the measured copy bandwidth.
docs/benchmarks.md explains every field.
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench import common  # noqa: E402
from bench.decode_runs import (LAM, SPEC_GAMMA, engine_generate, first_token_ms, hf_generate, hf_load,  # noqa: E402
                               output_heads, peak_logits, print_profile, profile_engine, spec_round)
from bench.decode_modes import ENGINE_MODES, MODES  # noqa: E402
from bench.decode_targets import judge  # noqa: E402
from bench.decode_configs import (CONFIGS, LORA_PAIRINGS, PAIRINGS, TINY, TINY_PAIRINGS, materialize,  # noqa: E402, F401
                                  pairing_models)
from bench.roofline import kv_bytes_per_token, param_counts, roofline_ms, weight_bytes  # noqa: E402

GPU_RESERVE_BYTES = 3 << 30  # activations, logits, sampler workspace, CUDA graph pools, allocator slack


# ---- one mode of one pairing ----------------------------------------------------------------------
class Suite:
    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        self.args, self.device = args, device
        self.dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.elt = torch.empty((), dtype=self.dtype).element_size()
        self.max_len = args.prompt + args.gen
        self.bandwidth = common.copy_bandwidth(device)
        self.rows: list[dict] = []
        self.skipped: list[dict] = []
        self.errors: list[dict] = []
        self.profiles: list[dict] = []
        self.pairings: dict[str, dict] = {}
        self.commit = args.commit or common.git_sha()  # once: the tree may be committed while we run

    def fitting(self, mode: str, cfgs: list[dict]) -> tuple[list[int], dict[int, str]]:
        """The batch sizes whose weights + KV (batch x prompt+gen tokens) + reserve fit in free GPU memory,
        and why each other one does not. The engine preallocates the KV of its largest batch; the peer's
        DynamicCache grows by concatenation, so it is given 1.5x its KV."""
        if self.device.type != "cuda":
            return list(self.args.batches), {}
        free, _ = torch.cuda.mem_get_info(self.device)
        fp8 = ENGINE_MODES.get(mode, {}).get("fp8", False)
        weights = sum(weight_bytes(c, self.elt, fp8 and i == 0) for i, c in enumerate(cfgs))
        per_seq = (1.5 if mode == "hf-rast" else 1.0) * self.max_len * sum(kv_bytes_per_token(c, self.elt)
                                                                             for c in cfgs)
        fit, why = [], {}
        for b in self.args.batches:
            need = weights + b * per_seq + GPU_RESERVE_BYTES
            if need <= free:
                fit.append(b)
            else:
                why[b] = (f"needs ~{need / 2**30:.1f} GiB (weights {weights / 2**30:.1f}, KV for {b} x "
                          f"{self.max_len} tokens, {GPU_RESERVE_BYTES / 2**30:.0f} reserve); {free / 2**30:.1f} free")
        return fit, why

    def release(self) -> float:
        common.release(self.device)
        return torch.cuda.memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else 0.0

    def build(self, rast: Any, mode: str, dirs: list[Path], max_batch: int, block_size: int = 16) -> Any:
        flags, a = ENGINE_MODES[mode], self.args
        pair = dict(small_rl=str(dirs[1]), small_base=str(dirs[2]), lam=LAM) if flags["pair"] else {}
        return rast.LLMEngine(rast.EngineConfig(
            model=str(dirs[0]), **pair, load_format="dummy", dtype=str(self.dtype).replace("torch.", ""),
            enforce_eager=flags["enforce_eager"], model_streams=flags["model_streams"],
            async_output=flags["async_output"], async_scheduling=flags["async_scheduling"],
            stack_small_models=flags["stack"], block_size=block_size,
            speculative_tokens=SPEC_GAMMA if flags.get("spec") else 0,
            quantization="fp8" if flags.get("fp8") else None, kv_cache_dtype=a.kv_cache_dtype,
            layer_ops=a.layer_ops, decode_linear=a.decode_linear,
            kv_cache_blocks=max_batch * math.ceil(self.max_len / block_size) + 1,
            max_num_seqs=max_batch, max_model_len=self.max_len,
            max_num_batched_tokens=max(max_batch * a.prompt, self.max_len), device=str(self.device)))

    def run_mode(self, mode: str, pairing: str, dirs: list[Path], cfgs: list[dict]) -> None:
        if mode == "hf-rast" and pairing in LORA_PAIRINGS:  # transformers would need peft, absent on the image
            self.skipped.append(dict(mode=mode, pairing=pairing, reason="the HF peer loads no LoRA adapter"))
            return
        batches, why = self.fitting(mode, cfgs if not mode.startswith("base") else cfgs[:1])
        for batch, reason in why.items():
            self.skipped.append(dict(mode=mode, pairing=pairing, batch=batch, reason=reason))
            print(f"[skip] {pairing} {mode} batch {batch}: {reason}", flush=True)
        if not batches:
            return
        try:
            self.measure(mode, pairing, dirs, cfgs, batches)
        except torch.cuda.OutOfMemoryError as e:  # while building: the estimate was short of the truth
            self.skipped.append(dict(mode=mode, pairing=pairing, reason=f"out of memory while building: {e}"))
            print(f"[skip] {pairing} {mode}: out of memory while building", flush=True)
        except Exception as e:  # record and go on: one broken mode must not lose the others' rows
            self.errors.append(dict(mode=mode, pairing=pairing, error=repr(e)[:500],
                                    traceback=traceback.format_exc()[-3000:]))
            print(f"[error] {pairing} {mode}: {e!r}\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        left = self.release()  # measure's frame, the only holder of the models, is gone by now
        if left > 1.0:
            print(f"[warn] {left:.1f} GiB still allocated after releasing {pairing} {mode}", flush=True)

    def measure(self, mode: str, pairing: str, dirs: list[Path], cfgs: list[dict], batches: list[int]) -> None:
        a, used = self.args, cfgs if not mode.startswith("base") else cfgs[:1]
        if mode == "rast-spec":  # a round reads M once and the small pair γ + 1 times
            used = cfgs[:1] + cfgs[1:] * (SPEC_GAMMA + 1)
        t0 = time.perf_counter()
        if mode == "hf-rast":
            models = hf_load(dirs, self.dtype, self.device)
            heads = [m.get_output_embeddings().weight for m in models]
            vocab = min(c["vocab_size"] for c in cfgs)

            def run(b: int, g: int, tag: str, prompt: int = a.prompt) -> dict:
                return hf_generate(models, b, prompt, g, vocab, self.device)
            forwards, ahead = len(models), False
        else:
            rast = common.import_engine()
            engine = self.build(rast, mode, dirs, max(batches))
            heads = output_heads(engine)
            vocab = engine.vocab_size
            forwards = len(engine.runner.units)  # model forwards per step: 2 when the pair is batched
            ahead = engine.async_scheduling

            def run(b: int, g: int, tag: str, prompt: int = a.prompt) -> dict:
                return engine_generate(engine, rast.SamplingParams, b, prompt, g, vocab, tag, self.device)
        build_s = time.perf_counter() - t0
        if a.logit_std is not None:
            peak_logits(heads, a.logit_std)
        for batch in batches:
            try:
                run(batch, a.warmup, f"warm{batch}")  # compiles kernels, captures this batch's graph
                if mode == "rast-spec":  # and the eager rounds shrunk near the context's end, as the run's last
                    run(batch, a.warmup, f"warm-end{batch}", prompt=a.prompt + a.gen - a.warmup)
                res = run(batch, a.gen, f"run{batch}")
            except torch.cuda.OutOfMemoryError as e:
                self.skipped.append(dict(mode=mode, pairing=pairing, batch=batch, reason=f"out of memory: {e}"))
                print(f"[skip] {pairing} {mode} batch {batch} and larger: out of memory", flush=True)
                break
            if mode == "rast-spec":
                res.update(spec_round(res, engine.stats(), batch, a.gen))
            res.update(first_token_ms(res["ttft_ms"], lambda i: run(batch, 2, f"ttft{batch}-{i}"), a.ttft_repeats))
            mean_ctx = a.prompt + a.gen / 2  # decode step k (1..gen-1) attends over prompt + k tokens
            row = dict(mode=mode, pairing=pairing, batch=batch, **res, mean_context=mean_ctx,
                       **roofline_ms(used, self.elt, batch, mean_ctx, self.bandwidth,
                                     fp8_large=ENGINE_MODES.get(mode, {}).get("fp8", False),
                                     kv_elt=1 if a.kv_cache_dtype == "fp8" and mode != "hf-rast" else None),
                       build_s=build_s,
                       forwards_per_step=forwards, async_scheduling=ahead)
            self.rows.append(row)
            print(f"  {pairing:>8} {mode:>8} b={batch:<4} {row['tokens_per_s']:10.1f} tok/s "
                  f"{row['step_ms']:8.3f} ms/step (roofline {row['roofline_ms']:.3f})", flush=True)
            self.flush()
        if a.profile and mode in a.profile_modes and mode != "hf-rast":
            prof = profile_engine(engine, rast.SamplingParams, min(a.profile_batch, max(batches)), a.prompt,
                                  vocab, self.device, tokens_per_step=SPEC_GAMMA + 1 if mode == "rast-spec" else 1)
            self.profiles.append(dict(mode=mode, pairing=pairing, **prof))
            print_profile(self.profiles[-1])

    # ---- results ----------------------------------------------------------------------------------
    def flush(self) -> Path:
        """Rewritten after every row, so a run cut off by a time limit keeps what it measured."""
        import transformers
        import triton

        a = self.args
        extra = dict(copy_bandwidth_GBps=self.bandwidth / 1e9, dtype=str(self.dtype), logit_std=a.logit_std,
                     prompt_len=a.prompt, gen_len=a.gen, warmup_tokens=a.warmup, ttft_repeats=a.ttft_repeats,
                     batches=a.batches, modes=a.modes, layer_ops=a.layer_ops, decode_linear=a.decode_linear,
                     kv_cache_dtype=a.kv_cache_dtype, pairings=self.pairings,
                     versions=dict(
                         torch=torch.__version__, triton=triton.__version__, transformers=transformers.__version__),
                     **judge(self.rows, list(self.pairings)), skipped=self.skipped, errors=self.errors,
                     profiles=self.profiles)
        return common.write_results(a.name, self.device, self.rows, extra, Path(a.out), commit=self.commit)


COLUMNS = ["pairing", "mode", "batch", "tokens_per_s", "step_ms", "step_ms_p90", "ttft_ms", "roofline_ms",
           "roofline_frac", "time_vs_base", "weight_bytes_ratio", "time_vs_base_over_wb"]


def parse(argv: Optional[list[str]] = None) -> tuple[argparse.Namespace, torch.device]:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny random configs (automatic without CUDA)")
    ap.add_argument("--quick", action="store_true", help="fewer generated tokens (32; tiny: 6)")
    ap.add_argument("--device", default="auto", help="cuda | cpu | auto")
    ap.add_argument("--pairings", nargs="+", choices=[*PAIRINGS, *LORA_PAIRINGS, *TINY_PAIRINGS],
                    help="default: every one but the LoRA ones (tiny: tiny; tiny-moe: a tiny mixture of experts as "
                         "the large model; *-lora: the RL model a LoRA adapter over its base)")
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--batches", nargs="+", type=int, help="default 1 8 32 128 (tiny: 1 4)")
    ap.add_argument("--prompt", type=int, help="prompt tokens per request (default 128; tiny 16)")
    ap.add_argument("--gen", type=int, help="generated tokens per request (default 128; tiny 12)")
    ap.add_argument("--warmup", type=int, help="tokens generated untimed per batch first (default 8; tiny 3)")
    ap.add_argument("--ttft-repeats", type=int, help="prefills of fresh prompts timed after each row's run, "
                    "ttft_ms being the median with the run's own (default 4; tiny 1)")
    ap.add_argument("--layer-ops", default="auto", choices=("auto", "torch", "triton"),
                    help="the engine modes' norms/rotary/activation (auto: fused triton kernels on CUDA)")
    ap.add_argument("--decode-linear", default="torch", choices=("torch", "skinny"),
                    help="the engine modes' large-model linear layers at batch 1 to 4 (skinny: "
                         "rast_kernels.skinny_linear)")
    ap.add_argument("--kv-cache-dtype", default="auto", choices=("auto", "fp8"),
                    help="the engine modes' KV cache (fp8: float8_e4m3fn, one byte an element in the roofline)")
    ap.add_argument("--logit-std", type=float, help="scale every model's output head so random weights give logits "
                    "of this std (5: 2-4 nats, like an LM's); default: the dummy init's, about 1.2, near uniform")
    ap.add_argument("--profile", action="store_true", help="torch.profiler over a few decode steps")
    ap.add_argument("--profile-modes", nargs="+", choices=list(ENGINE_MODES), default=["rast", "rast-seq"])
    ap.add_argument("--profile-batch", type=int, default=1)
    ap.add_argument("--out", default=str(common.RESULTS), help="directory of the JSON and PNG")
    ap.add_argument("--commit", help="commit to record (default: git rev-parse in this checkout)")
    ap.add_argument("--name", help="results file prefix (default decode; decode-layer-ops-<ops> for an A/B run)")
    a = ap.parse_args(argv)
    name = a.device if a.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    a.tiny = a.tiny or device.type != "cuda"
    a.name = a.name or ("decode" if a.layer_ops == "auto" else f"decode-layer-ops-{a.layer_ops}") + \
        ("" if a.kv_cache_dtype == "auto" else f"-kv-{a.kv_cache_dtype}") + \
        ("" if a.decode_linear == "torch" else f"-linear-{a.decode_linear}")
    if device.type == "cpu":
        torch.set_num_threads(1)  # tiny matmuls: threads only add sync overhead, and CI boxes are shared
    a.pairings = a.pairings or (["tiny"] if a.tiny else list(PAIRINGS))
    a.batches = sorted(set(a.batches or ([1, 4] if a.tiny else [1, 8, 32, 128])))
    a.prompt = a.prompt or (16 if a.tiny else 128)
    a.gen = a.gen or ((6 if a.quick else 12) if a.tiny else (32 if a.quick else 128))
    a.warmup = a.warmup or (3 if a.tiny else 8)
    a.ttft_repeats = (1 if a.tiny else 4) if a.ttft_repeats is None else a.ttft_repeats
    if a.tiny != all(p in TINY_PAIRINGS for p in a.pairings):
        ap.error(f"--tiny runs the pairings {sorted(TINY_PAIRINGS)} only, and they need --tiny")
    if min(a.batches) < 1 or a.prompt < 1 or a.gen < 2 or a.warmup < 2 or a.warmup > a.gen or a.ttft_repeats < 0:
        ap.error("batches and --prompt must be >= 1, --gen >= 2, 2 <= --warmup <= --gen, --ttft-repeats >= 0")
    return a, device


def main(argv: Optional[list[str]] = None) -> int:
    args, device = parse(argv)
    suite = Suite(args, device)
    print(f"decode bench on {common.device_name(device)} at {suite.commit}: copy bandwidth "
          f"{suite.bandwidth / 1e9:.1f} GB/s, prompt {args.prompt}, gen {args.gen}, batches {args.batches}",
          flush=True)
    with tempfile.TemporaryDirectory(prefix="rast-bench-") as tmp:
        for pairing in args.pairings:
            dirs, cfgs = materialize(pairing, Path(tmp))
            read = [param_counts(c)[1] * suite.elt for c in cfgs]
            large, small = pairing_models(pairing)
            kv = [kv_bytes_per_token(c, suite.elt) for c in cfgs]
            suite.pairings[pairing] = dict(large=large, small=small, weight_bytes_base=read[0],
                                           weight_bytes_rast=sum(read), weight_bytes_ratio=sum(read) / read[0],
                                           kv_bytes_per_token=kv)
            for mode in args.modes:
                suite.run_mode(mode, pairing, dirs, cfgs)
    path = suite.flush()
    print(f"\n{common.device_name(device)} @ {suite.commit}  "
          f"(copy bandwidth {suite.bandwidth / 1e9:.1f} GB/s)")
    print(common.table(suite.rows, COLUMNS))
    run = path.stem  # a GPU stage runs the suite twice: each target line says which run it judges
    for t in judge(suite.rows, list(suite.pairings))["targets"]:
        bound = "" if t["roofline_bound"] is None else f", roofline bound {t['roofline_bound']:.3f}"
        print(f"target [{run}] {t['target']}: {t['value']:.3f} (limit {t['limit']}{bound}) "
              f"{'met' if t['met'] else 'MISSED'}")
    series: dict[str, list[tuple[float, float]]] = {}
    for r in suite.rows:
        series.setdefault(f"{r['pairing']} {r['mode']}", []).append((r["batch"], r["tokens_per_s"]))
    png = common.plot(path, series, "batch", "decode tokens/s",
                      f"decode throughput, {common.device_name(device)} @ {suite.commit}")
    print(f"wrote {path}" + (f" and {png}" if png else ""))
    for s in suite.skipped:
        print(f"skipped {s}")
    return 1 if suite.errors else 0


if __name__ == "__main__":
    sys.exit(main())
