"""Tokenizers from local files only: the CLIP BPE tokenizer and BLIP's BERT tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["load_clip_tokenizer", "load_bert_tokenizer", "CLIP_TOKENIZER_FILES", "BERT_VOCAB_FILE"]

CLIP_TOKENIZER_FILES = ("vocab.json", "merges.txt")
BERT_VOCAB_FILE = "vocab.txt"


def load_clip_tokenizer(folder: str | os.PathLike, what: str = "CLIP tokenizer"):
    """CLIP BPE tokenizer (transformers CLIPTokenizer) from vocab.json + merges.txt in `folder`.

    If the folder also holds tokenizer_config.json / tokenizer.json (a Hugging Face
    processor folder), it is loaded with from_pretrained so its settings apply.
    """
    from transformers import CLIPTokenizer

    d = Path(folder)
    missing = [f for f in CLIP_TOKENIZER_FILES if not (d / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{what}: {d} lacks {missing}; expected the CLIP BPE files {list(CLIP_TOKENIZER_FILES)} "
            "(they come with any Hugging Face CLIP repository, e.g. laion/CLIP-ViT-H-14-laion2B-s32B-b79K)"
        )
    try:
        if (d / "tokenizer_config.json").is_file() or (d / "tokenizer.json").is_file():
            tok = CLIPTokenizer.from_pretrained(str(d), local_files_only=True)
        else:
            tok = CLIPTokenizer(vocab=str(d / "vocab.json"), merges=str(d / "merges.txt"))
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
