"""Tree preview: one picture of a sampled tree (the node pack's "Tree preview").

Top to bottom: the root (layer 0 of the window), each window layer's nodes, the final
leaves, then a panel under the leaves with every reward model's score, the advantage
(a diverging bar) and the clip eps each leaf gets. Every node shows its x0 prediction
x - sigma * v (what the model "sees" at that node); frames are coloured by the mean
advantage of the leaves below the node, so a good or bad subtree shows at a glance; the
best leaf's path is drawn in gold. Pure PIL + torch (no ComfyUI): the node decodes the
latents of ``node_x0`` into thumbnails and hands them here.

An unshared baseline (branching [G, 1, 1, ...], every layer stores G identical-prefix
rows) is drawn as the tree it samples: one root, G branches, G straight chains.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps

# palette: light background, ink, one accent (gold) for the best path, and a
# colour-blind-safe diverging red/blue ramp for advantages
BG = (250, 250, 247)
INK = (34, 38, 43)
MUTED = (112, 119, 128)
FAINT = (222, 224, 226)
EDGE = (160, 168, 178)
GOLD = (226, 152, 14)
NEG = (200, 58, 50)
POS = (35, 110, 180)
MID = (226, 226, 226)


def font(size: int) -> ImageFont.FreeTypeFont:
    """Pillow's bundled scalable font (Pillow >= 10.1), crisp at any size."""
    return ImageFont.load_default(size=max(6, int(size)))


def node_x0(tree) -> list[torch.Tensor]:
    """Per window layer k: the x0 prediction of each node evaluated at layer k
    (parents - sigma_k * old_velocity, rows as in tree.layers[k].parents); then, as the last
    entry, the final leaves (tree.leaves). Raises ValueError if the tree stored no velocities."""
    out = []
    for layer in tree.layers:
        if layer.old_velocity is None:
            raise ValueError(
                f"tree layer {layer.k} stored no velocities: sample the tree with rollout(..., store_velocity=True) "
                "to preview the nodes' x0 predictions"
            )
        if layer.old_velocity.shape != layer.parents.shape:
            raise ValueError(
                f"tree layer {layer.k}: old_velocity has shape {tuple(layer.old_velocity.shape)}, "
                f"expected the parents' shape {tuple(layer.parents.shape)}"
            )
        out.append(layer.parents.float() - layer.sigma * layer.old_velocity.float())
    if tree.leaves is None:
        raise ValueError("tree.leaves is None (the trainer frees the final latents after scoring): "
                         "preview a tree from rollout()")
    out.append(tree.leaves.float())
    return out


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """A decoded batch [B, 3 (or 1), H, W] with values in [0, 1] (a Trainer ``decode``'s
    output) -> B RGB PIL images, e.g. ``[to_pil(decode(x)) for x in node_x0(tree)]``."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] not in (1, 3):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a tensor [batch, 3 or 1, height, width] in [0, 1], got {shape}")
    arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1)
    return [Image.fromarray(a.permute(1, 2, 0).cpu().numpy(), "RGB") for a in arr]


# ---------------------------------------------------------------------------- structure
def _rows_per_level(tree) -> list[int]:
    """Rows of node_x0(tree)[k] for every level k (window layers, then the leaves)."""
    rows = [int(layer.parents.shape[0]) for layer in tree.layers]
    return rows + [tree.spec.leaves if tree.leaves is None else int(tree.leaves.shape[0])]


def _node_rows(tree) -> list[list[int]]:
    """For every level, the row of node_x0(tree)[level] that shows each drawn node.

    Node n of level k stands for the leaves [n * span, (n + 1) * span) (span = leaves /
    nodes(k)); its row is the parent, at layer k, of the first of them. A shared-prefix
    tree has one row per node; an unshared one repeats a node over its leaves' rows."""
    spec = tree.spec
    out = []
    for k, layer in enumerate(tree.layers):
        n = spec.nodes(k)
        first_leaf = torch.arange(n) * (spec.leaves // n)
        out.append([int(r) for r in layer.parent_index[layer.edge_of_leaf[first_leaf]]])
    out.append(list(range(spec.leaves)))
    return out


def shown_layers(tree, max_layers: int = 8) -> list[int]:
    """Levels render_tree draws (indices into node_x0(tree); the leaves, index depth, always).

    A deep window (DanceGRPO: every step is an SDE step) keeps layer 0, the last layer and
    every layer right after a branching, then evenly spaced layers up to ``max_layers``;
    the skipped layers are chains of single children, drawn as dashed edges. A node can
    decode only these levels' thumbnails (images[k] may be None for the others)."""
    d = tree.spec.depth
    if max_layers < 2:
        raise ValueError(f"max_layers must be >= 2 (first and last window layer), got {max_layers}")
    if d <= max_layers:
        return list(range(d + 1))
    b = tree.spec.branching
    chosen = {0, d - 1} | {k for k in range(1, d) if b[k - 1] > 1}
    rest = [k for k in range(d) if k not in chosen]
    need = max_layers - len(chosen)
    if need > 0 and rest:
        idx = [round(i * (len(rest) - 1) / max(need - 1, 1)) for i in range(need)] if need > 1 else [len(rest) // 2]
        chosen |= {rest[i] for i in idx}
    return sorted(chosen) + [d]


# ---------------------------------------------------------------------------- checks
def _as_2d(x, name: str, leaves: int) -> torch.Tensor:
    t = torch.as_tensor(x, dtype=torch.float32).detach().cpu()
    if t.ndim == 1:
        t = t[:, None]
    if t.ndim != 2 or t.shape[0] != leaves:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected [leaves={leaves}, reward models]")
    return t


def _as_1d(x, name: str, leaves: int) -> torch.Tensor:
    t = torch.as_tensor(x, dtype=torch.float32).detach().cpu().flatten()
    if t.numel() != leaves:
        raise ValueError(f"{name} has {t.numel()} values, expected one per leaf ({leaves})")
    return t


def _check_images(images, rows: list[int], levels: list[int]) -> None:
    if not isinstance(images, Sequence) or isinstance(images, (str, bytes)):
        raise ValueError("images must be a list of lists of PIL images (one list per entry of node_x0(tree)), "
                         f"got {type(images).__name__}")
    if len(images) != len(rows):
        raise ValueError(f"images has {len(images)} entries, expected depth + 1 = {len(rows)} "
                         "(one list per entry of node_x0(tree))")
    for k in levels:
        row = images[k]
        if row is None or len(row) != rows[k]:
            got = "None" if row is None else f"{len(row)} thumbnails"
            raise ValueError(f"images[{k}] has {got}, expected {rows[k]} (the rows of node_x0(tree)[{k}])")
        for j, im in enumerate(row):
            if not isinstance(im, Image.Image):
                raise ValueError(f"images[{k}][{j}] is a {type(im).__name__}, expected a PIL image")


def best_leaf(advantages: torch.Tensor | None, rewards: torch.Tensor | None) -> int | None:
    """The leaf with the largest advantage, else the largest summed reward; None when the
    group carries no signal (all equal) or nothing was scored. Non-finite values never win."""
    for score in (advantages, None if rewards is None else rewards.sum(1)):
        if score is None:
            continue
        ok = torch.isfinite(score)
        if int(ok.sum()) >= 1 and float(score[ok].max() - score[ok].min()) > 0:
            return int(torch.where(ok, score, torch.full_like(score, -math.inf)).argmax())
    return None


# ---------------------------------------------------------------------------- drawing helpers
def _mix(a, b, t: float):
    return tuple(int(round(x + (y - x) * t)) for x, y in zip(a, b))


def diverging(t: float):
    """Colour of t in [-1, 1]: red (negative), light grey (0), blue (positive)."""
    if not math.isfinite(t):
        return MID
    t = max(-1.0, min(1.0, t))
    return _mix(MID, POS, t) if t >= 0 else _mix(MID, NEG, -t)


def _thumbnail(im: Image.Image, size: int) -> Image.Image:
    im = im.convert("RGB")
    small = max(im.size) * 2 <= size  # tiny latents: keep their pixels sharp
    return ImageOps.pad(im, (size, size), method=Image.NEAREST if small else Image.LANCZOS, color=BG)


def _fmt(v: float, sci: bool = False) -> str:
    """Compact number: 3 decimals below 10, fewer above; scientific for tiny values
    when ``sci`` (clip eps) or huge ones."""
    if not math.isfinite(v):
        return "NaN" if math.isnan(v) else ("+inf" if v > 0 else "-inf")
    a = abs(v)
    if a != 0 and ((sci and a < 1e-2) or a >= 1e5):
        return f"{v:.1e}"
    return f"{v:.1f}" if a >= 100 else f"{v:.2f}" if a >= 10 else f"{v:.3f}"


def _text_w(f, s: str) -> int:
    box = f.getbbox(s)
    return box[2] - box[0]


def _wrap(f, text: str, width: int, max_lines: int = 2) -> list[str]:
    words, lines, cur = text.split(), [], ""
    for w in words:
        trial = f"{cur} {w}".strip()
        if _text_w(f, trial) <= width or not cur:
            cur = trial
        else:
            lines.append(cur)
            cur = w
    lines.append(cur)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] += " …"
    return [ln if _text_w(f, ln) <= width else _clip(f, ln, width) for ln in lines]


def _clip(f, s: str, width: int) -> str:
    if _text_w(f, s) <= width:
        return s
    while s and _text_w(f, s + "…") > width:
        s = s[:-1]
    return s + "…"


def _bezier(p0, p1, n: int = 40):
    """Vertical S-curve from p0 down to p1 (its midpoint is the chord's midpoint)."""
    (x0, y0), (x1, y1) = p0, p1
    h = (y1 - y0) / 2
    c0, c1 = (x0, y0 + h), (x1, y1 - h)
    pts = []
    for i in range(n + 1):
        t = i / n
        a, b, c, d = (1 - t) ** 3, 3 * (1 - t) ** 2 * t, 3 * (1 - t) * t * t, t**3
        pts.append((a * x0 + b * c0[0] + c * c1[0] + d * x1, a * y0 + b * c0[1] + c * c1[1] + d * y1))
    return pts


def _star(draw, cx, cy, r, fill):
    pts = []
    for i in range(10):
        ang = -math.pi / 2 + i * math.pi / 5
        rr = r if i % 2 == 0 else r * 0.45
        pts.append((cx + rr * math.cos(ang), cy + rr * math.sin(ang)))
    draw.polygon(pts, fill=fill)


def _centered(draw, cx, y, s, f, fill):
    draw.text((cx - _text_w(f, s) / 2, y), s, font=f, fill=fill)


# ---------------------------------------------------------------------------- render
@dataclass
class TreeLayout:
    """Where every part of a tree picture goes: pure geometry and text, no pixels.
    ``edges`` and ``boxes`` are also what ``image.info["treerpo_layout"]`` exposes."""

    width: int
    height: int
    thumb: int
    cell: int
    ring: int
    pad: int
    gutter: int
    fs: int  # font size; line height lh
    lh: int
    fonts: tuple  # regular, small, title
    levels: list[int]  # tree levels drawn (window layers, then d = the leaves)
    gaps: list[tuple[int, int]]  # pairs of consecutive drawn levels
    top: dict[int, int]  # y of each drawn level's thumbnails
    span: list[int]  # leaves below one node of each level
    x_left: int
    tree_w: int
    level_labels: dict[int, list[str]]
    gap_labels: dict[tuple[int, int], list[str]]
    title_lines: list[str]
    subtitle: str
    title_y: int
    leaf_label_y: int
    panel_y: int
    row_h: int  # one reward row of the panel
    bar_h: int  # the advantage bars
    legend_y: int
    best: int | None
    on_path: set[tuple[int, int]]
    edges: list[dict] = field(default_factory=list)
    boxes: dict[tuple[int, int], tuple[int, int, int, int]] = field(default_factory=dict)

    @property
    def leaves(self) -> int:
        return self.tree_w // self.cell

    def leaf_x(self, i: int) -> float:
        return self.x_left + i * self.cell + self.cell / 2

    def node_x(self, k: int, n: int) -> float:
        return (self.leaf_x(n * self.span[k]) + self.leaf_x((n + 1) * self.span[k] - 1)) / 2


def tree_layout(tree, levels: list[int], thumb: int, names: Sequence[str], panel: tuple[bool, bool, bool],
                best: int | None, title: str) -> TreeLayout:
    """The layout of ``render_tree``'s picture; ``panel``: whether rewards, advantages and eps
    rows are drawn."""
    spec = tree.spec
    L, d = spec.leaves, spec.depth
    has_r, has_adv, has_eps = panel
    span = [L // spec.nodes(k) for k in range(d)] + [1]

    # fonts and sizes scale with the thumbnail
    fs = max(10, round(thumb * 0.13))
    f, fsmall, ftitle = font(fs), font(fs - 1), font(round(fs * 1.6))
    lh = fs + 5  # line height
    pad, hgap = 22, max(10, thumb // 6)
    cell = thumb + hgap
    ring = max(2, thumb // 32)  # frame width

    # labels of the left gutter: per level, then per gap between drawn levels
    def level_label(k):
        if k == d:
            return ["leaves", f"step {spec.num_steps} · sigma 0", f"{L} images"]
        layer = tree.layers[k]
        n = spec.nodes(k)
        return [f"layer {k} · step {layer.step}", f"sigma {layer.sigma:.3f}", f"{n} node{'s' if n > 1 else ''}"]

    def gap_label(k0, k1):
        lay = tree.layers[k0]
        if k1 == k0 + 1:
            lines = [f"SDE · noise {lay.noise_level:.2f}", f"x{spec.branching[k0]} children"]
        else:
            hi = tree.layers[k1 - 1].noise_level
            lines = [f"… {k1 - k0} SDE steps", f"noise {lay.noise_level:.2f}-{hi:.2f}"]
        if k1 == d and spec.tail_steps:  # ODE (or the compressed solver) after the window
            lines.append(f"then ODE to step {spec.num_steps}")
        return lines

    gaps = list(zip(levels[:-1], levels[1:]))
    level_labels = {k: level_label(k) for k in levels}
    gap_labels = {g: gap_label(*g) for g in gaps}
    labels = [s for k in levels for s in level_labels[k]] + [s for g in gaps for s in gap_labels[g]]
    labels += list(names) + ["advantage", "clip eps"]
    gutter = min(max(_text_w(f, s) for s in labels) + 18, max(140, thumb * 2))

    tree_w = L * cell
    W = max(pad * 2 + gutter + tree_w, 720)
    x_left = pad + gutter + (W - 2 * pad - gutter - tree_w) // 2

    # title block
    title_lines = _wrap(ftitle, title or "Tree preview", W - 2 * pad, 2)
    kind = "shared prefix" if tree.share_prefix else "no prefix sharing (every leaf pays its path)"
    window = f"steps {spec.window_start}-{spec.window_start + d - 1}" if d > 1 else f"step {spec.window_start}"
    subtitle = (f"branching {'-'.join(map(str, spec.branching))} -> {L} leaves · SDE window at {window} "
                f"of {spec.num_steps} · {kind}")
    y = pad
    title_y = y
    y += len(title_lines) * (round(fs * 1.6) + 6) + lh + 14

    lay = TreeLayout(width=W, height=0, thumb=thumb, cell=cell, ring=ring, pad=pad, gutter=gutter, fs=fs, lh=lh,
                     fonts=(f, fsmall, ftitle), levels=levels, gaps=gaps, top={}, span=span, x_left=x_left,
                     tree_w=tree_w, level_labels=level_labels, gap_labels=gap_labels, title_lines=title_lines,
                     subtitle=subtitle, title_y=title_y, leaf_label_y=0, panel_y=0, row_h=lh + 6,
                     bar_h=max(36, thumb // 2), legend_y=0, best=best,
                     on_path={(k, best // span[k]) for k in levels} if best is not None else set())

    # vertical positions of the drawn levels; a gap grows with the horizontal spread of its edges
    for i, k in enumerate(levels):
        lay.top[k] = y
        y += thumb
        if i + 1 < len(levels):
            k1 = levels[i + 1]
            spread = max(abs(lay.node_x(k, n * span[k1] // span[k]) - lay.node_x(k1, n)) for n in range(L // span[k1]))
            need = len(gap_labels[(k, k1)]) * lh + 10
            y += int(max(need, min(0.3 * spread + 0.25 * thumb, 1.3 * thumb), 0.45 * thumb))
    lay.leaf_label_y = y + ring + 4
    y = lay.leaf_label_y + lh + 6

    # panel under the leaves, then the legend
    lay.panel_y = y
    y += ((len(names) * lay.row_h if has_r else 0) + (lay.bar_h + 10 if has_adv else 0)
          + (lay.row_h + 4 if has_eps else 0))
    lay.legend_y = y + 14
    lay.height = lay.legend_y + 2 * lh + 10 + pad

    for k0, k1 in gaps:
        for n in range(L // span[k1]):
            p = n * span[k1] // span[k0]
            p0 = (lay.node_x(k0, p), lay.top[k0] + thumb + ring + 1)
            p1 = (lay.node_x(k1, n), lay.top[k1] - ring - 1)
            is_best = (k0, p) in lay.on_path and (k1, n) in lay.on_path
            mid = ((p0[0] + p1[0]) / 2, (p0[1] + p1[1]) / 2)
            lay.edges.append(dict(parent=(k0, p), child=(k1, n), start=p0, end=p1, mid=mid, best=is_best,
                                  dashed=k1 != k0 + 1))
    for k in levels:
        for n in range(L // span[k]):
            x0 = int(round(lay.node_x(k, n) - thumb / 2))
            lay.boxes[(k, n)] = (x0, lay.top[k], x0 + thumb, lay.top[k] + thumb)
    return lay


def _paint_edges(img: Image.Image, lay: TreeLayout) -> None:
    """Edges: one coverage mask per colour drawn at 2x and box-averaged down (smooth curves);
    a point at pixel index x sits on the 2x grid at (x + 0.5) * 2 - 0.5 (pixel centres agree)."""
    s, W, H = 2, lay.width, lay.height
    for colour, width, best_only in ((EDGE, 2, False), (GOLD, 4, True)):
        mask = Image.new("L", (W * s, H * s), 0)
        md = ImageDraw.Draw(mask)
        for e in lay.edges:
            if e["best"] != best_only:
                continue
            pts = [((x + 0.5) * s - 0.5, (yy + 0.5) * s - 0.5) for x, yy in _bezier(e["start"], e["end"])]
            if e["dashed"]:
                for i in range(0, len(pts) - 1, 2):
                    md.line(pts[i : i + 2], fill=255, width=width * s)
            else:
                md.line(pts, fill=255, width=width * s, joint="curve")
        img.paste(colour, (0, 0, W, H), mask.reduce(s))


def _paint_nodes(img: Image.Image, draw, lay: TreeLayout, images, node_rows, adv, amax: float) -> None:
    """Each node's thumbnail in a frame coloured by the mean advantage of the leaves below it;
    the best path's nodes get a gold border."""
    ring = lay.ring
    for (k, n), box in lay.boxes.items():
        if (k, n) in lay.on_path:
            g = ring + max(2, ring)
            draw.rectangle((box[0] - g, box[1] - g, box[2] + g - 1, box[3] + g - 1), fill=GOLD)
        colour = MID
        if adv is not None and amax != 0:
            a = adv[n * lay.span[k] : (n + 1) * lay.span[k]]
            a = a[torch.isfinite(a)]
            colour = diverging(float(a.mean()) / amax) if a.numel() else MID
        draw.rectangle((box[0] - ring, box[1] - ring, box[2] + ring - 1, box[3] + ring - 1), fill=colour)
        img.paste(_thumbnail(images[k][node_rows[k][n]], lay.thumb), box[:2])


def _paint_gutter(draw, lay: TreeLayout) -> None:
    """Level labels centred on their row, gap labels centred in their gap."""
    f, fsmall, _ = lay.fonts
    gx, lh, thumb = lay.pad, lay.lh, lay.thumb
    for k in lay.levels:
        lines = lay.level_labels[k]
        yy = lay.top[k] + thumb / 2 - len(lines) * lh / 2
        for i, ln in enumerate(lines):
            draw.text((gx, yy + i * lh), _clip(f, ln, lay.gutter - 12), font=f if i == 0 else fsmall,
                      fill=INK if i == 0 else MUTED)
    for k0, k1 in lay.gaps:
        lines = lay.gap_labels[(k0, k1)]
        g0, g1 = lay.top[k0] + thumb, lay.top[k1]
        yy = (g0 + g1) / 2 - len(lines) * lh / 2
        for i, ln in enumerate(lines):
            draw.text((gx + 8, yy + i * lh), _clip(fsmall, ln, lay.gutter - 20), font=fsmall, fill=MUTED)
        draw.line((gx, g0 + 6, gx, g1 - 6), fill=FAINT, width=2)


def _paint_leaf_labels(draw, lay: TreeLayout) -> None:
    """Each leaf's index; the best one with a star."""
    _, fsmall, _ = lay.fonts
    y, fs = lay.leaf_label_y, lay.fs
    for i in range(lay.leaves):
        cx = lay.leaf_x(i)
        if i == lay.best:
            label = f"leaf {i} · best"
            w = _text_w(fsmall, label) + fs + 5
            _star(draw, cx - w / 2 + fs / 2, y + lay.lh / 2, fs * 0.55, GOLD)
            draw.text((cx - w / 2 + fs + 5, y), label, font=fsmall, fill=GOLD)
        else:
            _centered(draw, cx, y, f"leaf {i}", fsmall, MUTED)


def _paint_panel(draw, lay: TreeLayout, r, names, adv, ep, amax: float) -> None:
    """Under the leaves: each reward model's scores (cells tinted by the leaf's z-score within
    its model), the advantages as bars from a zero line, the clip eps with a small gauge."""
    f, fsmall, _ = lay.fonts
    gx, lh, rh, cell = lay.pad, lay.lh, lay.row_h, lay.cell
    L = lay.leaves
    y = lay.panel_y
    if r is not None:
        for j, name in enumerate(names):
            col = r[:, j]
            ok = torch.isfinite(col)
            mu = float(col[ok].mean()) if ok.any() else 0.0
            sd = float(col[ok].std(unbiased=False)) if int(ok.sum()) > 1 else 0.0
            draw.text((gx, y + 3), _clip(f, name, lay.gutter - 12), font=f, fill=INK)
            for i in range(L):
                v = float(col[i])
                z = (v - mu) / sd if sd > 0 and math.isfinite(v) else 0.0
                x0 = lay.leaf_x(i) - cell / 2 + 2
                draw.rounded_rectangle((x0, y, x0 + cell - 4, y + rh - 3), radius=3,
                                       fill=_mix(BG, diverging(z / 2), 0.45))
                _centered(draw, lay.leaf_x(i), y + 3, _fmt(v), f, INK if math.isfinite(v) else NEG)
            y += rh
    # advantage: bars up (blue) or down (red) from a zero line, the value on the other side
    if adv is not None:
        y += 4
        bar_h = lay.bar_h
        zero = y + bar_h / 2
        draw.text((gx, zero - lh / 2), "advantage", font=f, fill=INK)
        draw.line((lay.x_left + 2, zero, lay.x_left + lay.tree_w - 2, zero), fill=EDGE, width=1)
        bw = max(6, lay.thumb // 3)
        for i in range(L):
            a = float(adv[i])
            cx = lay.leaf_x(i)
            if math.isfinite(a) and amax > 0 and a != 0:
                hgt = a / amax * (bar_h / 2 - 2)
                y0, y1 = sorted((zero, zero - hgt))
                draw.rectangle((cx - bw / 2, y0, cx + bw / 2, y1), fill=diverging(a / amax))
                if i == lay.best:
                    draw.rectangle((cx - bw / 2 - 2, y0 - 2, cx + bw / 2 + 2, y1 + 2), outline=GOLD, width=2)
            text = ("+" if a > 0 else "") + _fmt(a)
            _centered(draw, cx, zero + 3 if not a < 0 else zero - lh - 1, text, fsmall,
                      INK if math.isfinite(a) else NEG)
        y += bar_h + 6
    # clip eps: value and a thin bar relative to the group's largest eps
    if ep is not None:
        draw.text((gx, y + 2), "clip eps", font=f, fill=INK)
        emax = float(ep[torch.isfinite(ep)].max()) if bool(torch.isfinite(ep).any()) else 0.0
        for i in range(L):
            v = float(ep[i])
            _centered(draw, lay.leaf_x(i), y + 1, _fmt(v, sci=True), fsmall, INK)
            if emax > 0 and math.isfinite(v):  # a small gauge: eps relative to the group's largest
                x0, w = lay.leaf_x(i) - (cell - 16) / 2, cell - 16
                draw.rectangle((x0, y + lh + 1, x0 + w, y + lh + 3), fill=FAINT)
                draw.rectangle((x0, y + lh + 1, x0 + w * max(v, 0) / emax, y + lh + 3), fill=MUTED)


def _paint_title_and_legend(draw, lay: TreeLayout, adv, amax: float) -> None:
    f, fsmall, ftitle = lay.fonts
    pad, lh, fs = lay.pad, lay.lh, lay.fs
    for i, ln in enumerate(lay.title_lines):
        draw.text((pad, lay.title_y + i * (round(fs * 1.6) + 6)), ln, font=ftitle, fill=INK)
    draw.text((pad, lay.title_y + len(lay.title_lines) * (round(fs * 1.6) + 6) + 2),
              _clip(f, lay.subtitle, lay.width - 2 * pad), font=f, fill=MUTED)

    x = pad
    ly = lay.legend_y + lh / 2
    draw.line((x, ly, x + 28, ly), fill=GOLD, width=4)
    x += 36
    best = lay.best
    best_txt = f"best path (leaf {best})" if best is not None else "best path (none: all leaves equal)"
    draw.text((x, ly - lh / 2), best_txt, font=fsmall, fill=INK)
    x += _text_w(fsmall, best_txt) + 26
    if adv is not None:
        lo, hi = "-" + _fmt(amax), "+" + _fmt(amax)
        draw.text((x, ly - lh / 2), lo, font=fsmall, fill=NEG)
        x += _text_w(fsmall, lo) + 6
        for t in range(100):
            draw.line((x + t, ly - 5, x + t, ly + 5), fill=diverging(t / 49.5 - 1))
        x += 106
        draw.text((x, ly - lh / 2), hi, font=fsmall, fill=POS)
        x += _text_w(fsmall, hi) + 10
        txt = "frame: mean advantage of the leaves below"
        draw.text((x, ly - lh / 2), txt, font=fsmall, fill=INK)
    draw.text((pad, ly + lh / 2 + 2), "thumbnail: the node's x0 prediction (x - sigma * v) at its layer; "
              "edges: SDE branches in the window (dashed: several steps)", font=fsmall, fill=MUTED)


def render_tree(
    tree,
    images,
    rewards=None,
    reward_names=(),
    advantages=None,
    eps=None,
    title="",
    thumb=96,
    *,
    max_layers: int = 8,
) -> Image.Image:
    """images: list of lists of PIL images, images[k][j] = thumbnail of row j of node_x0(tree)[k]
    (so len(images) == depth + 1). rewards: Tensor[L, K] per leaf and reward model; advantages:
    Tensor[L]; eps: Tensor[L] (the clip eps each leaf gets). Draws every node's thumbnail, the
    edges parent->child, each layer's step, sigma and noise level, each leaf's rewards / advantage /
    eps, and highlights the best leaf's path (max advantage, else max summed reward).
    Works for shared-prefix trees (1,2,4,8 nodes per layer), 16 leaves, and unshared baselines
    (G rows per layer, branching [G,1,1,1]).

    ``max_layers`` caps the window layers drawn (see shown_layers); images[k] of a skipped
    layer may be None. The layout (node boxes, edges with their midpoints, best leaf) is
    returned in ``image.info["treerpo_layout"]``."""
    L = tree.spec.leaves
    if not isinstance(thumb, int) or thumb < 16:
        raise ValueError(f"thumb must be an integer >= 16 (pixels), got {thumb!r}")
    levels = shown_layers(tree, max_layers)
    _check_images(images, _rows_per_level(tree), levels)
    r = None if rewards is None else _as_2d(rewards, "rewards", L)
    names = [str(n) for n in reward_names]
    if r is not None:
        if names and len(names) != r.shape[1]:
            raise ValueError(f"reward_names has {len(names)} names for the {r.shape[1]} reward columns of rewards")
        names = names or [f"reward {i + 1}" for i in range(r.shape[1])]
    adv = None if advantages is None else _as_1d(advantages, "advantages", L)
    ep = None if eps is None else _as_1d(eps, "eps", L)
    best = best_leaf(adv, r)
    lay = tree_layout(tree, levels, thumb, names, (r is not None, adv is not None, ep is not None), best, title)

    # paint passes, back to front
    img = Image.new("RGB", (lay.width, lay.height), BG)
    _paint_edges(img, lay)
    draw = ImageDraw.Draw(img)
    amax = float(adv[torch.isfinite(adv)].abs().max()) if adv is not None and bool(torch.isfinite(adv).any()) else 0.0
    _paint_nodes(img, draw, lay, images, _node_rows(tree), adv, amax)
    _paint_gutter(draw, lay)
    _paint_leaf_labels(draw, lay)
    _paint_panel(draw, lay, r, names, adv, ep, amax)
    _paint_title_and_legend(draw, lay, adv, amax)

    img.info["treerpo_layout"] = {"nodes": lay.boxes, "edges": lay.edges, "best_leaf": best, "levels": levels}
    return img
