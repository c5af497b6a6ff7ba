"""Dynamic-TreeRPO core library: pure torch / diffusers / transformers / peft / accelerate.

Never imports ComfyUI. One module per concept of the paper: schedule, sde, tree, window,
advantages, losses, trainer, presets; models/ (FLUX) and rewards/ (reward models).
"""

import logging as _logging


class _NoTorchvisionFallbackNotice(_logging.Filter):
    """transformers >= 5 warns once per image processor that it falls back to its PIL version when
    torchvision is missing, on every `import diffusers.FluxPipeline`. We never use torchvision
    (rewards preprocess with PIL themselves), so the notice is noise a user cannot act on."""

    def filter(self, record: _logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


_logging.getLogger("transformers.utils.import_utils").addFilter(_NoTorchvisionFallbackNotice())
