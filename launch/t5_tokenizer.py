"""A T5 (SentencePiece Unigram) tokenizer written down locally from a small caption corpus, so nothing is downloaded.

Its layout is T5's: <pad> 0, </s> 1, <unk> 2, then "▁" and the pieces; every text gets </s> appended. Each corpus
word is one "▁word" piece scored by its log frequency and single characters are costly fallbacks, so Viterbi keeps
known words whole and spells the rest out. Nothing is trained, so every build is identical.
"""

from __future__ import annotations

import collections
import json
import math
import string
import tempfile
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import T5TokenizerFast

from launch.clip_bpe import CAPTION_CORPUS

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
SPACE = "▁"  # SentencePiece's word-start marker
MAX_SEQUENCE_LENGTH = 120  # PixArt-alpha's T5 token budget (Chen et al. 2023, Sec. 3.1), its pipeline's default
CHARACTER_SCORE = -20.0  # far below any word's log frequency: a known word is never spelt out


def unigram_vocab(corpus: str = CAPTION_CORPUS) -> list[tuple[str, float]]:
    """(piece, log-probability) pairs in T5's id order: specials, "▁", corpus words, then single characters."""
    counts = collections.Counter(corpus.split())
    total = sum(counts.values())
    words = [(SPACE + w, math.log(c / total)) for w, c in sorted(counts.items())]
    chars = [(ch, CHARACTER_SCORE) for ch in string.ascii_letters + string.digits + string.punctuation]
    return [(PAD, 0.0), (EOS, 0.0), (UNK, 0.0), (SPACE, -2.0), *words, *chars]


def t5_backend(corpus: str = CAPTION_CORPUS) -> Tokenizer:
    """The `tokenizers` pipeline of T5's tokenizer.json: Metaspace split, Unigram, "$A </s>"."""
    tok = Tokenizer(models.Unigram(unigram_vocab(corpus), unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="always")])
    tok.decoder = decoders.Metaspace(replacement=SPACE, prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single=["$A", EOS], pair=["$A", EOS, "$B", EOS],
                                                       special_tokens=[(EOS, 1)])
    return tok


def write_t5_files(directory: Path, corpus: str = CAPTION_CORPUS,
                   model_max_length: int = MAX_SEQUENCE_LENGTH) -> None:
    """tokenizer.json and tokenizer_config.json: what a fast T5 tokenizer loads from in transformers 4 and 5.

    No <extra_id_N> sentinels: they serve T5's span-corruption pretraining, never a text encoder's input.
    """
    directory.mkdir(parents=True, exist_ok=True)
    t5_backend(corpus).save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "T5Tokenizer", "eos_token": EOS, "unk_token": UNK, "pad_token": PAD,
              "extra_ids": 0, "additional_special_tokens": [], "model_max_length": model_max_length}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def build_t5_tokenizer(corpus: str = CAPTION_CORPUS,
                       model_max_length: int = MAX_SEQUENCE_LENGTH) -> T5TokenizerFast:
    """Load the tokenizer from its files, as the clip_bpe tokenizer is: one constructor for every version."""
    with tempfile.TemporaryDirectory() as tmp:
        write_t5_files(Path(tmp), corpus, model_max_length)
        return T5TokenizerFast.from_pretrained(tmp)
