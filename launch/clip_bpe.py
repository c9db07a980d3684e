"""A CLIP byte-level BPE tokenizer learnt locally from a small caption corpus, so nothing is downloaded.

Its files (vocab.json, merges.txt) are laid out as CLIP's: the 256 byte symbols, the same with "</w>", the
merge results, then <|startoftext|> and <|endoftext|>.
"""

from __future__ import annotations

import collections
import functools
import json
import tempfile
from pathlib import Path

from transformers import CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"
MODEL_MAX_LENGTH = 77

# Lowercase ASCII words only: CLIP's pre-tokenizer splits them on spaces and byte-level BPE maps them to themselves.
CAPTION_CORPUS = """
a photo of a red circle on a white background
a photo of a small blue square in the top left corner
a photo of a large green triangle in the bottom right corner
a picture of a yellow star in the center of the image
an image of an orange rectangle on a black background
a drawing of a purple hexagon in the middle
a pink heart and a brown diamond on a gray background
a cyan ellipse next to a magenta cross
a small dark dot above a large light line
a bright striped circle below a plain solid square
a handwritten digit zero
a handwritten digit one
a handwritten digit two
a handwritten digit three
a handwritten digit four
a handwritten digit five
a handwritten digit six
a handwritten digit seven
a handwritten digit eight
a handwritten digit nine
the number zero one two three four five six seven eight nine written in white on black
a photo of a dog and a cat in front of a house
a photo of a person next to a car under a tree
a photo of the sky with clouds at sunset
a red shape in the top right and a blue shape in the bottom left
a tiny object at the left edge and a big object at the right edge
a medium sized outlined square with a filled circle inside
three small green circles and two large red squares
a close up photo of a colorful pattern with many shapes
a black and white photo of a digit on a plain background
"""


def bytes_to_unicode() -> list[str]:
    """CLIP's 256 base symbols in CLIP's vocab order: printable bytes as themselves, the rest shifted past 255."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = range(256, 512 - len(printable))
    return [chr(c) for c in (*printable, *shifted)]


def merge_pair(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    """Apply one BPE merge to a word, left to right, as CLIP's tokenizer does."""
    out, i = [], 0
    while i < len(symbols):
        if symbols[i : i + 2] == pair:
            out.append(pair[0] + pair[1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return tuple(out)


def train_bpe(corpus: str) -> list[tuple[str, str]]:
    """Merge the most frequent pair until every corpus word is one token; ties break on the pair, so runs agree."""
    counts = collections.Counter(corpus.split())
    words = {w: (*w[:-1], w[-1] + END_OF_WORD) for w in counts}
    merges = []
    while True:
        pairs = collections.Counter()
        for word, symbols in words.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += counts[word]
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        words = {w: merge_pair(s, best) for w, s in words.items()}
    return merges


@functools.lru_cache(maxsize=4)
def clip_bpe(corpus: str = CAPTION_CORPUS) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges laid out as CLIP's: bytes, bytes+</w>, merge results, then BOS and EOS."""
    merges = train_bpe(corpus)
    base = bytes_to_unicode()
    tokens = [*base, *(b + END_OF_WORD for b in base), *("".join(m) for m in merges), BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_bpe_files(directory: Path, corpus: str = CAPTION_CORPUS) -> None:
    """Write vocab.json and merges.txt, the files every transformers version can build a CLIPTokenizer from."""
    vocab, merges = clip_bpe(corpus)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2", *(" ".join(m) for m in merges)]
    (directory / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def build_tokenizer(corpus: str = CAPTION_CORPUS, model_max_length: int = MODEL_MAX_LENGTH) -> CLIPTokenizer:
    """Load the CLIP tokenizer from files: the one constructor shared by transformers 4 and 5."""
    with tempfile.TemporaryDirectory() as tmp:
        write_bpe_files(Path(tmp), corpus)
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=model_max_length)
