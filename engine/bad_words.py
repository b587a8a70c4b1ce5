"""bad_words (vLLM's): each word's token sequences, and which of their last tokens a draw masks. A word's
last token is masked wherever the output ends with the rest of it; a one-token word, at every draw."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rast_engine.errors import RastError

if TYPE_CHECKING:
    from rast_engine.sequence import Sequence

MAX_BAD_WORD_TOKENS = 1024  # over all of a request's bad words (as vLLM): their tails are matched every draw


def tokenize_bad_words(tokenizer: Any, words: list[str], vocab: int) -> list[list[int]]:
    """Each word's token ids as it starts a text and, where that differs in its first token only, as it
    follows a space (vLLM's rule: both spellings of a word are masked; a spaced spelling that splits
    into another number of tokens is left out); RastError for ids outside the vocabulary or too many tokens."""
    if tokenizer is None:
        raise RastError("bad_words needs a tokenizer to tokenise the words, and this engine has none", param="bad_words")
    out: list[list[int]] = []
    for word in words:
        try:
            bare = list(tokenizer.encode(word.lstrip(), add_special_tokens=False))
            spaced = list(tokenizer.encode(" " + word.lstrip(), add_special_tokens=False))
        except Exception as exc:  # noqa: BLE001 - e.g. a lone surrogate: the client's input
            raise RastError(f"the tokenizer cannot encode bad word {word[:40]!r}: {exc}", param="bad_words") from None
        if bare:  # a word the tokenizer drops entirely cannot be generated
            out += [bare] + ([spaced] if len(spaced) == len(bare) and spaced[0] != bare[0] else [])
    outside = sorted({t for w in out for t in w if t >= vocab})
    if outside:
        raise RastError(f"bad_words tokenise to ids {outside[:5]} outside the vocabulary (size {vocab})", param="bad_words")
    total = sum(map(len, out))
    if total > MAX_BAD_WORD_TOKENS:
        raise RastError(f"bad_words tokenise to {total} tokens; at most {MAX_BAD_WORD_TOKENS}", param="bad_words")
    return out


def bad_word_bans(seq: Sequence, generated: int) -> tuple[list[int], list[tuple[int, int]]]:
    """The last token of each bad word whose other tokens end the output (of ``generated`` tokens, the
    pending one included): banned outright, or with a pending last token, (its second-to-last, its last)
    where the tokens before those end the known output (the device tests the pending one)."""
    ids, known = seq.token_ids, seq.num_known
    bans, pending = [], []
    for w in seq.params.bad_words_token_ids or ():
        if len(w) == 1:
            bans.append(w[0])
        elif len(w) - 1 <= generated:
            if not seq.num_pending:
                if ids[known - len(w) + 1:known] == w[:-1]:
                    bans.append(w[-1])
            elif ids[known - len(w) + 2:known] == w[:-2]:
                pending.append((w[-2], w[-1]))
    return bans, pending
