"""Sample quality and memorisation, on features computed once (:func:`arvision.features.embed`).

Everything here takes feature arrays ``(N, D)`` (numpy or torch), so the real sets (val,
train) are embedded once and every generated set is scored against them.

- Fréchet distance and KID: torchmetrics' ``FrechetInceptionDistance`` and
  ``KernelInceptionDistance``, given a pass-through "extractor" so that they work on the
  pipeline's own features.
- precision / recall (Kynkäänniemi et al. 2019, k-NN manifolds) and density / coverage
  (Naeem et al. 2020): the authors' ``prdc`` package; above :data:`PRDC_MAX_POINTS` points the
  same formulas here, in blocks (``prdc`` holds full distance matrices: 20 GB at 50k points).
  Their bootstrap (:func:`bootstrap_resamples`) is ours: ``prdc`` has no weighted form.
- memorisation: each sample's nearest training image, in feature space and in pixel space,
  against a threshold calibrated on real held-out images (:data:`COPY_PERCENTILE`).
- Inception FID (:func:`inception_fd`), optional: needs ``torch-fidelity`` and a weights file.
"""

from __future__ import annotations

import importlib.util
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Union

import numpy as np
import torch
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from arvision.errors import UserError

Array = Union[np.ndarray, Tensor]

#: A sample is flagged a copy when its distance to the nearest training image is at or below
#: this percentile of the same distance for real val images (unseen in training): it sits
#: closer to a training image than 95 % of real unseen images do. Real held-out images are
#: so flagged 5 % of the time by construction; a copying generator far more often.
COPY_PERCENTILE = 5.0
#: copy scores (threshold / distance) are capped here, so an exact copy (distance 0) is finite
COPY_SCORE_CAP = 1000.0
#: KID: subsets drawn, and the largest subset size; smaller sets use half their size, so that
#: the subsets differ and the std over them means something
KID_SUBSETS = 100
KID_MAX_SUBSET = 100
#: rows of a distance block: memory ~ CHUNK × (other set's size) floats
CHUNK = 1024


def _feats(x: Array) -> Tensor:
    """Features as a float64 CPU tensor ``(N, D)``."""
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x)
    return t.detach().to("cpu", torch.float64).flatten(1)


def _stored_feats(x: Array) -> Tensor:
    """Reference features as kept: a CPU tensor ``(N, D)`` in the dtype they come in (float32
    from the feature net, sharing the array's memory), half of float64's memory for a large
    training set. :func:`_nearest` widens each block to float64 through :func:`_feats`, exactly
    (float32 → float64 is exact), so every distance is the same as with float64 storage."""
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x)
    return t.detach().cpu().flatten(1)


class _Precomputed(nn.Module):
    """torchmetrics' feature-extractor slot for features computed already: passes them on."""

    def __init__(self, dim: int):
        super().__init__()
        self.num_features = dim  # read by FrechetInceptionDistance instead of a dummy forward

    def forward(self, feats_ND: Tensor) -> Tensor:
        return feats_ND


def frechet_distance(gen_feats: Array, real_feats: Array) -> float:
    """Fréchet distance between Gaussians fitted to the two feature sets (FID's formula)."""
    gen, real = _feats(gen_feats), _feats(real_feats)
    fd = FrechetInceptionDistance(feature=_Precomputed(real.shape[1]))
    fd.update(real, real=True)
    fd.update(gen, real=False)
    return float(fd.compute())


def kernel_distance(gen_feats: Array, real_feats: Array, *, seed: int = 0) -> tuple[float, float]:
    """KID (Bińkowski et al. 2018): mean and std over :data:`KID_SUBSETS` subsets of the
    unbiased squared MMD, cubic polynomial kernel. Subset size: min(:data:`KID_MAX_SUBSET`,
    half the smaller set), so small sets work. Seeded: the same inputs give the same value."""
    gen, real = _feats(gen_feats), _feats(real_feats)
    if min(len(gen), len(real)) < 4:
        raise ValueError(f"KID needs at least 4 images in each set, got {len(gen)} generated and {len(real)} real")
    size = min(KID_MAX_SUBSET, min(len(gen), len(real)) // 2)
    with warnings.catch_warnings():  # "will save all extracted features": small feature arrays here
        warnings.simplefilter("ignore", UserWarning)
        kid = KernelInceptionDistance(feature=_Precomputed(real.shape[1]), subsets=KID_SUBSETS, subset_size=size)
    kid.update(real, real=True)
    kid.update(gen, real=False)
    with torch.random.fork_rng(devices=[]):  # its subsets come from the global RNG
        torch.manual_seed(seed)
        mean, std = kid.compute()
    return float(mean), float(std)


def _kth_nn_distance(x_ND: Tensor, k: int) -> Tensor:
    """Each point's distance to its k-th nearest other point in the same set: ``(N,)``."""
    if len(x_ND) <= k:
        raise ValueError(f"k-NN radii need more than nearest_k={k} points, got {len(x_ND)}")
    out = [torch.cdist(x_ND[i : i + CHUNK], x_ND).topk(k + 1, dim=1, largest=False).values[:, k]
           for i in range(0, len(x_ND), CHUNK)]  # column 0 is the point itself
    return torch.cat(out)


#: above this many points in either set, :func:`prdc` computes in blocks of :data:`CHUNK` rows
#: instead of calling the ``prdc`` package, whose three full distance matrices (float64) and
#: argpartition index take ~3 GB at 10,000 points and grow with the square
PRDC_MAX_POINTS = 10_000


def prdc(gen_feats: Array, real_feats: Array, *, nearest_k: int = 5) -> dict[str, float]:
    """precision, recall (Kynkäänniemi et al. 2019) and density, coverage (Naeem et al. 2020).

    Each real point's ball reaches its k-th nearest real neighbour (each generated point's, its
    k-th generated neighbour); a point is inside a ball when strictly closer than its radius.
    precision: share of generated points inside some real ball (fidelity); recall: share of
    real points inside some generated ball (diversity); density: mean count of real balls
    holding a generated point, over k (≈1 when the sets match, more when samples crowd dense
    regions); coverage: share of real balls holding some generated point (robust to outliers in
    the generated set).

    Computed by the authors' ``prdc.compute_prdc`` (float64); sets of more than
    :data:`PRDC_MAX_POINTS` points, or where ``prdc`` cannot be imported (it needs scikit-learn
    and scipy, ~50 MB, which the GPU machine lacks), by :func:`_prdc_blocks`, the same formulas
    in bounded memory.
    """
    gen, real = _feats(gen_feats), _feats(real_feats)
    for name, x in (("generated", gen), ("real", real)):
        if len(x) <= nearest_k:
            raise ValueError(f"k-NN radii need more than nearest_k={nearest_k} points, got {len(x)} {name}")
    try:
        from prdc import compute_prdc
    except ImportError:
        compute_prdc = None
    if compute_prdc is None or max(len(gen), len(real)) > PRDC_MAX_POINTS:
        return _prdc_blocks(gen, real, nearest_k)
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # it prints the set sizes on every call
        out = compute_prdc(real_features=real.numpy(), fake_features=gen.numpy(), nearest_k=nearest_k)
    return {k: float(out[k]) for k in ("precision", "recall", "density", "coverage")}


def _prdc_blocks(gen: Tensor, real: Tensor, nearest_k: int) -> dict[str, float]:
    """:func:`prdc` for large sets: memory ~ :data:`CHUNK` × (the other set's size) floats."""
    r_real_N = _kth_nn_distance(real, nearest_k)
    r_gen_M = _kth_nn_distance(gen, nearest_k)
    in_real_balls_M = torch.zeros(len(gen), dtype=torch.long)  # per generated point: real balls holding it
    covered_N = torch.zeros(len(real), dtype=torch.bool)
    recalled_N = torch.zeros(len(real), dtype=torch.bool)
    for i in range(0, len(gen), CHUNK):
        d_mN = torch.cdist(gen[i : i + CHUNK], real)  # m: this block of generated points
        inside_mN = d_mN < r_real_N[None]
        in_real_balls_M[i : i + CHUNK] = inside_mN.sum(1)
        covered_N |= inside_mN.any(0)
        recalled_N |= (d_mN < r_gen_M[i : i + CHUNK, None]).any(0)
    return {
        "precision": float((in_real_balls_M > 0).double().mean()),
        "recall": float(recalled_N.double().mean()),
        "density": float(in_real_balls_M.double().sum() / (nearest_k * len(gen))),
        "coverage": float(covered_N.double().mean()),
    }


def sample_metrics(gen_feats: Array, real_feats: Array, *, nearest_k: int = 5) -> dict[str, float]:
    """``fd``, ``kid``, ``kid_std``, ``precision``, ``recall``, ``density``, ``coverage`` of a
    generated set against a real one, both as features ``(N, D)``."""
    kid, kid_std = kernel_distance(gen_feats, real_feats)
    return {
        "fd": frechet_distance(gen_feats, real_feats),
        "kid": kid,
        "kid_std": kid_std,
        **prdc(gen_feats, real_feats, nearest_k=nearest_k),
    }


#: bootstrap intervals: the central CI_LEVEL share of the resampled values (percentile method)
CI_LEVEL = 0.95
#: above this many points in either set, KID and the k-NN metrics get no interval: their
#: resamples read the full (M, M), (N, N) and (M, N) kernel and distance matrices (float64:
#: 2500 points, 50 MB each)
BOOTSTRAP_MAX_POINTS = 2500
#: resamples of a chunk evaluated together: memory ~ BOOT_CHUNK × M × N booleans and floats
BOOT_CHUNK = 16
#: the metrics that :func:`bootstrap_resamples` resamples (``copy_rate`` when given the flags)
BOOTSTRAP_KEYS = ("fd", "kid", "precision", "recall", "density", "coverage", "copy_rate")


def bootstrap_counts(m: int, n: int, resamples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The resamples as counts: ``(B, m)`` and ``(B, n)`` int64, how often each generated and
    each real point is drawn (with replacement, ``m`` and ``n`` draws). Fixed by ``(m, n,
    resamples, seed)``: two generated sets of one size, scored against one real set with one
    seed, are resampled at the same indices, so their resampled values pair up."""
    rng = np.random.default_rng(seed)
    idx_BM, idx_BN = rng.integers(0, m, (resamples, m)), rng.integers(0, n, (resamples, n))

    def counts(idx_BK: np.ndarray, size: int) -> np.ndarray:  # (B, size): draws of each point
        rows = np.arange(len(idx_BK))[:, None].repeat(idx_BK.shape[1], 1)
        out_BK = np.zeros((len(idx_BK), size), np.int64)
        np.add.at(out_BK, (rows, idx_BK), 1)
        return out_BK

    return counts(idx_BM, m), counts(idx_BN, n)


def _weighted_moments(x_ND: Tensor, w_BN: Tensor) -> tuple[Tensor, Tensor]:
    """Mean ``(B, D)`` and covariance ``(B, D, D)`` (unbiased, as torchmetrics') of each
    resample, a resample being the counts ``w_BN`` of the rows of ``x_ND``."""
    n_B11 = w_BN.sum(1)[:, None, None]
    mu_BD = w_BN @ x_ND / n_B11[:, 0]
    xc_BND = (x_ND[None] - mu_BD[:, None]) * w_BN[..., None].sqrt()  # each row weighted by its count
    return mu_BD, xc_BND.transpose(1, 2) @ xc_BND / (n_B11 - 1)


@contextmanager
def _one_thread() -> Iterator[None]:
    """Torch on one CPU thread within the block. The bootstrap's work is many small pieces
    (batched eigh/SVD of 128 × 128 matrices, (16, 500, 400) comparisons), where the threads'
    hand-offs cost more than the work: on the 2-core machine under load, 200 resamples took
    6 s of CPU on two threads and 2 s on one (a batch of 16 eigh: 0.5 s against 0.02 s)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _sqrtm_psd(c_BDD: Tensor) -> Tensor:
    """The symmetric square root of covariances (eigenvalues below 0, rounding, set to 0)."""
    lam_BD, u_BDD = torch.linalg.eigh(c_BDD)
    return (u_BDD * lam_BD.clamp_min(0).sqrt()[:, None, :]) @ u_BDD.transpose(1, 2)


def _fd_batched(mu1_BD: Tensor, cov1_BDD: Tensor, mu2_BD: Tensor, cov2_BDD: Tensor) -> Tensor:
    """Fréchet distance ``(B,)``. tr √(Σ1Σ2) is the sum of the singular values of √Σ2 √Σ1
    (their squares are the eigenvalues of √Σ1 Σ2 √Σ1, those of Σ1Σ2): the value of
    torchmetrics' ``eigvals(Σ1 Σ2)`` to 1e-13 here, three times faster, and exact for singular
    covariances (a collapsed generator's)."""
    tr_B = cov1_BDD.diagonal(dim1=1, dim2=2).sum(-1) + cov2_BDD.diagonal(dim1=1, dim2=2).sum(-1)
    tr_sqrt_B = torch.linalg.svdvals(_sqrtm_psd(cov2_BDD) @ _sqrtm_psd(cov1_BDD)).sum(-1)
    return (mu1_BD - mu2_BD).square().sum(-1) + tr_B - 2 * tr_sqrt_B


#: the k-NN radius within a resample is looked for among each point's RADIUS_RANKS nearest
#: others: a resample draws each point ~Poisson(1) times, so fewer than k of 64 neighbours are
#: drawn with probability ~1e-20 (k = 5); the search then stops at the 64th
RADIUS_RANKS = 64


def _nearest_others(d_NN: Tensor) -> tuple[Tensor, Tensor]:
    """Each point's :data:`RADIUS_RANKS` nearest other points: distances and indices ``(N, R)``,
    nearest first, the point itself left out."""
    d_self_inf = d_NN.clone()
    d_self_inf.fill_diagonal_(float("inf"))
    return d_self_inf.topk(min(RADIUS_RANKS, len(d_NN) - 1), dim=1, largest=False)


def _kth_radius(d_sorted_NR: Tensor, order_NR: Tensor, w_BN: Tensor, k: int) -> Tensor:
    """Each point's k-NN radius within each resample: ``(B, N)``, the distance to its k-th
    nearest *other* point counting the resample's multiplicities (a point drawn twice is two
    neighbours, the point's own copies none: they would make every radius of a point drawn
    twice 0). ``d_sorted_NR, order_NR``: :func:`_nearest_others`. With all counts 1 this is
    :func:`_kth_nn_distance`."""
    cum_BNR = w_BN[:, order_NR].cumsum(-1)  # neighbours drawn up to each rank
    reached_BNR = cum_BNR >= k
    last = torch.tensor(order_NR.shape[1] - 1)
    rank_BN = torch.where(reached_BNR.any(-1), reached_BNR.int().argmax(-1), last)
    return d_sorted_NR.gather(1, rank_BN.T).T


def _within_mean(k_NN: Tensor, c_BN: Tensor) -> Tensor:
    """Each resample's mean kernel value over pairs of distinct points ``(B,)`` (the U-statistic
    of MMD², a point's own copies left out as the diagonal is): ``c_BN`` its counts."""
    pairs_B = c_BN.sum(1) ** 2 - (c_BN * c_BN).sum(1)
    return (((c_BN @ k_NN) * c_BN).sum(1) - (c_BN * c_BN) @ k_NN.diagonal()) / pairs_B


def bootstrap_resamples(gen_feats: Array, real_feats: Array, *, nearest_k: int = 5, resamples: int = 200,
                        seed: int = 0, copy_flags: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The metrics of :func:`sample_metrics` (and ``copy_rate`` from per-sample ``copy_flags``)
    on ``resamples`` bootstrap resamples of both sets: ``{metric: (B,)}``.

    Generated and real points are both drawn with replacement (:func:`bootstrap_counts`), so
    the spread holds the reference's share of the noise too. Nothing is embedded again: a
    resample is a vector of counts, and each metric is computed from the full sets' moments,
    kernel and distance matrices weighted by those counts (cheap: matrix products, no cdist per
    resample). Per metric:

    - ``fd``: the Fréchet distance of the count-weighted means and covariances (torchmetrics'
      formula, the one :func:`frechet_distance` computes);
    - ``kid``: the unbiased squared MMD of the whole resampled sets, cubic kernel as KID's
      (the point estimate averages it over subsets: the same expectation);
    - precision, recall, density, coverage: as :func:`prdc`, the k-NN radii recomputed in each
      resample (:func:`_kth_radius`), balls and points counted with their multiplicity;
    - ``copy_rate``: the share of flagged samples; the thresholds stay those calibrated on all
      of val (the copy flags are against the training set, which is not resampled).

    KID and the k-NN metrics are left out when either set has more than
    :data:`BOOTSTRAP_MAX_POINTS` points. The same ``(len(gen), len(real), resamples, seed)``
    resample the same indices: values of two generated sets pair up (:func:`paired_interval`).
    Cost: ~2 s of CPU for 200 resamples of 500 samples against 400 val images in 128 dims.
    """
    with _one_thread():
        return _bootstrap_resamples(gen_feats, real_feats, nearest_k, resamples, seed, copy_flags)


def _bootstrap_resamples(gen_feats: Array, real_feats: Array, nearest_k: int, resamples: int, seed: int,
                         copy_flags: np.ndarray | None) -> dict[str, np.ndarray]:
    gen, real = _feats(gen_feats), _feats(real_feats)
    m, n, d = len(gen), len(real), gen.shape[1]
    w_np, v_np = bootstrap_counts(m, n, resamples, seed)
    w_BM, v_BN = torch.from_numpy(w_np).double(), torch.from_numpy(v_np).double()
    out: dict[str, list[Tensor]] = {k: [] for k in BOOTSTRAP_KEYS}
    knn = max(m, n) <= BOOTSTRAP_MAX_POINTS and min(m, n) > nearest_k
    if knn:
        kern = lambda a, b: (a @ b.T / d + 1.0) ** 3  # noqa: E731  KID's polynomial kernel (degree 3, gamma 1/d, coef 1)
        k_gg_MM, k_rr_NN, k_gr_MN = kern(gen, gen), kern(real, real), kern(gen, real)
        d_gr_MN = torch.cdist(gen, real)
        near_gen, near_real = _nearest_others(torch.cdist(gen, gen)), _nearest_others(torch.cdist(real, real))
    flags_M = None if copy_flags is None else torch.as_tensor(np.asarray(copy_flags), dtype=torch.float64)
    for b in range(0, resamples, BOOT_CHUNK):
        w, v = w_BM[b : b + BOOT_CHUNK], v_BN[b : b + BOOT_CHUNK]  # (Bc, M), (Bc, N)
        mu_g, cov_g = _weighted_moments(gen, w)
        mu_r, cov_r = _weighted_moments(real, v)
        out["fd"].append(_fd_batched(mu_g, cov_g, mu_r, cov_r))
        if flags_M is not None:
            out["copy_rate"].append(w @ flags_M / m)
        if not knn:
            continue
        cross = ((w @ k_gr_MN) * v).sum(1) / (w.sum(1) * v.sum(1))
        out["kid"].append(_within_mean(k_gg_MM, w) + _within_mean(k_rr_NN, v) - 2 * cross)
        r_real, r_gen = _kth_radius(*near_real, v, nearest_k), _kth_radius(*near_gen, w, nearest_k)  # (Bc, N), (Bc, M)
        # strictly inside, as prdc counts: all counts 1 give prdc's numbers, ties included
        inside_real = (d_gr_MN[None] < r_real[:, None, :]) & (v[:, None, :] > 0)  # (Bc, M, N): sample in a drawn real ball
        in_gen = (d_gr_MN[None] < r_gen[:, :, None]) & (w[:, :, None] > 0)  # real point in a drawn generated ball
        out["precision"].append((w * inside_real.any(2)).sum(1) / m)
        balls_BM = (inside_real.double() @ v[:, :, None])[..., 0]  # drawn real balls holding each sample
        out["density"].append((w * balls_BM).sum(1) / (nearest_k * m))
        out["coverage"].append((v * inside_real.any(1)).sum(1) / n)
        out["recall"].append((v * in_gen.any(1)).sum(1) / n)
    return {k: torch.cat(vals).numpy() for k, vals in out.items() if vals}


def percentile_interval(values_B: np.ndarray, estimate: float | None = None, level: float = CI_LEVEL) -> tuple[float, float]:
    """The central ``level`` share of bootstrap values: ``(low, high)``; with ``estimate``,
    shifted so that its median sits on the estimate.

    Why shifted: a bootstrap resample holds only ~63 % distinct points, and the set-level
    metrics move with that alone: FD rises (its bias grows as a set's distinct points shrink:
    500 vs 400 points in 128 dims, FD 0.73 resampled to 1.05–1.18), k-NN radii shrink. The
    resampled values' *spread* is the metric's noise; their offset is an artefact of resampling.
    """
    tail = 100 * (1 - level) / 2
    low, mid, high = np.percentile(np.asarray(values_B, np.float64), [tail, 50.0, 100 - tail])
    shift = 0.0 if estimate is None else float(estimate) - mid
    return float(low + shift), float(high + shift)


#: the range each metric can take: a centred interval is clipped to it (a precision of 0.975
#: with a spread of ±0.05 reads [0.925, 1], not [.., 1.025]). KID's unbiased estimate can go below 0.
METRIC_RANGE = {"fd": (0.0, np.inf), "kid": (-np.inf, np.inf), "precision": (0.0, 1.0), "recall": (0.0, 1.0),
                "density": (0.0, np.inf), "coverage": (0.0, 1.0), "copy_rate": (0.0, 1.0)}


def bootstrap_intervals(resampled: dict[str, np.ndarray], estimates: dict[str, float],
                        level: float = CI_LEVEL) -> dict[str, float]:
    """Flat ``<metric>_ci_low`` / ``<metric>_ci_high`` (numbers only: what MLflow and ``dvc
    metrics`` take) from :func:`bootstrap_resamples`' values, each centred on its metric's
    value in ``estimates`` (:func:`percentile_interval`) and clipped to :data:`METRIC_RANGE`."""
    out = {}
    for k, values_B in resampled.items():
        if len(values_B) and k in estimates:
            low, high = percentile_interval(values_B, estimates[k], level)
            lo, hi = METRIC_RANGE.get(k, (-np.inf, np.inf))
            out[f"{k}_ci_low"], out[f"{k}_ci_high"] = float(np.clip(low, lo, hi)), float(np.clip(high, lo, hi))
    return out


def paired_interval(a_B: np.ndarray, b_B: np.ndarray, estimate: float, level: float = CI_LEVEL) -> tuple[float, float]:
    """The interval of the difference a − b of two generated sets' metric, from values
    resampled at the same indices (:func:`bootstrap_counts`: same sizes, same seed), centred
    on ``estimate`` (their values' difference). Pairing removes the noise both share, that of
    the reference set: it is narrower than either set's own interval."""
    a_B, b_B = np.asarray(a_B, np.float64), np.asarray(b_B, np.float64)
    if a_B.shape != b_B.shape:
        raise ValueError(f"paired resamples must match: {a_B.shape} and {b_B.shape}")
    return percentile_interval(a_B - b_B, estimate, level)


def class_accuracy(pred_labels: Array, intended_labels: Array) -> float:
    """Share of samples that the feature classifier assigns to the class they were generated
    for (samples with an intended label < 0 are left out). Chance is Σ_c p_pred(c)·p_int(c),
    1 / num_classes for balanced classes."""
    pred, want = np.asarray(pred_labels), np.asarray(intended_labels)
    keep = want >= 0
    if not keep.any():
        raise ValueError("class accuracy needs samples with intended labels >= 0")
    return float((pred[keep] == want[keep]).mean())


def _pixels(images_u8_NHWC: Array) -> Tensor:
    """uint8 images → float32 ``(N, H·W·C)`` in [0, 1]."""
    return torch.as_tensor(np.asarray(images_u8_NHWC)).flatten(1).float().div(255.0)


#: converted query rows (bytes) held at once by :func:`_nearest`: each such span of queries
#: walks the reference once (a lazily decoded training split is decoded once per span)
QUERY_BYTES = 256 << 20


def _nearest(query: Array, ref: Array, to_vec) -> tuple[Tensor, Tensor]:
    """Each query row's nearest ``ref`` row (L2): ``(distance (N,), index (N,))``.

    Both sides go in blocks of :data:`CHUNK` rows through ``to_vec`` (uint8 images → pixels,
    or features); ``ref`` (an array or a lazy image sequence) is walked once per
    :data:`QUERY_BYTES` of query blocks, not once per block. The numbers do not depend on
    that span: each (query block, ref block) pair is the same ``cdist``, and each query block
    meets the ref blocks in the same order.
    """
    dist, idx = [], []
    i = 0
    while i < len(query):
        qs, held = [], 0  # the query blocks of this walk
        while i < len(query) and (not qs or held < QUERY_BYTES):
            qs.append(to_vec(query[i : i + CHUNK]))
            held += qs[-1].element_size() * qs[-1].nelement()
            i += len(qs[-1])
        best_d = [torch.full((len(q),), float("inf"), dtype=q.dtype) for q in qs]
        best_i = [torch.zeros(len(q), dtype=torch.long) for q in qs]
        for j in range(0, len(ref), CHUNK):
            r = to_vec(ref[j : j + CHUNK])
            for b, q in enumerate(qs):
                d, k = torch.cdist(q, r.to(q.dtype)).min(1)
                better = d < best_d[b]
                best_d[b] = torch.where(better, d, best_d[b])
                best_i[b] = torch.where(better, k + j, best_i[b])
        dist += best_d
        idx += best_i
    return torch.cat(dist), torch.cat(idx)


@dataclass(frozen=True)
class CopyReference:
    """The training set to compare samples with, and the copy thresholds calibrated on val."""

    train_feats: Tensor  # (N, D) as computed (float32); compared in float64, a block at a time
    train_u8: Any  # (N, H, W, C) uint8: an array, or a lazy image sequence walked in slices
    threshold: float  # feature-space L2 distance
    threshold_pixels: float  # pixel-space L2 distance, pixels in [0, 1] (whole image, not per pixel)
    val_feats: Any = None  # (Nv, D): the features of the val images the thresholds were calibrated on


def copy_reference(
    train_feats: Array, train_u8_NHWC: np.ndarray, val_feats: Array, val_u8_NHWC: np.ndarray
) -> CopyReference:
    """Calibrate the copy thresholds: the :data:`COPY_PERCENTILE`-th percentile of the val
    images' distances to their nearest training image, in feature and in pixel space.
    Computed once; :func:`memorisation` then scores any number of generated sets. The images
    may be arrays or lazy sequences (:class:`arvision.data.feed.ImageSplit`, a tokenizer's
    reconstructions), kept as given and walked in slices."""
    if len(val_u8_NHWC) == 0 or len(train_u8_NHWC) == 0:
        raise ValueError("copy thresholds need val and train images")
    train = _stored_feats(train_feats)
    d_val, _ = _nearest(_feats(val_feats), train, _feats)
    d_val_px, _ = _nearest(val_u8_NHWC, train_u8_NHWC, _pixels)
    q = COPY_PERCENTILE / 100
    return CopyReference(
        train_feats=train,
        train_u8=train_u8_NHWC if hasattr(train_u8_NHWC, "shape") else np.asarray(train_u8_NHWC),
        threshold=float(torch.quantile(d_val, q)),
        threshold_pixels=float(torch.quantile(d_val_px.double(), q)),
        val_feats=_stored_feats(val_feats),
    )


@dataclass(frozen=True)
class CopyReport:
    """Memorisation of one generated set. Scores are threshold / distance (capped at
    :data:`COPY_SCORE_CAP`): >= 1 means flagged a copy, higher is more copy-like."""

    copy_rate: float  # share of samples flagged in feature space
    copy_rate_pixels: float  # share flagged in pixel space
    threshold: float
    threshold_pixels: float
    score: np.ndarray  # (M,) float64, feature space
    nearest: np.ndarray  # (M,) int64: index of the nearest training image, feature space
    score_pixels: np.ndarray  # (M,) float64
    nearest_pixels: np.ndarray  # (M,) int64

    def metrics(self) -> dict[str, float]:
        """The scalar figures, for metrics files and MLflow."""
        return {
            "copy_rate": self.copy_rate,
            "copy_rate_pixels": self.copy_rate_pixels,
            "copy_threshold": self.threshold,
            "copy_threshold_pixels": self.threshold_pixels,
        }


def _scores(dist_M: Tensor, threshold: float) -> Tensor:
    return threshold / dist_M.double().clamp_min(max(threshold / COPY_SCORE_CAP, 1e-12))


def memorisation(ref: CopyReference, gen_feats: Array, gen_u8_NHWC: np.ndarray) -> CopyReport:
    """Each sample's nearest training image (features, and pixels), flagged against ``ref``'s thresholds."""
    d, i = _nearest(_feats(gen_feats), ref.train_feats, _feats)
    d_px, i_px = _nearest(gen_u8_NHWC, ref.train_u8, _pixels)
    score, score_px = _scores(d, ref.threshold), _scores(d_px, ref.threshold_pixels)
    return CopyReport(
        copy_rate=float((d <= ref.threshold).double().mean()),
        copy_rate_pixels=float((d_px <= ref.threshold_pixels).double().mean()),
        threshold=ref.threshold,
        threshold_pixels=ref.threshold_pixels,
        score=score.numpy(),
        nearest=i.numpy(),
        score_pixels=score_px.numpy(),
        nearest_pixels=i_px.numpy(),
    )


def inception_fd(gen_u8_NHWC: np.ndarray, real_u8_NHWC: np.ndarray, weights_path: str | Path) -> float:
    """The standard FID (Inception-v3 pool features, 2048-d) through torchmetrics.

    Needs the optional ``torch-fidelity`` package and the FID Inception weights file
    (``pt_inception-2015-12-05``) at ``weights_path`` (params: ``evaluate.inception_weights``),
    since nothing is downloaded. Grayscale images are repeated to three channels.
    """
    path = Path(weights_path)
    if not path.is_file():
        raise UserError(f"evaluate.inception_weights: no file at {path}")
    if importlib.util.find_spec("torch_fidelity") is None:
        raise UserError("Inception FID needs the torch-fidelity package: pip install torch-fidelity")
    fid = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(path))

    def to_u8_NCHW(images: np.ndarray) -> Tensor:
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
        return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x

    for images, real in ((real_u8_NHWC, True), (gen_u8_NHWC, False)):
        for i in range(0, len(images), 64):
            fid.update(to_u8_NCHW(images[i : i + 64]), real=real)
    return float(fid.compute())
