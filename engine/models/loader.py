"""load_model: an HF directory (config.json + safetensors, single or sharded) -> CausalLM on a device.

Weights are memory-mapped with safetensors.safe_open and copied tensor by tensor into a model built on
the meta device, so host memory never holds a second full copy and no random init is paid. Pickle
checkpoints (*.bin, *.pt) are refused: loading them can run arbitrary code.

load_format="dummy" needs only config.json: every weight is drawn on the device itself (N(0, 0.02),
norms 1), from a generator seeded by ``seed``, so benchmarks get the exact shapes and byte counts of a
real checkpoint without reading one. The same seed gives the same weights on the same device type.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError, safe_open

from rast_engine.attention.base import AttentionBackend
from rast_engine.config import QUANTIZATIONS
from rast_engine.errors import ModelLoadError
from rast_engine.models.config import DTYPES, ModelConfig
from rast_engine.models.decoder import CausalLM, WeightSlot
from rast_engine.models.fp8 import QUANTIZE_ROWS, fp8_owners, use_fp8
from rast_engine.models.layer_ops import LayerOps

INDEX_FILE = "model.safetensors.index.json"
LOAD_FORMATS = ("auto", "dummy")
FLOAT_DTYPES = ("BF16", "F16", "F32", "F64")  # safetensors' names of the dtypes a weight is read from
DUMMY_STD = 0.02  # HF's initializer_range for Qwen2 / Llama: activations stay O(1) through the layers


def resolve_dtype(dtype: str | torch.dtype, cfg: ModelConfig) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return cfg.torch_dtype
    if dtype not in DTYPES:
        raise ModelLoadError(f"unsupported dtype {dtype!r}; use 'auto' or one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def tensor_files(path: Path) -> dict[str, Path]:
    """HF tensor name -> the safetensors file holding it (via the shard index when there is one)."""
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise TypeError("weight_map must map tensor names to shard file names")
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise ModelLoadError(f"{str(index)!r} is not a valid safetensors index: {e}") from None
        files = {name: path / shard for name, shard in weight_map.items()}
        absent = sorted({str(f.name) for f in files.values() if not f.is_file()})
        if absent:
            raise ModelLoadError(f"{str(path)!r}: shards listed in {INDEX_FILE} are missing: {absent}")
        return files
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
        hint = f" (found {pickles}: pickle checkpoints are never loaded; convert them)" if pickles else ""
        raise ModelLoadError(f"{str(path)!r} has no *.safetensors weights{hint}")
    files: dict[str, Path] = {}
    for shard in shards:
        with _safetensors(shard) as f:
            files.update({name: shard for name in f.keys()})
    return files


@contextlib.contextmanager
def _safetensors(file: Path) -> Iterator[Any]:
    """safe_open, with a corrupt or truncated file reported as a ModelLoadError that names it."""
    try:
        with safe_open(str(file), framework="pt") as f:
            yield f
    except SafetensorError as e:
        raise ModelLoadError(f"{str(file)!r} is not a readable safetensors file: {e}") from None


def _empty_model(cfg: ModelConfig, attention: AttentionBackend, dtype: torch.dtype,
                 device: torch.device, ops: LayerOps | None, quantization: str | None) -> CausalLM:
    with torch.device("meta"):
        model = CausalLM(cfg, attention, dtype, ops)
        if quantization == "fp8":  # the FP8 kernel on CUDA (whatever the layer ops: the torch spec would
            # dequantise every weight each step) and under the interpreter's Triton layer ops; else the spec
            use_fp8(model, "triton" if device.type == "cuda" or model.ops.name == "triton" else "torch")
    if quantization == "fp8" and device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        raise ModelLoadError(f"quantization='fp8' needs a GPU of compute capability 8.9 or newer (Ada, Hopper), "
                             f"where Triton converts FP8; {torch.cuda.get_device_name(device)} has "
                             f"{torch.cuda.get_device_capability(device)}")
    model.to_empty(device=device)
    if cfg.tie_word_embeddings:  # to_empty gives each parameter its own storage; re-tie
        model.lm_head.weight = model.embed_tokens.weight
    model.rotary.reset_cache()
    if model.sliding_rotary is not model.rotary:
        model.sliding_rotary.reset_cache()
    return model


@torch.no_grad()
def init_dummy_weights(model: CausalLM, seed: int) -> None:
    """Seeded random weights drawn in place on the model's device and dtype: no host copy, no float32
    temporary (a 32B model's embedding alone would be 3 GB of it)."""
    device = model.embed_tokens.weight.device
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    for name, param in model.named_parameters():  # a tied lm_head is listed once
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        else:
            param.normal_(0.0, DUMMY_STD, generator=gen)
    for linear in fp8_owners(model).values():  # FP8 weights are buffers: drawn in the model's dtype, quantised
        for r in range(0, linear.out_features, QUANTIZE_ROWS):
            rows = min(QUANTIZE_ROWS, linear.out_features - r)
            linear.load_rows(r, torch.empty(rows, linear.in_features, dtype=model.dtype, device=device)
                             .normal_(0.0, DUMMY_STD, generator=gen))


# where a multimodal checkpoint keeps its language model's tensors (Gemma 3: transformers 4, then 5's layout)
LANGUAGE_MODEL_PREFIXES = (("model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                           ("model.", "model.language_model."))


def _stored_name(name: str, files: dict[str, Path]) -> str:
    """The checkpoint's name for the model's tensor ``name``: itself, or under a language model's prefix."""
    if name in files:
        return name
    for ours, theirs in LANGUAGE_MODEL_PREFIXES:
        if name.startswith(ours) and theirs + name[len(ours):] in files:
            return theirs + name[len(ours):]
    return name


@torch.no_grad()
def load_model(
    path: str | Path, *, device: str | torch.device, dtype: str | torch.dtype, attention: AttentionBackend,
    load_format: str = "auto", seed: int = 0, ops: LayerOps | None = None, quantization: str | None = None,
) -> CausalLM:
    """``seed`` only matters for load_format="dummy"; ``ops`` defaults to plain torch; ``quantization``:
    None or "fp8" (models/fp8.py)."""
    if load_format not in LOAD_FORMATS:
        raise ModelLoadError(f"unknown load_format {load_format!r}; expected one of {LOAD_FORMATS}")
    if quantization not in (None, *QUANTIZATIONS):
        raise ModelLoadError(f"unknown quantization {quantization!r}; expected None or one of {QUANTIZATIONS}")
    path = Path(path)
    cfg = ModelConfig.from_dir(path)
    torch_dtype = resolve_dtype(dtype, cfg)
    device = torch.device(device)
    if load_format == "dummy":
        model = _empty_model(cfg, attention, torch_dtype, device, ops, quantization)
        init_dummy_weights(model, seed)
        return model.eval()
    model = _empty_model(cfg, attention, torch_dtype, device, ops, quantization)
    fp8 = fp8_owners(model)
    for file, items in checkpoint_slots(path, model).items():
        write_file(file, items, fp8, cfg.norm_offset, repr(str(path)))
    return model.eval()


def checkpoint_slots(path: Path, model: CausalLM) -> dict[Path, list[tuple[str, WeightSlot]]]:
    """Every tensor ``model`` needs from the checkpoint at ``path``, by file, with its slot: each name,
    shard, shape and dtype checked (ModelLoadError), no tensor read."""
    files = tensor_files(path)
    slots = {_stored_name(name, files): slot for name, slot in model.weight_map().items()}
    missing = [name for name in slots if name not in files]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ModelLoadError(f"{str(path)!r} lacks tensor(s) {shown}")
    by_file: dict[Path, list[tuple[str, WeightSlot]]] = {}
    for name, slot in slots.items():
        by_file.setdefault(files[name], []).append((name, slot))
    for file, items in by_file.items():
        with _safetensors(file) as f:
            held = set(f.keys())
            for name, slot in items:
                if name not in held:  # the index points at the wrong shard
                    raise ModelLoadError(f"{str(path)!r}: {INDEX_FILE} lists tensor {name} in {file.name}, "
                                         f"which does not hold it")
                tensor_slice = f.get_slice(name)
                shape, want = tuple(tensor_slice.get_shape()), slot_shape(slot)
                if shape != want:
                    raise ModelLoadError(f"{str(path)!r}: tensor {name} has shape {list(shape)}, "
                                         f"expected {list(want)} from config.json")
                if tensor_slice.get_dtype() not in FLOAT_DTYPES:  # quantised or integer: never cast silently
                    raise ModelLoadError(f"{str(path)!r}: tensor {name} is {tensor_slice.get_dtype()}; "
                                         f"weights must be one of {FLOAT_DTYPES}")
    return by_file


def slot_shape(slot: WeightSlot) -> tuple[int, ...]:
    """The shape of the HF tensor that fills ``slot``."""
    param, _, rows = slot
    return (rows, *param.shape[1:])


def write_file(file: Path, items: list[tuple[str, WeightSlot]], fp8: dict[int, Any], norm_offset: float,
               where: str) -> None:
    """A checkpoint file's tensors (checkpoint_slots' items for it) read and written into their slots."""
    with _safetensors(file) as f:
        for name, slot in items:
            write_weight(slot, f.get_tensor(name), name, fp8, norm_offset, where)


@torch.no_grad()
def write_weight(slot: WeightSlot, tensor: torch.Tensor, name: str, fp8: dict[int, Any], norm_offset: float,
                 where: str) -> None:
    """HF tensor ``name`` (its shape checked) into its slot of the model: quantised where the parameter is
    FP8 (``fp8``: fp8_owners'), and a norm weight with the model's ``norm_offset`` added (Gemma's norms
    scale by 1 + weight: folded in once, so every kernel reads a plain scale)."""
    param, start, rows = slot
    if id(param) in fp8:
        try:
            fp8[id(param)].load_rows(start, tensor)
        except ValueError as e:  # a non-finite weight has no FP8 scale
            raise ModelLoadError(f"{where}: tensor {name} cannot be quantised: {e}") from None
        return
    target = param.narrow(0, start, rows)
    # from pinned memory the copy is queued, not waited for (LLMEngine.load_weights waits once, at its end)
    target.copy_(tensor, non_blocking=tensor.device.type == "cpu" and tensor.is_pinned())
    if norm_offset and name.endswith("norm.weight"):
        target.add_(norm_offset)
