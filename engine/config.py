"""EngineConfig: everything LLM(...) accepts, validated before any model is loaded."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional, Sequence

from rast_engine.errors import RastError
from rast_engine.lora_modules import checked_lora_modules
from rast_engine.reasoning import PARSERS
from rast_engine.sampling_params import MAX_LAM, is_lam

ATTENTION_BACKENDS = ("auto", "torch", "triton", "flash_attn")
LAYER_OPS = ("auto", "torch", "triton")  # rast_engine.models.layer_ops
DTYPES = ("auto", "float32", "bfloat16", "float16")
# "auto": safetensors weights; "dummy": seeded random weights of config.json's shapes, made on the device
LOAD_FORMATS = ("auto", "dummy")
SPECULATIVE_DRAFTS = ("small", "rl")  # rast_engine.speculative.round
SPECULATIVE_METHODS = ("coupled", "rejection")
LOGPROBS_MODES = ("processed_logprobs", "raw_logprobs")
DECODE_LINEARS = ("torch", "skinny")
QUANTIZATIONS = ("fp8",)  # rast_engine.models.fp8: the large model's projections in FP8
KV_CACHE_DTYPES = ("auto", "fp8")  # "auto": the model's dtype; "fp8": scaled float8_e4m3fn (vLLM's name)
SCHEDULING_POLICIES = ("fcfs", "priority")  # rast_engine.scheduler


@dataclass(frozen=True)
class ExpertPair:
    rl: str
    base: str
    weight: float


def _positive_int(name: str, value: object, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise RastError(f"{name} must be a positive integer, got {value!r}")


@dataclass
class EngineConfig:
    model: str
    small_rl: Optional[str] = None
    small_base: Optional[str] = None
    lam: float = 1.0
    experts: Optional[Sequence[tuple[str, str, float]]] = None
    device: str = "auto"
    dtype: str = "auto"
    max_num_seqs: int = 256
    max_model_len: Optional[int] = None  # None: the large model's max_position_embeddings (capped by the KV)
    block_size: int = 16
    kv_cache_blocks: Optional[int] = None
    kv_cache_memory: Optional[int] = None  # bytes
    # CUDA: the fraction of the device's memory this engine may hold (weights, KV cache, activations), as
    # vLLM's; None: the KV cache takes 0.9 of the memory free once the weights are loaded
    gpu_memory_utilization: Optional[float] = None
    attention_backend: str = "auto"
    layer_ops: str = "auto"  # norms, rotary, activation: fused Triton kernels on CUDA, plain torch elsewhere
    enforce_eager: bool = False
    seed: int = 0
    max_num_batched_tokens: Optional[int] = None  # prefill tokens per step; None: kv_cache.default_token_budget
    enable_prefix_caching: bool = True
    load_format: str = "auto"
    model_streams: bool = True  # CUDA: the large model on one stream, the small models on another
    # the distinct small models of one architecture as one batched forward (models.stacked): an (rl, base)
    # pair launches each kernel once, not twice
    stack_small_models: bool = True
    # CUDA graphs: the largest decode batch captured (None: max_num_seqs); larger batches decode eagerly
    cuda_graph_max_batch: Optional[int] = None
    # detokenise, check stop strings and build a step's outputs while the next step runs on the GPU
    # (None: on for CUDA). A sequence stopped by a stop string then computes one discarded token.
    async_output: Optional[bool] = None
    # launch each decode step before the previous step's ids reach the host, which feeds them in on the
    # device (None: on when async_output is). A sequence stopped by any rule but length then computes
    # one discarded token.
    async_scheduling: Optional[bool] = None
    # speculative decoding (engine/speculative): each decode round the small models draft this many tokens
    # and the large model verifies them in one forward; 0 turns it off. The draft: "small" (S + λ·(R − S),
    # the request's λ) or "rl" (R alone). The method: "coupled" (the plain sampler's tokens, whatever the
    # rounds) or "rejection" (speculative sampling: more drafts pass, tokens depend on the rounds)
    speculative_tokens: int = 0
    speculative_draft: str = "small"
    speculative_method: str = "coupled"
    # default sampling parameters (engine/generation_config.py, vLLM's --generation-config): "auto" reads
    # the large model's generation_config.json, a directory reads its file, "vllm" ignores both
    generation_config: str = "auto"
    # "fp8": the large model's decoder projections as FP8 weights with per-channel scales, quantised at
    # load (half the bytes a decode step reads for them); the small models keep their dtype
    quantization: Optional[str] = None
    # "fp8": every model's KV cache in float8_e4m3fn with a power-of-two scale per (token, KV head)
    # (rast_kernels.fp8_kv): about half the bytes a decode step reads for them, and nearly twice the tokens
    kv_cache_dtype: str = "auto"
    # vLLM's reasoning parser (rast_engine.reasoning): structured outputs hold the answer after the
    # thinking's </think>, not the thinking; the server also splits chat responses by it
    reasoning_parser: Optional[str] = None
    # vLLM's scheduling policy: "fcfs", or "priority" (requests' priority, lower first, then arrival; the
    # running request last in that order is preempted first; engine/scheduler.py)
    scheduling_policy: str = "fcfs"
    # {name: LoRA adapter directory}: RL models over small_base, chosen per request (engine/lora_modules.py)
    lora_modules: Optional[dict[str, str]] = None
    # their slots (vLLM's names): adapters held at once, their loads at run time included (None: as many as
    # lora_modules), and the largest rank a slot takes (None: lora_modules' largest, else 16)
    max_loras: Optional[int] = None
    max_lora_rank: Optional[int] = None
    enable_lora: bool = False  # vLLM's: slots with no lora_modules (max_loras 1 unless given), for loads later
    # vLLM's: adapters read by a LoRARequest's path kept in host memory, the least recently read dropped
    # first, so one evicted from its slot reloads without reading its files again (None: max_loras)
    max_cpu_loras: Optional[int] = None
    # vLLM's logprobs_mode: what a sampled token's logprobs are. "processed_logprobs": under the distribution
    # it was drawn from (temperature, top-k/top-p/min-p, logit_bias, penalties, masks; T = 1 for greedy);
    # "raw_logprobs": log-softmax of the combined logits with the request's λ, before any of those
    logprobs_mode: str = "processed_logprobs"
    # the large model's plain linear layers at decode batches of 1 to 4: "torch" (F.linear, cuBLAS on CUDA) or
    # "skinny" (rast_kernels.skinny_linear: a strip of output channels a program; engine/models/skinny.py)
    decode_linear: str = "torch"
    pairs: list[ExpertPair] = field(init=False)

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise RastError(f"model must be a local model directory, got {self.model!r}")
        _positive_int("max_loras", self.max_loras, allow_none=True)
        _positive_int("max_lora_rank", self.max_lora_rank, allow_none=True)
        _positive_int("max_cpu_loras", self.max_cpu_loras, allow_none=True)
        if not isinstance(self.enable_lora, bool):
            raise RastError(f"enable_lora must be True or False, got {self.enable_lora!r}")
        if self.enable_lora and self.lora_modules is None and self.max_loras is None:
            self.max_loras = 1  # vLLM's default
        if self.max_loras is not None and self.lora_modules is None:
            self.lora_modules = {}  # adapters loaded while serving only
        for name in ("max_lora_rank", "max_cpu_loras"):
            if getattr(self, name) is not None and self.lora_modules is None:
                raise RastError(f"{name} is about LoRA slots: give lora_modules, max_loras or enable_lora=True too")
        if self.lora_modules is not None:
            self.lora_modules = checked_lora_modules(self.lora_modules, allow_empty=self.max_loras is not None)
            if self.max_loras is not None and len(self.lora_modules) > self.max_loras:
                raise RastError(f"{len(self.lora_modules)} lora_modules do not fit max_loras={self.max_loras}")
            slots = self.max_loras or len(self.lora_modules)
            if self.max_cpu_loras is not None and self.max_cpu_loras < slots:
                raise RastError(f"max_cpu_loras ({self.max_cpu_loras}) must be at least max_loras ({slots}), as "
                                "vLLM's")
            if self.small_base is None or self.small_rl is not None or self.experts:
                raise RastError("lora_modules are RL models over small_base, one chosen per request: give "
                                "small_base, and neither small_rl nor experts")
        elif (self.small_rl is None) != (self.small_base is None):
            raise RastError("small_rl and small_base must be given together (the RL model and its base), "
                            f"got small_rl={self.small_rl!r}, small_base={self.small_base!r}")
        if not is_lam(self.lam):
            raise RastError(f"lam must be a number with |lam| <= {MAX_LAM:g}, got {self.lam!r}")
        # 1.0 is the default: any other value would be dropped
        if self.small_rl is None and self.lora_modules is None and self.lam != 1.0:
            raise RastError(f"lam={self.lam!r} weighs the (small_rl, small_base) pair, and none is given"
                            + ("; experts carry their own weights" if self.experts else ""))
        if self.experts is not None and not isinstance(self.experts, (list, tuple)):
            raise RastError(f"experts must be a list of (rl_path, base_path, weight), got {self.experts!r}")
        # with lora_modules the pair's rl is a view of its base holding the adapters (engine/lora_registry.py)
        rl = self.small_rl if self.lora_modules is None else self.small_base
        pairs = [] if rl is None else [ExpertPair(str(rl), str(self.small_base), float(self.lam))]
        for i, entry in enumerate(self.experts or ()):
            if not isinstance(entry, (tuple, list)) or len(entry) != 3:
                raise RastError(f"experts[{i}] must be (rl_path, base_path, weight), got {entry!r}")
            rl, base, weight = entry
            if not is_lam(weight):
                raise RastError(f"experts[{i}] weight must be a number with |weight| <= {MAX_LAM:g}, got {weight!r}")
            pairs.append(ExpertPair(str(rl), str(base), float(weight)))
        self.pairs = pairs
        if not isinstance(self.device, str):  # a torch.device is accepted in its string form
            self.device = str(self.device)
        if self.dtype not in DTYPES:
            raise RastError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise RastError(f"attention_backend must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}")
        if self.layer_ops not in LAYER_OPS:
            raise RastError(f"layer_ops must be one of {LAYER_OPS}, got {self.layer_ops!r}")
        if self.load_format not in LOAD_FORMATS:
            raise RastError(f"load_format must be one of {LOAD_FORMATS}, got {self.load_format!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise RastError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}")
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise RastError(f"quantization must be None or one of {QUANTIZATIONS}, got {self.quantization!r}")
        for name in ("model_streams", "stack_small_models", "enforce_eager", "enable_prefix_caching"):
            if not isinstance(getattr(self, name), bool):
                raise RastError(f"{name} must be True or False, got {getattr(self, name)!r}")
        _positive_int("max_num_seqs", self.max_num_seqs)
        _positive_int("max_model_len", self.max_model_len, allow_none=True)
        _positive_int("block_size", self.block_size)
        _positive_int("kv_cache_blocks", self.kv_cache_blocks, allow_none=True)
        _positive_int("kv_cache_memory", self.kv_cache_memory, allow_none=True)
        _positive_int("max_num_batched_tokens", self.max_num_batched_tokens, allow_none=True)
        _positive_int("cuda_graph_max_batch", self.cuda_graph_max_batch, allow_none=True)
        for name in ("async_output", "async_scheduling"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), bool):
                raise RastError(f"{name} must be True, False or None, got {getattr(self, name)!r}")
        if self.async_scheduling and self.async_output is False:
            raise RastError("async_scheduling=True needs async_output: a step ahead is launched before the "
                            "previous step's text is read")
        if not isinstance(self.speculative_tokens, int) or isinstance(self.speculative_tokens, bool) or \
                self.speculative_tokens < 0:
            raise RastError(f"speculative_tokens must be an integer >= 0 (0: off), got {self.speculative_tokens!r}")
        if self.speculative_draft not in SPECULATIVE_DRAFTS:
            raise RastError(f"speculative_draft must be one of {SPECULATIVE_DRAFTS}, got {self.speculative_draft!r}")
        if self.decode_linear not in DECODE_LINEARS:
            raise RastError(f"decode_linear must be one of {DECODE_LINEARS}, got {self.decode_linear!r}",
                            param="decode_linear")
        if self.logprobs_mode not in LOGPROBS_MODES:
            raise RastError(f"logprobs_mode must be one of {LOGPROBS_MODES} (vLLM's raw_logits and processed_logits "
                            f"are not served), got {self.logprobs_mode!r}", param="logprobs_mode")
        if self.speculative_method not in SPECULATIVE_METHODS:
            raise RastError(f"speculative_method must be one of {SPECULATIVE_METHODS}, got {self.speculative_method!r}")
        if self.speculative_tokens and not pairs:
            raise RastError("speculative_tokens needs a small pair to draft with (small_rl and small_base)")
        if self.speculative_tokens and self.async_scheduling:
            raise RastError("async_scheduling=True cannot be combined with speculative_tokens: a round's "
                            "accepted length must reach the host before the next round is scheduled")
        u = self.gpu_memory_utilization
        if u is not None and (not isinstance(u, (int, float)) or isinstance(u, bool) or not 0 < u <= 1):
            raise RastError(f"gpu_memory_utilization must be a fraction in (0, 1], got {u!r}")
        sizes = [n for n in ("kv_cache_blocks", "kv_cache_memory", "gpu_memory_utilization")
                 if getattr(self, n) is not None]
        if len(sizes) > 1:
            raise RastError(f"give one of kv_cache_blocks, kv_cache_memory and gpu_memory_utilization, not {sizes}")
        if self.reasoning_parser is not None and self.reasoning_parser not in PARSERS:
            raise RastError(f"reasoning_parser must be one of {', '.join(PARSERS)} or None, got {self.reasoning_parser!r}")
        if self.scheduling_policy not in SCHEDULING_POLICIES:
            raise RastError(f"scheduling_policy must be one of {SCHEDULING_POLICIES}, got {self.scheduling_policy!r}")
        if isinstance(self.generation_config, os.PathLike):  # a directory given as a Path, as the model paths may be
            self.generation_config = os.fspath(self.generation_config)
        if not isinstance(self.generation_config, str) or not self.generation_config:
            raise RastError(f"generation_config must be 'auto', 'vllm' or a directory, got {self.generation_config!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise RastError(f"seed must be an integer, got {self.seed!r}")

    @property
    def model_paths(self) -> list[str]:
        """Every model in runner order: the large model, then (rl, base) per pair."""
        out = [self.model]
        for p in self.pairs:
            out += [p.rl, p.base]
        return out
