"""Prompt templates (paper Fig. 7 / App. A.2).

(a) the model's own chat template around "{input}\\nPlease reason step by step, and put your final answer
    within \\boxed{}." (for Qwen2.5 this reproduces Fig. 7's system line, which is its default);
(b) "Question:\\n{input}\\nAnswer:\\nLet's think step by step.";
or a text file holding an {input} placeholder.

Only the literal "{input}" is substituted (never str.format): problems and templates are full of LaTeX
braces. Prompts are returned as token ids so that the template alone decides the special tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rast_engine.errors import RastError
from rast_engine.evaluation.data import read_utf8

PLACEHOLDER = "{input}"
BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
TEMPLATE_B = "Question:\n{input}\nAnswer:\nLet's think step by step."


@dataclass(frozen=True)
class PromptTemplate:
    """`text` is None for the chat template (a); otherwise a string with one or more {input}."""

    name: str
    text: str | None
    # Strings that end a completion: a base model under template (b) tends to pose itself a new question.
    stop: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.text is not None and PLACEHOLDER not in self.text:
            raise RastError(f"prompt template {self.name!r} has no {PLACEHOLDER} placeholder")

    def render(self, problem: str, tokenizer: Any) -> list[int]:
        """The prompt's token ids for one problem."""
        if self.text is None:
            if not getattr(tokenizer, "chat_template", None):
                raise RastError("template 'a' needs a tokenizer with a chat template; this model has none "
                                "(use --template b or a template file)")
            messages = [{"role": "user", "content": f"{problem}\n{BOXED_INSTRUCTION}"}]
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            # The chat template already holds every special token it wants (BOS included).
            return list(tokenizer(text, add_special_tokens=False)["input_ids"])
        return list(tokenizer(self.text.replace(PLACEHOLDER, problem))["input_ids"])


def load_template(spec: str) -> PromptTemplate:
    """'a', 'b', or the path of a template file."""
    if spec == "a":
        return PromptTemplate("a", None)
    if spec == "b":
        return PromptTemplate("b", TEMPLATE_B, stop=("\n\nQuestion:",))
    path = Path(spec)
    if not path.is_file():
        raise RastError(f"--template must be 'a', 'b' or a template file; {spec!r} is neither")
    return PromptTemplate(str(path), read_utf8(path, "template file"))

