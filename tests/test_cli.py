"""The `rast` console: every subcommand is listed, user mistakes are one line without a traceback,
`generate` prints what the offline engine generates, `bench` dispatches to bench/<suite>.py."""
from __future__ import annotations

import importlib.metadata
import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from factories import make_triple

import rast_engine
from rast_engine import LLM, SamplingParams
from rast_engine.cli import SUBCOMMANDS, build_parser, main
from rast_engine.errors import RastError
from rast_engine.commands import bench
from test_logits_processors import no_repeat

ENGINE_FLAGS = ["--device", "cpu", "--dtype", "float32", "--kv-cache-blocks", "64"]


@pytest.fixture(scope="module")
def triple(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, str]:
    return tuple(str(p) for p in make_triple(tmp_path_factory.mktemp("cli-triple")))  # type: ignore[return-value]


def _one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str], command: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"rast {command}: error: "), err
    return err


def test_help_lists_every_subcommand() -> None:
    choices = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert {"generate", "serve", "bench"} <= set(choices) and len(choices) == len(SUBCOMMANDS)
    run = subprocess.run([sys.executable, "-m", "rast_engine.cli", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    for name in choices:
        assert f"    {name} " in run.stdout or f"    {name}\n" in run.stdout, name


def test_version_is_the_installed_distributions(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"rast {importlib.metadata.version('rast')}"


def test_bad_path_on_the_console_is_one_line() -> None:
    run = subprocess.run([sys.executable, "-m", "rast_engine.cli", "generate", "/no/such/model", "--prompt", "hi"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr.strip() == "rast generate: error: MODEL: no such model directory: /no/such/model"


def test_user_mistakes_are_one_line(capsys: pytest.CaptureFixture[str], triple: tuple[str, str, str],
                                    tmp_path: Path) -> None:
    large, rl, base = triple
    assert "--small-rl" in _one_line_error(capsys, ["serve", large, "--small-rl", "/nope"], "serve")
    assert "together" in _one_line_error(capsys, ["serve", large, "--small-rl", rl, *ENGINE_FLAGS], "serve")
    assert "weight" in _one_line_error(capsys, ["generate", large, "--expert", rl, base, "big",
                                                "--prompt", "hi"], "generate")
    assert "top_p" in _one_line_error(capsys, ["generate", large, "--prompt", "hi", "--top-p", "2"], "generate")
    assert "--port" in _one_line_error(capsys, ["serve", large, "--port", "0"], "serve")
    assert "one suite" in _one_line_error(capsys, ["bench", "all", "--fast"], "bench")
    # NaN passed the > 0 check, and its timer then fired at random
    assert "--queue-timeout" in _one_line_error(capsys, ["serve", "/no/model", "--queue-timeout", "nan"], "serve")
    assert "needs --tool-call-parser" in _one_line_error(capsys, ["serve", "/no/model", "--enable-auto-tool-choice"],
                                                         "serve")  # vLLM's rule, before any model loads
    with socket.socket() as taken:  # uvicorn logged the bind error and exited 3, after loading every model
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        assert "cannot listen on" in _one_line_error(capsys, ["serve", "/no/model", "--port", port], "serve")
    # vLLM's flag reaches the engine, which sizes a CUDA device's cache with it
    argv = ["generate", large, "--prompt", "hi", "--device", "cpu", "--gpu-memory-utilization", "0.5"]
    assert "on a CPU give kv_cache_memory or kv_cache_blocks (--kv-cache-blocks)" in _one_line_error(capsys, argv,
                                                                                                  "generate")
    # an explicit KV size past memory: the allocation's RuntimeError was a traceback
    assert "cannot be allocated" in _one_line_error(capsys, ["generate", large, "--prompt", "hi", "--device", "cpu",
                                                             "--kv-cache-blocks", "10000000000"], "generate")
    # so were the decode step's per-sequence buffers of a --max-num-seqs past memory
    assert "give a smaller max_num_seqs" in _one_line_error(capsys, ["generate", large, "--prompt", "hi", "--device",
                                                                     "cpu", "--max-num-seqs", "10000000000000"],
                                                            "generate")


def test_a_request_that_masks_every_token_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    """--plausibility-alpha 1 keeps M's top token only, and --min-tokens masks it once it is EOS: the
    engine's NoAdmissibleToken (a RuntimeError) was a traceback."""
    toy = Path(rast_engine.__file__).parent / "assets" / "toy"
    argv = ["generate", str(toy / "large"), "--small-rl", str(toy / "small_rl"), "--small-base", str(toy / "small"),
            "--prompt", "12345+54321=", "--device", "cpu", "--temperature", "0", "--max-tokens", "100",
            "--min-tokens", "100", "--plausibility-alpha", "1"]
    assert "no admissible token" in _one_line_error(capsys, argv, "generate")


def test_serve_api_key_from_flag_or_environment(capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """--api-key, else $RAST_API_KEY, else vLLM's $VLLM_API_KEY (a deployment moved from vLLM kept no
    authentication); an empty variable is unset, and a key no client can send (empty, or with the
    surrounding whitespace HTTP strips) is refused rather than turning every request away."""
    from rast_engine.server.cli import _api_key

    for name in ("RAST_API_KEY", "VLLM_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    assert _api_key(None) is None
    monkeypatch.setenv("VLLM_API_KEY", "from-vllm")
    assert _api_key(None) == "from-vllm"
    monkeypatch.setenv("RAST_API_KEY", "")
    assert _api_key(None) == "from-vllm"
    monkeypatch.setenv("RAST_API_KEY", "from-rast")
    assert (_api_key(None), _api_key("flag")) == ("from-rast", "flag")
    monkeypatch.setenv("RAST_API_KEY", "trailing ")
    with pytest.raises(RastError, match=r"\$RAST_API_KEY must be a non-empty key"):
        _api_key(None)
    assert "--api-key must be a non-empty key" in _one_line_error(capsys, ["serve", "/no/model", "--api-key", ""],
                                                                   "serve")
    from rast_engine.server.app import OpenAIServer

    with pytest.raises(RastError, match="api_key must be a non-empty key"):
        OpenAIServer(None, model_name="m", api_key=" k")


def test_generate_prints_the_engines_text(capsys: pytest.CaptureFixture[str], triple: tuple[str, str, str]) -> None:
    large, rl, base = triple
    prompt = "what is the answer?"
    oracle = LLM(large, rl, base, lam=0.5, device="cpu", dtype="float32", kv_cache_blocks=64)
    greedy = SamplingParams(temperature=0, max_tokens=10)
    want = oracle.generate(prompt, greedy, use_tqdm=False)[0].outputs[0].text
    want_chat = oracle.chat([{"role": "user", "content": prompt}], greedy, use_tqdm=False)[0].outputs[0].text
    flags = ["--small-rl", rl, "--small-base", base, "--lam", "0.5", "--temperature", "0", "--max-tokens", "10"]
    assert main(["generate", large, *flags, "--prompt", prompt, *ENGINE_FLAGS]) == 0
    assert capsys.readouterr().out == want + "\n"
    assert main(["generate", large, *flags, "--prompt", prompt, "--chat", *ENGINE_FLAGS]) == 0
    assert capsys.readouterr().out == want_chat + "\n"
    # the same pair given as an --expert is the same decoding
    assert main(["generate", large, "--expert", rl, base, "0.5", "--temperature", "0", "--max-tokens", "10",
                 "--prompt", prompt, *ENGINE_FLAGS]) == 0
    assert capsys.readouterr().out == want + "\n"
    adjusted = dict(min_tokens=4, repetition_penalty=1.5, presence_penalty=0.5, frequency_penalty=-0.5,
                    plausibility_alpha=0.5)
    plain, want = want, oracle.generate(prompt, SamplingParams(temperature=0, max_tokens=10, **adjusted),
                                        use_tqdm=False)[0].outputs[0].text
    assert want != plain  # else the flags' effect could not be seen
    assert main(["generate", large, *flags, "--prompt", prompt, "--min-tokens", "4", "--repetition-penalty", "1.5",
                 "--presence-penalty", "0.5", "--frequency-penalty", "-0.5", "--plausibility-alpha", "0.5",
                 *ENGINE_FLAGS]) == 0
    assert capsys.readouterr().out == want + "\n"
    want = oracle.generate(prompt, SamplingParams(temperature=0, max_tokens=10, logits_processors=[no_repeat]),
                           use_tqdm=False)[0].outputs[0].text
    assert want != plain  # the processor's effect can be seen
    assert main(["generate", large, *flags, "--prompt", prompt, "--logits-processors",
                 "test_logits_processors.no_repeat", *ENGINE_FLAGS]) == 0
    assert capsys.readouterr().out == want + "\n"
    assert "cannot be loaded" in _one_line_error(capsys, ["generate", large, "--prompt", "hi", "--logits-processors",
                                                          "nosuch_module_xyz.fn"], "generate")


def test_a_chat_template_flag_replaces_the_tokenizers(capsys: pytest.CaptureFixture[str], triple: tuple[str, str, str],
                                                     tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--chat-template (vLLM's flag; base models often ship no template): a Jinja string or a file, for
    `generate --chat` and for the server's chat and /tokenize."""
    import uvicorn

    from rast_engine.server import cli as serve_cli

    large, rl, base = triple
    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %} answer:"
    conv, greedy = [{"role": "user", "content": "what is the answer?"}], SamplingParams(temperature=0, max_tokens=8)
    oracle = LLM(large, rl, base, lam=0.5, device="cpu", dtype="float32", kv_cache_blocks=64)
    want = oracle.chat(conv, greedy, use_tqdm=False, chat_template=template)[0].outputs[0].text
    assert want != oracle.chat(conv, greedy, use_tqdm=False)[0].outputs[0].text  # else the flag could not be seen
    path = tmp_path / "chat.jinja"
    path.write_text(template)
    flags = ["--small-rl", rl, "--small-base", base, "--lam", "0.5", "--temperature", "0", "--max-tokens", "8"]
    for value in (template, str(path)):
        assert main(["generate", large, *flags, "--prompt", conv[0]["content"], "--chat", "--chat-template", value,
                     *ENGINE_FLAGS]) == 0
        assert capsys.readouterr().out == want + "\n"
    assert "goes with --chat" in _one_line_error(capsys, ["generate", large, "--prompt", "hi", "--chat-template",
                                                          template], "generate")
    broken = "{% for m in messages %}{{ m['content'] }"  # a typo: jinja's TemplateSyntaxError was a traceback
    assert "the chat template rejected the prompt" in _one_line_error(
        capsys, ["generate", large, "--prompt", "hi", "--chat", "--chat-template", broken, *ENGINE_FLAGS], "generate")
    assert "not a Jinja template" in _one_line_error(capsys, ["serve", large, "--chat-template",
                                                              str(tmp_path / "none.jinja")], "serve")
    built = []

    def build(args: object) -> object:  # the model flags' engine, kept to look at
        built.append(LLM(large, device="cpu", dtype="float32", kv_cache_blocks=64).llm_engine)
        return built[-1]
    monkeypatch.setattr(serve_cli, "build_engine", build)
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: None)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    assert main(["serve", large, "--port", port, "--chat-template", str(path)]) == 0
    assert built[0].tokenizer.chat_template == template


def test_a_default_max_tokens_grows_to_min_tokens(capsys: pytest.CaptureFixture[str]) -> None:
    from rast_engine.commands.generate import DEFAULT_MAX_TOKENS, _params

    args = build_parser().parse_args(["generate", "m", "--prompt", "p", "--min-tokens", "300"])
    assert (_params(args, {}).max_tokens, _params(args, {"max_tokens": 100}).max_tokens) == (300, 300)
    args = build_parser().parse_args(["generate", "m", "--prompt", "p", "--min-tokens", "3"])
    assert (_params(args, {}).max_tokens, _params(args, {"max_tokens": 100}).max_tokens) == (DEFAULT_MAX_TOKENS, 100)
    # an explicit --max-tokens is kept, so a contradiction fails before any model loads ("m" is no directory)
    err = _one_line_error(capsys, ["generate", "m", "--prompt", "p", "--min-tokens", "30", "--max-tokens", "10"],
                          "generate")
    assert "min_tokens" in err and "max_tokens=10" in err


def test_bench_runs_the_suite_script(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    suite_dir = tmp_path / "bench"
    suite_dir.mkdir()
    record = tmp_path / "argv.json"
    (suite_dir / "sampler.py").write_text(
        f"import json, sys\njson.dump(sys.argv[1:], open({str(record)!r}, 'w'))\nsys.exit(3)\n")
    monkeypatch.setattr(bench, "bench_dir", lambda: suite_dir)
    assert main(["bench", "sampler", "--rows", "2", "--cpu"]) == 3  # the script's exit code
    assert json.loads(record.read_text()) == ["--rows", "2", "--cpu"]
    capsys.readouterr()
    err = _one_line_error(capsys, ["bench", "decode"], "bench")
    assert "decode.py not found" in err and "sampler" in err


def test_bench_without_a_checkout(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import rast_engine

    monkeypatch.setattr(rast_engine, "__file__", str(tmp_path / "site" / "rast_engine" / "__init__.py"))
    monkeypatch.chdir(tmp_path)
    assert "source checkout" in _one_line_error(capsys, ["bench", "sampler"], "bench")


def test_serving_flags_reach_the_engine(triple: tuple[str, str, str]) -> None:
    from rast_engine.commands import build_engine
    from rast_engine.models.fp8 import Fp8Linear

    large, rl, base = triple
    args = build_parser().parse_args(
        ["serve", large, "--small-rl", rl, "--small-base", base, *ENGINE_FLAGS, "--block-size", "8",
         "--max-num-batched-tokens", "32", "--attention-backend", "torch", "--enforce-eager",
         "--cuda-graph-max-batch", "4", "--no-enable-prefix-caching", "--async-output", "--no-async-scheduling",
         "--no-model-streams", "--no-stack-small-models", "--speculative-tokens", "3", "--speculative-draft", "rl",
         "--quantization", "fp8"])
    engine = build_engine(args)
    cfg = engine.config
    assert (cfg.block_size, cfg.max_num_batched_tokens, cfg.attention_backend, cfg.enforce_eager,
            cfg.cuda_graph_max_batch, cfg.enable_prefix_caching, engine.async_output, cfg.model_streams) == (
        8, 32, "torch", True, 4, False, True, False)
    assert (engine.scheduler.lookahead, engine.runner.speculative_draft) == (3, "rl")
    assert not cfg.stack_small_models and len(engine.runner.units) == 3  # rl and base as two forwards
    assert not engine.async_scheduling
    assert cfg.quantization == "fp8" and any(isinstance(m, Fp8Linear) for m in engine.runner.units[0].modules())
    defaults = build_parser().parse_args(["serve", large])
    assert (defaults.enable_prefix_caching, defaults.async_output, defaults.async_scheduling, defaults.block_size,
            defaults.model_streams, defaults.stack_small_models, defaults.speculative_tokens, defaults.quantization) == (
        True, None, None, 16, True, True, 0, None)


def test_model_as_positional_or_vllms_flag_and_no_abbreviations(capsys: pytest.CaptureFixture[str]) -> None:
    def parse(argv: list[str]) -> Any:
        return build_parser().parse_args(argv + (["--prompt", "p"] if argv[0] == "generate" else []))

    for command in ("serve", "generate"):
        assert parse([command, "m"]).model == parse([command, "--model", "m"]).model == "m"
        assert parse([command, "--model", "m"]).model_streams  # --model is its own flag, not --model-streams'
        for argv in ([command, "m", "--model", "n"], [command, "--model", "n", "m"]):
            with pytest.raises(SystemExit):
                parse(argv)
            assert "MODEL given twice" in capsys.readouterr().err
    # a prefix of a flag is not the flag: with abbreviations on, these set --max-model-len and --model-streams
    for argv in (["serve", "m", "--max-model", "64"], ["serve", "--mod", "m"], ["generate", "m", "--temp", "0"]):
        with pytest.raises(SystemExit):
            parse(argv)
        assert "unrecognized arguments" in capsys.readouterr().err
    assert "MODEL is required" in _one_line_error(capsys, ["serve", "--port", "0"], "serve")
    assert "MODEL is required" in _one_line_error(capsys, ["generate", "--prompt", "hi"], "generate")
