"""ComfyUI nodes (new node API, comfy_api.latest). Thin adapters over treerpo.core.

Imported only from the package's comfy_entrypoint(), so ComfyUI is never needed to use
the core library. One module per group of nodes; common.py holds the TREERPO_* socket
types and the ComfyUI glue; choices.py the nodes' pure decisions, which import no ComfyUI
module (this file imports none at import time either, so the fast tests can reach them).
"""


def extension():
    """The pack's ComfyExtension (ComfyUI is imported here, not when the package is)."""
    from comfy_api.latest import ComfyExtension

    from . import comfy_model, evaluate, lora, models, plots, prompts, rewards, train, tree
    from .common import register_folders

    class TreeRPOExtension(ComfyExtension):
        async def on_load(self) -> None:
            register_folders()

        async def get_node_list(self):
            register_folders()  # before any schema lists the folders' files
            return [*models.NODES, *comfy_model.NODES, *prompts.NODES, *rewards.NODES, *tree.NODES, *train.NODES,
                    *lora.NODES, *plots.NODES, *evaluate.NODES]

    return TreeRPOExtension()
