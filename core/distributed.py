"""Where this process stands in a run started by torch.distributed's launcher (torchrun), read
from the launcher's environment (RANK, WORLD_SIZE, LOCAL_RANK): known before torch is imported (a
rank picks its GPU first) and before the process group exists (accelerate makes it when the
trainer opens; transformers' save_pretrained writes only on rank 0 once a group exists, so the
group must not exist earlier than needed)."""

from __future__ import annotations

import os


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def local_rank() -> int | None:
    v = os.environ.get("LOCAL_RANK")
    return int(v) if v not in (None, "") else None


def is_main() -> bool:
    return rank() == 0
