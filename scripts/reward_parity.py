#!/usr/bin/env python
"""Compare our reward scores with the original implementations on the same images.

NOT part of CI: it needs checkpoints in the models folder layout of docs/rewards.md and,
for the "theirs" side, a second Python environment with the original packages (pinned in
docs/rewards.md, "Checking parity"). Three steps:

1. In this project's environment (transformers 5), score with our loaders::

       python scripts/reward_parity.py ours --models-dir /path/to/models \\
           --images a.png b.png c.png --prompts "a cat" "a dog" "a red cube" --out ours.json

2. In the originals' environment, with the SAME files::

       python scripts/reward_parity.py theirs --models-dir /path/to/models \\
           --images a.png b.png c.png --prompts "a cat" "a dog" "a red cube" --out theirs.json

   hps: hpsv2.img_score.score(paths, prompt, cp=<hps/HPS_v2.1_compressed.pt>, hps_version="v2.1"),
   its model built without the laion2B base weights that the checkpoint replaces anyway
   (--hps-base-weights to download them as hpsv2 does). imagereward:
   ImageReward.load(<imagereward/ImageReward.pt>, med_config=<med_config.json>).score(prompt,
   path), BLIP's bert-base-uncased tokenizer read from imagereward/vocab.txt
   (--ir-bert-from-hub for the hub's). pickscore: PickScore's README code (AutoProcessor on
   pickscore/processor, AutoModel on pickscore/model). Runs offline.

3. Anywhere::

       python scripts/reward_parity.py compare ours.json theirs.json

   prints per image both scores and the difference, and per reward the largest and mean
   absolute difference and the rank correlation; exits with status 1 if a difference
   exceeds --tol (defaults: hps 0.005, pickscore 0.1, imagereward 0.05).

One prompt may be given for all images. Images are read with PIL and converted to RGB.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
from pathlib import Path

REWARDS = ("hps", "pickscore", "imagereward")
DEFAULT_TOL = {"hps": 0.005, "pickscore": 0.1, "imagereward": 0.05}


def _import_rewards():
    """Our package's reward loaders, installed (pip install -e .) or straight from this checkout."""
    try:
        return importlib.import_module("treerpo.core.rewards")
    except ImportError:
        root = Path(__file__).resolve().parents[1]  # the repository root is the package `treerpo`
        spec = importlib.util.spec_from_file_location("treerpo", root / "__init__.py",
                                                      submodule_search_locations=[str(root)])
        mod = importlib.util.module_from_spec(spec)
        sys.modules["treerpo"] = mod
        spec.loader.exec_module(mod)
        return importlib.import_module("treerpo.core.rewards")


def _pairs(args) -> tuple[list[str], list[str]]:
    images = [str(Path(p)) for p in args.images]
    prompts = list(args.prompts)
    if len(prompts) == 1:
        prompts = prompts * len(images)
    if len(prompts) != len(images):
        raise SystemExit(f"got {len(images)} images but {len(prompts)} prompts (give one, or one per image)")
    for p in images:
        if not Path(p).is_file():
            raise SystemExit(f"image not found: {p}")
    return images, prompts


def _folder(models_dir: str, name: str) -> Path:
    d = Path(models_dir)
    return (d if d.name == "treerpo_rewards" else d / "treerpo_rewards") / name


def score_ours(args) -> dict:
    import numpy as np
    import torch
    from PIL import Image

    rw = _import_rewards()
    images, prompts = _pairs(args)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    scores, tokens = {}, None
    for name in args.rewards:
        reward = rw.load_reward(name, args.models_dir, device=args.device, dtype=dtype,
                                trust_checkpoint=args.trust_checkpoint)
        vals = []
        for path, prompt in zip(images, prompts):
            arr = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
            x = torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0)
            vals.append(float(reward(x, [prompt])[0]))
        scores[name] = vals
        print(f"ours {name}: {vals}")
        if name == "hps" and hasattr(reward, "tokenize"):
            tokens = {q: _until_eos(reward.tokenize([q])[0].tolist(), reward.tokenizer.eos_token_id)
                      for q in dict.fromkeys(prompts)}
    import transformers

    return {"side": "ours", "images": images, "prompts": prompts, "scores": scores, "hps_tokens": tokens,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__}}


def _until_eos(ids: list[int], eos: int) -> list[int]:
    return ids[:ids.index(eos) + 1] if eos in ids else ids


def _by_prompt(prompts: list[str]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for i, q in enumerate(prompts):
        groups.setdefault(q, []).append(i)
    return groups


def _hps_theirs(args, images, prompts, versions) -> list[float]:
    """hpsv2 1.2.0's own scorer, hpsv2.img_score.score(paths, prompt, cp=..., hps_version="v2.1")."""
    spec = importlib.util.find_spec("hpsv2")
    if spec is None:
        raise SystemExit("hps: the package hpsv2 is not installed (pip install hpsv2==1.2.0)")
    bpe = Path(spec.origin).parent / "src" / "open_clip" / "bpe_simple_vocab_16e6.txt.gz"
    if not bpe.is_file():
        raise SystemExit(
            f"hps: hpsv2's wheel lacks {bpe.name}, which its tokenizer reads on import. Copy open_clip's:\n"
            "  cp \"$(python -c 'import open_clip, os; print(os.path.dirname(open_clip.__file__))')"
            f"/{bpe.name}\" {bpe.parent}/")
    from hpsv2 import img_score

    from hpsv2.src.open_clip import get_tokenizer

    tokenize = get_tokenizer("ViT-H-14")
    versions["hps_tokens"] = {q: _until_eos(tokenize([q])[0].tolist(), 49407) for q in dict.fromkeys(prompts)}
    img_score.device = args.device  # hpsv2 picks cuda whenever it is available
    if not args.hps_base_weights and not img_score.model_dict:
        # initialize_model() builds ViT-H-14 with open_clip's laion2B weights (a 3.9 GB download)
        # that score() then replaces with a strict load_state_dict of the checkpoint: build the
        # same model, same arguments, without them.
        from hpsv2.src.open_clip import create_model_and_transforms

        model, _, preprocess_val = create_model_and_transforms(
            "ViT-H-14", None, precision="amp", device=args.device, jit=False, force_quick_gelu=False,
            force_custom_text=False, force_patch_dropout=False, force_image_size=None, pretrained_image=False,
            image_mean=None, image_std=None, light_augmentation=True, aug_cfg={}, output_dict=True,
            with_score_predictor=False, with_region_predictor=False)
        img_score.model_dict.update(model=model, preprocess_val=preprocess_val)
    ckpt = _folder(args.models_dir, "hps") / "HPS_v2.1_compressed.pt"
    out = [0.0] * len(images)
    for q, idx in _by_prompt(prompts).items():  # score() reloads the checkpoint on every call
        vals = img_score.score([images[i] for i in idx], q, cp=str(ckpt), hps_version="v2.1")
        for i, v in zip(idx, vals):
            out[i] = float(v)
    versions["hpsv2"] = _version("hpsv2")
    versions["torchvision"] = _version("torchvision")  # decides antialiasing of hpsv2's tensor resize
    return out


def _imagereward_theirs(args, images, prompts, versions) -> list[float]:
    """image-reward 1.5: ImageReward.load(checkpoint, med_config=...).score(prompt, path)."""
    import torch

    try:
        import ImageReward as RM
        from ImageReward.models.BLIP import blip as blip_module
    except ImportError as e:
        raise SystemExit(f"imagereward: import ImageReward failed ({e}); it needs transformers<=4.44.x, "
                         "a `clip` module (clip-anytorch with setuptools<81), diffusers 0.30, accelerate, "
                         "datasets: see docs/rewards.md") from e
    d = _folder(args.models_dir, "imagereward")
    med = d / "med_config.json"
    if (d / "vocab.txt").is_file() and not args.ir_bert_from_hub:
        # BLIP's init_tokenizer() calls BertTokenizer.from_pretrained("bert-base-uncased"): hand
        # it the vocab.txt of this folder instead of the hub's (the same file).
        bert = blip_module.BertTokenizer

        class _LocalBert:
            @staticmethod
            def from_pretrained(name, *a, **k):
                return bert.from_pretrained(str(d) if name == "bert-base-uncased" else name, *a, **k)

        blip_module.BertTokenizer = _LocalBert
    model = RM.load(str(d / "ImageReward.pt"), device=args.device, med_config=str(med) if med.is_file() else None)
    sd = torch.load(d / "ImageReward.pt", map_location="cpu", weights_only=True)
    used = set(model.state_dict())
    print(f"imagereward: the original model took {len(set(sd) & used)}/{len(sd)} checkpoint tensors; "
          f"unused: {sorted(set(sd) - used)}; left at init: {sorted(used - set(sd))}")
    with torch.no_grad():
        vals = [float(model.score(q, p)) for p, q in zip(images, prompts)]
    versions["image-reward"] = _version("image-reward")
    return vals


def _pickscore_theirs(args, images, prompts, versions) -> list[float]:
    """PickScore's README code: processor + AutoModel, logit_scale.exp() * cosine.

    The README's AutoProcessor.from_pretrained("laion/CLIP-ViT-H-14-laion2B-s32B-b79K")
    resolves to CLIPProcessor through that repository's config.json, which the processor
    folder need not hold: name CLIPProcessor directly.
    """
    import torch
    from PIL import Image
    from transformers import AutoModel, CLIPProcessor

    d = _folder(args.models_dir, "pickscore")
    processor = CLIPProcessor.from_pretrained(str(d / "processor"))
    model = AutoModel.from_pretrained(str(d / "model")).eval().to(args.device)
    vals = []
    with torch.no_grad():
        for p, q in zip(images, prompts):
            im = processor(images=[Image.open(p)], padding=True, truncation=True, max_length=77,
                           return_tensors="pt").to(args.device)
            tx = processor(text=[q], padding=True, truncation=True, max_length=77, return_tensors="pt").to(args.device)
            ie = model.get_image_features(**im)
            te = model.get_text_features(**tx)
            ie = ie if torch.is_tensor(ie) else ie.pooler_output
            te = te if torch.is_tensor(te) else te.pooler_output
            ie = ie / ie.norm(dim=-1, keepdim=True)
            te = te / te.norm(dim=-1, keepdim=True)
            vals.append(float(model.logit_scale.exp() * (te @ ie.T)[0, 0]))
    return vals


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def score_theirs(args) -> dict:
    import torch

    images, prompts = _pairs(args)
    scores = {}
    versions = {"torch": torch.__version__, "transformers": _version("transformers"), "pillow": _version("pillow")}
    run = {"hps": _hps_theirs, "imagereward": _imagereward_theirs, "pickscore": _pickscore_theirs}
    for name in args.rewards:
        scores[name] = run[name](args, images, prompts, versions)
        print(f"theirs {name}: {scores[name]}")
    tokens = versions.pop("hps_tokens", None)
    return {"side": "theirs", "images": images, "prompts": prompts, "scores": scores, "hps_tokens": tokens,
            "versions": versions}


def _ranks(xs):
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    r = [0.0] * len(xs)
    for rank, i in enumerate(order):
        r[i] = float(rank)
    return r


def _spearman(a, b):
    if len(a) < 2:
        return float("nan")
    ra, rb = _ranks(a), _ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va = sum((x - ma) ** 2 for x in ra) ** 0.5
    vb = sum((y - mb) ** 2 for y in rb) ** 0.5
    return cov / (va * vb) if va and vb else float("nan")


def compare(args) -> int:
    a = json.loads(Path(args.ours).read_text())
    b = json.loads(Path(args.theirs).read_text())
    if a["images"] != b["images"] or a["prompts"] != b["prompts"]:
        print("warning: the two files were made from different image/prompt lists")
    tol = dict(DEFAULT_TOL)
    for item in args.tol or []:
        k, v = item.split("=", 1)
        tol[k] = float(v)
    print(f"ours: {a.get('versions')}  theirs: {b.get('versions')}")
    status = 0
    for name in sorted(set(a["scores"]) & set(b["scores"])):
        x, y = a["scores"][name], b["scores"][name]
        diffs = [abs(p - q) for p, q in zip(x, y)]
        print(f"\n== {name}")
        for img, p, q, d in zip(a["images"], x, y, diffs):
            print(f"  {Path(img).name:30s} ours {p:12.7f}  theirs {q:12.7f}  diff {d:.2e}")
        worst = max(diffs) if diffs else 0.0
        ok = worst <= tol.get(name, float("inf"))
        spread = max(y) - min(y) if y else 0.0
        print(f"  max |diff| {worst:.2e}  mean |diff| {sum(diffs) / max(len(diffs), 1):.2e}  "
              f"(theirs spread {spread:.3g})  rank corr {_spearman(x, y):.4f}  "
              f"-> {'OK' if ok else 'CHECK'} (tol {tol.get(name)})")
        status |= 0 if ok else 1
    ta, tb = a.get("hps_tokens"), b.get("hps_tokens")
    if ta and tb:
        same = [q for q in ta if q in tb and ta[q] == tb[q]]
        print(f"\n== hps token ids: {len(same)}/{len(ta)} prompts identical")
        for q in ta:
            if q in tb and ta[q] != tb[q]:
                print(f"  {q!r}: ours {ta[q]}  theirs {tb[q]}")
    return status


def bench_resize(args) -> int:
    """Time PIL against the tensor passes for the ImageReward/PickScore resize; check same bits."""
    import time

    import torch

    pre = importlib.import_module(_import_rewards().__name__ + ".preprocess")

    def timed(fn):
        fn()
        ts = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return sorted(ts)[len(ts) // 2] * 1e3

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of {args.repeat} runs, "
          f"shortest side -> {args.to}")
    for px in args.sizes:
        for b in args.batches:
            x = torch.rand(b, 3, px, px, generator=torch.Generator().manual_seed(px + b))
            size = (args.to, args.to)
            same = torch.equal(pre.resize_bicubic_pil(x, size, use_pil=True),
                               pre.resize_bicubic_pil(x, size, use_pil=False))
            row = f"{b:3d} x {px}px: PIL {timed(lambda: pre.resize_bicubic_pil(x, size, use_pil=True)):8.1f} ms"
            row += f"   tensor (cpu) {timed(lambda: pre.resize_bicubic_pil(x, size, use_pil=False)):8.1f} ms"
            if torch.cuda.is_available():
                xc = x.cuda()

                def gpu():
                    pre.resize_bicubic_pil(xc, size, use_pil=False)
                    torch.cuda.synchronize()

                same = same and torch.equal(pre.resize_bicubic_pil(xc, size, use_pil=False).cpu(),
                                            pre.resize_bicubic_pil(x, size, use_pil=True))
                row += f"   tensor (cuda) {timed(gpu):8.1f} ms"
            print(row + f"   same bits: {same}", flush=True)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for side in ("ours", "theirs"):
        p = sub.add_parser(side, help=f"score with {side} implementation")
        p.add_argument("--models-dir", required=True, help="folder holding treerpo_rewards/ (docs/rewards.md)")
        p.add_argument("--images", nargs="+", required=True)
        p.add_argument("--prompts", nargs="+", required=True, help="one prompt, or one per image")
        p.add_argument("--rewards", type=lambda s: [r.strip() for r in s.split(",") if r.strip()],
                       default=list(REWARDS), help="comma-separated subset of hps,pickscore,imagereward")
        p.add_argument("--device", default="cuda" if _cuda() else "cpu")
        p.add_argument("--out", required=True, help="JSON file to write")
        if side == "ours":
            p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
            p.add_argument("--trust-checkpoint", action="store_true",
                           help="allow torch.load(weights_only=False) for the checkpoints")
        else:
            p.add_argument("--hps-base-weights", action="store_true",
                           help="let hpsv2 build its model with open_clip's laion2B weights (a 3.9 GB "
                                "download, all replaced by the checkpoint) instead of without them")
            p.add_argument("--ir-bert-from-hub", action="store_true",
                           help="let ImageReward load bert-base-uncased's tokenizer from the hub instead of "
                                "the vocab.txt in imagereward/")
    p = sub.add_parser("compare", help="print the differences between two score files")
    p.add_argument("ours")
    p.add_argument("theirs")
    p.add_argument("--tol", nargs="*", help="per-reward tolerance, e.g. hps=0.01 pickscore=0.2")
    p = sub.add_parser("bench-resize", help="time PIL vs the tensor PIL-exact resize (8-bit, bicubic)")
    p.add_argument("--batches", type=int, nargs="+", default=[8, 16])
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 1024], help="square input sides")
    p.add_argument("--to", type=int, default=224)
    p.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args(argv)
    if args.cmd == "compare":
        return compare(args)
    if args.cmd == "bench-resize":
        return bench_resize(args)
    result = score_ours(args) if args.cmd == "ours" else score_theirs(args)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    sys.exit(main())
