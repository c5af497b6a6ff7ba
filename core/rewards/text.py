"""Tokenizers from local files only: the CLIP BPE tokenizer and BLIP's BERT tokenizer.

The CLIP BPE vocabulary comes in two forms: Hugging Face's vocab.json + merges.txt, and
open_clip's bpe_simple_vocab_16e6.txt.gz (shipped inside open_clip_torch). The .gz holds
all merges; open_clip keeps the first 49152 - 256 - 2 of them and builds the vocabulary
as 256 byte symbols, the same with '</w>', one token per merge, then <|startoftext|> and
<|endoftext|>: the same ids HF's openai/clip-vit-large-patch14 vocab.json has.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

__all__ = ["load_clip_tokenizer", "load_bert_tokenizer", "read_open_clip_bpe", "has_clip_bpe_files",
           "CLIP_TOKENIZER_FILES", "OPEN_CLIP_VOCAB_FILE", "BERT_VOCAB_FILE"]

CLIP_TOKENIZER_FILES = ("vocab.json", "merges.txt")
OPEN_CLIP_VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
OPEN_CLIP_NUM_MERGES = 49152 - 256 - 2  # what open_clip's SimpleTokenizer keeps (vocab 49408)
BERT_VOCAB_FILE = "vocab.txt"


def has_clip_bpe_files(folder: str | os.PathLike, hf_only: bool = False) -> bool:
    """Whether `folder` holds vocab.json + merges.txt (or, unless hf_only, open_clip's .gz)."""
    d = Path(folder)
    if all((d / f).is_file() for f in CLIP_TOKENIZER_FILES):
        return True
    return not hf_only and (d / OPEN_CLIP_VOCAB_FILE).is_file()


def _bytes_to_unicode() -> dict[int, str]:
    # Byte-level BPE's byte -> printable character table, in its standard order: the
    # printable bytes first (keeping their code points), then the rest mapped past 255.
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def read_open_clip_bpe(path: str | os.PathLike) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) from open_clip's bpe_simple_vocab_16e6.txt.gz, as open_clip builds them."""
    p = Path(path)
    try:
        with gzip.open(p, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise ValueError(f"could not read {p} as open_clip's gzipped BPE merges file "
                         f"({OPEN_CLIP_VOCAB_FILE}): {type(e).__name__}: {e}") from e
    # First line is a version header; a short (test) file may end with an empty line.
    merges = []
    for i, line in enumerate(lines[1:OPEN_CLIP_NUM_MERGES + 1], start=2):
        parts = line.split()
        if not parts and i == len(lines):
            break
        if len(parts) != 2:
            raise ValueError(f"{p} line {i}: expected a BPE merge 'a b', got {line!r}")
        merges.append((parts[0], parts[1]))
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def load_clip_tokenizer(folder: str | os.PathLike, what: str = "CLIP tokenizer", use_folder_config: bool = True):
    """CLIP BPE tokenizer (transformers CLIPTokenizer) from the files in `folder`.

    Files: vocab.json + merges.txt, or open_clip's bpe_simple_vocab_16e6.txt.gz.
    use_folder_config: if the folder also holds tokenizer_config.json / tokenizer.json (a
    Hugging Face processor folder), load it with from_pretrained so its settings apply
    (PickScore's processor does). False builds the tokenizer from the vocabulary alone, as
    open_clip does (HPS): a processor folder's settings would change the ids, e.g. laion's
    pad_token "!" turns every "!" into a special token.
    """
    from transformers import CLIPTokenizer

    d = Path(folder)
    hf = all((d / f).is_file() for f in CLIP_TOKENIZER_FILES)
    if not hf and not (d / OPEN_CLIP_VOCAB_FILE).is_file():
        missing = [f for f in CLIP_TOKENIZER_FILES if not (d / f).is_file()]
        raise FileNotFoundError(
            f"{what}: {d} lacks {missing}; expected the CLIP BPE files {list(CLIP_TOKENIZER_FILES)} "
            "(they come with any Hugging Face CLIP repository, e.g. laion/CLIP-ViT-H-14-laion2B-s32B-b79K)"
            f" or open_clip's {OPEN_CLIP_VOCAB_FILE} (inside the open_clip_torch package)"
        )
    try:
        if hf and use_folder_config and ((d / "tokenizer_config.json").is_file() or (d / "tokenizer.json").is_file()):
            tok = CLIPTokenizer.from_pretrained(str(d), local_files_only=True)
        else:
            if hf:
                vocab = json.loads((d / "vocab.json").read_text(encoding="utf-8"))
                lines = (d / "merges.txt").read_text(encoding="utf-8").split("\n")
                merges = [tuple(m.split()) for m in lines if m.strip() and not m.startswith("#version")]
            else:
                vocab, merges = read_open_clip_bpe(d / OPEN_CLIP_VOCAB_FILE)
            tok = CLIPTokenizer(vocab=vocab, merges=merges)
    except Exception as e:
        raise ValueError(f"{what}: could not build a CLIP tokenizer from {d}: {type(e).__name__}: {e}") from e
    if tok.eos_token_id is None:
        raise ValueError(f"{what}: tokenizer in {d} has no end-of-text token (<|endoftext|>)")
    return tok


def load_bert_tokenizer(vocab_file: str | os.PathLike, what: str = "BERT tokenizer"):
    """bert-base-uncased WordPiece tokenizer from `vocab.txt`, with BLIP's [DEC] and [ENC] added.

    BLIP adds [DEC] as bos token and [ENC] as an extra special token, giving 30524 ids for
    the real vocabulary, the size of ImageReward's word embedding.
    """
    from transformers import BertTokenizer

    p = Path(vocab_file)
    if not p.is_file():
        raise FileNotFoundError(
            f"{what}: vocab file {p} not found; expected bert-base-uncased's {BERT_VOCAB_FILE} "
            "(from the Hugging Face repository google-bert/bert-base-uncased)"
        )
    try:
        tok = BertTokenizer(vocab=str(p), do_lower_case=True)
    except Exception as e:
        raise ValueError(f"{what}: could not read {p} as a WordPiece vocab: {type(e).__name__}: {e}") from e
    for t in ("[CLS]", "[SEP]", "[PAD]", "[UNK]"):
        if t not in tok.get_vocab():
            raise ValueError(f"{what}: {p} has no {t} token; expected a BERT vocab.txt")
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok
