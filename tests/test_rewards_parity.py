"""Parity details with the original reward implementations (issue 8).

- HPS builds its CLIP tokenizer from the vocabulary alone, as open_clip does, even when the
  vocabulary comes from PickScore's processor folder, whose pad_token "!" would otherwise
  turn every "!" into a special token. PickScore keeps that processor behaviour.
- ImageReward and PickScore resize 8-bit PIL images: PIL resamples rows, rounds and clips,
  then columns, with fixed-point weights. Our resize must give PIL's bits on sharp edges.
- open_clip's bpe_simple_vocab_16e6.txt.gz is accepted in place of vocab.json + merges.txt.
"""

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from reward_fixtures import (
    build_models_dir,
    sample_images,
    write_clip_tokenizer,
    write_hps_folder,
    write_open_clip_bpe_gz,
)
from treerpo.core.rewards import clear_reward_cache, load_hps, load_reward
from treerpo.core.rewards import preprocess as P
from treerpo.core.rewards import text as T

BANG = ["a cat!!", "A CAT on a Mat!", "the dog! on the table!!!", "a red cube"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    clear_reward_cache()
    info = build_models_dir(tmp_path_factory.mktemp("models"))
    yield info
    clear_reward_cache()


def _ids(tok, text):
    return tok(text)["input_ids"]


# ---------------------------------------------------------------------------- 1. HPS tokenizer
def test_hps_tokenizer_fallback_keeps_bang_tokens(models, tmp_path):
    ids = models["hps"]["tokenizer"]["ids"]
    bos, eos = ids["<|startoftext|>"], ids["<|endoftext|>"]
    # open_clip splits "cat!!" into "cat" and "!!"; "!!" has no merge: "!" then "!</w>".
    want = [bos, ids["a</w>"], ids["cat</w>"], ids["!"], ids["!</w>"], eos]
    root = tmp_path / "treerpo_rewards"
    shutil.copytree(models["root"] / "treerpo_rewards" / "pickscore" / "processor", root / "pickscore" / "processor")
    (root / "hps").mkdir(parents=True)
    for f in ("HPS_v2.1_compressed.pt", "open_clip_config.json"):
        shutil.copy(models["root"] / "treerpo_rewards" / "hps" / f, root / "hps" / f)
    fallback = load_reward("hps", tmp_path)
    own = load_reward("hps", models["root"])
    assert _ids(fallback.tokenizer, "a cat!!") == want
    assert _ids(own.tokenizer, "a cat!!") == want
    x = sample_images()
    assert torch.allclose(fallback(x, BANG), own(x, BANG), atol=1e-6)


def test_pickscore_keeps_its_processor_pad_token(models):
    # laion's processor registers pad_token "!": transformers then reads each "!" as that
    # special token. PickScore's original code uses this processor, so we keep it.
    ids = models["pickscore"]["tokenizer"]["ids"]
    r = load_reward("pickscore", models["root"])
    assert _ids(r.tokenizer, "a cat!!") == [ids["<|startoftext|>"], ids["a</w>"], ids["cat</w>"], ids["!"], ids["!"],
                                            ids["<|endoftext|>"]]


def test_hps_ignores_tokenizer_settings_in_its_own_folder(models, tmp_path):
    d = tmp_path / "hps"
    info = write_hps_folder(d)
    shutil.copy(models["pickscore"]["processor_dir"] / "tokenizer_config.json", d / "tokenizer_config.json")
    shutil.copy(models["pickscore"]["processor_dir"] / "special_tokens_map.json", d / "special_tokens_map.json")
    r = load_hps(info["checkpoint"], d, open_clip_config=info["config"])
    ids = info["tokenizer"]["ids"]
    assert _ids(r.tokenizer, "dog!")[1:-1] == [ids["dog</w>"], ids["!</w>"]]


# ---------------------------------------------------------------------------- 2. PIL resize
def _sharp_images(n, h, w, seed):
    """8-bit images with hard edges: noise, a checkerboard, stripes and a white square on black."""
    g = torch.Generator().manual_seed(seed)
    out = [torch.randint(0, 256, (3, h, w), generator=g).float()]
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    out.append(((yy // 3 + xx // 3) % 2 * 255.0).expand(3, h, w))
    out.append(((xx % 4 < 2) * 255.0).expand(3, h, w))
    sq = torch.zeros(3, h, w)
    sq[:, h // 4: 3 * h // 4, w // 3: 2 * w // 3] = 255.0
    out.append(sq)
    return (torch.stack(out[:n]) / 255.0).contiguous()


def _pil_resize(x, size):
    arr = (x.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
    res = [np.asarray(Image.fromarray(a).resize((size[1], size[0]), Image.BICUBIC)) for a in arr]
    return torch.from_numpy(np.stack(res)).permute(0, 3, 1, 2).float() / 255


@pytest.mark.parametrize("hw,size", [((97, 131), (32, 43)), ((64, 48), (224, 168)), ((300, 200), (224, 149)),
                                     ((50, 80), (50, 33)), ((40, 40), (17, 40))])
@pytest.mark.parametrize("use_pil", [False, True])
def test_resize_is_pil_bit_for_bit_on_sharp_edges(hw, size, use_pil):
    x = _sharp_images(4, *hw, seed=hw[0])
    ours = P.resize_bicubic_pil(x, size, use_pil=use_pil)
    assert ours.shape == (4, 3) + size
    assert torch.equal((ours * 255).round(), (_pil_resize(x, size) * 255).round())


def test_imagereward_pixels_are_pil_exact():
    # ImageReward: torchvision Resize(n, BICUBIC) on the PIL image, CenterCrop (rounded offset), ToTensor.
    x = _sharp_images(4, 45, 70, seed=5)
    ref = _pil_resize(x, (32, 49))[..., :, 8:40]  # left = round((49 - 32) / 2) = round(8.5) = 8
    assert torch.allclose(P.imagereward_preprocess(x, 32), P.normalize(ref), atol=1e-6)


def test_pickscore_pixels_are_clip_processor_exact(models):
    from transformers import CLIPImageProcessor

    proc = CLIPImageProcessor.from_pretrained(str(models["pickscore"]["processor_dir"]))
    for h, w in [(41, 60), (70, 31)]:
        x = _sharp_images(4, h, w, seed=h)
        pil = [Image.fromarray((im.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()) for im in x]
        ref = torch.as_tensor(np.asarray(proc(images=pil, return_tensors="np")["pixel_values"]))
        ours = P.clip_processor_preprocess(x, 24, 24)
        assert ours.shape == ref.shape
        assert torch.allclose(ours, ref, atol=1e-5), (ours - ref).abs().max()


def test_resize_target_must_be_positive():
    with pytest.raises(ValueError, match="positive"):
        P.resize_bicubic_pil(torch.zeros(1, 3, 8, 8), (0, 4))


# ---------------------------------------------------------------------------- 3. open_clip vocab file
def test_open_clip_gz_gives_the_hf_vocab_and_merges(tmp_path):
    hf = write_clip_tokenizer(tmp_path / "hf")
    write_open_clip_bpe_gz(tmp_path / "bpe_simple_vocab_16e6.txt.gz")
    vocab, merges = T.read_open_clip_bpe(tmp_path / "bpe_simple_vocab_16e6.txt.gz")
    assert vocab == hf["ids"]
    hf_merges = (tmp_path / "hf" / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
    assert [f"{a} {b}" for a, b in merges] == hf_merges
    # the real file holds more merges than open_clip keeps: vocab stays at 49408 ids
    write_open_clip_bpe_gz(tmp_path / "big.txt.gz", extra_merges=49152)
    big, _ = T.read_open_clip_bpe(tmp_path / "big.txt.gz")
    assert len(big) == 49408 and big["<|endoftext|>"] == 49407 and big["<|startoftext|>"] == 49406


def test_hps_loads_with_only_the_open_clip_vocab_file(models, tmp_path):
    d = tmp_path / "treerpo_rewards" / "hps"
    d.mkdir(parents=True)
    src = models["root"] / "treerpo_rewards" / "hps"
    for f in ("HPS_v2.1_compressed.pt", "open_clip_config.json"):
        shutil.copy(src / f, d / f)
    write_open_clip_bpe_gz(d / "bpe_simple_vocab_16e6.txt.gz")
    gz = load_reward("hps", tmp_path)
    own = load_reward("hps", models["root"])
    for p in BANG:
        assert _ids(gz.tokenizer, p) == _ids(own.tokenizer, p)
    x = sample_images()
    assert torch.allclose(gz(x, BANG), own(x, BANG), atol=1e-6)
    tok = T.load_clip_tokenizer(d, use_folder_config=False)
    assert tok.eos_token_id == models["hps"]["tokenizer"]["eos"]


def test_broken_open_clip_vocab_file_is_named(tmp_path):
    (tmp_path / "bpe_simple_vocab_16e6.txt.gz").write_bytes(b"not gzip")
    with pytest.raises(ValueError, match="bpe_simple_vocab_16e6.txt.gz"):
        T.load_clip_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="bpe_simple_vocab_16e6.txt.gz"):
        T.load_clip_tokenizer(tmp_path / "empty")


# ---------------------------------------------------------------------------- open_clip prompt handling
def test_hps_prompts_are_cleaned_and_end_token_text_is_text(models):
    r = load_reward("hps", models["root"])
    x = sample_images(2)
    # open_clip unescapes HTML twice and collapses whitespace before tokenising
    assert torch.allclose(r(x, ["a red &amp;amp; blue\t\tcube"] * 2), r(x, ["a red & blue cube"] * 2), atol=1e-6)
    # a literal "<|endoftext|>" is plain text to open_clip: the only end token is the last one
    ids = models["hps"]["tokenizer"]["ids"]
    got = r.tokenize(["<|endoftext|> cat", "a  &amp;amp; cat!!"]).tolist()
    assert got[0][:4] == [ids["<|startoftext|>"], ids["<"], ids["|</w>"], ids["e"]]
    assert got[0][10:15] == [ids["t</w>"], ids["|"], ids["></w>"], ids["cat</w>"], ids["<|endoftext|>"]]
    assert got[1][:7] == [ids["<|startoftext|>"], ids["a</w>"], ids["&</w>"], ids["cat</w>"], ids["!"], ids["!</w>"],
                          ids["<|endoftext|>"]]
