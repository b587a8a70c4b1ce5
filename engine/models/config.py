"""ModelConfig: the architecture facts the engine needs, read from an HF config.json.

Reads both config layouts: transformers 4 (``rope_theta`` + ``rope_scaling``, ``torch_dtype``) as in the
published checkpoints, and transformers 5 (``rope_parameters``, ``dtype``) as written by save_pretrained.
Anything the decoder does not implement (other rope types, MLP bias, other activations) is refused here
with a clear message rather than run wrongly.

Architectures:
- Llama;
- Qwen2: Llama + q/k/v bias;
- Qwen3 dense: Llama + an RMSNorm over each head's query and key before the rotary embedding, and a
  head_dim of its own, not hidden / heads;
- Mistral: Llama with a sliding window in every layer when the config gives one (4096 tokens in v0.1,
  none since);
- OLMo 2: Llama with its norms moved: an RMSNorm over the whole query and key projections, and each
  sublayer's output normed before it joins the residual stream, with no norm on the sublayer's input;
- OLMo 3: OLMo 2 with sliding window attention in three layers of four, those layers with a rotary
  embedding of their own;
- Gemma 3 (text; a multimodal checkpoint's language model too): per-head q/k norms, a norm before and
  after each sublayer, norms that scale by 1 + weight, embeddings times sqrt(hidden), GELU (tanh) in the
  MLP, attention scaled by query_pre_attn_scalar, and sliding windows in five layers of six with their
  own rope base;
- Gemma 2: Gemma 3's layout without q/k norms, windows in every other layer, and soft-capped attention
  scores (cap * tanh(s / cap)) and output logits.
- mixture of experts (moe_config): Qwen3-MoE (Qwen3's attention), Qwen2-MoE (Qwen2's, plus a shared
  expert), Mixtral (Mistral's) and OLMoE (Llama's with OLMo's q/k norms over all heads).
Sliding windows (Qwen's ``use_sliding_window`` too) and per-layer-type ropes are read in layer_kinds.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from rast_engine.errors import ModelLoadError
from rast_engine.models.layer_kinds import language_model_config, layer_windows, per_kind_rope
from rast_engine.models.hf_defaults import HF_DEFAULTS
from rast_engine.models.moe_config import moe_fields
from rast_engine.models.rope_config import check_scaling, full_attention_positions, rope_of
from rast_kernels.fp8_cast import FP8
from rast_kernels.fp8_kv import cache_rows

logger = logging.getLogger("rast")

# model_type -> arch
ARCHS = {"qwen2": "qwen2", "qwen3": "qwen3", "llama": "llama", "mistral": "mistral", "olmo2": "olmo2", "olmo3": "olmo3",
         "gemma3_text": "gemma3", "gemma2": "gemma2", "qwen3_moe": "qwen3", "qwen2_moe": "qwen2", "mixtral": "mistral",
         "olmoe": "olmoe"}  # a mixture of experts maps to its attention's family
GEMMA = ("gemma2", "gemma3")
ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}  # HF's hidden_act names -> the MLP's
OLMO = ("olmo2", "olmo3")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class ModelConfig:
    arch: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int  # the padded width of the embedding and lm_head, not len(tokenizer)
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None  # None (plain rotary) or a dict with rope_type, one of rope_config.ROPE_KEYS
    tie_word_embeddings: bool
    attention_bias: bool  # bias on q/k/v (always for Qwen2)
    o_proj_bias: bool  # bias on o_proj (Llama's and Qwen3's attention_bias covers it too; never for Qwen2)
    max_position_embeddings: int
    torch_dtype: torch.dtype
    qk_norm: bool = False  # per-head RMSNorm of q and k before rotary (Qwen3)
    # OLMo 2: an RMSNorm over all heads' q (and all heads' k) before rotary, and post-norm sublayers
    # (h + norm(attn(h)), then h + norm(mlp(h))) in place of pre-norm ones
    qk_norm_full: bool = False
    post_norm: bool = False
    layer_windows: tuple[Optional[int], ...] = ()  # per layer: its sliding window, None for full attention
    # the sliding layers' (rope_theta, rope_scaling), where they differ from the full layers' (OLMo 3)
    sliding_rope: Optional[tuple[float, Optional[dict[str, Any]]]] = None
    activation: str = "silu"  # the MLP's: "silu", or "gelu_tanh" (Gemma)
    # Gemma: the attention scale (None: head_dim ** -0.5), the embeddings' factor, a norm's weight offset
    # (its scale is offset + weight: the loader folds it in), and a norm after each sublayer as well
    attn_scale: Optional[float] = None
    embed_scale: Optional[float] = None
    norm_offset: float = 0.0
    sandwich_norm: bool = False
    # Gemma 2's soft caps (None: none): attention scores and output logits become cap * tanh(x / cap)
    attn_softcap: Optional[float] = None
    logit_softcap: Optional[float] = None
    # a mixture of experts (models/moe.py; 0 experts: dense): per token the router's top experts_per_token
    # of num_experts gated MLPs of moe_intermediate_size, in the layers moe_layers marks (the others dense)
    num_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False  # renormalise the top-k router probabilities to sum to 1
    router_fp32: bool = False  # they reach the experts in float32 (Mixtral), else in the model dtype
    moe_layers: tuple[bool, ...] = ()
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE's shared expert, behind a sigmoid gate (0: none)

    def differences(self, other: ModelConfig) -> list[str]:
        """The fields, the dtype aside, whose values differ from ``other``'s (another architecture or shape)."""
        ours, theirs = asdict(self), asdict(other)
        return sorted(k for k in ours if k != "torch_dtype" and ours[k] != theirs[k])

    def __post_init__(self) -> None:
        if self.arch not in ARCHS.values():
            raise ModelLoadError(f"unsupported architecture {self.arch!r}; supported: {sorted(ARCHS)}")
        for name in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "vocab_size", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ModelLoadError(f"config {name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        if self.layer_windows and (len(self.layer_windows) != self.num_layers or
                                   any(w is not None and w < 1 for w in self.layer_windows)):
            raise ModelLoadError(f"layer_windows must give each of {self.num_layers} layers a window >= 1 or "
                                 f"None, got {self.layer_windows!r}")
        if self.activation not in ACTIVATIONS.values():
            raise ModelLoadError(f"unsupported activation {self.activation!r}")
        if self.num_experts and not (0 < self.experts_per_token <= self.num_experts and self.moe_intermediate_size > 0
                                     and len(self.moe_layers) == self.num_layers and self.activation == "silu"):
            raise ModelLoadError(f"a mixture of experts needs 1 <= num_experts_per_tok ({self.experts_per_token}) "
                                 f"<= num_experts ({self.num_experts}), a positive moe_intermediate_size, a flag "
                                 f"per layer and the silu activation")
        if self.qk_norm and self.qk_norm_full:
            raise ModelLoadError("qk_norm (per head) and qk_norm_full (over all heads) exclude each other")
        if self.head_dim % 2:
            raise ModelLoadError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.rms_norm_eps <= 0 or self.rope_theta <= 0:
            raise ModelLoadError("rms_norm_eps and rope_theta must be positive")
        check_scaling(self.rope_scaling)
        if self.sliding_rope is not None:
            if self.sliding_rope[0] <= 0:
                raise ModelLoadError("the sliding layers' rope_theta must be positive")
            check_scaling(self.sliding_rope[1])

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> ModelConfig:
        cfg = language_model_config(cfg)
        model_type = cfg.get("model_type")
        if model_type not in ARCHS:
            raise ModelLoadError(f"unsupported model_type {model_type!r}; supported: {sorted(ARCHS)}")
        arch = ARCHS[model_type]
        gemma = arch in GEMMA  # whose class defaults differ: GELU, tied embeddings
        act = cfg.get("hidden_activation") or cfg.get("hidden_act") or ("gelu_pytorch_tanh" if gemma else "silu")
        if act not in ACTIVATIONS:
            raise ModelLoadError(f"unsupported hidden_act {act!r}; implemented: {sorted(ACTIVATIONS)}")
        for key in ("final_logit_softcapping", "attn_logit_softcapping"):  # Gemma 2's only
            if cfg.get(key) is not None and arch != "gemma2":
                raise ModelLoadError(f"{key} is not supported for model_type {model_type!r}")
        if cfg.get("use_bidirectional_attention"):
            raise ModelLoadError("use_bidirectional_attention=true is not supported (the engine decodes causally)")
        if cfg.get("mlp_bias", False):
            raise ModelLoadError("mlp_bias=true is not supported")
        if cfg.get("quantization_config"):  # its weights are not the values they hold: refuse, never misread
            method = cfg["quantization_config"].get("quant_method") if isinstance(cfg["quantization_config"], dict) \
                else cfg["quantization_config"]
            raise ModelLoadError(f"pre-quantized checkpoints are not supported (quantization_config, quant_method "
                                 f"{method!r}); load the bf16 checkpoint, with quantization='fp8' to quantise it")
        def given(key: str, derived: Any = None) -> Any:
            """The key's value; omitted, the class default; an explicit null, the derived value, as HF's
            classes take None for num_key_value_heads (= heads) and Llama's head_dim."""
            value = cfg.get(key)
            if value is not None:
                return value
            return derived if key in cfg and derived is not None else HF_DEFAULTS[model_type].get(key, derived)

        def required(key: str) -> Any:
            """A key every config must give, unless its class has a default for it (Gemma's shape keys)."""
            return cfg[key] if key in cfg or key not in HF_DEFAULTS[model_type] else HF_DEFAULTS[model_type][key]

        def softcap(key: str) -> Optional[float]:
            """Gemma 2's cap (its class default when omitted, none when null)."""
            if arch != "gemma2" or (key in cfg and cfg[key] is None):
                return None
            value = float(given(key))
            if not 0 < value < math.inf:
                raise ModelLoadError(f"{key} must be positive and finite, got {value!r}")
            return value

        try:
            hidden, heads = int(required("hidden_size")), int(required("num_attention_heads"))
            layers = int(required("num_hidden_layers"))
            kinds = per_kind_rope(cfg)
            theta, scaling = rope_of(cfg if kinds is None else kinds[0], given("rope_theta", 10000.0))
            dtype_name = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
            if dtype_name not in DTYPES:
                raise ModelLoadError(f"unsupported dtype {dtype_name!r}; supported: {sorted(DTYPES)}")
            bias = bool(cfg.get("attention_bias", False))
            moe = moe_fields(cfg, model_type, layers, int(required("intermediate_size")))
            return cls(
                arch=arch,
                hidden_size=hidden,
                intermediate_size=int(required("intermediate_size")),
                num_layers=layers,
                num_heads=heads,
                num_kv_heads=int(given("num_key_value_heads", heads)),
                head_dim=int(given("head_dim", hidden // heads)),
                vocab_size=int(required("vocab_size")),
                rms_norm_eps=float(given("rms_norm_eps")),
                rope_theta=theta,
                rope_scaling=scaling,
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", gemma)),
                # Qwen2 always has q/k/v biases; only Qwen2-MoE's config may turn them off
            attention_bias=bool(cfg.get("qkv_bias", True)) if model_type == "qwen2_moe" else arch == "qwen2" or bias,
                o_proj_bias=False if arch == "qwen2" else bias,
                max_position_embeddings=full_attention_positions(cfg, int(given("max_position_embeddings")), scaling),
                torch_dtype=DTYPES[dtype_name],
                qk_norm=arch in ("qwen3", "gemma3"),
                qk_norm_full=arch in (*OLMO, "olmoe"),
                post_norm=arch in OLMO,
                layer_windows=layer_windows(cfg, model_type, layers),
                sliding_rope=None if kinds is None else rope_of(kinds[1]),
                activation=ACTIVATIONS[act],
                attn_scale=float(given("query_pre_attn_scalar")) ** -0.5 if gemma else None,
                embed_scale=hidden ** 0.5 if gemma else None,
                norm_offset=1.0 if gemma else 0.0,
                sandwich_norm=gemma,
                attn_softcap=softcap("attn_logit_softcapping"),
                logit_softcap=softcap("final_logit_softcapping"),
                **moe,
            )
        except ModelLoadError:  # __post_init__'s, already specific
            raise
        except KeyError as e:
            raise ModelLoadError(f"config.json lacks the required key {e.args[0]!r}") from None
        except (TypeError, ValueError, ZeroDivisionError) as e:  # null, a string, zero heads...
            raise ModelLoadError(f"config.json holds an invalid value: {type(e).__name__}: {e}") from None

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if not path.is_dir():
            raise ModelLoadError(f"model directory {str(path)!r} does not exist")
        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            raise ModelLoadError(f"{str(path)!r} has no config.json; expected an HF-format model directory")
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ModelLoadError(f"{str(cfg_path)!r} is not valid JSON: {e}") from None
        except OSError as e:
            raise ModelLoadError(f"{str(cfg_path)!r} cannot be read: {e}") from None
        if not isinstance(cfg, dict):
            raise ModelLoadError(f"{str(cfg_path)!r} must hold a JSON object, got a {type(cfg).__name__}")
        return cls.from_dict(cfg)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def mlp_activation_width(self) -> int:
        """Values a token holds at a feed-forward block's peak: gate, up and activation (3·I) in a dense
        block; a sparse one's router logits, k rows of I and k of H (rast_kernels.moe) and a shared expert's."""
        dense = 3 * self.intermediate_size if not all(self.moe_layers or (False,)) else 0
        sparse = self.num_experts + self.experts_per_token * (self.moe_intermediate_size + self.hidden_size) + \
            3 * self.shared_expert_intermediate_size
        return max(dense, sparse if self.num_experts else 0)

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        """Bytes of K and V over all layers for one token: what attention reads of a cached token (an FP8
        cache adds a scale byte a head, rast_kernels.fp8_kv)."""
        scale = self.num_kv_heads if dtype == FP8 else 0
        return 2 * self.num_layers * (self.kv_size * torch.empty((), dtype=dtype).element_size() + scale)

    def kv_bytes_per_block(self, block_size: int, dtype: torch.dtype) -> int:
        """Bytes of one block of this model's cache over all layers, K and V (FP8: its scale rows too)."""
        return 2 * self.num_layers * math.prod(self.kv_cache_shape(1, block_size, dtype)) * \
            torch.empty((), dtype=dtype).element_size()

    @property
    def max_context(self) -> int:
        """The positions the model serves: max_position_embeddings, stretched by a yarn or linear rope
        scaling's factor as vLLM derives it (yarn: original_max_position_embeddings x factor; Qwen2.5's
        recipe keeps max_position_embeddings at 32768 and adds factor 4 for 131072). llama3 configs state
        their stretched length already, and so do Gemma 3's (128K with a linear factor of 8), as vLLM
        takes them."""
        s = self.rope_scaling
        if s is None or s["rope_type"] == "llama3" or s.get("factor") is None or self.arch == "gemma3":
            return self.max_position_embeddings
        base = s["original_max_position_embeddings"] if s["rope_type"] == "yarn" else self.max_position_embeddings
        return max(self.max_position_embeddings, int(base * float(s["factor"])))

    def kv_cache_shape(self, num_blocks: int, block_size: int, dtype: Optional[torch.dtype] = None
                       ) -> tuple[int, int, int, int]:
        """Shape of one layer's k_cache (and v_cache); see rast_engine.attention.metadata. An FP8 cache's
        blocks hold scale rows after their token rows (rast_kernels.fp8_kv)."""
        return (num_blocks, cache_rows(block_size, self.head_dim, dtype), self.num_kv_heads, self.head_dim)

