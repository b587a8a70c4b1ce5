"""Chat details checked without a server: render_chat hands a message's name to the template as HF's
apply_chat_template does, and a token's logprobs ``bytes`` (token_bytes) are its own bytes, so the
tokens of a character split across tokens join back to its UTF-8 (OpenAI's meaning of the field), for
byte-level BPE and for SentencePiece byte fallback. The oracle is the tokenizer's own decode."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from factories import make_tokenizer
from rast_engine.server.chat_messages import ChatMessage, render_chat
from rast_engine.server.protocol import APIError, ChatCompletionRequest
from rast_engine.server.request_json import parse_request
from rast_engine.server.token_bytes import token_bytes

NAMED = ("{% for m in messages %}<|{{ m['role'] }}|>{% if m.name is defined %}{{ m.name }}: {% endif %}"
         "{{ m['content'] }}\n{% endfor %}")


def _joined(tok: object, ids: list[int]) -> bytes:
    return bytes(b for i in ids for b in token_bytes(tok, i))


def test_a_message_name_reaches_the_template(tmp_path: Path) -> None:
    tok = AutoTokenizer.from_pretrained(make_tokenizer(tmp_path / "tok"))
    tok.chat_template = NAMED
    messages = [{"role": "user", "content": "hi", "name": "alice"}, {"role": "assistant", "content": "yo"}]
    got = render_chat(tok, [ChatMessage(**m) for m in messages], add_generation_prompt=False)
    assert got == tok.apply_chat_template(messages, tokenize=False) and "alice: hi" in got


def test_byte_level_tokens_give_their_own_bytes(tmp_path: Path) -> None:
    tok = AutoTokenizer.from_pretrained(make_tokenizer(tmp_path / "tok", extra_corpus=("caf\u00e9 na\u00efve",)))
    text = "the caf\u00e9 is na\u00efve"
    ids = tok.encode(text, add_special_tokens=False)
    assert any("\ufffd" in tok.decode([i]) for i in ids), "setup: no token holds part of a character"
    assert _joined(tok, ids) == tok.decode(ids, clean_up_tokenization_spaces=False).encode()
    assert token_bytes(tok, tok.eos_token_id) == list(tok.eos_token.encode())  # an added token: its text


def test_sentencepiece_byte_fallback_tokens_give_their_byte() -> None:
    vocab = {"<unk>": 0, "</s>": 1, **{f"<0x{b:02X}>": 2 + b for b in range(256)},
             **{c: 258 + n for n, c in enumerate("\u2581caf")}}
    sp = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    sp.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    sp.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    tok = PreTrainedTokenizerFast(tokenizer_object=sp, unk_token="<unk>", eos_token="</s>")
    ids = tok.encode("caf caf\u00e9", add_special_tokens=False)
    assert tok.convert_ids_to_tokens(ids)[-6:] == ["\u2581", "c", "a", "f", "<0xC3>", "<0xA9>"]
    assert [token_bytes(tok, i) for i in ids[-2:]] == [[0xC3], [0xA9]]
    # the word marker is the space the text has there (decoding "\u2581" alone gives ""); only the text's very
    # first space is stripped by the decoder, which an output after its prompt never starts with
    text = tok.decode(ids, clean_up_tokenization_spaces=False)
    assert text == "caf caf\u00e9" and _joined(tok, ids[4:]) == text[3:].encode() == " caf\u00e9".encode()


def test_a_replayed_assistant_message_is_accepted_and_unsupported_parts_refused() -> None:
    """OpenAI's client's message.model_dump() of a text reply carries refusal, tool_calls, function_call,
    audio and annotations as null: a history replayed so is valid; a message that uses one this server
    lacks is refused (tool_calls are served: tests/test_server_tools.py)."""
    reply = {"role": "assistant", "content": "yo", "refusal": None, "tool_calls": None, "function_call": None,
             "audio": None, "annotations": None}
    req = {"model": "m", "messages": [{"role": "user", "content": "hi"}, reply]}
    got = parse_request(json.dumps(req).encode(), ChatCompletionRequest)
    assert [m.text() for m in got.messages] == ["hi", "yo"]
    for field, value in (("function_call", {"name": "f", "arguments": "{}"}), ("refusal", "no"),
                         ("audio", {"id": "a"})):
        bad = {**req, "messages": [req["messages"][0], {**reply, field: value}]}
        with pytest.raises(APIError, match=field) as err:
            parse_request(json.dumps(bad).encode(), ChatCompletionRequest)
        assert (err.value.status, err.value.param) == (400, "messages")


def test_chat_template_kwargs_reach_the_template(tmp_path: Path) -> None:
    tok = AutoTokenizer.from_pretrained(make_tokenizer(tmp_path / "tok"))
    tok.chat_template = ("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                         "{% if enable_thinking %}<think>{% endif %}")
    req = {"model": "m", "messages": [{"role": "user", "content": "hi"}],
           "chat_template_kwargs": {"enable_thinking": True}}
    got = parse_request(json.dumps(req).encode(), ChatCompletionRequest)
    assert render_chat(tok, got.messages, True, got.chat_template_kwargs) == "hi<think>"
    assert render_chat(tok, got.messages, True, None) == "hi"
    with pytest.raises(APIError, match="apply_chat_template's own") as err:
        render_chat(tok, got.messages, True, {"add_generation_prompt": False})
    assert (err.value.status, err.value.param) == (400, "chat_template_kwargs")
