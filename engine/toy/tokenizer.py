"""Character-level tokenizer, saved in HF format. Ids 0..2 are <pad>, <bos>, <eos>; the task's
alphabet follows in a fixed order, so every model in the toy world shares this exact vocabulary
prefix (the models' embedding widths are padded beyond it, differently for small and large)."""
from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from rast_engine.toy.task import ALPHABET

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
SPECIALS = (PAD, BOS, EOS)


def build_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIALS + tuple(ALPHABET))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=None))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    # A prompt always starts with <bos>, so encode(prompt) alone yields what the models were trained on.
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=PAD, model_max_length=128
    )


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, out_dir: str | Path) -> None:
    tokenizer.save_pretrained(str(out_dir))
    # Beside a model's config.json (qwen2), AutoTokenizer loads Qwen2Tokenizer, whose default unk token
    # <|endoftext|> would be added as a 19th id; this vocabulary has no unknown token, and says so.
    path = Path(out_dir) / "tokenizer_config.json"
    cfg = json.loads(path.read_text(encoding="utf-8"))
    cfg["unk_token"] = None
    path.write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")


def vocab_size() -> int:
    return len(SPECIALS) + len(ALPHABET)
