"""Dynamic-TreeRPO for ComfyUI.

Import-light on purpose: ``import treerpo.core`` must work where ComfyUI is absent,
so the ComfyUI nodes are imported only inside ``comfy_entrypoint()``.
"""

__version__ = "0.1.0"


async def comfy_entrypoint():
    """ComfyUI's entry point for packs on the new node API (comfy_api.latest)."""
    from .nodes import extension

    return extension()
