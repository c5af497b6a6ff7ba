"""Reward interface, RewardSet masking/metrics, weight-free rewards, preprocessing, file checks."""

import logging
import math

import numpy as np
import pytest
import torch
from PIL import Image

from reward_fixtures import Opaque
from treerpo.core.rewards import (
    Brightness,
    Colourfulness,
    JPEGCompressibility,
    JPEGIncompressibility,
    Reward,
    RewardSet,
    Saturation,
    canonical_reward_name,
    load_reward,
    load_rewards,
    parse_reward_spec,
)
from treerpo.core.rewards.checkpoints import (
    check_state_dict_keys,
    detect_checkpoint_format,
    load_state_dict_file,
    save_safetensors_atomic,
)
from treerpo.core.rewards.preprocess import (
    hps_preprocess,
    imagereward_preprocess,
    normalize,
    resize_longest_and_pad,
    resize_shortest_and_center_crop,
)


class Fixed(Reward):
    """Returns preset values (may contain NaN/inf) to exercise RewardSet."""

    def __init__(self, name, values):
        super().__init__()
        self.name = name
        self.values = torch.tensor(values, dtype=torch.float32)
        self.calls = 0

    def _score(self, images, prompts):
        self.calls += 1
        return self.values[: images.shape[0]].clone()


def imgs(n=3, h=8, w=8):
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------------- RewardSet
def test_rewardset_shape_names_weights():
    rs = RewardSet([Fixed("a", [1.0, 2.0, 3.0]), Fixed("b", [0.5, 0.25, 0.0])], [1.0, 2.0])
    s = rs(imgs(), ["p", "q", "r"])
    assert s.shape == (3, 2) and s.dtype == torch.float32 and s.device.type == "cpu"
    assert rs.names == ["a", "b"] and rs.weights == [1.0, 2.0]
    assert torch.equal(s[:, 0], torch.tensor([1.0, 2.0, 3.0]))
    assert torch.allclose(rs.weighted_sum(s), torch.tensor([2.0, 2.5, 3.0]))
    m = rs.last_metrics
    assert m["reward/a/mean"] == pytest.approx(2.0) and m["reward/b/max"] == pytest.approx(0.5)
    assert m["reward/masked_samples"] == 0.0


def test_rewardset_masks_nan_and_inf(caplog):
    rs = RewardSet([Fixed("a", [1.0, float("nan"), 3.0, 4.0]), Fixed("b", [0.0, 1.0, float("inf"), 2.0])])
    with caplog.at_level(logging.WARNING):
        s = rs(imgs(4), ["p"] * 4)
    # inf is reported as NaN so one isnan/isfinite test catches both.
    assert torch.isnan(s[1, 0]) and torch.isnan(s[2, 1]) and not torch.isinf(s).any()
    assert rs.valid_mask(s).tolist() == [True, False, False, True]
    ws = rs.weighted_sum(s)
    assert torch.isnan(ws[1]) and torch.isnan(ws[2]) and ws[0] == 1.0 and ws[3] == 6.0
    m = rs.last_metrics
    assert m["reward/a/nonfinite"] == 1.0 and m["reward/b/nonfinite"] == 1.0
    assert m["reward/masked_samples"] == 2.0
    # statistics only over finite entries
    assert m["reward/a/mean"] == pytest.approx((1 + 3 + 4) / 3)
    assert m["reward/b/mean"] == pytest.approx(1.0)
    assert "'a'" in caplog.text and "'b'" in caplog.text


def test_non_finite_pixels_are_not_scored():
    r = Brightness()
    x = imgs(3)
    x[1, 0, 2, 2] = float("nan")
    s = r(x, ["a", "b", "c"])
    assert torch.isnan(s[1]) and torch.isfinite(s[[0, 2]]).all()
    assert torch.allclose(s[[0, 2]], r(x[[0, 2]], ["a", "c"]))


def test_rewardset_validation_errors():
    with pytest.raises(ValueError, match="at least one"):
        RewardSet([])
    with pytest.raises(ValueError, match="duplicate"):
        RewardSet([Fixed("a", [1.0]), Fixed("a", [1.0])])
    with pytest.raises(ValueError, match="2 rewards but 1 weights"):
        RewardSet([Fixed("a", [1.0]), Fixed("b", [1.0])], [1.0])
    with pytest.raises(ValueError, match="finite"):
        RewardSet([Fixed("a", [1.0])], [float("nan")])
    with pytest.raises(ValueError, match="all weights are zero"):
        RewardSet([Fixed("a", [1.0])], [0.0])
    rs = RewardSet([Fixed("a", [1.0, 1.0])])
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        rs(imgs(2), ["only one"])
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        rs(torch.rand(2, 4, 8, 8), ["a", "b"])
    with pytest.raises(TypeError, match="single str"):
        rs(imgs(1), "a prompt")


def test_reward_chunking_matches_single_batch():
    x = imgs(5, 12, 20)
    full = Colourfulness()(x, ["p"] * 5)
    chunked = Colourfulness(batch_size=2)(x, ["p"] * 5)
    assert torch.allclose(full, chunked)


# ---------------------------------------------------------------------------- weight-free rewards
@pytest.mark.parametrize("size", [(32, 32), (48, 80)])
def test_jpeg_ranks_flat_above_noise(size):
    g = torch.Generator().manual_seed(1)
    flat = torch.full((1, 3, *size), 0.5)
    noise = torch.rand(1, 3, *size, generator=g)
    x = torch.cat([flat, noise])
    comp = JPEGCompressibility()(x, ["", ""])
    incomp = JPEGIncompressibility()(x, ["", ""])
    assert comp[0] > comp[1], comp
    assert incomp[1] > incomp[0], incomp
    assert torch.allclose(comp, -incomp)
    # deterministic
    assert torch.equal(comp, JPEGCompressibility()(x, ["", ""]))


def test_jpeg_size_is_pil_quality_95():
    import io

    x = imgs(1, 24, 40)
    arr = (x[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    assert JPEGIncompressibility()(x, [""])[0].item() == pytest.approx(buf.tell() / 1000.0)
    with pytest.raises(ValueError, match="quality"):
        JPEGIncompressibility(quality=0)


def test_brightness_saturation_colourfulness():
    black = torch.zeros(1, 3, 8, 8)
    white = torch.ones(1, 3, 8, 8)
    grey = torch.full((1, 3, 8, 8), 0.5)
    red = torch.zeros(1, 3, 8, 8)
    red[:, 0] = 1.0
    x = torch.cat([black, white, grey, red])
    p = [""] * 4
    b = Brightness()(x, p)
    assert b.tolist() == pytest.approx([0.0, 1.0, 0.5, 0.299], abs=1e-6)
    s = Saturation()(x, p)
    assert s.tolist() == pytest.approx([0.0, 0.0, 0.0, 1.0], abs=1e-6)
    c = Colourfulness()(x, p)
    # red: rg = 1, yb = 0.5 constant -> std 0, mean term 0.3 * sqrt(1.25)
    assert c.tolist() == pytest.approx([0.0, 0.0, 0.0, 0.3 * math.sqrt(1.25)], abs=1e-6)


# ---------------------------------------------------------------------------- preprocessing
def test_resize_longest_and_pad_geometry():
    x = torch.rand(2, 3, 40, 56)
    y = resize_longest_and_pad(x, 32)
    # 40 * 32/56 = 22.86 -> 23 rows; pad 9 = 4 top + 5 bottom (open_clip ResizeMaxSize)
    assert y.shape == (2, 3, 32, 32)
    assert (y[:, :, :4] == 0).all() and (y[:, :, 27:] == 0).all()
    inner = torch.nn.functional.interpolate(x, size=(23, 32), mode="bicubic", antialias=True, align_corners=False)
    assert torch.allclose(y[:, :, 4:27], inner)
    # padded area after normalisation is (0 - mean) / std, as in hpsv2 (pad before normalise)
    z = hps_preprocess(x, 32)
    assert torch.allclose(z[:, :, 0, 0], normalize(torch.zeros(1, 3, 1, 1))[0, :, 0, 0])


def test_center_crop_rounding_conventions():
    # a 24 x 27 image: torchvision rounds (27 - 24) / 2 = 1.5 to 2, transformers floors to 1
    x = torch.arange(27.0).view(1, 1, 1, 27).expand(1, 3, 24, 27) / 27.0
    tv = resize_shortest_and_center_crop(x, 24, 24, crop_rounding="round", uint8_output=False)
    hf = resize_shortest_and_center_crop(x, 24, 24, crop_rounding="floor", uint8_output=False)
    assert tv.shape == hf.shape == (1, 3, 24, 24)
    assert tv[0, 0, 0, 0].item() == pytest.approx(2 / 27) and hf[0, 0, 0, 0].item() == pytest.approx(1 / 27)
    with pytest.raises(ValueError, match="crop_rounding"):
        resize_shortest_and_center_crop(x, 24, 24, crop_rounding="ceil")


def test_imagereward_preprocess_matches_pil_bicubic():
    # ImageReward feeds PIL images through torchvision Resize(224, BICUBIC): PIL's resampler.
    g = torch.Generator().manual_seed(3)
    low = torch.rand(1, 3, 6, 9, generator=g)
    x = torch.nn.functional.interpolate(low, size=(48, 72), mode="bilinear", align_corners=False)
    x = (x * 255).round() / 255
    ours = resize_shortest_and_center_crop(x, 32, 32)
    arr = (x[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    pil = Image.fromarray(arr).resize((48, 32), Image.BICUBIC)  # (w, h): shortest side 48 -> 32
    ref = torch.from_numpy(np.array(pil)).permute(2, 0, 1).float().unsqueeze(0) / 255
    ref = ref[..., :, 8:40]  # CenterCrop(32) of 32 x 48: left = round(8) = 8
    assert torch.equal((ours * 255).round(), (ref * 255).round())  # PIL's bits exactly
    assert torch.allclose(imagereward_preprocess(x, 32), normalize(ours))


# ---------------------------------------------------------------------------- checkpoint files
def test_detect_format_and_wrong_file_type(tmp_path):
    sd = {"w": torch.ones(2)}
    torch.save(sd, tmp_path / "a.pt")
    torch.save(sd, tmp_path / "b.pt", _use_new_zipfile_serialization=False)
    save_safetensors_atomic(sd, tmp_path / "c.safetensors")
    assert detect_checkpoint_format(tmp_path / "a.pt") == "torch-zip"
    assert detect_checkpoint_format(tmp_path / "b.pt") == "torch-pickle"
    assert detect_checkpoint_format(tmp_path / "c.safetensors") == "safetensors"
    for name in ("a.pt", "b.pt", "c.safetensors"):
        assert torch.equal(load_state_dict_file(tmp_path / name)["w"], torch.ones(2))
    (tmp_path / "d.pt").write_text('{"not": "a checkpoint"}')
    with pytest.raises(ValueError, match="d.pt is not a PyTorch checkpoint"):
        load_state_dict_file(tmp_path / "d.pt")
    with pytest.raises(ValueError, match="is a directory"):
        load_state_dict_file(tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_state_dict_file(tmp_path / "nope.pt")
    torch.save([1, 2, 3], tmp_path / "e.pt")
    with pytest.raises(ValueError, match="does not contain a state dict"):
        load_state_dict_file(tmp_path / "e.pt")
    torch.save({"w": torch.ones(1), "step": 3}, tmp_path / "f.pt")
    with pytest.raises(ValueError, match="not a plain state dict"):
        load_state_dict_file(tmp_path / "f.pt")


def test_weights_only_policy_and_trust_opt_in(tmp_path, caplog):
    torch.save({"state_dict": {"w": torch.ones(3)}, "args": Opaque()}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="trust_checkpoint=True"):
        load_state_dict_file(tmp_path / "x.pt")
    with caplog.at_level(logging.WARNING):
        sd = load_state_dict_file(tmp_path / "x.pt", trust_checkpoint=True)
    assert torch.equal(sd["w"], torch.ones(3))
    assert "weights_only=False" in caplog.text and "x.pt" in caplog.text


def test_module_prefix_is_stripped(tmp_path):
    torch.save({"module.a": torch.zeros(1), "module.b": torch.ones(1)}, tmp_path / "m.pt")
    assert sorted(load_state_dict_file(tmp_path / "m.pt")) == ["a", "b"]


def test_strict_key_check_message():
    with pytest.raises(ValueError) as e:
        check_state_dict_keys(["a", "b", "x"], ["a", "b", "c"], source="f.pt", what="thing")
    msg = str(e.value)
    assert "f.pt" in msg and "1 missing keys: c" in msg and "1 unexpected keys: x" in msg
    check_state_dict_keys(["a", "pos"], ["a"], source="f.pt", what="thing", ignorable=["pos"])


def test_atomic_write_leaves_no_temp_files(tmp_path):
    save_safetensors_atomic({"a": torch.arange(4.0)}, tmp_path / "w.safetensors", {"k": "v"})
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


# ---------------------------------------------------------------------------- names and specs
def test_spec_parsing():
    assert parse_reward_spec("hps:1, pickscore:0.5, imagereward") == [
        ("hps", 1.0), ("pickscore", 0.5), ("imagereward", 1.0)]
    assert parse_reward_spec({"HPSv2.1": 2, "colorfulness": 1}) == [("hps", 2.0), ("colourfulness", 1.0)]
    assert parse_reward_spec(["jpeg", ("brightness", 0.1)]) == [("jpeg_compressibility", 1.0), ("brightness", 0.1)]
    assert parse_reward_spec("saturation=0.3") == [("saturation", 0.3)]
    with pytest.raises(ValueError, match="unknown reward 'aesthetic'"):
        parse_reward_spec("aesthetic")
    with pytest.raises(ValueError, match="not a number"):
        parse_reward_spec("hps:high")
    with pytest.raises(ValueError, match="more than once"):
        parse_reward_spec("hps, hpsv2")
    with pytest.raises(ValueError, match="names no reward"):
        parse_reward_spec(" , ")
    assert canonical_reward_name("ImageReward") == "imagereward"


def test_weight_free_set_needs_no_models_dir():
    rs = load_rewards("jpeg_compressibility:1, brightness:0.5")
    assert rs.names == ["jpeg_compressibility", "brightness"] and rs.weights == [1.0, 0.5]
    assert rs(imgs(2, 16, 16), ["a", "b"]).shape == (2, 2)
    assert load_reward("brightness") is load_reward("brightness")  # cached


def test_model_reward_without_models_dir_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.delenv("TREERPO_MODELS_DIR", raising=False)
    with pytest.raises(ValueError, match="models_dir"):
        load_reward("hps")
    with pytest.raises(FileNotFoundError) as e:
        load_reward("imagereward", tmp_path)
    msg = str(e.value)
    assert "ImageReward.pt" in msg and "vocab.txt" in msg and "treerpo_rewards" in msg
    with pytest.raises(FileNotFoundError, match="model.safetensors or pytorch_model.bin"):
        load_reward("pickscore", tmp_path)
    with pytest.raises(FileNotFoundError, match="HPS_v2.1_compressed.pt"):
        load_reward("hps", tmp_path)
