"""Reasoning outputs (--reasoning-parser): the split of a chat choice's text into reasoning and content.

The oracle splits a whole text with str.partition, nothing incremental. The splitter must give the same
parts for the whole text and for every way of cutting it into stream deltas (hypothesis), and the server's
message fields and joined stream deltas must equal the oracle's split of the text the same request gets
from /v1/completions, its chat prompt given as ids from /tokenize."""
from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest
from hypothesis import given, settings, strategies as st

from factories import CHAT_TEMPLATE, make_triple
from rast_engine.reasoning import PARSERS, ReasoningSplitter, prompt_start, split_reasoning
from rast_engine.server.api_error import APIError
from rast_engine.server.chat_messages import ChatMessage, render_chat


def oracle(parser: str, prompt: str, text: str) -> tuple[str, str]:
    if prompt.rstrip().endswith("</think>"):  # the template closed the thinking: all answer
        return "", text.lstrip()
    head = text.lstrip()
    if head.startswith("<think>"):
        inside, rest = True, head[len("<think>"):]
    else:
        inside, rest = parser == "deepseek_r1" or prompt.rstrip().endswith("<think>"), text
    if not inside:
        return "", rest.lstrip()
    reasoning, _, content = rest.partition("</think>")
    return reasoning.strip(), content.lstrip()


def streamed(parser: str, prompt: str, pieces: list[str]) -> tuple[str, str]:
    splitter = ReasoningSplitter(prompt_start(parser, prompt))  # type: ignore[arg-type]
    parts = [splitter.feed(p, final=i == len(pieces) - 1) for i, p in enumerate(pieces)]
    return "".join(r for r, _ in parts), "".join(c for _, c in parts)


FRAGMENTS = ["<think>", "</think>", "<thi", "nk>", "</th", "<", ">", "/", "\n", " ", "a", "b c", "\u00e9", "42"]


@settings(max_examples=400, deadline=None)
@given(pieces=st.lists(st.sampled_from(FRAGMENTS), max_size=14), cuts=st.lists(st.integers(0, 60), max_size=6),
       parser=st.sampled_from(PARSERS), prompt=st.sampled_from(["<|assistant|>", "<|assistant|><think>\n", "<|assistant|><think>\n\n</think>\n\n"]))
def test_the_split_equals_the_oracle_however_the_text_is_cut(pieces: list[str], cuts: list[int], parser: str,
                                                              prompt: str) -> None:
    text = "".join(pieces)
    bounds = sorted({0, len(text), *(c for c in cuts if c < len(text))})
    deltas = [text[a:b] for a, b in zip(bounds, bounds[1:])] or [""]
    want = oracle(parser, prompt, text)
    assert split_reasoning(parser, prompt, text) == want  # type: ignore[arg-type]
    assert streamed(parser, prompt, deltas) == want
    assert streamed(parser, prompt, list(text) + [""]) == want  # one character a delta, then the end


@pytest.mark.parametrize("parser, prompt, text, want", [
    ("qwen3", "<|assistant|>", "<think>\nLet me see.\n</think>\n\nIt is 4.", ("Let me see.", "It is 4.")),
    ("qwen3", "<|assistant|>", "It is 4.", ("", "It is 4.")),  # enable_thinking false: no thinking
    ("qwen3", "<|assistant|><think>\n", "hmm </think> 4", ("hmm", "4")),  # Thinking-2507 opens it
    ("deepseek_r1", "<|assistant|>", "hmm\n</think>\n4", ("hmm", "4")),  # R1 writes no <think>
    ("deepseek_r1", "<|assistant|>", "cut by max_tokens ", ("cut by max_tokens", "")),
    ("qwen3", "<|assistant|>", "<think>cut", ("cut", "")),
    ("qwen3", "<|assistant|>", "a </think> b", ("", "a </think> b")),  # not thinking: the tag is text
    ("deepseek_r1", "<think>\n\n</think>\n\n", "4 </think> 5", ("", "4 </think> 5")),  # closed by the prompt
    ("qwen3", "<think>\n\n</think>\n\n", "<think>4", ("", "<think>4")),
])
def test_what_each_parser_reads_as_thinking(parser: str, prompt: str, text: str, want: tuple[str, str]) -> None:
    assert split_reasoning(parser, prompt, text) == want  # type: ignore[arg-type]


def test_replayed_reasoning_reaches_the_template_and_bad_placements_are_refused(tmp_path: Path) -> None:
    from factories import make_tokenizer
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(make_tokenizer(tmp_path / "tok"))
    tok.chat_template = ("{% for m in messages %}<|{{ m.role }}|>{% if m.reasoning_content is defined %}"
                         "<think>{{ m.reasoning_content }}</think>{% endif %}{{ m.content }}\n{% endfor %}")
    replayed = {"role": "assistant", "content": "4", "reasoning": "2 + 2", "reasoning_content": "2 + 2",
                "refusal": None, "tool_calls": None}  # message.model_dump() of a parsed response
    got = render_chat(tok, [ChatMessage(role="user", content="2 + 2?"), ChatMessage(**replayed)], False)
    assert got == "<|user|>2 + 2?\n<|assistant|><think>2 + 2</think>4\n"
    older = ChatMessage(role="assistant", content="4", reasoning_content="2 + 2")  # vLLM's older field alone
    assert render_chat(tok, [older], False) == "<|assistant|><think>2 + 2</think>4\n"
    with pytest.raises(APIError, match="differ"):
        ChatMessage(role="assistant", content="4", reasoning="a", reasoning_content="b")
    with pytest.raises(APIError, match="only an assistant"):
        ChatMessage(role="user", content="4", reasoning="a")


ANSWER = "(cat|dog)s? [0-9]{2}"  # structured outputs hold the answer after the thinking
SEED = 2  # each of its 3 choices thinks, then answers


@pytest.fixture(scope="module")
def think_srv(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    pytest.importorskip("xgrammar")
    from rast_engine.server.app import OpenAIServer
    from server_util import MODEL, Running, server_engine

    triple = make_triple(tmp_path_factory.mktemp("think"), added_tokens=("<think>", "</think>"))
    engine = server_engine(triple, reasoning_parser="qwen3")
    # a generation prompt that opens the thinking, as Qwen3-Thinking-2507's and DeepSeek-R1's templates do
    engine.tokenizer.chat_template = CHAT_TEMPLATE.replace("<|assistant|>{% endif %}", "<|assistant|><think>{% endif %}")
    running = Running(OpenAIServer(engine, model_name=MODEL))
    running.close_id = engine.tokenizer.convert_tokens_to_ids("</think>")
    yield running
    running.close()


def _completion_texts(url: str, messages: list[dict], **body: object) -> tuple[str, list[str]]:
    """The chat prompt's text, and what /v1/completions draws after its ids (the raw text)."""
    tokens = httpx.post(f"{url}/tokenize", json={"messages": messages}).json()["tokens"]
    prompt = httpx.post(f"{url}/detokenize", json={"tokens": tokens}).json()["prompt"]
    r = httpx.post(f"{url}/v1/completions", json={"model": "tiny-rast", "prompt": tokens, **body}, timeout=120)
    assert r.status_code == 200, r.text
    return prompt, [c["text"] for c in r.json()["choices"]]


def test_the_server_splits_messages_and_streams_alike(think_srv) -> None:  # noqa: ANN001
    messages = [{"role": "user", "content": "the sum"}]
    extra = {"logit_bias": {str(think_srv.close_id): 3.0}, "structured_outputs": {"regex": ANSWER}}
    prompt, raws = _completion_texts(think_srv.url, messages, max_tokens=40, temperature=1.0, seed=SEED, n=3, **extra)
    wants = [oracle("qwen3", prompt, raw) for raw in raws]
    assert all(r and re.fullmatch(ANSWER, c) for r, c in wants), wants  # each thought, then answered
    client = think_srv.client()
    res = client.chat.completions.create(model="tiny-rast", messages=messages, max_tokens=40, temperature=1.0,
                                         seed=SEED, n=3, extra_body=extra)
    got = [(c.message.reasoning, c.message.content) for c in res.choices]
    assert got == wants and [c.message.reasoning_content for c in res.choices] == [r for r, _ in wants]

    stream = client.chat.completions.create(model="tiny-rast", messages=messages, max_tokens=40, temperature=1.0,
                                            seed=SEED, n=3, logprobs=True, stream=True, extra_body=extra)
    parts: dict[int, list[str]] = {i: ["", ""] for i in range(3)}
    logprobs = dict.fromkeys(range(3), 0)
    for chunk in stream:
        for c in chunk.choices:
            parts[c.index][0] += getattr(c.delta, "reasoning", None) or ""
            parts[c.index][1] += c.delta.content or ""
            logprobs[c.index] += len(c.logprobs.content) if c.logprobs else 0
    assert [tuple(parts[i]) for i in range(3)] == wants
    # every token's logprobs arrive once, the held-back text's on a later chunk
    assert sum(logprobs.values()) == res.usage.completion_tokens and all(logprobs.values())


def test_include_reasoning_false_drops_the_thinking(think_srv) -> None:  # noqa: ANN001
    messages = [{"role": "user", "content": "the sum"}]
    body = {"max_tokens": 40, "temperature": 1.0, "seed": 5, "logit_bias": {str(think_srv.close_id): 3.0}}
    prompt, (raw,) = _completion_texts(think_srv.url, messages, **body)
    r = httpx.post(f"{think_srv.url}/v1/chat/completions",
                   json={"model": "tiny-rast", "messages": messages, "include_reasoning": False, **body}, timeout=120)
    message = r.json()["choices"][0]["message"]
    assert message == {"role": "assistant", "content": oracle("qwen3", prompt, raw)[1]}
