"""Dynamic-TreeRPO core library: pure torch / diffusers / transformers / peft / accelerate.

Never imports ComfyUI. One module per concept of the paper: schedule, sde, tree, window,
advantages, losses, trainer, presets; models/ (FLUX) and rewards/ (reward models).
"""
