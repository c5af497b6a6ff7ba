"""The FLUX velocity model ("policy") used by the engine.

`FluxPolicy` wraps a diffusers `FluxTransformer2DModel` behind the core interface
`v = policy(x, sigma, cond)` with UNPACKED latents x[B, 16, H, W]. Base weights are
frozen; a peft LoRA adapter holds the only trainable parameters. `policy.reference()`
switches the adapters off (the frozen base model, used for KL terms and checks).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, asdict
from typing import Iterator, Mapping, Sequence

import torch
from torch import nn

# Linear layers that receive LoRA by default (Flow-GRPO's FLUX choice, see REFERENCES.md).
# peft matches these as name suffixes, so "attn.to_q" covers the double-stream AND the
# single-stream blocks; the single blocks have no to_out / add_* / ff layers.
DEFAULT_LORA_TARGETS: tuple[str, ...] = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
)

ADAPTER_NAME = "default"


@dataclass
class LoraSettings:
    """LoRA hyper-parameters: rank r, alpha (scale = alpha / r) and target module suffixes."""

    rank: int = 32
    alpha: float = 64.0
    targets: Sequence[str] = field(default_factory=lambda: DEFAULT_LORA_TARGETS)
    dropout: float = 0.0
    init_seed: int = 0  # seeds lora_A's random init, so a run starts from the same adapter every time

    def __post_init__(self):
        if int(self.rank) != self.rank or self.rank < 1:
            raise ValueError(f"LoraSettings.rank must be a positive integer, got {self.rank!r}")
        self.rank = int(self.rank)
        if not (float(self.alpha) > 0):
            raise ValueError(f"LoraSettings.alpha must be > 0, got {self.alpha!r}")
        self.alpha = float(self.alpha)
        if isinstance(self.targets, str):
            self.targets = [t.strip() for t in self.targets.split(",") if t.strip()]
        self.targets = tuple(self.targets)
        if not self.targets:
            raise ValueError("LoraSettings.targets must name at least one module (e.g. 'attn.to_q')")
        if not (0.0 <= self.dropout < 1.0):
            raise ValueError(f"LoraSettings.dropout must be in [0, 1), got {self.dropout!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["targets"] = list(self.targets)
        return d


def default_dtype(device: torch.device | str | None) -> torch.dtype:
    """bf16 on CUDA, fp32 elsewhere (CPU bf16 matmuls are slow and imprecise)."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    return torch.bfloat16 if dev.type == "cuda" else torch.float32


# ---------------------------------------------------------------- latent packing
def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/2)(W/2), 4C]: each 2x2 patch becomes one token (FLUX layout)."""
    b, c, h, w = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"FLUX latents need even height and width to pack 2x2, got {h}x{w}")
    x = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of `pack_latents`: [B, (H/2)(W/2), 4C] -> [B, C, H, W] (H, W in latent pixels)."""
    b, n, d = tokens.shape
    if n != (height // 2) * (width // 2) or d % 4:
        raise ValueError(
            f"cannot unpack {tuple(tokens.shape)} tokens into a {height}x{width} latent "
            f"(expected {(height // 2) * (width // 2)} tokens of a multiple-of-4 width)"
        )
    x = tokens.reshape(b, height // 2, width // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, height, width)


def latent_image_ids(h2: int, w2: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """RoPE position ids [h2*w2, 3] for a grid of packed tokens: (0, row, col)."""
    ids = torch.zeros(h2, w2, 3, device=device, dtype=dtype)
    ids[..., 1] = torch.arange(h2, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(w2, device=device, dtype=dtype)[None, :]
    return ids.reshape(h2 * w2, 3)


# ---------------------------------------------------------------- the policy
def check_velocity_inputs(policy, x: torch.Tensor, sigma, cond: Mapping[str, torch.Tensor],
                          encode_hint: str) -> torch.Tensor:
    """The checks every FLUX velocity model makes of ``v = policy(x, sigma, cond)``; returns sigma
    as [B] on the policy's device (a scalar is broadcast)."""
    name = type(policy).__name__
    if x.ndim != 4 or x.shape[1] != policy.latent_channels:
        raise ValueError(f"{name} expects unpacked latents [B, {policy.latent_channels}, H, W], got {tuple(x.shape)}")
    b = x.shape[0]
    for key in ("prompt_embeds", "pooled_prompt_embeds"):
        if key not in cond:
            raise ValueError(f"cond is missing '{key}' (have {sorted(cond)}); {encode_hint}")
        if cond[key].shape[0] != b:
            raise ValueError(f"cond['{key}'] has batch {cond[key].shape[0]}, latents have batch {b}")
    sigma = torch.as_tensor(sigma, device=policy.device)
    if sigma.ndim == 0:
        sigma = sigma.expand(b)
    if sigma.shape != (b,):
        raise ValueError(f"sigma must have shape [{b}], got {tuple(sigma.shape)}")
    return sigma


class FluxPolicy(nn.Module):
    """FLUX transformer as a core velocity model: `v = policy(x[B,16,H,W], sigma[B], cond)`.

    Args:
        transformer: a diffusers `FluxTransformer2DModel` (any size).
        lora: LoRA settings; None gives a frozen model without adapters (inference only).
        guidance: value of the distilled guidance embedding (FLUX.1-dev: 3.5); ignored
            by models without a guidance embedding (schnell).
        gradient_checkpointing: recompute transformer blocks in backward (saves memory).
        dtype: weights/compute dtype of the base model; "auto" = bf16 on CUDA, fp32 on CPU;
            None keeps the transformer's dtype. LoRA weights are always kept in fp32.
        device: move the transformer there first (None: leave it where it is).
        compile: wrap the transformer forward in torch.compile.
        base_identity: free-form description of the base weights, written into LoRA files.

    `cond` holds "prompt_embeds" [B, L, D] (T5 sequence) and "pooled_prompt_embeds"
    [B, P] (CLIP pooled). The timestep is passed as sigma in [0, 1]; diffusers' transformer
    multiplies timestep and guidance by 1000 itself (as in FluxPipeline, which passes t/1000).
    The returned velocity has x's shape and dtype.
    """

    def __init__(
        self,
        transformer: nn.Module,
        lora: LoraSettings | None = None,
        guidance: float = 3.5,
        gradient_checkpointing: bool = False,
        dtype: torch.dtype | str | None = "auto",
        device: torch.device | str | None = None,
        compile: bool = False,
        base_identity: Mapping | None = None,
    ):
        super().__init__()
        cfg = getattr(transformer, "config", None)
        if cfg is None or not hasattr(cfg, "in_channels") or not hasattr(transformer, "transformer_blocks"):
            raise TypeError(
                f"FluxPolicy needs a diffusers FluxTransformer2DModel, got {type(transformer).__name__}"
            )
        if cfg.in_channels % 4:
            raise ValueError(f"transformer in_channels={cfg.in_channels} is not 4 x latent channels")
        if device is not None:
            transformer.to(device)
        if dtype == "auto":
            dtype = default_dtype(next(transformer.parameters()).device)
        if dtype is not None and next(transformer.parameters()).dtype != dtype:
            transformer.to(dtype)
        transformer.requires_grad_(False)
        self.transformer = transformer
        self.guidance = float(guidance)
        self.latent_channels = cfg.in_channels // 4
        self.lora_settings = lora
        self.base_identity = dict(base_identity or {})
        self._reference_depth = 0
        if lora is not None:
            self._add_lora(lora)
        if gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        # Kept out of the module registry: a compiled wrapper must not duplicate parameters.
        object.__setattr__(self, "_forward_fn", torch.compile(transformer) if compile else transformer)

    # -- LoRA -------------------------------------------------------------
    def _add_lora(self, lora: LoraSettings) -> None:
        from peft import LoraConfig

        names = [n for n, _ in self.transformer.named_modules()]
        unmatched = [t for t in lora.targets if not any(n == t or n.endswith("." + t) for n in names)]
        if unmatched:
            raise ValueError(
                f"LoRA targets {unmatched} match no module of the FLUX transformer "
                f"(expected suffixes such as {list(DEFAULT_LORA_TARGETS[:4])})"
            )
        config = LoraConfig(
            r=lora.rank,
            lora_alpha=lora.alpha,
            target_modules=list(lora.targets),
            lora_dropout=lora.dropout,
            init_lora_weights=True,  # B = 0: the policy starts exactly at the base model
        )
        # peft draws lora_A from the global RNG: fork it, so the init is reproducible and
        # the caller's random stream is left untouched
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(lora.init_seed)
            self.transformer.add_adapter(config, adapter_name=ADAPTER_NAME)
        # Optimise LoRA in fp32 even over a bf16 base (peft casts activations to A's dtype).
        for name, p in self.transformer.named_parameters():
            if "lora_" in name:
                p.data = p.data.float()
                p.requires_grad_(True)

    @property
    def has_lora(self) -> bool:
        return self.lora_settings is not None

    def lora_parameters(self) -> dict[str, nn.Parameter]:
        """Trainable LoRA parameters by their transformer module name (peft naming)."""
        return {n: p for n, p in self.transformer.named_parameters() if "lora_" in n}

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """Within this context the forward pass is the frozen base model (adapters off)."""
        if not self.has_lora:
            yield
            return
        if self._reference_depth == 0:
            self.transformer.disable_adapters()
        self._reference_depth += 1
        try:
            yield
        finally:
            self._reference_depth -= 1
            if self._reference_depth == 0:
                self.transformer.enable_adapters()

    # -- forward ------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.x_embedder.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.transformer.x_embedder.weight.device

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: Mapping[str, torch.Tensor]) -> torch.Tensor:
        sigma = check_velocity_inputs(self, x, sigma, cond, "use the FLUX text encoder/cache")
        b, _, h, w = x.shape
        device, dtype = self.device, self.dtype
        enc = cond["prompt_embeds"].to(device=device, dtype=dtype)
        pooled = cond["pooled_prompt_embeds"].to(device=device, dtype=dtype)
        guidance = None
        if getattr(self.transformer.config, "guidance_embeds", False):
            # FluxPipeline passes guidance in fp32; the transformer casts and scales by 1000.
            guidance = torch.full((b,), self.guidance, device=device, dtype=torch.float32)
        out = self._forward_fn(
            hidden_states=pack_latents(x.to(device=device, dtype=dtype)),
            encoder_hidden_states=enc,
            pooled_projections=pooled,
            timestep=sigma.to(dtype),
            img_ids=latent_image_ids(h // 2, w // 2, device=device, dtype=dtype),
            txt_ids=torch.zeros(enc.shape[1], 3, device=device, dtype=dtype),
            guidance=guidance,
            return_dict=False,
        )[0]
        return unpack_latents(out, h, w).to(x.dtype)
