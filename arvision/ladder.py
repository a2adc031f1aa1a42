"""The calibration ladder: known degradations of real images, scored exactly like the samples.

A number such as ``precision 0.97`` says little on its own; beside the same metric for real
images blurred by 1.5 px, or down-sampled ×4 and back up ("blobs"), it says where a model
sits. Each rung takes the *floor's* training images (:meth:`arvision.judge.Yardstick.floor_pick`,
an equal number of train images, what a perfect generator scores), applies one degradation
and scores the result with :meth:`~arvision.judge.Yardstick.score`, the images' own labels for
class accuracy: each rung differs from the floor only by its degradation. Rung 0 is the floor.

Families, each ordered mildest first (``level`` grows with the damage): Gaussian blur (σ in
px), down-then-up sampling (factor), additive Gaussian noise (σ of 255), JPEG (quality
falling), colour quantisation (colours falling), patch shuffling (a grid of patches permuted),
and the tokenizer's own reconstructions of the same images (from
:meth:`~arvision.judge.Yardstick.reconstruction_reference`: nothing is reconstructed again).

A metric is *trustworthy on this data* when it gets worse (or stays) at every step along every
family, starting from the floor, and when it tells ×4 blobs from the floor (their values differ
by more than :data:`SEPARATION` of the floor's). ``copy_rate`` is read the other way: the rungs
*are* training images, degraded, so it should fall as the damage grows.

Degradations take and return uint8 ``(N, H, W, C)`` arrays and are deterministic for a seed.
Imports numpy, torch and PIL only; the yardstick is passed in.
"""

from __future__ import annotations

import io
import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# ---------------------------------------------------------------- degradations (uint8 NHWC)


def _to_float_NCHW(images_u8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images_u8)).permute(0, 3, 1, 2).double()  # (N, C, H, W), 0..255


def _to_u8_NHWC(x_NCHW: torch.Tensor) -> np.ndarray:
    return x_NCHW.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def gaussian_blur(images_u8: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of standard deviation ``sigma`` px (kernel radius ⌈3σ⌉,
    reflected borders). ``sigma`` → 0 gives the input back exactly."""
    radius = int(math.ceil(3 * sigma))
    if sigma <= 0 or radius == 0:
        return images_u8.copy()
    x_NCHW = _to_float_NCHW(images_u8)
    n, c, h, w = x_NCHW.shape
    radius = min(radius, h - 1, w - 1)  # reflect padding needs pad < side
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k_K = torch.exp(-0.5 * (t / sigma) ** 2)
    k_K = k_K / k_K.sum()
    x = x_NCHW.reshape(n * c, 1, h, w)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), k_K.view(1, 1, 1, -1))  # along W
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), k_K.view(1, 1, -1, 1))  # along H
    return _to_u8_NHWC(x.reshape(n, c, h, w))


def down_up(images_u8: np.ndarray, factor: int) -> np.ndarray:
    """Area down-sampling by ``factor`` then bilinear up-sampling to the original size: the
    image's coarse colour layout, its detail gone ("blobs" at ×4)."""
    x_NCHW = _to_float_NCHW(images_u8)
    h, w = x_NCHW.shape[-2:]
    small = F.adaptive_avg_pool2d(x_NCHW, (max(1, h // factor), max(1, w // factor)))
    return _to_u8_NHWC(F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False))


def gaussian_noise(images_u8: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    """Additive Gaussian noise of standard deviation ``sigma`` (in 0..255 units), clipped."""
    rng = np.random.default_rng(seed)
    noisy = images_u8.astype(np.float64) + rng.normal(0.0, sigma, size=images_u8.shape)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def _pil(x_HWC: np.ndarray) -> Image.Image:
    return Image.fromarray(x_HWC[..., 0] if x_HWC.shape[-1] == 1 else x_HWC)


def _from_pil(img: Image.Image, channels: int) -> np.ndarray:
    a = np.asarray(img, dtype=np.uint8)
    return a[..., None] if channels == 1 else a


def jpeg(images_u8: np.ndarray, quality: int) -> np.ndarray:
    """Each image through JPEG at ``quality`` (1..95; libjpeg is deterministic)."""
    out = np.empty_like(images_u8)
    for i, x in enumerate(images_u8):
        buf = io.BytesIO()
        _pil(x).save(buf, format="JPEG", quality=int(quality))
        out[i] = _from_pil(Image.open(buf), images_u8.shape[-1])
    return out


def quantise_colours(images_u8: np.ndarray, colours: int) -> np.ndarray:
    """Each image reduced to its own palette of ``colours`` colours (median cut, no dither)."""
    out = np.empty_like(images_u8)
    for i, x in enumerate(images_u8):
        img = _pil(x)
        q = img.convert("RGB").quantize(colors=int(colours), method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
        out[i] = _from_pil(q.convert(img.mode), images_u8.shape[-1])
    return out


def shuffle_patches(images_u8: np.ndarray, grid: int, seed: int = 0) -> np.ndarray:
    """Each image cut into a ``grid``×``grid`` grid of patches, the patches permuted (a seeded
    permutation per image): every local statistic kept, the layout destroyed. Rows or columns
    past ``grid`` · ⌊side / grid⌋ stay in place."""
    rng = np.random.default_rng(seed)
    n, h, w, c = images_u8.shape
    ph, pw = h // grid, w // grid
    out = images_u8.copy()
    core = images_u8[:, : ph * grid, : pw * grid]
    # (N, gh*ph, gw*pw, C) -> (N, gh*gw, ph, pw, C)
    patches_NPhwC = core.reshape(n, grid, ph, grid, pw, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, grid * grid, ph, pw, c)
    perm_NP = np.stack([rng.permutation(grid * grid) for _ in range(n)]) if n else np.zeros((0, grid * grid), int)
    shuffled = np.take_along_axis(patches_NPhwC, perm_NP[:, :, None, None, None], axis=1)
    out[:, : ph * grid, : pw * grid] = shuffled.reshape(n, grid, grid, ph, pw, c).transpose(0, 1, 3, 2, 4, 5).reshape(
        n, ph * grid, pw * grid, c)
    return out


# ---------------------------------------------------------------- the rungs


@dataclass(frozen=True)
class Rung:
    """One degradation at one strength. ``level`` orders a family mildest first; ``param``
    is the strength in the family's own unit (blur σ, JPEG quality ...)."""

    name: str
    family: str
    param: float
    level: float
    label: str
    apply: Callable[[np.ndarray, int], np.ndarray] | None  # (images, seed) -> images; None: not a pixel function


FLOOR = Rung("floor", "floor", 0.0, 0.0, "floor (train images, as they are)", None)
#: the tokenizer's reconstructions of the floor's images (needs the reconstruction reference)
RECONSTRUCTION = Rung("tokenizer", "tokenizer", 0.0, 1.0, "tokenizer reconstructions", None)

BLUR_SIGMAS = (0.5, 1.0, 1.5, 2.0, 3.0)

#: the degradation rungs, family by family, mildest first
RUNGS: tuple[Rung, ...] = (
    *(Rung(f"blur_{s:g}", "blur", s, s, f"blur σ={s:g} px", lambda x, _, s=s: gaussian_blur(x, s)) for s in BLUR_SIGMAS),
    *(Rung(f"downup_x{f}", "downup", f, f, f"down-up ×{f}", lambda x, _, f=f: down_up(x, f)) for f in (2, 4)),
    *(Rung(f"noise_{s}", "noise", s, s, f"noise σ={s}/255", lambda x, seed, s=s: gaussian_noise(x, s, seed)) for s in (8, 16, 32)),
    *(Rung(f"jpeg_q{q}", "jpeg", q, 100 - q, f"JPEG q={q}", lambda x, _, q=q: jpeg(x, q)) for q in (30, 10)),
    *(Rung(f"quantise_{k}", "quantise", k, 256 - k, f"{k} colours", lambda x, _, k=k: quantise_colours(x, k)) for k in (8, 4)),
    Rung("shuffle_4x4", "shuffle", 4, 4, "4×4 patches shuffled", lambda x, seed: shuffle_patches(x, 4, seed)),
)

#: the blobs the metrics must tell from the floor, and by how much (share of the floor's value)
BLOBS, SEPARATION = "downup_x4", 0.05
#: a harsher step that scores better by at most this share of the metric's range over the whole
#: ladder is read as sampling noise, not as a reversal (one image in 500 moves a rate by 0.002)
MONOTONE_TOL = 0.02

#: the metrics of the ladder's table, and whether each gets *worse* as it rises
LADDER_KEYS = ("fd", "kid", "precision", "recall", "density", "coverage", "class_accuracy", "copy_rate")
WORSE_UP = {"fd": True, "kid": True, "precision": False, "recall": False, "density": False, "coverage": False,
            "class_accuracy": False, "copy_rate": False, "copy_rate_pixels": False}


#: the rungs ``evaluate`` scores (14 scorings with the floor and the tokenizer's, each of up to
#: 500 images: some 60 s of CPU on the demo); bench/ladder.py scores all of :data:`RUNGS`
# evaluate's own ladder: two scorings fewer than the first cut (blur 0.5, noise 32) keep the
# demo's evaluate within +60 s of CPU (each rung is one scoring of up to 500 images, ~4.5 s on 2
# cores); bench/ladder.py scores every rung
EVALUATE_RUNGS = tuple(r for r in RUNGS if r.name not in ("noise_16", "jpeg_q30", "quantise_8", "blur_0.5", "noise_32"))


def families(names=None) -> dict[str, list[Rung]]:
    """Each degradation family, mildest first (the floor is step 0 of every one); with
    ``names``, of those rungs only (a ladder's own)."""
    out: dict[str, list[Rung]] = {}
    for r in sorted((r for r in RUNGS if names is None or r.name in names), key=lambda r: r.level):
        out.setdefault(r.family, []).append(r)
    return out


def degrade(images_u8: np.ndarray, rung: Rung, seed: int) -> np.ndarray:
    """``rung`` applied to uint8 ``(N, H, W, C)`` images."""
    return images_u8.copy() if rung.apply is None else rung.apply(images_u8, seed)


# ---------------------------------------------------------------- scoring


def score_ladder(yard: Any, n: int, seed: int, recon_ref: Any = None, rungs=RUNGS) -> dict[str, Any]:
    """Every rung scored by ``yard.score`` (a :class:`arvision.judge.Yardstick`) against val,
    as the samples are: the floor's ``n`` training images (``yard.floor_pick(n, seed)``), each
    rung's degradation of them (``rungs``: some of :data:`RUNGS`), and with ``recon_ref`` the tokenizer's reconstructions of them
    (its stored images and features, reused). Copies are checked as for samples (against
    ``recon_ref`` too when given).

    Returns the ladder: ``{"n_images", "seed", "seconds", "rungs": {name: {"family", "param",
    "label", "metrics"}}, "monotone": {metric: {family: bool}}, "separates_blobs": {metric: bool}}``.
    """
    t0, cpu0 = time.perf_counter(), time.process_time()
    idx = yard.floor_pick(n, seed)
    images = yard.train_u8[idx]  # (n, H, W, C) uint8
    labels = yard.train_labels[idx] if yard.labelled else None
    scored: dict[str, dict[str, Any]] = {}

    def add(rung: Rung, imgs: np.ndarray, feats=None) -> None:
        metrics, _ = yard.score(imgs, labels, recon_ref=recon_ref, feats=feats)
        scored[rung.name] = {"family": rung.family, "param": rung.param, "label": rung.label, "metrics": metrics}

    add(FLOOR, images, feats=yard.train_feats[idx])  # the floor's own features: the same numbers
    for rung in rungs:
        add(rung, degrade(images, rung, seed + RUNGS.index(rung)))  # a rung's noise does not hang on which others run
    if recon_ref is not None:
        add(RECONSTRUCTION, recon_ref.train_u8[idx], feats=np.asarray(recon_ref.train_feats[idx]))
    ladder = {"n_images": int(len(idx)), "seed": int(seed), "rungs": scored}
    ladder.update(trust(ladder))
    ladder["seconds"] = round(time.perf_counter() - t0, 1)  # wall: depends on the machine's load
    ladder["cpu_seconds"] = round(time.process_time() - cpu0, 1)  # this process's CPU time, all threads
    return ladder


def _values(ladder: dict[str, Any], names: list[str], key: str) -> list[float]:
    return [float(ladder["rungs"][n]["metrics"].get(key, math.nan)) for n in names]


def trust(ladder: dict[str, Any]) -> dict[str, Any]:
    """Per metric: monotone along each family from the floor (no harsher step better than the
    one before by more than :data:`MONOTONE_TOL` of the metric's range over the ladder;
    ``monotone_strict``: by anything); and whether ×4 blobs differ from the floor by more
    than :data:`SEPARATION` of the floor's value."""
    metrics = [k for k in WORSE_UP if k in ladder["rungs"]["floor"]["metrics"]]
    monotone: dict[str, dict[str, bool]] = {}
    strict: dict[str, dict[str, bool]] = {}
    separates: dict[str, bool] = {}
    for key in metrics:
        sign = 1.0 if WORSE_UP[key] else -1.0  # sign * value grows as it gets worse
        every = [x for x in _values(ladder, list(ladder["rungs"]), key) if math.isfinite(x)]
        tol = MONOTONE_TOL * (max(every) - min(every)) if every else 0.0
        monotone[key], strict[key] = {}, {}
        for fam, rs in families(ladder["rungs"]).items():
            v = [sign * x for x in _values(ladder, ["floor"] + [r.name for r in rs], key)]
            monotone[key][fam] = bool(all(b >= a - tol for a, b in zip(v, v[1:])))
            strict[key][fam] = bool(all(b >= a for a, b in zip(v, v[1:])))
        if BLOBS in ladder["rungs"]:
            f, b = _values(ladder, ["floor", BLOBS], key)
            separates[key] = bool(abs(b - f) > SEPARATION * max(abs(f), 1e-12))
    return {"monotone": monotone, "monotone_strict": strict, "separates_blobs": separates}


def trustworthy(ladder: dict[str, Any], key: str) -> bool:
    """Monotone along every family and tells ×4 blobs from the floor."""
    return all(ladder["monotone"].get(key, {}).values()) and ladder["separates_blobs"].get(key, False)


def blur_equivalent(ladder: dict[str, Any], key: str, value: float) -> tuple[float, str]:
    """The blur σ (px) at which ``key`` equals ``value``: linear between the two blur rungs
    (the floor as σ 0) that bracket it, the first such pair. Returns ``(sigma, relation)``,
    relation ``"="``; ``"<"`` when ``value`` is better than the floor's (sigma 0); ``">"``
    when worse than the strongest blur's (sigma: the strongest)."""
    blur = families(ladder["rungs"]).get("blur", [])
    names, sigmas = ["floor"] + [r.name for r in blur], [0.0] + [r.param for r in blur]
    sign = 1.0 if WORSE_UP.get(key, True) else -1.0
    v = [sign * x for x in _values(ladder, names, key)]
    target = sign * float(value)
    if not all(map(math.isfinite, v + [target])):
        return math.nan, "="
    if target <= v[0]:
        return 0.0, "<" if target < v[0] else "="
    for (s0, a), (s1, b) in zip(zip(sigmas, v), zip(sigmas[1:], v[1:])):
        if min(a, b) <= target <= max(a, b):
            return (s0 if a == b else s0 + (s1 - s0) * (target - a) / (b - a)), "="
    return sigmas[-1], ">"


def nearest_rung(ladder: dict[str, Any], key: str, value: float) -> str:
    """The rung whose ``key`` is closest to ``value``."""
    rungs = {n: r["metrics"][key] for n, r in ladder["rungs"].items() if key in r["metrics"]}
    return min(rungs, key=lambda n: abs(rungs[n] - value)) if rungs else ""


def flat_metrics(ladder: dict[str, Any], model: dict[str, float]) -> dict[str, float]:
    """A few numbers for ``metrics/eval.json``: ``ladder_blur_sigma_equiv_<metric>``, the blur σ
    whose rung scores like the model (clipped to [0, the strongest blur]: the report says
    when), and ``ladder_trustworthy_<metric>`` (1 or 0)."""
    out: dict[str, float] = {}
    for key in LADDER_KEYS:
        if key in model and key in ladder["rungs"]["floor"]["metrics"]:
            if key != "copy_rate":  # the model's copies are not degraded training images
                out[f"ladder_blur_sigma_equiv_{key}"] = float(blur_equivalent(ladder, key, model[key])[0])
            out[f"ladder_trustworthy_{key}"] = float(trustworthy(ladder, key))
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "—" if math.isnan(v) else f"{v:.4g}"
    return "—" if v is None else str(v)


def ladder_table(ladder: dict[str, Any], model: dict[str, float] | None = None) -> list[str]:
    """Markdown table lines: one row per rung (and the model's first), the ladder's metrics."""
    keys = [k for k in LADDER_KEYS if k in ladder["rungs"]["floor"]["metrics"]]
    marks = {k: "" if trustworthy(ladder, k) else " ⚠" for k in keys}
    lines = ["| rung | " + " | ".join(k + marks[k] for k in keys) + " |", "|---" * (len(keys) + 1) + "|"]
    if model is not None:
        lines.append("| **this model** | " + " | ".join(f"**{_fmt(model.get(k))}**" for k in keys) + " |")
    for r in ladder["rungs"].values():
        lines.append(f"| {r['label']} | " + " | ".join(_fmt(r["metrics"].get(k)) for k in keys) + " |")
    return lines


def untrusted_lines(ladder: dict[str, Any]) -> list[str]:
    """One line per metric that is not trustworthy on this data, and why."""
    out = []
    for key in [k for k in LADDER_KEYS if k in ladder["monotone"]]:
        bad = [f for f, ok in ladder["monotone"][key].items() if not ok]
        why = ([f"not monotone along {', '.join(bad)}"] if bad else []) + (
            [f"×4 blobs within {SEPARATION:.0%} of the floor"] if not ladder["separates_blobs"].get(key, True) else [])
        if why:
            out.append(f"- ⚠ `{key}`: not trustworthy on this data ({'; '.join(why)}).")
    return out


def ladder_section(ladder: dict[str, Any], model: dict[str, float]) -> list[str]:
    """The report's "Calibration ladder" section (markdown lines)."""
    lines = ["## Calibration ladder", "",
             f"The floor's {ladder['n_images']} training images, each rung one known degradation of them, scored "
             "exactly like the samples (their own labels for class accuracy). ⚠: the metric is not monotone "
             f"along a family (a harsher step better by more than {MONOTONE_TOL:.0%} of its range over the ladder), "
             "or cannot tell ×4 down-up blobs from the floor: not trustworthy on this data. "
             "`copy_rate` should fall down the ladder (the rungs are degraded training images).", ""]
    lines += ladder_table(ladder, model) + [""]
    said = []
    for key in [k for k in LADDER_KEYS if k in model and k in ladder["rungs"]["floor"]["metrics"] and k != "copy_rate"]:
        sigma, rel = blur_equivalent(ladder, key, model[key])
        near = ladder["rungs"][nearest_rung(ladder, key, model[key])]["label"]
        like = {"=": f"σ≈{sigma:.2g}", "<": "σ 0, better than the floor", ">": f"σ>{sigma:g}"}[rel]
        said.append(f"{like} ({key}; nearest rung: {near})")
    if said:
        lines += ["These samples score like training images blurred with " + ", ".join(said) + "; "
                  f"σ>{BLUR_SIGMAS[-1]:g}: worse than the strongest blur.", ""]
    lines += untrusted_lines(ladder) + [""]
    return lines
