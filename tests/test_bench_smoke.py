"""bench/decode.py: its CPU tiny mode end to end (as CI runs it), its byte counts against HF transformers'
own parameter counts and the engine's KV layout, and the peer's RAST sampling step against the formula."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from bench_runs import load_bench, run_bench

decode = load_bench("decode.py")  # puts the repo root on sys.path, so the suite's sibling modules import
from bench import decode_runs  # noqa: E402


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, str]:
    return run_bench("decode.py", tmp_path_factory.mktemp("bench"), "--tiny", "--quick", "--device", "cpu",
                     "--profile", "--profile-modes", "rast", "--commit", "smoketest",
                     pattern="decode-*-smoketest.json", env={"HF_HUB_OFFLINE": "1"}, timeout=240)


def test_result_file_has_every_mode_and_batch(smoke: tuple[dict, Path, str]) -> None:
    result, path, stdout = smoke
    assert result["commit"] == "smoketest" and result["device"] and result["date"]
    assert result["errors"] == [] and result["skipped"] == []
    assert result["copy_bandwidth_GBps"] > 0
    got = {(r["mode"], r["pairing"], r["batch"]) for r in result["rows"]}
    assert got == {(m, "tiny", b) for m in decode.MODES for b in (1, 4)}
    assert path.with_suffix(".png").is_file() or importlib.util.find_spec("matplotlib") is None
    assert "roofline_ms" in stdout and result["device"] in stdout  # the printed table names the device


def test_rows_are_consistent(smoke: tuple[dict, Path, str]) -> None:
    result, _, _ = smoke
    gen, prompt = result["gen_len"], result["prompt_len"]
    for r in result["rows"]:
        for key in ("tokens_per_s", "step_ms", "step_ms_median", "ttft_ms", "roofline_ms", "weight_bytes_read",
                    "kv_bytes_read"):
            assert r[key] > 0, (key, r)
        spec = r["mode"] == "rast-spec"  # a step is a round of 1 to γ + 1 tokens a sequence
        assert r["decode_steps"] == gen - 1 or spec and 0 < r["decode_steps"] < gen - 1
        flags = decode.ENGINE_MODES.get(r["mode"], dict(pair=True, stack=False))  # hf-rast: three forwards
        assert r["forwards_per_step"] == (1 if not flags["pair"] else 2 if flags["stack"] else 3)
        assert r["async_scheduling"] == flags.get("async_scheduling", False)
        # tokens/s counts every sequence's decode tokens over the summed step time
        assert r["tokens_per_s"] == pytest.approx(r["batch"] * (gen - 1) * 1e3 / (r["step_ms"] * r["decode_steps"]),
                                                  rel=1e-9)
        assert r["mean_context"] == prompt + gen / 2
        # the timed run's own prefill and --ttft-repeats (tiny: 1) more, each of fresh prompts
        assert len(r["ttft_ms_runs"]) == 1 + result["ttft_repeats"] == 2 and r["ttft_ms_runs"][0] > 0
        assert r["ttft_ms"] == pytest.approx(sum(r["ttft_ms_runs"]) / 2)
        bw = result["copy_bandwidth_GBps"] * 1e9
        assert r["roofline_ms"] == pytest.approx((r["weight_bytes_read"] + r["kv_bytes_read"]) / bw * 1e3)
        # issue 4's words, every weight: the untied input embeddings too, of which a step gathers B rows
        used = ["tiny-large"] + ([] if r["mode"].startswith("base") else  # a round reads the pair γ + 1 times
                                 ["tiny-small", "tiny-small"] * (decode.SPEC_GAMMA + 1 if spec else 1))
        elt = torch.empty((), dtype=getattr(torch, result["dtype"].removeprefix("torch."))).element_size()
        embeddings = sum(c["vocab_size"] * c["hidden_size"] for c in map(decode.TINY.get, used)
                         if not c.get("tie_word_embeddings", False))
        assert r["weight_bytes_all"] - r["weight_bytes_read"] == embeddings * elt
        assert r["roofline_all_weights_ms"] == pytest.approx((r["weight_bytes_all"] + r["kv_bytes_read"]) / bw * 1e3)
        pair = result["pairings"]["tiny"]
        fp8 = r["mode"].endswith("-fp8")  # measured against base-fp8, its large model's projections in FP8
        base_mode = "base-fp8" if fp8 else "base"
        if r["mode"] != base_mode:
            base = next(b for b in result["rows"] if b["mode"] == base_mode and b["batch"] == r["batch"])
            assert r["time_vs_base"] == pytest.approx(r["step_ms"] / base["step_ms"])
            # a round reads M once and the pair γ + 1 times
            want = 1 + (decode.SPEC_GAMMA + 1 if spec else 1) * (pair["weight_bytes_ratio"] - 1)
            if fp8:
                cfgs = [decode.TINY[n] for n in ("tiny-large", "tiny-small", "tiny-small")]
                large = decode.weight_bytes(cfgs[0], 4, fp8=True, read=True)
                want = sum(decode.weight_bytes(c, 4, read=True) for c in cfgs[1:]) / large + 1
            assert r["weight_bytes_ratio"] == pytest.approx(want)
        if spec:
            g, round_s = decode.SPEC_GAMMA, r["step_ms"] / 1e3
            assert 0 <= r["spec_acceptance"] <= 1 and r["spec_gamma"] == g
            assert r["projected_tokens_per_s"]["0.8"] == pytest.approx(r["batch"] * (1 - 0.8 ** (g + 1)) / 0.2 / round_s)
    [prof] = result["profiles"]
    assert prof["mode"] == "rast" and prof["kernels"] and all(k["ms_per_step"] > 0 for k in prof["kernels"])
    # every op of a step counted (CPU: aten ops), at least those the top-kernels table lists
    assert prof["launches_per_step"] >= sum(k["calls_per_step"] for k in prof["kernels"])
    pre = prof["prefill"]  # the step that prefills the prompts: its projections are among its top ops
    assert pre["wall_ms_per_step"] > 0 and any(k["name"] in ("aten::mm", "aten::bmm") for k in pre["kernels"]), pre


@pytest.mark.parametrize("name", ["qwen2.5-0.5b", "qwen2.5-7b", "llama-3.1-8b", "qwen3-1.7b", "qwen3-8b", "tiny-large",
                                  "tiny-small", "qwen3-30b-a3b"])
def test_param_counts_match_transformers(name: str) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = decode.TINY.get(name) or json.loads((decode.CONFIGS / f"{name}.json").read_text())
    hf_cfg = AutoConfig.for_model(**cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_cfg)
    total, read = decode.param_counts(cfg)
    assert total == model.num_parameters()
    embed = model.get_input_embeddings().weight
    tied = model.get_output_embeddings().weight is embed
    assert read == total - (0 if tied else embed.numel()) - unrouted(model)  # all but the gathered embedding rows


def unrouted(model: torch.nn.Module) -> int:
    """The expert weights one token's step leaves unread: all but k of E experts in each sparse layer."""
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    if not experts:
        return 0
    c = model.config
    return round(experts * (1 - c.num_experts_per_tok / (getattr(c, "num_experts", None) or c.num_local_experts)))


def test_param_counts_use_hf_defaults_for_omitted_keys() -> None:
    """A Qwen3 config without head_dim has HF's 128, not hidden // heads (64 here), and one without
    num_key_value_heads HF's 32 (the counts come from the engine's own reading of the config)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = json.loads((decode.CONFIGS / "qwen3-1.7b.json").read_text())
    cfg = {k: v for k, v in cfg.items() if k not in ("head_dim", "num_key_value_heads")}
    cfg.update(hidden_size=1024, num_attention_heads=32, num_hidden_layers=2)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg))
    assert model.config.head_dim == 128 and model.config.hidden_size // 32 != 128
    assert decode.param_counts(cfg)[0] == model.num_parameters()
    assert decode.kv_bytes_per_token(cfg, 2) == 2 * 2 * 32 * 128 * 2


@pytest.mark.parametrize("name", ["qwen2.5-0.5b", "qwen3-1.7b", "tiny-large", "qwen3-30b-a3b"])
def test_fp8_weight_bytes_match_the_engine_model(name: str) -> None:
    """weight_bytes(fp8=True) against the bytes of a model the engine builds with quantization="fp8" (on
    the meta device: no memory), every parameter and buffer but the gathered embedding rows (and, read by
    one token's step, but the experts it does not route to: all but k of E, FP8 weights and scales)."""
    from rast_engine.attention.torch_backend import TorchAttention
    from rast_engine.models.config import ModelConfig
    from rast_engine.models.decoder import CausalLM
    from rast_engine.models.fp8 import use_fp8

    cfg = decode.TINY.get(name) or json.loads((decode.CONFIGS / f"{name}.json").read_text())
    with torch.device("meta"):
        model = CausalLM(ModelConfig.from_dict(cfg), TorchAttention(), torch.bfloat16)
        use_fp8(model, "torch")
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()] if t.dim() and t is not model.rotary.cos_sin}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    embed = model.embed_tokens.weight
    read = total - (0 if model.lm_head.weight is embed else embed.numel() * embed.element_size())
    experts = sum(t.numel() * t.element_size() for n, t in model.named_buffers() if "fp8_experts" in n)
    m = model.config
    read -= round(experts * (1 - m.experts_per_token / m.num_experts)) if m.num_experts else 0
    assert decode.weight_bytes(cfg, 2, fp8=True, read=True) == read
    assert decode.weight_bytes(cfg, 2, fp8=True) == total


@pytest.mark.parametrize("name", ["qwen2.5-14b", "llama-3.1-70b", "tiny-small"])
def test_kv_bytes_match_the_engine_layout(name: str) -> None:
    from rast_engine.models.config import ModelConfig

    cfg = decode.TINY.get(name) or json.loads((decode.CONFIGS / f"{name}.json").read_text())
    for dtype in (torch.bfloat16, torch.float32, torch.float8_e4m3fn):
        elt = torch.empty((), dtype=dtype).element_size()
        assert decode.kv_bytes_per_token(cfg, elt) == ModelConfig.from_dict(cfg).kv_bytes_per_token(dtype)


def test_peer_sampling_is_the_rast_combination() -> None:
    torch.manual_seed(0)
    v, b = 40, 6
    large, rl, base = torch.randn(b, v + 3), torch.randn(b, v), torch.randn(b, v)
    gen = torch.Generator().manual_seed(1)
    want = (large[:, :v] + decode_runs.LAM * (rl - base)).argmax(-1, keepdim=True)
    # top-p that keeps only the most likely token: the draw must be the combined argmax, whatever the noise
    assert torch.equal(decode_runs.hf_combine_sample([large, rl, base], v, gen, top_p=1e-6), want)
    # the full distribution: the empirical frequencies follow softmax(combined)
    probs = torch.softmax(large[:1, :v] + rl[:1] - base[:1], -1)[0]
    draws = torch.cat([decode_runs.hf_combine_sample([large[:1], rl[:1], base[:1]], v, gen, top_p=1.0)
                       for _ in range(4000)]).flatten()
    freq = torch.bincount(draws, minlength=v).float() / draws.numel()
    assert (freq - probs).abs().max() < 0.03


def test_peak_logits_gives_logits_of_the_asked_std(tmp_path: Path) -> None:
    """--logit-std: an HF model's random logits come out with that std, and the engine's output heads,
    the stacked pair's one [2, V, H] tensor included, are scaled by the same rule."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from bench.decode_configs import materialize
    from rast_engine import EngineConfig, LLMEngine

    dirs, _ = materialize("tiny", tmp_path)
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(dirs[0])), dtype=torch.float32)
    decode_runs.peak_logits([hf.get_output_embeddings().weight], 5.0)
    logits = hf(torch.randint(0, 400, (4, 16))).logits
    assert 4.5 < logits.std().item() < 5.5
    engine = LLMEngine(EngineConfig(str(dirs[0]), small_rl=str(dirs[1]), small_base=str(dirs[2]),
                                    load_format="dummy", device="cpu", dtype="float32", kv_cache_blocks=8))
    heads = decode_runs.output_heads(engine)
    assert [h.dim() for h in heads] == [2, 3]  # the large model's, then the stacked pair's
    decode_runs.peak_logits(heads, 5.0)
    for h in heads:
        assert abs(h.std().item() * h.shape[-1] ** 0.5 - 5.0) < 0.25


def test_batch_1_targets_are_judged_against_both_rooflines() -> None:
    """Issue 4 words its roofline as every weight's bytes; the floor leaves out the input embeddings a step
    only gathers B rows of. Both verdicts come back, by the arithmetic of the rows; rows written before the
    all-weights roofline existed are judged against the floor alone."""
    from bench.decode_targets import judge

    def row(mode: str, step: float, read: int, every: int, roof: float, roof_all: float) -> dict:
        return dict(mode=mode, pairing="7b+1.5b", batch=1, step_ms=step, tokens_per_s=1e3 / step,
                    weight_bytes_read=read, weight_bytes_all=every, roofline_ms=roof, roofline_all_weights_ms=roof_all)

    rows = [row("base", 5.0, 100, 110, 4.0, 4.4), row("rast", 9.0, 140, 160, 7.6, 8.4)]
    got = {t["target"]: (t["value"], t["met"]) for t in judge(rows, ["7b+1.5b"])["targets"]}
    assert got["7b+1.5b b1 rast step / roofline"] == (pytest.approx(9.0 / 7.6), False)
    assert got["7b+1.5b b1 rast step / all-weights roofline (issue 4's words)"] == (pytest.approx(9.0 / 8.4), True)
    assert got["7b+1.5b b1 (rast/base) / weight-bytes ratio"] == (pytest.approx(1.8 / 1.4), False)
    assert got["7b+1.5b b1 (rast/base) / all-weight-bytes ratio (issue 4's words)"] == (
        pytest.approx(1.8 / (160 / 110)), False)
    old = [{k: v for k, v in row(*a).items() if k not in ("weight_bytes_all", "roofline_all_weights_ms")}
           for a in (("base", 5.0, 100, 110, 4.0, 4.4), ("rast", 9.0, 140, 160, 7.6, 8.4))]
    assert len(judge(old, ["7b+1.5b"])["targets"]) == 2


def test_sliding_layers_read_only_their_window() -> None:
    """OLMo 3's pattern, counted by hand: three layers of four read at most 4096 keys, the fourth all."""
    from bench.roofline import kv_bytes_read

    cfg = {"model_type": "olmo3", "hidden_size": 256, "intermediate_size": 64, "num_hidden_layers": 8,
           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 64, "sliding_window": 4096}
    per_layer_token = 2 * 2 * 64 * 2  # K and V, 2 heads of 64, bf16
    assert kv_bytes_read(cfg, 2, 1000) == 8 * 1000 * per_layer_token
    assert kv_bytes_read(cfg, 2, 10_000) == (6 * 4096 + 2 * 10_000) * per_layer_token
    assert kv_bytes_read({**cfg, "model_type": "olmo2"}, 2, 10_000) == 8 * 10_000 * per_layer_token


def test_moe_weights_read_grow_with_the_tokens_routed() -> None:
    """Uniform routing: one token reads k experts a sparse layer, B tokens E(1 - (1 - k/E)^B); a dense
    layer (mlp_only_layers) and the router are read at any batch; a shared expert too (Qwen2-MoE)."""
    h, i, e, k = 64, 32, 8, 2
    cfg = {"model_type": "qwen2_moe", "hidden_size": h, "intermediate_size": 96, "moe_intermediate_size": i,
           "num_experts": e, "num_experts_per_tok": k, "shared_expert_intermediate_size": 48, "num_hidden_layers": 3,
           "mlp_only_layers": [1], "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 128}
    expert = 3 * h * i
    total, one = decode.param_counts(cfg, 1)
    assert total - one == 2 * (e - k) * expert + 128 * h  # two sparse layers' unrouted experts; the embedding
    for tokens in (3, 40):
        assert decode.param_counts(cfg, tokens)[1] - one == round(2 * (e * (1 - (1 - k / e) ** tokens) - k) * expert)
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        assert total == AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg)).num_parameters()


@pytest.mark.parametrize("model_type", ["olmo2", "olmo3", "mistral", "gemma2", "gemma3_text", "mixtral", "olmoe"])
def test_param_counts_of_the_other_layouts_match_transformers(model_type: str) -> None:
    """The roofline's weight counts for OLMo's q/k norms over all heads, Gemma's four norms a layer (and
    its per-head q/k norms) and the experts and routers of Mixtral and OLMoE, against transformers' own
    models of those classes."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = {"model_type": model_type, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3,
           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 128, "head_dim": 16}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg))
    total, read = decode.param_counts(cfg)
    assert total == model.num_parameters()
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert read == total - (0 if tied else model.get_input_embeddings().weight.numel()) - unrouted(model)
