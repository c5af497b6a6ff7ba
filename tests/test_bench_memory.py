"""`treerpo bench memory`: the saved-for-backward byte counts behind the FLUX.1-dev memory plan, on
a tiny FLUX (the counts are exact, so the checks are equalities or tight bounds)."""

import json

import pytest
import torch

from treerpo.cli import bench_memory as bm
from treerpo.cli.main import main
from treerpo.core.models import FluxPolicy, LoraSettings


@pytest.fixture(scope="module")
def policy():
    """flux-narrow's transformer shape with 2 double + 3 single blocks, bf16 base and fp32 LoRA
    (the GPU setting), so per-block counts can be compared between blocks of a kind."""
    from diffusers import FluxTransformer2DModel

    from treerpo.testing import TINY_TRANSFORMER_CONFIG

    torch.manual_seed(0)
    tr = FluxTransformer2DModel(**dict(TINY_TRANSFORMER_CONFIG, num_layers=2, num_single_layers=3))
    tr.to(torch.bfloat16)
    return FluxPolicy(tr, lora=LoraSettings(rank=4, alpha=4), dtype=None)


def test_saved_bytes_checkpointing_linearity_and_scaling(policy):
    w = policy.transformer.config.num_attention_heads * policy.transformer.config.attention_head_dim
    a = bm.count_saved(policy, ("tokens", 64), text_tokens=16)
    b = bm.count_saved(policy, ("tokens", 128), text_tokens=16)
    c = bm.count_saved(policy, ("tokens", 64), text_tokens=16, checkpointing=True)
    two = bm.count_saved(policy, ("tokens", 64), text_tokens=16, batch=2)
    assert a["image_tokens"] == 64 and b["image_tokens"] == 128
    # deterministic: the same forward counts the same bytes
    assert bm.count_saved(policy, ("tokens", 64), text_tokens=16) == a
    # blocks of one kind save the same, but the first double block saves less: its inputs come
    # from the embedders and need no grad (the scaling uses the last block of a kind for the rest)
    assert a["double"][0] < a["double"][1] and len(set(a["single"])) == 1
    assert min(a["double"] + a["single"]) > 0
    # checkpointing keeps only each block's inputs: hidden (image) + encoder (text) states in bf16
    held = (64 + 16) * w * 2
    assert c["double"] == [held] * 2 and c["single"] == [held] * 3
    assert all(x < y / 5 for x, y in zip(c["double"] + c["single"], a["double"] + a["single"]))
    assert c["rest"] == a["rest"]
    # linear in tokens: bytes per (image + text) token agree within 2 % between 80 and 144 tokens
    # (measured: within 0.5 %; the time/modulation tensors are per row, not per token)
    for kind in ("double", "single"):
        pa, pb = a[kind][-1] / (64 + 16), b[kind][-1] / (128 + 16)
        assert abs(pa - pb) / pb < 0.02, (kind, pa, pb)
    # linear in rows: two rows save twice the bytes of one, block by block
    assert two["double"] == [2 * x for x in a["double"]] and two["single"] == [2 * x for x in a["single"]]
    # the scaled table's arithmetic: rest + shared + 19 double + 38 single, times the rows
    s = bm.scaled_activations(a, c, 19, 38, rows=4)
    d, g = a["double"][1], a["single"][0]
    assert s["no_checkpointing"] == 4 * (a["rest"] + a["shared"] + a["double"][0] + 18 * d + 38 * g)
    assert s["checkpointing"] == 4 * (c["rest"] + c["shared"] + 19 * held + 38 * held + max(d, g))
    assert s["checkpointing"] < s["no_checkpointing"]
    # the counts of this 2 + 3 model are exactly the scaled counts of 2 + 3 blocks
    assert bm.scaled_activations(a, c, 2, 3, rows=1)["no_checkpointing"] == \
        a["rest"] + a["shared"] + sum(a["double"]) + sum(a["single"])
    # linear extrapolation reproduces a count it did not see
    e = bm.extrapolate(a, b, 192)
    f = bm.count_saved(policy, ("tokens", 192), text_tokens=16)
    for kind in ("double", "single"):
        assert abs(e[kind][-1] - f[kind][-1]) / f[kind][-1] < 0.01


def test_flux_dev_sizes_from_the_real_config():
    s = bm.flux_sizes(rank=32)
    assert 11.8e9 < s["transformer_params"] < 12.0e9  # FLUX.1-dev: 11.9 B parameters
    # LoRA r=32 on the default targets: per double block 12 linears, per single block q, k, v
    lora_double = 32 * (8 * (3072 + 3072) + 2 * (3072 + 12288) + 2 * (12288 + 3072))
    lora_single = 32 * 3 * (3072 + 3072)
    assert s["lora_params"] == 19 * lora_double + 38 * lora_single
    assert s["comfy_adapted_params_total"] == 19 * s["comfy_adapted_params_double"] + \
        38 * s["comfy_adapted_params_single"]


def test_bench_memory_cli_tiny(tmp_path, capsys):
    out = tmp_path / "mem.json"
    from treerpo.cli.errors import BadInput

    with pytest.raises(BadInput, match="unknown size preset"):  # a size preset only (random weights)
        main(["bench", "memory", "--model", "tiny"])
    capsys.readouterr()
    assert main(["bench", "memory", "--model", "flux-narrow:1:1", "--max-tokens", "64", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Memory plan for FLUX.1-dev" in text and "extrapolated" in text
    res = json.loads(out.read_text())
    rows = res["plan"]["rows"]
    assert {r["resolution"] for r in rows} == {512, 720} and {r["micro_batch"] for r in rows} == {1, 2, 4}
    for r in rows:
        fixed = res["plan"]["fixed"]
        assert r["total"] == (fixed[f"weights_{r['weights']}"] + fixed["lora_adamw_fp32"]
                              + fixed["reward_models_bf16"] + fixed["vae_decoder_bf16"]
                              + r["activations"] + r["comfy_weight_copies"])
