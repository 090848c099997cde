"""CLIP's byte-level BPE tokenizer (Radford et al. 2021), as SD v1 feeds its text encoder.

    ids = CLIPTokenizer.default()(["a photo of a cat"])     -> (B, 77) int64

Steps for one prompt, giving the ids of transformers' ``CLIPTokenizer`` (what SD pipelines run),
which follows OpenAI's ``simple_tokenizer.py`` except in step 1:

1. clean as transformers' normalizer: Unicode NFC, runs of Unicode White_Space -> one space,
   lowercase character by character. No HTML unescaping and no ftfy (OpenAI's tokenizer does
   both), so "fish &amp; chips" keeps its "&amp;";
2. pre-tokenize with CLIP's regex (letters runs, single digits, punctuation runs, contractions);
3. map each piece's UTF-8 bytes to printable unicode symbols (``bytes_to_unicode``), mark the
   end of the word with ``</w>`` and apply the BPE merges in rank order;
4. wrap in ``<|startoftext|>`` (49406) ... ``<|endoftext|>`` (49407), truncate to 77 keeping
   the end token, and pad with ``<|endoftext|>`` to 77.

The vocabulary comes from ``bpe_simple_vocab_16e6.txt.gz`` (OpenAI CLIP, MIT licence, shipped
in this package) or from a diffusers ``tokenizer/`` folder (``vocab.json`` + ``merges.txt``).
"""

from __future__ import annotations

import gzip
import json
import re
import unicodedata
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor

from diffmodels.core.errors import CheckpointError

# Unicode White_Space: \s of `tokenizers` and of the `regex` package. The stdlib's \s also takes
# the separators \x1c-\x1f, which CLIPTokenizer keeps (and tokenizes like punctuation).
WHITESPACE = r"\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
# CLIP's pre-tokenizer: special tokens, contractions, letter runs, single digits, other runs.
PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
# The same with the stdlib: letters = word characters minus digits and "_"; \d (decimal digits)
# stands in for \p{N}, so only other numerals (superscripts, fractions) split differently.
STDLIB_PATTERN = rf"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|(?:[^{WHITESPACE}\w]|_)+"""

try:  # the `regex` package knows \p{L} / \p{N}; diffusers depends on it
    import regex

    _PATTERN = regex.compile(PATTERN, regex.IGNORECASE)
except ImportError:
    _PATTERN = re.compile(STDLIB_PATTERN, re.IGNORECASE)

VOCAB_FILE = Path(__file__).with_name("bpe_simple_vocab_16e6.txt.gz")
SOT, EOT = "<|startoftext|>", "<|endoftext|>"
NUM_MERGES = 49152 - 256 - 2  # lines 1..48894 of the vocab file (line 0 is a version header)


@lru_cache
def bytes_to_unicode() -> dict[int, str]:
    """Byte -> printable unicode char, a bijection over all 256 bytes (GPT-2's table): printable
    Latin-1 bytes map to themselves, the rest to code points 256 and up, so BPE never sees
    whitespace or control characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def clean(text: str) -> str:
    """transformers' CLIPTokenizer normalizer: NFC, White_Space runs -> " ", lowercase.

    Per character, as ``tokenizers`` lowercases: str.lower would turn a word-final capital sigma
    into the final form (ΟΔΟΣ -> οδος), CLIPTokenizer gives σ. HTML entities are kept as typed."""
    text = unicodedata.normalize("NFC", text)
    text = re.sub(f"[{WHITESPACE}]+", " ", text)
    return "".join(ch.lower() for ch in text).strip(" ")


class CLIPTokenizer:
    """BPE tokenizer with ``encoder`` (symbol -> id) and merge ``ranks`` ((a, b) -> rank)."""

    def __init__(self, encoder: dict[str, int], merges: list[tuple[str, str]], max_length: int = 77):
        self.encoder = encoder
        self.ranks = {pair: i for i, pair in enumerate(merges)}
        self.max_length = max_length
        self.byte_encoder = bytes_to_unicode()
        self.sot_id, self.eot_id = encoder[SOT], encoder[EOT]
        self.cache: dict[str, list[str]] = {SOT: [SOT], EOT: [EOT]}

    @classmethod
    def from_bpe_file(cls, path: str | Path = VOCAB_FILE) -> CLIPTokenizer:
        """Build from OpenAI's gzip merges file: vocab = bytes, bytes + ``</w>``, merges, SOT, EOT."""
        lines = gzip.open(path, "rt", encoding="utf-8").read().split("\n")[1 : NUM_MERGES + 1]
        merges = [tuple(line.split()) for line in lines]
        symbols = list(bytes_to_unicode().values())
        symbols = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [SOT, EOT]
        return cls({s: i for i, s in enumerate(symbols)}, merges)

    @classmethod
    def from_folder(cls, folder: str | Path) -> CLIPTokenizer:
        """Build from a diffusers/transformers ``tokenizer/`` folder (vocab.json + merges.txt)."""
        folder = Path(folder)
        try:
            encoder = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
            lines = (folder / "merges.txt").read_text(encoding="utf-8").split("\n")
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{folder}: not a CLIP tokenizer folder ({exc})") from None
        merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
        if SOT not in encoder or EOT not in encoder:
            raise CheckpointError(f"{folder}/vocab.json: no {SOT} / {EOT} tokens; not a CLIP vocabulary")
        return cls(encoder, merges)

    @classmethod
    def default(cls) -> CLIPTokenizer:
        return _default()

    def bpe(self, word: str) -> list[str]:
        """Byte-symbol word -> its BPE pieces (the last carrying ``</w>``)."""
        if word in self.cache:
            return self.cache[word]
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            pairs = {(a, b) for a, b in zip(parts, parts[1:])}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(parts):  # merge every occurrence of `best`, left to right
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        self.cache[word] = parts
        return parts

    def encode(self, text: str) -> list[int]:
        """Text -> BPE ids, without start/end tokens or padding."""
        ids = []
        for piece in _PATTERN.findall(clean(text)):
            word = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[p] for p in self.bpe(word))
        return ids

    def __call__(self, prompts: str | list[str]) -> Tensor:
        """Prompts -> ids (B, max_length) int64: SOT, tokens (truncated), EOT, EOT padding."""
        if isinstance(prompts, str):
            prompts = [prompts]
        out = torch.full((len(prompts), self.max_length), self.eot_id, dtype=torch.long)
        for row, text in enumerate(prompts):
            ids = [self.sot_id] + self.encode(text)[: self.max_length - 2] + [self.eot_id]
            out[row, : len(ids)] = torch.tensor(ids)
        return out


@lru_cache
def _default() -> CLIPTokenizer:
    return CLIPTokenizer.from_bpe_file()
