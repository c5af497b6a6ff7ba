"""Training curves as one image (the node pack's "Metrics plot"): small multiples over
iterations of the metrics the Trainer writes. Pure PIL (no matplotlib), drawn at 2x and
downsampled so lines and text are smooth."""

from __future__ import annotations

import math
import re

from PIL import Image, ImageDraw

from .preview import BG, EDGE, FAINT, INK, MUTED, NEG, POS, font

BLUE, RED, GREEN, PURPLE = POS, NEG, (46, 140, 90), (120, 80, 170)
SCALE = 2  # drawn at 2x, then downsampled


def _series(history: list[dict], key: str) -> list[float] | None:
    """Values of ``key`` per iteration (NaN where absent or not a number); None when no
    entry has it."""
    if not any(key in h for h in history):
        return None
    out = []
    for h in history:
        v = h.get(key)
        try:
            out.append(float(v) if v is not None and not isinstance(v, (str, bytes)) else math.nan)
        except (TypeError, ValueError):
            out.append(math.nan)
    return out


def _panels(history: list[dict]) -> list[dict]:
    """Panels to draw: title, lines [(label, values, colour)], optional band (lo, hi)."""
    names = []
    for h in history:
        for k in h:
            m = re.fullmatch(r"reward/(.+)/mean", str(k))
            if m and m.group(1) not in names:
                names.append(m.group(1))
    panels = []
    for name in names:
        mean, std = _series(history, f"reward/{name}/mean"), _series(history, f"reward/{name}/std")
        band = None if std is None else ([m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)])
        panels.append(dict(title=f"reward: {name} (mean ± std)" if band else f"reward: {name}",
                           lines=[(name, mean, BLUE)], band=band))

    def single(key, title, colour=BLUE, optional=False):
        v = _series(history, key)
        if v is not None and not (optional and all(x == 0 or math.isnan(x) for x in v)):
            panels.append(dict(title=title, lines=[(key, v, colour)], band=None))

    single("group_reward_std", "reward std within a group", PURPLE)
    eps = _series(history, "eps_mean")
    if eps is not None:
        lo, hi = _series(history, "eps_min"), _series(history, "eps_max")
        band = (lo, hi) if lo is not None and hi is not None else None
        panels.append(dict(title="clip eps (mean, min-max)" if band else "clip eps (mean)",
                           lines=[("eps", eps, GREEN)], band=band))
    clip = [(lbl, _series(history, k), c)
            for k, lbl, c in (("clip_frac_high", "high", BLUE), ("clip_frac_low", "low", RED))]
    clip = [c for c in clip if c[1] is not None]
    if clip:
        panels.append(dict(title="clipped fraction", lines=clip, band=None))
    single("ratio_mean", "ratio (mean)", PURPLE)
    single("sft_loss", "LayerTuning SFT loss", GREEN)
    single("kl", "KL to reference", RED, optional=True)  # 0 throughout unless kl_beta > 0
    single("loss", "loss", INK)
    single("grad_norm", "grad norm", MUTED)
    single("window_start", "window start (step)", MUTED)
    return panels


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About n round tick values (1, 2, 2.5, 5 x 10^k) covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"tick range must be finite, got [{lo}, {hi}]")
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / max(n - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _tick_label(v: float, step: float, big: float) -> str:
    """Tick text with just enough decimals for ``step``; scientific when that needs more
    than 5 decimals or the axis reaches ``big`` >= 1e5."""
    if v == 0:
        return "0"
    e = math.floor(math.log10(step) + 1e-9)
    dec = max(0, -e + (1 if abs(step / 10**e - 2.5) < 1e-6 else 0))  # 0.25 needs 2 decimals, 0.5 one
    return f"{v:.1e}" if dec > 5 or big >= 1e5 else f"{v:.{dec}f}"


def _fmt(v: float) -> str:
    if not math.isfinite(v):
        return "NaN"
    a = abs(v)
    return f"{v:.2e}" if a and (a < 1e-3 or a >= 1e5) else f"{v:.4g}"


def _series_of(panel: dict, xs: list[float]) -> list[dict]:
    """A metrics panel's lines as series on the common x values; its band goes with the first line."""
    return [dict(label=label, x=xs, y=values, colour=colour, band=panel["band"] if i == 0 else None)
            for i, (label, values, colour) in enumerate(panel["lines"])]


def _finite(values) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def _y_range(series: list[dict]) -> tuple[float, float] | None:
    vals = []
    for sr in series:
        vals += _finite(sr["y"])
        if sr.get("band"):
            vals += [x for side in sr["band"] for x in _finite(side)]
    if not vals:
        return None
    lo, hi = min(vals), max(vals)
    if hi - lo < 1e-12 * max(1.0, abs(hi)):
        d = abs(hi) * 0.1 or 1.0
        return lo - d, hi + d
    pad = 0.06 * (hi - lo)
    return lo - pad, hi + pad


def _draw_panel(draw, box, panel, s, bottom_row) -> dict:
    """Draws one panel: ``panel`` has a title, series [dict(label, x, y, colour, band=(lo, hi) or
    None)], optionally an xlabel (default "iteration") and legend=False. Returns where its data
    went (1x pixels) for callers and tests."""
    x0, y0, x1, y1 = box
    ftitle, ftick = font(13 * s), font(10 * s)
    series = panel["series"]
    draw.text((x0, y0), panel["title"], font=ftitle, fill=INK)
    # legend (several series) or the latest value (one series) at the top right
    if len(series) > 1 and panel.get("legend", True):
        lx = x1
        for sr in reversed(series):
            w = draw.textlength(sr["label"], font=ftick)
            lx -= w
            draw.text((lx, y0 + 2 * s), sr["label"], font=ftick, fill=MUTED)
            lx -= 18 * s
            draw.line((lx, y0 + 9 * s, lx + 14 * s, y0 + 9 * s), fill=sr["colour"], width=2 * s)
            lx -= 10 * s
    elif len(series) == 1:
        vals = _finite(series[0]["y"])
        last = f"last {_fmt(vals[-1])}" if vals else ""
        draw.text((x1 - draw.textlength(last, font=ftick), y0 + 2 * s), last, font=ftick, fill=MUTED)

    # plot area: room for y tick labels on the left, x tick labels below
    px0, py0, px1, py1 = x0 + 48 * s, y0 + 24 * s, x1 - 4 * s, y1 - (30 if bottom_row else 18) * s
    draw.rectangle((px0, py0, px1, py1), fill=(255, 255, 255), outline=FAINT, width=s)
    yr = _y_range(series)
    all_x = [x for sr in series for x in _finite(sr["x"])]
    if yr is None or not all_x:
        msg = "no finite values"
        draw.text(((px0 + px1 - draw.textlength(msg, font=ftick)) / 2, (py0 + py1) / 2 - 6 * s), msg,
                  font=ftick, fill=MUTED)
        return dict(title=panel["title"], box=tuple(v / s for v in (px0, py0, px1, py1)), x_map=None, y_map=None)
    lo, hi = yr
    xlo, xhi = min(all_x), max(all_x)
    if xhi == xlo:
        xlo, xhi = xlo - 1, xhi + 1

    def X(x):
        return px0 + 6 * s + (x - xlo) / (xhi - xlo) * (px1 - px0 - 12 * s)

    def Y(y):
        return py1 - (y - lo) / (hi - lo) * (py1 - py0)

    yt = nice_ticks(lo, hi, 5)
    ystep = yt[1] - yt[0] if len(yt) > 1 else abs(yt[0]) or 1.0
    for t in yt:
        if lo <= t <= hi:
            draw.line((px0 + s, Y(t), px1 - s, Y(t)), fill=FAINT, width=s)
            lab = _tick_label(t, ystep, max(abs(lo), abs(hi)))
            draw.text((px0 - 5 * s - draw.textlength(lab, font=ftick), Y(t) - 6 * s), lab, font=ftick, fill=MUTED)
    if all(float(x).is_integer() for x in all_x):  # iterations: integer ticks
        xt = [t for t in nice_ticks(min(all_x), max(all_x), 6) if float(t).is_integer()] or [min(all_x)]
        xlabels = [str(int(t)) for t in xt]
    else:
        xt = [t for t in nice_ticks(min(all_x), max(all_x), 5) if xlo <= t <= xhi] or [min(all_x)]
        xstep = xt[1] - xt[0] if len(xt) > 1 else abs(xt[0]) or 1.0
        xlabels = [_tick_label(t, xstep, max(abs(xlo), abs(xhi))) for t in xt]
    for t, lab in zip(xt, xlabels):
        draw.line((X(t), py1, X(t), py1 + 3 * s), fill=EDGE, width=s)
        draw.text((X(t) - draw.textlength(lab, font=ftick) / 2, py1 + 4 * s), lab, font=ftick, fill=MUTED)
    if bottom_row:
        lab = panel.get("xlabel", "iteration")
        draw.text(((px0 + px1 - draw.textlength(lab, font=ftick)) / 2, py1 + 16 * s), lab, font=ftick, fill=MUTED)

    def ok(v):
        return v is not None and math.isfinite(v)

    def runs(sr):
        """Consecutive finite stretches: a NaN breaks the line."""
        cur = []
        for x, y in zip(sr["x"], sr["y"]):
            if ok(x) and ok(y):
                cur.append((X(x), Y(y)))
            elif cur:
                yield cur
                cur = []
        if cur:
            yield cur

    for sr in series:
        if sr.get("band"):
            (blo, bhi), xs = sr["band"], sr["x"]
            fill = tuple(int(c + (255 - c) * 0.8) for c in sr["colour"])
            for i in range(len(xs) - 1):
                a, b = (blo[i], bhi[i]), (blo[i + 1], bhi[i + 1])
                if all(ok(v) for v in a + b + (xs[i], xs[i + 1])):
                    draw.polygon([(X(xs[i]), Y(a[0])), (X(xs[i + 1]), Y(b[0])), (X(xs[i + 1]), Y(b[1])),
                                  (X(xs[i]), Y(a[1]))], fill=fill)
    for sr in series:
        markers = len(sr["x"]) <= 40
        for run in runs(sr):
            if len(run) > 1:
                draw.line(run, fill=sr["colour"], width=2 * s, joint="curve")
            if markers or len(run) == 1:
                for cx, cy in run:
                    draw.ellipse((cx - 2.5 * s, cy - 2.5 * s, cx + 2.5 * s, cy + 2.5 * s), fill=sr["colour"])
    # data -> 1x pixel: x_map (x_lo, x_hi, px_lo, px_hi), y_map (y_lo, y_hi, px_bottom, px_top)
    return dict(title=panel["title"], box=tuple(v / s for v in (px0, py0, px1, py1)),
                x_map=(xlo, xhi, X(xlo) / s, X(xhi) / s), y_map=(lo, hi, Y(lo) / s, Y(hi) / s))


def plot_metrics(history: list[dict], title="") -> Image.Image:
    """Panels over iterations for the metric keys the Trainer writes (reward/<name>/mean per reward
    model, eps_mean (and eps_min/eps_max when present), clip_frac_high/low, sft_loss, ratio_mean,
    group_reward_std...). Keys that are absent are skipped; NaN handled; a clear ValueError for an
    empty history.

    Missing or non-numeric values (None in metrics.jsonl) count as NaN and break a line; the
    x axis is each entry's ``iteration`` (else its position); KL is drawn only when non-zero."""
    if not isinstance(history, (list, tuple)) or not history:
        raise ValueError("history is empty: plot_metrics needs one dict of metrics per iteration "
                         "(Trainer.history, or the lines of a run's metrics.jsonl)")
    for i, h in enumerate(history):
        if not isinstance(h, dict):
            raise ValueError(f"history[{i}] is a {type(h).__name__}, expected a dict of metrics")
    panels = _panels(history)
    if not panels:
        raise ValueError("history has none of the Trainer's metric keys (reward/<name>/mean, eps_mean, "
                         "clip_frac_high, clip_frac_low, sft_loss, ratio_mean, group_reward_std, loss, ...); "
                         f"its first entry has {sorted(history[0])[:12]}")
    it = _series(history, "iteration")
    xs = [float(i) for i in range(len(history))]
    if it is not None:
        xs = [v if math.isfinite(v) else float(i) for i, v in enumerate(it)]

    s = SCALE
    cols = min(3, len(panels))
    nrows = math.ceil(len(panels) / cols)
    pw, ph, gap, pad = 330 * s, 210 * s, 22 * s, 20 * s
    head = 46 * s
    W = pad * 2 + cols * pw + (cols - 1) * gap
    H = pad * 2 + head + nrows * ph + (nrows - 1) * gap
    img = Image.new("RGB", (W, H), BG)
    draw = ImageDraw.Draw(img)
    draw.text((pad, pad), title or "Training metrics", font=font(20 * s), fill=INK)
    n = len(history)
    sub = f"{n} iteration{'s' if n != 1 else ''}" + (f" · {int(min(xs))}-{int(max(xs))}" if n > 1 else "")
    draw.text((pad, pad + 26 * s), sub, font=font(12 * s), fill=MUTED)
    placed = []
    for i, panel in enumerate(panels):
        r, c = divmod(i, cols)
        x0 = pad + c * (pw + gap)
        y0 = pad + head + r * (ph + gap)
        bottom = i + cols >= len(panels)
        placed.append(_draw_panel(draw, (x0, y0, x0 + pw, y0 + ph), dict(panel, series=_series_of(panel, xs)), s,
                                  bottom))
    out = img.resize((W // s, H // s), Image.LANCZOS)
    out.info["treerpo_panels"] = placed
    return out


# one colour per compared run (presets, variants), distinct on white
SERIES_COLOURS = [BLUE, RED, GREEN, PURPLE, (220, 140, 20), (40, 160, 170), (140, 90, 50), (200, 80, 150),
                  (90, 90, 90), (120, 170, 40), (20, 60, 120), (170, 30, 90)]


def plot_comparison(panels: list[dict], title: str, subtitle: str = "", cols: int = 3) -> Image.Image:
    """Several runs compared in small multiples. Each panel: title, xlabel and series
    [dict(label, x, y, colour, band=(lo, hi) or None)]; every series has its own x values (so
    runs compare against NFE or seconds). One legend, from the first panel's series, under
    the title."""
    if not panels or not all(p.get("series") for p in panels):
        raise ValueError("plot_comparison needs panels, each with at least one series")
    s = SCALE
    cols = min(cols, len(panels))
    nrows = math.ceil(len(panels) / cols)
    pw, ph, gap, pad = 330 * s, 230 * s, 22 * s, 20 * s
    W = pad * 2 + cols * pw + (cols - 1) * gap
    ftick = font(11 * s)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    rows, cur, width = [], [], 0  # legend rows: as many entries per row as fit
    for sr in panels[0]["series"]:
        w = probe.textlength(sr["label"], font=ftick) + 34 * s
        if cur and width + w > W - 2 * pad:
            rows.append(cur)
            cur, width = [], 0
        cur.append((sr["label"], sr["colour"], w))
        width += w
    rows.append(cur)
    head = 46 * s + len(rows) * 18 * s
    H = pad * 2 + head + nrows * ph + (nrows - 1) * gap
    img = Image.new("RGB", (W, H), BG)
    draw = ImageDraw.Draw(img)
    draw.text((pad, pad), title, font=font(20 * s), fill=INK)
    draw.text((pad, pad + 26 * s), subtitle, font=font(12 * s), fill=MUTED)
    for r, row in enumerate(rows):
        x, y = pad, pad + 46 * s + r * 18 * s
        for label, colour, w in row:
            draw.line((x, y + 7 * s, x + 16 * s, y + 7 * s), fill=colour, width=3 * s)
            draw.text((x + 22 * s, y), label, font=ftick, fill=INK)
            x += w
    placed = []
    for i, panel in enumerate(panels):
        r, c = divmod(i, cols)
        x0, y0 = pad + c * (pw + gap), pad + head + r * (ph + gap)
        placed.append(_draw_panel(draw, (x0, y0, x0 + pw, y0 + ph), dict(panel, legend=False), s, True))
    out = img.resize((W // s, H // s), Image.LANCZOS)
    out.info["treerpo_panels"] = placed
    return out
