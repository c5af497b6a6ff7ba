"""TreeRPO model from ComfyUI: the TREERPO_MODEL bundle over the MODEL, CLIP and VAE that ComfyUI's own
loaders made (Load Diffusion Model, DualCLIPLoader, Load VAE), so training uses the weights already
in the graph, in the dtype ComfyUI loaded them (fp8 included). The policy, text and decode glue live
in comfy_flux.py."""

from __future__ import annotations

from comfy_api.latest import io

from .common import CATEGORY, FluxModel, ModelBundle, grad_enabled, torch_device


class ComfyModelSource(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TreeRPOComfyModel",
            display_name="TreeRPO model from ComfyUI",
            category=CATEGORY,
            description="Trains on the FLUX MODEL, CLIP and VAE from ComfyUI's own loaders (Load Diffusion Model, "
                        "DualCLIPLoader type flux, Load VAE): a LoRA made of ComfyUI's weight adapters on the weights "
                        "as loaded (bf16, fp16 or fp8), prompts encoded once with the CLIP, leaves decoded with the "
                        "VAE. Saved LoRAs load with LoraLoaderModelOnly.",
            inputs=[
                io.Model.Input("model", tooltip="FLUX.1 from Load Diffusion Model (weight_dtype default or fp8_e4m3fn) "
                                                "or Load Checkpoint. GGUF models are refused (their layers ignore "
                                                "ComfyUI's weight adapters)."),
                io.Clip.Input("clip", tooltip="The FLUX text encoders (DualCLIPLoader: clip_l + t5xxl, type flux). "
                                              "Each training prompt is encoded once and kept."),
                io.Vae.Input("vae", tooltip="The FLUX autoencoder (Load VAE: ae.safetensors), decodes the leaves "
                                            "for the rewards."),
                io.Int.Input("lora_rank", default=32, min=1, max=512, tooltip="LoRA rank r (trainable size)."),
                io.Float.Input("lora_alpha", default=64.0, min=0.01, max=4096.0, step=0.5,
                               tooltip="LoRA alpha; the adapter is scaled by alpha / rank."),
                io.String.Input("lora_targets", default="", multiline=False,
                                tooltip="Comma-separated layer suffixes that get a LoRA, in ComfyUI's names "
                                        "(img_attn.qkv, img_attn.proj, img_mlp.0, txt_attn.qkv, linear1, "
                                        "linear2, ...) or Load FLUX's (attn.to_q, ...: q, k, v are one fused "
                                        "layer here); empty = every attention and feed-forward layer."),
                io.Float.Input("guidance", default=3.5, min=0.0, max=100.0, step=0.1,
                               tooltip="FLUX.1-dev's distilled guidance (as FluxGuidance); schnell ignores it."),
                io.Boolean.Input("gradient_checkpointing", default=False,
                                 tooltip="Recompute each transformer block in backward: much less memory, slower."),
            ],
            outputs=[FluxModel.Output(display_name="model",
                                      tooltip="The trainable bundle for the trainer, tree sampler and preview.")],
        )

    @classmethod
    def execute(cls, model, clip, vae, lora_rank, lora_alpha, lora_targets, guidance,
                gradient_checkpointing) -> io.NodeOutput:
        from ..core.models import LoraSettings
        from ..core.training_run import trainable_snapshot
        from .comfy_flux import COMFY_LORA_TARGETS, NotSupportedModel, comfy_flux_stack

        targets = [t.strip() for t in str(lora_targets).split(",") if t.strip()]
        try:
            with grad_enabled():  # adapters made under inference mode could not be trained
                lora = LoraSettings(rank=lora_rank, alpha=lora_alpha, targets=targets or COMFY_LORA_TARGETS)
                stack = comfy_flux_stack(model, clip, vae, lora, guidance=guidance,
                                         gradient_checkpointing=gradient_checkpointing)
        except NotSupportedModel as e:
            raise ValueError(f"TreeRPO model from ComfyUI: {e}") from None
        policy = stack.policy
        source = f"ComfyUI MODEL ({type(model.model).__name__}, weights {policy.weight_dtype}, compute {policy.dtype})"
        bundle = ModelBundle(stack=stack, source=source, initial_state=trainable_snapshot(policy),
                             device=torch_device())
        return io.NodeOutput(bundle)


NODES = [ComfyModelSource]
