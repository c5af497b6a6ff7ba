"""Prompt embeddings for FLUX (T5 sequence + CLIP pooled), computed once and cached on disk.

`FluxTextEncoder(files, cache_dir)` is the engine's `encode(prompts) -> list[dict]`. A
prompt already in the cache is read back from a small safetensors file; only misses build
the text encoders (T5-XXL alone is ~9 GB in bf16), and the encoders are freed right after.
The cache key is (prompt text, encoder identity, max sequence length), so changing the
encoder files or the length never returns stale embeddings.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import torch

from ..checkpoint import atomic_save_safetensors
from .build import load_text_encoders
from .flux_policy import default_dtype

CACHE_FORMAT = "treerpo-flux-text-v1"


def default_cache_dir() -> Path:
    """$TREERPO_CACHE/text_embeddings, else ~/.cache/treerpo/text_embeddings."""
    base = os.environ.get("TREERPO_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "treerpo")
    return Path(base) / "text_embeddings"


class EmbeddingCache:
    """On-disk cache of per-prompt embeddings, one safetensors file per prompt."""

    def __init__(
        self, directory: str | os.PathLike, encoder_id: str, max_sequence_length: int, memory_items: int = 256
    ):
        self.directory = Path(directory)
        self.encoder_id = str(encoder_id)
        self.max_sequence_length = int(max_sequence_length)
        self._memory: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self._memory_items = memory_items

    def key(self, prompt: str) -> str:
        blob = json.dumps([CACHE_FORMAT, prompt, self.encoder_id, self.max_sequence_length], ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:40]

    def path(self, prompt: str) -> Path:
        return self.directory / f"{self.key(prompt)}.safetensors"

    def get(self, prompt: str) -> dict[str, torch.Tensor] | None:
        k = self.key(prompt)
        if k in self._memory:
            self._memory.move_to_end(k)
            return self._memory[k]
        p = self.directory / f"{k}.safetensors"
        if not p.is_file():
            return None
        from safetensors import safe_open

        try:
            with safe_open(str(p), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("prompt") != prompt or meta.get("encoder_id") != self.encoder_id:
                    return None  # hash collision or foreign file: recompute
                out = {n: f.get_tensor(n) for n in f.keys()}
        except Exception:
            return None  # unreadable (e.g. disk full during an old write): recompute and overwrite
        self._remember(k, out)
        return out

    def put(self, prompt: str, tensors: dict[str, torch.Tensor]) -> None:
        k = self.key(prompt)
        atomic_save_safetensors(
            tensors,
            self.directory / f"{k}.safetensors",
            metadata={
                "format": "pt",
                "cache_format": CACHE_FORMAT,
                "prompt": prompt,
                "encoder_id": self.encoder_id,
                "max_sequence_length": str(self.max_sequence_length),
            },
        )
        self._remember(k, {n: v.detach().cpu() for n, v in tensors.items()})

    def _remember(self, k, v):
        self._memory[k] = v
        self._memory.move_to_end(k)
        while len(self._memory) > self._memory_items:
            self._memory.popitem(last=False)


@torch.no_grad()
def encode_with_models(
    prompts: Sequence[str], clip_tok, clip, t5_tok, t5, max_sequence_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exactly FluxPipeline.encode_prompt: CLIP pooled output (77 tokens) + T5 last hidden state."""
    ids = clip_tok(
        list(prompts), padding="max_length", max_length=clip_tok.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    pooled = clip(ids.to(clip.device), output_hidden_states=False).pooler_output
    ids2 = t5_tok(
        list(prompts), padding="max_length", max_length=max_sequence_length, truncation=True, return_tensors="pt"
    ).input_ids
    seq = t5(ids2.to(t5.device), output_hidden_states=False)[0]
    return seq, pooled


class FluxTextEncoder:
    """`encode(prompts) -> [{"prompt_embeds": [1,L,D], "pooled_prompt_embeds": [1,P]}, ...]`.

    Args:
        files: `FluxFiles` with text encoders and tokenizers (only opened on cache misses).
        cache_dir: where embeddings are stored (default `default_cache_dir()`).
        max_sequence_length: T5 tokens (FLUX.1-dev 512, schnell 256; default from files).
        device / dtype: where encoders run and what the returned tensors are ("auto": bf16
            on CUDA, fp32 on CPU).
        batch_size: prompts per encoder forward on a cache miss.
        keep_loaded: keep the encoders in memory after a miss (default: free them).

    Attributes `hits`, `misses` and `encoder_loads` count what happened.
    """

    def __init__(
        self,
        files,
        cache_dir: str | os.PathLike | None = None,
        max_sequence_length: int | None = None,
        device="cpu",
        dtype: torch.dtype | str = "auto",
        batch_size: int = 8,
        keep_loaded: bool = False,
    ):
        self.files = files
        self.device = torch.device(device)
        self.dtype = default_dtype(self.device) if dtype == "auto" else dtype
        self.max_sequence_length = int(max_sequence_length or files.max_sequence_length)
        if not 1 <= self.max_sequence_length <= 512:
            raise ValueError(
                f"max_sequence_length must be in 1..512 (T5 limit in FLUX), got {self.max_sequence_length}"
            )
        self.batch_size = int(batch_size)
        self.keep_loaded = keep_loaded
        files._require_text()  # fail now, not on the first miss
        self.cache = EmbeddingCache(
            cache_dir if cache_dir is not None else default_cache_dir(),
            # the dtype is part of the identity: bf16 and fp32 embeddings differ
            f"{files.text_encoder_identity()}:{str(self.dtype).replace('torch.', '')}",
            self.max_sequence_length,
        )
        self._models = None
        self.hits = self.misses = self.encoder_loads = 0

    def __call__(self, prompts: Sequence[str]) -> list[dict[str, torch.Tensor]]:
        if isinstance(prompts, str):
            raise TypeError("encode() takes a list of prompts, got a single string")
        prompts = list(prompts)
        found = {p: self.cache.get(p) for p in dict.fromkeys(prompts)}
        todo = [p for p, v in found.items() if v is None]
        self.hits += sum(v is not None for v in found.values())
        if todo:
            self.misses += len(todo)
            try:
                models = self._load()
                for i in range(0, len(todo), self.batch_size):
                    chunk = todo[i : i + self.batch_size]
                    seq, pooled = encode_with_models(chunk, *models, self.max_sequence_length)
                    for j, p in enumerate(chunk):
                        entry = {
                            "prompt_embeds": seq[j : j + 1].to(self.dtype).cpu(),
                            "pooled_prompt_embeds": pooled[j : j + 1].to(self.dtype).cpu(),
                        }
                        self.cache.put(p, entry)
                        found[p] = entry
            finally:
                if not self.keep_loaded:
                    self.release()
        return [{k: v.to(self.device) for k, v in found[p].items()} for p in prompts]

    def _load(self):
        if self._models is None:
            self._models = load_text_encoders(self.files, dtype=self.dtype, device=self.device)
            self.encoder_loads += 1
        return self._models

    def release(self) -> None:
        """Free the text encoders (they are rebuilt on the next cache miss)."""
        if self._models is not None:
            self._models = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
