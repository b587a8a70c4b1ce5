"""Console subcommands, and the model/sampling flags that `generate` and `serve` share. Nothing heavy is
imported at module level, so `rast --help` stays fast."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any, Optional

from rast_engine.config import (DECODE_LINEARS, KV_CACHE_DTYPES, LAYER_OPS, LOGPROBS_MODES, QUANTIZATIONS,
                                SPECULATIVE_DRAFTS, SPECULATIVE_METHODS)
from rast_engine.errors import RastError


class _OneModel(argparse.Action):
    """MODEL is given once, as the positional or as vLLM's --model; either may come first."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: Optional[str] = None) -> None:
        if getattr(namespace, self.dest, None) is not None:
            parser.error("MODEL given twice: as the positional and as --model; give one")
        setattr(namespace, self.dest, values)


def add_model_args(p: argparse.ArgumentParser) -> None:
    # the positional's default is SUPPRESS so an absent positional does not overwrite --model's value
    p.add_argument("model", nargs="?", default=argparse.SUPPRESS, action=_OneModel,
                   help="the large base model M: a local HF-format directory")
    p.add_argument("--model", dest="model", metavar="MODEL", default=None, action=_OneModel,
                   help="the same as the positional MODEL, as vLLM's serve also takes it")
    p.add_argument("--small-rl", metavar="P", help="the small RL-tuned model R (with --small-base): a model "
                   "directory, or a PEFT LoRA adapter over --small-base")
    p.add_argument("--small-base", metavar="P", help="R's small base model S (with --small-rl)")
    p.add_argument("--lam", type=float, default=1.0, help="λ, the strength of R − S (default 1.0)")
    p.add_argument("--expert", nargs=3, action="append", metavar=("RL", "BASE", "W"), default=None,
                   help="an extra (RL, base, weight) pair; repeat for an ensemble")
    p.add_argument("--device", default="auto", help="torch device, e.g. cuda:0 or cpu (default auto)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    p.add_argument("--max-num-seqs", type=int, default=256, help="largest running batch (default 256)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="context length (default: the model's, capped by the KV cache)")
    p.add_argument("--kv-cache-blocks", type=int, default=None, help="force the KV-cache size in blocks")
    p.add_argument("--gpu-memory-utilization", type=float, default=None, metavar="F",
                   help="CUDA: the fraction of the GPU's memory the engine may hold, weights, KV cache and "
                        "activations, as vLLM's (default: the KV cache takes 0.9 of what the weights leave free)")
    p.add_argument("--seed", type=int, default=0, help="engine seed for unseeded requests (default 0)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block (default 16)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="prefill tokens per step; longer prompts are chunked (default min(max(len, 2048), 8192))")
    p.add_argument("--attention-backend", default="auto", choices=("auto", "torch", "triton", "flash_attn"))
    p.add_argument("--layer-ops", default="auto", choices=LAYER_OPS,
                   help="norms, rotary and activation: fused triton kernels (auto on CUDA) or plain torch")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    p.add_argument("--cuda-graph-max-batch", type=int, default=None,
                   help="largest decode batch captured in a CUDA graph; larger ones run eagerly")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--async-output", action=argparse.BooleanOptionalAction, default=None,
                   help="read a step's outputs while the next runs (default: on with CUDA)")
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="launch each decode step before the previous step's ids are read (default: with "
                        "--async-output)")
    p.add_argument("--model-streams", action=argparse.BooleanOptionalAction, default=True,
                   help="CUDA: the small models on their own stream, beside the large one (default on)")
    p.add_argument("--stack-small-models", action=argparse.BooleanOptionalAction, default=True,
                   help="the small models of one architecture as one batched forward (default on)")
    p.add_argument("--speculative-tokens", type=int, default=0, metavar="G",
                   help="speculative decoding: the small models draft G tokens a round, the large model "
                        "verifies them in one forward (default 0: off)")
    p.add_argument("--speculative-draft", default="small", choices=SPECULATIVE_DRAFTS,
                   help="the draft: small = S + λ·(R − S), rl = R alone (default small)")
    p.add_argument("--speculative-method", default="coupled", choices=SPECULATIVE_METHODS,
                   help="coupled: the plain sampler's tokens for a seed, whatever the rounds (default); "
                        "rejection: speculative sampling, more drafts pass")
    p.add_argument("--decode-linear", default="torch", choices=DECODE_LINEARS,
                   help="the large model's linear layers at decode batches of 1 to 4: torch (cuBLAS on CUDA, default) "
                        "or skinny (rast_kernels.skinny_linear)")
    p.add_argument("--logprobs-mode", default="processed_logprobs", choices=LOGPROBS_MODES,
                   help="as vLLM's: a sampled token's logprobs under the distribution it was drawn from (default), "
                        "or raw: the combined logits' log-softmax before temperature, filters and adjustments")
    p.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
                   help="fp8: every model's KV cache in float8_e4m3fn, half the bytes (default auto: the model's)")
    p.add_argument("--quantization", default=None, choices=QUANTIZATIONS,
                   help="fp8: the large model's projections as FP8 weights, quantised at load (default: none)")
    p.add_argument("--generation-config", default="auto", metavar="auto|vllm|DIR",
                   help="default sampling parameters: auto reads MODEL's generation_config.json, DIR reads "
                        "that directory's, vllm ignores both (default auto)")


def _existing_dir(path: str, flag: str) -> str:
    if not os.path.isdir(path):
        raise RastError(f"{flag}: no such model directory: {path}")
    return path


def read_chat_template(value: Optional[str]) -> Optional[str]:
    """--chat-template as vLLM reads it: the text of a file, or else the Jinja template itself."""
    if value is None:
        return None
    if os.path.isfile(value):
        from rast_engine.evaluation.data import read_utf8

        return read_utf8(Path(value), "--chat-template file")
    if "{{" in value or "{%" in value:
        return value
    raise RastError(f"--chat-template {value!r}: no such file, and not a Jinja template")


def use_chat_template(engine: Any, template: Optional[str]) -> None:
    """Give the engine's tokenizer ``template`` (None: keep its own)."""
    if template is None:
        return
    if engine.tokenizer is None:
        raise RastError("--chat-template needs a tokenizer, and these model directories hold none")
    engine.tokenizer.chat_template = template


def require_model(args: argparse.Namespace) -> None:
    """MODEL was given: add_model_args leaves the positional optional so that vLLM's --model may give it."""
    if args.model is None:
        raise RastError("MODEL is required: a local HF-format directory, as the positional or --model")


def build_engine(args: argparse.Namespace) -> Any:
    """The LLMEngine the model flags describe; bad paths fail here, before torch is imported."""
    require_model(args)
    _existing_dir(args.model, "MODEL")
    if args.small_rl is not None:
        _existing_dir(args.small_rl, "--small-rl")
    if args.small_base is not None:
        _existing_dir(args.small_base, "--small-base")
    lora_modules = lora_modules_arg(getattr(args, "lora_modules", None))
    for name, path in (lora_modules or {}).items():
        _existing_dir(path, f"--lora-modules {name}")
    experts = []
    for rl, base, weight in args.expert or ():
        try:
            w = float(weight)
        except ValueError:
            raise RastError(f"--expert {rl} {base} {weight}: the weight must be a number") from None
        experts.append((_existing_dir(rl, "--expert"), _existing_dir(base, "--expert"), w))
    from rast_engine import EngineConfig, LLMEngine

    return LLMEngine(EngineConfig(
        model=args.model, small_rl=args.small_rl, small_base=args.small_base, lam=args.lam,
        experts=experts or None, device=args.device, dtype=args.dtype, max_num_seqs=args.max_num_seqs,
        max_model_len=args.max_model_len, kv_cache_blocks=args.kv_cache_blocks, seed=args.seed,
        gpu_memory_utilization=args.gpu_memory_utilization,
        block_size=args.block_size, max_num_batched_tokens=args.max_num_batched_tokens,
        attention_backend=args.attention_backend, layer_ops=args.layer_ops, enforce_eager=args.enforce_eager,
        cuda_graph_max_batch=args.cuda_graph_max_batch, enable_prefix_caching=args.enable_prefix_caching,
        async_output=args.async_output, async_scheduling=args.async_scheduling, model_streams=args.model_streams,
        stack_small_models=args.stack_small_models, speculative_tokens=args.speculative_tokens,
        speculative_draft=args.speculative_draft, speculative_method=args.speculative_method,
        logprobs_mode=args.logprobs_mode, decode_linear=args.decode_linear,
        generation_config=args.generation_config, quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype,
        # serve's flags
        reasoning_parser=getattr(args, "reasoning_parser", None),
        scheduling_policy=getattr(args, "scheduling_policy", "fcfs"),
        lora_modules=lora_modules, max_loras=getattr(args, "max_loras", None),
        enable_lora=getattr(args, "enable_lora", False),
        max_lora_rank=getattr(args, "max_lora_rank", None), max_cpu_loras=getattr(args, "max_cpu_loras", None)))


def lora_modules_arg(values: list[str] | None) -> dict[str, str] | None:
    """--lora-modules as EngineConfig.lora_modules: NAME=PATH or vLLM's JSON objects, each name once."""
    if not values:
        return None
    out: dict[str, str] = {}
    for value in values:
        if value.lstrip().startswith("{"):
            try:
                entry = json.loads(value)
                name, path = entry["name"], entry["path"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise RastError(f"--lora-modules {value!r}: a JSON module needs \"name\" and \"path\"") from None
        else:
            name, sep, path = value.partition("=")
            if not sep:
                raise RastError(f"--lora-modules {value!r}: give NAME=PATH")
        if not isinstance(name, str) or not name or name in out:
            raise RastError(f"--lora-modules {value!r}: each module needs a name of its own")
        out[name] = path
    return out


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    # the five filters and max_tokens default to the generation config's values (--generation-config)
    p.add_argument("--max-tokens", type=int, default=None,
                   help="tokens to generate (default: the generation config's max_new_tokens, else 256)")
    p.add_argument("--temperature", type=float, default=None,
                   help="0 is greedy (default: the generation config's, else 1.0)")
    p.add_argument("--top-p", type=float, default=None, help="(default: the generation config's, else 1.0)")
    p.add_argument("--top-k", type=int, default=None, help="0 disables it (default: the generation config's, else 0)")
    p.add_argument("--min-p", type=float, default=None, help="(default: the generation config's, else 0.0)")
    p.add_argument("--stop", action="append", default=None, help="a stop string; repeatable")
    p.add_argument("--request-seed", type=int, default=None, help="seed of this request's sampling")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence")
    p.add_argument("--min-tokens", type=int, default=0, help="tokens before EOS or a stop may end it (default 0)")
    p.add_argument("--repetition-penalty", type=float, default=None,
                   help="vLLM's; 1 is off (default: the generation config's, else 1.0)")
    p.add_argument("--presence-penalty", type=float, default=0.0, help="in [-2, 2]; 0 is off (default)")
    p.add_argument("--frequency-penalty", type=float, default=0.0, help="in [-2, 2]; 0 is off (default)")
    p.add_argument("--plausibility-alpha", type=float, default=0.0,
                   help="contrastive decoding's mask: tokens the large model alone gives under this fraction "
                        "of its top token's probability (0 is off, the default)")
    p.add_argument("--logits-processors", nargs="+", default=None, metavar="NAME",
                   help="qualified names (pkg.module.fn) of logits processors run in order over the combined "
                        "logits (README: SamplingParams.logits_processors)")
