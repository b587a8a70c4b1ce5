"""LLM.chat as vLLM's: the template's options, and messages whose content is OpenAI's list of text parts,
offline and on the server; and an empty text prompt (text parts joined by newlines; "" is whatever the
tokenizer makes of it)."""
from __future__ import annotations

import pytest
from tokenizers import processors

from rast_engine import LLM, SamplingParams
from rast_engine.errors import RastError
from rast_engine.server.chat_messages import ChatMessage

ONE = SamplingParams(temperature=0.0, max_tokens=1)


@pytest.fixture(scope="module")
def llm(qwen2_triple: tuple) -> LLM:
    return LLM(*map(str, qwen2_triple), lam=0.5, block_size=4, kv_cache_blocks=32, device="cpu", dtype="float32")


def test_text_parts_reach_the_template_as_text(llm: LLM) -> None:
    """LLM.chat passed the list itself to the template: its repr in the prompt, or the template's error."""
    parts = [{"role": "user", "content": [{"type": "text", "text": "the cat"}, {"type": "text", "text": "sat"}]}]
    joined = [{"role": "user", "content": "the cat\nsat"}]
    got = llm.chat(parts, ONE, use_tqdm=False)[0]
    assert got.prompt == llm.chat(joined, ONE, use_tqdm=False)[0].prompt
    assert "the cat\nsat" in got.prompt and "'type'" not in got.prompt
    with pytest.raises(RastError, match="content parts"):
        llm.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], ONE,
                 use_tqdm=False)
    # the server's messages give the template the same text (it joined parts with "")
    message = ChatMessage(role="user", content=[{"type": "text", "text": "the cat"}, {"type": "text", "text": "sat"}])
    assert message.text() == "the cat\nsat"


def test_an_empty_prompt_is_what_the_tokenizer_makes_of_it(llm: LLM) -> None:
    """With a tokenizer that adds BOS, "" is the prompt [BOS], as the server and vLLM take it (it was
    refused before encoding); a tokenizer that makes nothing of it still gets the refusal."""
    tok = llm.get_tokenizer()
    with pytest.raises(RastError, match="the prompt is empty"):
        llm.generate("", ONE, use_tqdm=False)
    backend = tok.backend_tokenizer
    saved = backend.post_processor
    backend.post_processor = processors.TemplateProcessing(single=f"{tok.bos_token} $A",
                                                           special_tokens=[(tok.bos_token, tok.bos_token_id)])
    try:
        assert tok.encode("") == [tok.bos_token_id]
        out = llm.generate("", ONE, use_tqdm=False)[0]
    finally:
        backend.post_processor = saved
    assert out.prompt_token_ids == [tok.bos_token_id] and len(out.outputs[0].token_ids) == 1


def test_chat_uses_the_template(llm: LLM) -> None:
    conv = [{"role": "user", "content": "hello world"}]
    out = llm.chat(conv, SamplingParams(temperature=0.0, max_tokens=3), use_tqdm=False)[0]
    text = llm.get_tokenizer().apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    assert out.prompt_token_ids == llm.get_tokenizer().encode(text, add_special_tokens=False)
    assert out.prompt_token_ids[-1] == llm.get_tokenizer().convert_tokens_to_ids("<|assistant|>")
    assert out.prompt == text
    # vLLM's options: continue the assistant's last message, or another template
    tok, one = llm.get_tokenizer(), SamplingParams(temperature=0.0, max_tokens=1)
    started = conv + [{"role": "assistant", "content": "the answer is"}]
    out = llm.chat(started, one, use_tqdm=False, add_generation_prompt=False, continue_final_message=True)[0]
    assert out.prompt == tok.apply_chat_template(started, tokenize=False, continue_final_message=True)
    assert out.prompt.endswith("the answer is")
    plain = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    out = llm.chat(conv, one, use_tqdm=False, chat_template=plain, add_generation_prompt=False)[0]
    assert out.prompt == "user: hello world\n"
    with pytest.raises(RastError, match="excludes"):
        llm.chat(started, one, use_tqdm=False, continue_final_message=True)
    # vLLM's keywords: messages, and chat_template_kwargs as the template's variables (Qwen3's enable_thinking)
    think = "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if enable_thinking %}<think>{% endif %}"
    for flag in (True, False):
        out = llm.chat(messages=conv, sampling_params=one, use_tqdm=False, chat_template=think,
                       chat_template_kwargs={"enable_thinking": flag})[0]
        assert out.prompt == "hello world" + ("<think>" if flag else "")
    with pytest.raises(RastError, match="apply_chat_template's own"):
        llm.chat(conv, one, use_tqdm=False, chat_template_kwargs={"tokenize": True})
    # vLLM's tools: the function specs reach the template
    listed = "{% for t in tools or [] %}[{{ t.function.name }}]{% endfor %}{{ messages[0]['content'] }}"
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    out = llm.chat(conv, one, use_tqdm=False, chat_template=listed, add_generation_prompt=False, tools=tools)[0]
    assert out.prompt == "[get_weather]hello world"
