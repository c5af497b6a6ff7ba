"""ComfyUI nodes (new node API, comfy_api.latest). Thin adapters over treerpo.core.

Imported only from the package's comfy_entrypoint(), so ComfyUI is never needed to use
the core library.
"""

from comfy_api.latest import ComfyExtension


class TreeRPOExtension(ComfyExtension):
    async def get_node_list(self):
        # The node set (loader, reward, trainer, tree viewer, save LoRA) is built on the core
        # engine in the nodes work item; until then the pack registers no nodes.
        return []
