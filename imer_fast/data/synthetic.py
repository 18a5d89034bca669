"""Seeded synthetic corpora with the statistics of IEMOCAP, CMU-MOSI and CMU-MOSEI.

This is the embedded default dataset of imer_fast: the real corpora need licences and feature
extraction, so tests, demos and benchmarks use :func:`make_synthetic`, which produces a
:class:`~imer_fast.data.corpus.Corpus` shaped like the real one (dialogue counts, splits, length
distribution, label frequencies, speakers, GCNet feature dimensions) whose features carry learnable,
cross-modally redundant and context-dependent label information.

Datasets
--------
``iemocap6``
    151 dialogues, 120 train (sessions 1-4) / 31 test (session 5); 7,433 utterances
    (5,810 / 1,623); dialogue length 8-110 with median 47 and 10th/90th percentiles 28/69;
    6 classes ``hap, sad, neu, ang, exc, fru`` with target counts 648/1084/1708/1103/1041/1849;
    two speakers (``0 = F``, ``1 = M``).
``iemocap4``
    The same 151 dialogues with 5,531 utterances (4,290 / 1,241), length 5-110, median 37;
    4 classes ``hap`` (happy + excited), ``sad``, ``neu``, ``ang`` with the standard counts
    1636/1084/1708/1103. The 10th/90th percentiles (18/50) are our assumption.
``mosi``
    93 videos, 52/10/31 for train/valid/test with 1,284/229/686 utterances; length 9-63, median 22
    (10th/90th percentiles 13/36 assumed); one speaker; regression labels in ``[-3, 3]`` on the
    0.2 grid (means of five annotators' integer ratings, as in CMU-MOSI).
``mosei``
    A *small* CMU-MOSEI-like corpus: one eighth of MMSA's split sizes (16,326 / 1,871 / 4,659
    training/validation/test samples -> 2,041 / 234 / 582 utterances) in 287/33/83 videos; length
    1-30 with median 6 (the video count and the length distribution are assumptions, not measured
    statistics); one speaker; regression labels as for ``mosi``.

Lengths are placed deterministically on a piecewise-linear quantile function through the minimum,
10th percentile, median, 90th percentile and maximum, rounded, adjusted by +-1 steps so that every
split has its target number of utterances, and shuffled over the dialogues with the seed. The exact
utterance counts take precedence over the percentiles: where the knots' mean differs from a split's
mean length the adjustment shifts the middle of the distribution, so the default corpora have median
lengths 47 / 36 / 20 (iemocap6 / iemocap4 / mosi) against the real 47 / 37 / 22.
``scale`` multiplies the number of dialogues of every split (at least 2 per split) and keeps the
mean length; ``feature_dims`` overrides the GCNet dimensions (text 1024, audio 512, video 1024).

Generative model
----------------
For every dialogue ``d`` and utterance ``i`` (speaker ``s_i``):

1. *Turns.* The first speaker is uniform; the speaker changes with probability 0.7 at every turn
   (two speakers), or stays 0 (one speaker).
2. *Emotion state (classification).* A dialogue theme ``pi_d ~ Dirichlet(10 * pi)`` around the
   corpus class frequencies ``pi`` (so ``E[pi_d] = pi``). The state ``y_i`` copies the speaker's own
   previous state with probability 0.7 (*stickiness*), copies the other speaker's latest state
   with probability 0.15 (*contagion*), and is otherwise (and whenever the state to copy does not
   exist yet) drawn fresh from ``pi_d``. Every state is either fresh
   or a copy of an earlier state, so the marginal label distribution is ``pi``, and neighbouring
   labels are strongly dependent: context helps. Single dialogues' chains are then redrawn and
   kept when they bring the corpus class counts closer to the targets, until every class
   frequency is within 0.005 of its target (or 20 redraws per dialogue were tried), so the label
   counts match the real corpus closely.
   *Valence (regression).* ``v_i = m_d + a_i`` with a video mean ``m_d ~ N(0, 1)`` and an AR(1)
   ``a_i = 0.7 a_{i-1} + sqrt(1 - 0.7^2) eta_i``, ``eta_i ~ N(0, 1)``; the label is ``v_i`` rounded
   to the 0.2 grid and clipped to ``[-3, 3]``.
3. *Shared clean latent* ``h_i`` in ``R^K`` (``K = 16``):
   ``h_i = mu_{y_i} + o_{d, s_i} + u_i`` (classification) or ``h_i = v_i * e + r_i + o_{d, s_i} + u_i``
   (regression), where the class embeddings ``mu_c`` combine a valence/arousal placement of the
   emotion (so that e.g. ``hap``/``exc`` and ``ang``/``fru`` are close) with a random part, ``e`` is
   a unit valence direction, ``r_i`` an AR(1) nuisance "arousal" factor orthogonal to ``e``,
   ``o_{d,s} ~ N(0, 0.4^2 I)`` a per-speaker offset and ``u_i ~ N(0, 0.7^2 I)`` utterance noise shared
   by all modalities. ``h_i`` is stored in ``Dialogue.extras["latent"]`` (and ``y_i`` in
   ``extras["emotion_state"]`` or ``v_i`` in ``extras["valence"]``).
4. *Modalities.* For ``m`` in text/audio/video:
   ``x_{m,i} = W_m (h_i + xi_{m,i}) + P_m z_{m,i} + b_m + eps_{m,i}`` with a modality-specific
   linear map ``W_m`` (``D_m x K``, entries ``N(0, 1/K)``), modality-specific latent noise
   ``xi_m ~ N(0, sigma_m^2 I)`` (``sigma`` = 0.5 text, 1.0 audio, 1.6 video: text is the most
   informative modality, as in IEMOCAP), a private nuisance factor ``z_m ~ N(0, I_8)`` through
   ``P_m`` (entries ``N(0, 0.5^2 / 8)``), a bias ``b_m ~ N(0, 0.1^2)`` and white noise
   ``eps ~ N(0, 0.3^2)``.

Hence (1) every modality alone carries label information (through ``h``), (2) the modalities are
correlated through the shared ``h``, so one modality can be linearly predicted from the others
(imperfectly: ``xi``, ``z`` and ``eps`` are private), and (3) context helps through the sticky
emotion chain. The stored features are the complete, unmasked ground truth: missing-modality
protocols mask them only when batches are built.

Reproducibility: all randomness comes from ``numpy.random.Generator`` objects seeded with
``(seed, crc32(name))``; the "world" (class embeddings, ``W_m``, ``P_m``, ``b_m``) uses its own
stream, so it does not change with ``scale``. The linear maps are applied with ``np.einsum``
(no BLAS, so no thread-count dependent summation order). The same ``(name, seed, scale,
feature_dims)`` always gives bitwise identical corpora.
"""
from __future__ import annotations

import zlib
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from .corpus import MODALITIES, Corpus, Dialogue

__all__ = ["make_synthetic", "write_synthetic", "SYNTHETIC_SPECS", "SYNTHETIC_NAMES",
           "DEFAULT_FEATURE_DIMS", "LATENT_DIM"]

DEFAULT_FEATURE_DIMS = {"text": 1024, "audio": 512, "video": 1024}
LATENT_DIM = 16
_PRIVATE_DIM = 8

# (probability, length) knots of the piecewise-linear quantile function of dialogue lengths
SYNTHETIC_SPECS: Dict[str, dict] = {
    "iemocap6": dict(
        task="classification",
        label_names=["hap", "sad", "neu", "ang", "exc", "fru"],
        class_counts=[648, 1084, 1708, 1103, 1041, 1849],
        # (valence, arousal) placement of every class in the latent space
        affect=[(0.8, 0.5), (-0.7, -0.5), (0.0, -0.1), (-0.6, 0.8), (0.7, 0.8), (-0.5, 0.3)],
        splits={"train": 120, "test": 31},
        utterances={"train": 5810, "test": 1623},
        knots=[(0.0, 8), (0.1, 28), (0.5, 47), (0.9, 69), (1.0, 110)],
        num_speakers=2, session_ids=True,
    ),
    "iemocap4": dict(
        task="classification",
        label_names=["hap", "sad", "neu", "ang"],
        class_counts=[1636, 1084, 1708, 1103],
        affect=[(0.75, 0.65), (-0.7, -0.5), (0.0, -0.1), (-0.6, 0.8)],
        splits={"train": 120, "test": 31},
        utterances={"train": 4290, "test": 1241},
        knots=[(0.0, 5), (0.1, 18), (0.5, 37), (0.9, 50), (1.0, 110)],
        num_speakers=2, session_ids=True,
    ),
    "mosi": dict(
        task="regression",
        splits={"train": 52, "valid": 10, "test": 31},
        utterances={"train": 1284, "valid": 229, "test": 686},
        knots=[(0.0, 9), (0.1, 13), (0.5, 22), (0.9, 36), (1.0, 63)],
        num_speakers=1, session_ids=False,
    ),
    "mosei": dict(
        task="regression",
        splits={"train": 287, "valid": 33, "test": 83},
        utterances={"train": 2041, "valid": 234, "test": 582},
        knots=[(0.0, 1), (0.1, 2), (0.5, 6), (0.9, 12), (1.0, 30)],
        num_speakers=1, session_ids=False,
    ),
}
SYNTHETIC_NAMES = tuple(SYNTHETIC_SPECS)

# generative constants (see the module docstring)
_SWITCH_PROB = 0.7
_THEME_CONCENTRATION = 10.0
_STICK_SELF = 0.7
_STICK_OTHER = 0.15
_SPEAKER_OFFSET = 0.4
_UTTERANCE_NOISE = 0.7
_MODALITY_LATENT_NOISE = {"text": 0.5, "audio": 1.0, "video": 1.6}
_PRIVATE_SCALE = 0.5
_WHITE_NOISE = 0.3
_BIAS_SCALE = 0.1
_VALENCE_AR = 0.7
_LABEL_PROPOSALS = 20
_LABEL_TOLERANCE = 0.005
_AFFECT_SCALE = 1.0
_RANDOM_CLASS_SCALE = 0.35


def _resolve_dims(feature_dims) -> Dict[str, int]:
    dims = dict(DEFAULT_FEATURE_DIMS)
    if feature_dims is None:
        return dims
    if isinstance(feature_dims, (int, np.integer)) and not isinstance(feature_dims, bool):
        return {m: int(feature_dims) for m in MODALITIES}
    if not isinstance(feature_dims, Mapping):
        raise ValueError(f"feature_dims: expected None, an int or a dict modality -> int, got "
                         f"{type(feature_dims).__name__}")
    for m, d in feature_dims.items():
        if m not in MODALITIES:
            raise ValueError(f"feature_dims: unknown modality {m!r}; expected keys among "
                             f"{MODALITIES}")
        if int(d) < 1:
            raise ValueError(f"feature_dims[{m!r}]: expected a positive dimension, got {d}")
        dims[m] = int(d)
    return dims


def _split_lengths(rng: np.random.Generator, n: int, knots, total: int) -> np.ndarray:
    """``n`` dialogue lengths on the quantile function ``knots``, summing to ``total``."""
    kp = np.array([k[0] for k in knots], dtype=np.float64)
    kv = np.array([k[1] for k in knots], dtype=np.float64)
    lo, hi = int(kv[0]), int(kv[-1])
    p = np.linspace(0.0, 1.0, n) if n >= 5 else (np.arange(n) + 0.5) / n
    lengths = np.rint(np.interp(p, kp, kv)).astype(np.int64)
    total = int(np.clip(total, n * lo, n * hi))
    interior = np.arange(1, n - 1) if n >= 5 else np.arange(n)
    diff = total - int(lengths.sum())
    if diff and interior.size:
        order = rng.permutation(interior)
        step = 1 if diff > 0 else -1
        stalled = 0
        k = 0
        while diff and stalled < order.size:
            j = order[k % order.size]
            k += 1
            if lo <= lengths[j] + step <= hi:
                lengths[j] += step
                diff -= step
                stalled = 0
            else:
                stalled += 1
    return lengths[rng.permutation(n)]


def _dialogue_ids(name: str, spec: dict, counts: Dict[str, int]) -> Dict[str, List[str]]:
    ids: Dict[str, List[str]] = {}
    if spec["session_ids"]:
        # IEMOCAP-like names: Ses0<session><F|M>_<impro|script><nn>; train sessions 1-4, test 5
        for split, n in counts.items():
            names = []
            for k in range(n):
                if split == "test":
                    session, j = 5, k
                else:
                    session, j = 1 + k % 4, k // 4
                gender = "F" if j % 2 == 0 else "M"
                kind = "script" if j % 3 == 0 else "impro"
                names.append(f"Ses{session:02d}{gender}_{kind}{j // 2 + 1:02d}")
            ids[split] = sorted(names)
        return ids
    start = 0
    for split, n in counts.items():
        ids[split] = [f"{name}_{start + k:04d}" for k in range(n)]
        start += n
    return ids


class _World:
    """The random parameters shared by all dialogues of one synthetic corpus."""

    def __init__(self, rng: np.random.Generator, spec: dict, dims: Dict[str, int]):
        K = LATENT_DIM
        basis, _ = np.linalg.qr(rng.standard_normal((K, K)))
        self.valence_dir = basis[:, 0]
        self.arousal_dir = basis[:, 1]
        if spec["task"] == "classification":
            affect = np.asarray(spec["affect"], dtype=np.float64)
            rand = rng.standard_normal((len(affect), K))
            rand -= np.outer(rand @ self.valence_dir, self.valence_dir)
            rand -= np.outer(rand @ self.arousal_dir, self.arousal_dir)
            self.class_means = (_AFFECT_SCALE * (np.outer(affect[:, 0], self.valence_dir)
                                                 + np.outer(affect[:, 1], self.arousal_dir))
                                + _RANDOM_CLASS_SCALE * rand)
            counts = np.asarray(spec["class_counts"], dtype=np.float64)
            self.class_freq = counts / counts.sum()
        else:
            self.class_means = None
            self.class_freq = None
        self.W: Dict[str, np.ndarray] = {}
        self.P: Dict[str, np.ndarray] = {}
        self.b: Dict[str, np.ndarray] = {}
        for m in MODALITIES:
            d = dims[m]
            self.W[m] = rng.standard_normal((d, K)) / np.sqrt(K)
            self.P[m] = rng.standard_normal((d, _PRIVATE_DIM)) * (_PRIVATE_SCALE
                                                                  / np.sqrt(_PRIVATE_DIM))
            self.b[m] = rng.standard_normal(d) * _BIAS_SCALE


def _speakers(rng: np.random.Generator, length: int, num_speakers: int) -> np.ndarray:
    if num_speakers == 1:
        return np.zeros(length, np.int64)
    spk = np.empty(length, np.int64)
    spk[0] = rng.integers(0, 2)
    switches = rng.random(length) < _SWITCH_PROB
    for i in range(1, length):
        spk[i] = 1 - spk[i - 1] if switches[i] else spk[i - 1]
    return spk


def _emotion_chain(rng: np.random.Generator, speakers: np.ndarray, world: _World) -> np.ndarray:
    theme = rng.dirichlet(_THEME_CONCENTRATION * world.class_freq)
    n = speakers.shape[0]
    u = rng.random(n).tolist()
    fresh = rng.choice(len(theme), size=n, p=theme).tolist()
    spk = speakers.tolist()
    last = [-1] * (max(spk) + 1)  # latest state of every speaker, -1: none yet
    y = [0] * n
    for i in range(n):
        s = spk[i]
        if last[s] >= 0 and u[i] < _STICK_SELF:
            v = last[s]
        elif _STICK_SELF <= u[i] < _STICK_SELF + _STICK_OTHER and _other_last(last, s) >= 0:
            v = _other_last(last, s)  # contagion from the interlocutor
        else:
            v = fresh[i]
        y[i] = v
        last[s] = v
    return np.asarray(y, dtype=np.int64)


def _other_last(last: List[int], s: int) -> int:
    for k, v in enumerate(last):
        if k != s and v >= 0:
            return v
    return -1


def _label_chains(rng: np.random.Generator, speakers: List[np.ndarray], world: _World
                  ) -> List[np.ndarray]:
    """Emotion chains of all dialogues, adjusted so that the class frequencies match the targets.

    After one draw for every dialogue, single dialogues (chosen at random) are redrawn and the new
    chain is kept when it brings the corpus class counts closer (squared error) to the targets,
    until every class frequency is within ``_LABEL_TOLERANCE`` of its target or
    ``_LABEL_PROPOSALS`` redraws per dialogue have been tried.
    """
    chains = [_emotion_chain(rng, spk, world) for spk in speakers]
    k = len(world.class_freq)
    counts = np.bincount(np.concatenate(chains), minlength=k).astype(np.float64)
    total = counts.sum()
    target = world.class_freq * total
    err = float(np.sum((counts - target) ** 2))
    n = len(chains)
    for _ in range(_LABEL_PROPOSALS * n):
        if np.max(np.abs(counts - target)) <= _LABEL_TOLERANCE * total:
            break
        j = int(rng.integers(n))
        new = _emotion_chain(rng, speakers[j], world)
        cand = counts - np.bincount(chains[j], minlength=k) + np.bincount(new, minlength=k)
        cand_err = float(np.sum((cand - target) ** 2))
        if cand_err < err:
            chains[j], counts, err = new, cand, cand_err
    return chains


def _ar1(rng: np.random.Generator, n: int, phi: float) -> np.ndarray:
    eta = rng.standard_normal(n)
    a = np.empty(n)
    a[0] = eta[0]
    c = np.sqrt(1.0 - phi * phi)
    for i in range(1, n):
        a[i] = phi * a[i - 1] + c * eta[i]
    return a


def make_synthetic(name: str, seed: int = 0, scale: float = 1.0,
                   feature_dims: Union[None, int, Mapping[str, int]] = None,
                   modality_noise: float = 1.0) -> Corpus:
    """Generate a synthetic corpus (see the module docstring for the model and the statistics).

    Args:
        name: ``"iemocap6"``, ``"iemocap4"``, ``"mosi"`` or ``"mosei"``.
        seed: non-negative integer seed.
        scale: multiplies the number of dialogues per split (``> 0``; at least 2 per split).
        feature_dims: None (GCNet dims text 1024 / audio 512 / video 1024), one int for every
            modality, or a dict overriding some modalities (e.g. ``{"text": 32}``).
        modality_noise: multiplies every modality-private term (``xi``, ``P z`` and ``eps``), which sets
            how redundant the modalities are: 1.0 (default) is the corpus described above, where one
            modality explains little of another's variance (a linear fit from the other two reaches
            R² ≈ 0.1–0.2); smaller values make the modalities predictable from each other (0 leaves
            only the shared ``h`` through each modality's map), the premise of missing-modality
            recovery. The same draws are used at every value, so only the noise amplitude changes.

    Returns:
        A :class:`~imer_fast.data.corpus.Corpus` whose ``metadata["generator"]`` records the
        generator parameters and whose dialogues carry ``extras["latent"]`` (clean ``h``).
    """
    if name not in SYNTHETIC_SPECS:
        raise ValueError(f"name: unknown synthetic dataset {name!r}; expected one of "
                         f"{list(SYNTHETIC_NAMES)}")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed: expected a non-negative integer, got {seed!r}")
    try:
        scale = float(scale)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"scale: expected a positive number, got {scale!r}") from exc
    if not np.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale: expected a positive number, got {scale!r}")
    try:
        modality_noise = float(modality_noise)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"modality_noise: expected a non-negative number, got {modality_noise!r}") from exc
    if not np.isfinite(modality_noise) or modality_noise < 0:
        raise ValueError(f"modality_noise: expected a non-negative number, got {modality_noise!r}")
    spec = SYNTHETIC_SPECS[name]
    dims = _resolve_dims(feature_dims)
    root_ss = np.random.SeedSequence([int(seed), zlib.crc32(name.encode())])
    world_ss, layout_ss, data_ss = root_ss.spawn(3)
    world = _World(np.random.default_rng(world_ss), spec, dims)
    layout_rng = np.random.default_rng(layout_ss)
    rng = np.random.default_rng(data_ss)

    counts = {s: max(2, int(round(n * scale))) for s, n in spec["splits"].items()}
    ids = _dialogue_ids(name, spec, counts)
    lengths: Dict[str, np.ndarray] = {}
    for s, n in counts.items():
        mean_len = spec["utterances"][s] / spec["splits"][s]
        lengths[s] = _split_lengths(layout_rng, n, spec["knots"], int(round(mean_len * n)))

    K = LATENT_DIM
    task = spec["task"]
    order: List[Tuple[str, int]] = [(did, int(L)) for s in counts
                                    for did, L in zip(ids[s], lengths[s])]
    spk_all = [_speakers(rng, L, spec["num_speakers"]) for _, L in order]
    if task == "classification":
        chains = _label_chains(rng, spk_all, world)
    latents, states, labels_all = [], [], []
    for k, (did, L) in enumerate(order):
        spk = spk_all[k]
        offsets = rng.standard_normal((spec["num_speakers"], K)) * _SPEAKER_OFFSET
        noise = rng.standard_normal((L, K)) * _UTTERANCE_NOISE
        if task == "classification":
            y = chains[k]
            h = world.class_means[y] + offsets[spk] + noise
            states.append(y)
            labels_all.append(y)
        else:
            v = rng.standard_normal() + _ar1(rng, L, _VALENCE_AR)
            arousal = _ar1(rng, L, _VALENCE_AR)
            h = (np.outer(v, world.valence_dir) + np.outer(arousal, world.arousal_dir)
                 + offsets[spk] + noise)
            states.append(v)
            labels_all.append(np.clip(np.round(v * 5.0) / 5.0, -3.0, 3.0).astype(np.float32))
        latents.append(h)
    speakers_all = spk_all

    H = np.concatenate(latents, axis=0)
    N = H.shape[0]
    feats_all: Dict[str, np.ndarray] = {}
    for m in MODALITIES:
        xi = rng.standard_normal((N, K)) * (_MODALITY_LATENT_NOISE[m] * modality_noise)
        z = rng.standard_normal((N, _PRIVATE_DIM)) * modality_noise
        eps = rng.standard_normal((N, dims[m])) * (_WHITE_NOISE * modality_noise)
        x = (np.einsum("nk,dk->nd", H + xi, world.W[m]) + np.einsum("np,dp->nd", z, world.P[m])
             + world.b[m] + eps)
        feats_all[m] = x.astype(np.float32)

    dialogues: Dict[str, Dialogue] = {}
    start = 0
    for (did, L), h, st, spk, lab in zip(order, latents, states, speakers_all, labels_all):
        sl = slice(start, start + L)
        start += L
        if spec["num_speakers"] == 2:
            seen = {0: 0, 1: 0}
            utt = []
            for s in spk:
                utt.append(f"{did}_{'FM'[int(s)]}{seen[int(s)]:03d}")
                seen[int(s)] += 1
        else:
            utt = [f"{did}_{i + 1}" for i in range(L)]
        extras = {"latent": h.astype(np.float32)}
        if task == "classification":
            extras["emotion_state"] = st.astype(np.int64)
        else:
            extras["valence"] = st.astype(np.float32)
        dialogues[did] = Dialogue(id=did, features={m: feats_all[m][sl] for m in MODALITIES},
                                  labels=lab, speakers=spk, sentences=None, utterance_ids=utt,
                                  extras=extras)
    metadata = {
        "generator": {
            "name": name, "seed": int(seed), "scale": scale, "latent_dim": K,
            "private_dim": _PRIVATE_DIM,
            "class_means": None if world.class_means is None else world.class_means.copy(),
            "class_freq": None if world.class_freq is None else world.class_freq.copy(),
            "valence_dir": world.valence_dir.copy(),
            "W": {m: w.copy() for m, w in world.W.items()},
            "P": {m: p.copy() for m, p in world.P.items()},
            "b": {m: b.copy() for m, b in world.b.items()},
            "modality_latent_noise": dict(_MODALITY_LATENT_NOISE),
            "modality_noise": modality_noise,
            "stickiness": (_STICK_SELF, _STICK_OTHER),
        }
    }
    return Corpus(name=name, dialogues=dialogues, splits=ids, task=task,
                  num_classes=len(spec["label_names"]) if task == "classification" else 1,
                  label_names=list(spec["label_names"]) if task == "classification" else None,
                  feature_dims=dims, num_speakers=spec["num_speakers"], metadata=metadata)


def write_synthetic(name: str, root, seed: int = 0,
                    formats: Sequence[str] = ("gcnet", "dialoguegcn", "mmsa"), *,
                    scale: float = 1.0, feature_dims: Union[None, int, Mapping[str, int]] = None,
                    mmsa_seq_len: int = 8, corpus: Optional[Corpus] = None) -> Dict[str, dict]:
    """Generate a synthetic corpus and write it in the requested formats under ``root``.

    Layout: ``root/gcnet/`` (label pickle + one folder per modality), ``root/dialoguegcn/<name>_
    features.pkl`` (9-tuple; a ``valid`` split is merged into ``trainVid``, the format has none) and
    ``root/mmsa/aligned_<mmsa_seq_len>.pkl``. MMSA sequences hold ``mmsa_seq_len`` steps per
    utterance (MMSA's own files use 50; the default 8 keeps files small: at the default dims one
    MOSI step costs 2,199 x 2,560 x 4 bytes = 22.5 MB); their valid steps average back to the
    utterance features (see :meth:`~imer_fast.data.formats.mmsa.MMSADataset.from_corpus`).

    Returns:
        format -> the paths dict of its writer (``{"label_path", "feature_dirs"}`` for GCNet,
        ``{"path"}`` otherwise) plus ``"corpus"`` -> the generated corpus.
    """
    from .formats import write_dialoguegcn, write_gcnet, write_mmsa

    known = ("gcnet", "dialoguegcn", "mmsa")
    for f in formats:
        if f not in known:
            raise ValueError(f"formats: unknown format {f!r}; expected a subset of {known}")
    if corpus is None:
        corpus = make_synthetic(name, seed=seed, scale=scale, feature_dims=feature_dims)
    root = Path(root)
    out: Dict[str, dict] = {}
    if "gcnet" in formats:
        out["gcnet"] = write_gcnet(corpus, root / "gcnet")
    if "dialoguegcn" in formats:
        out["dialoguegcn"] = write_dialoguegcn(corpus, root / "dialoguegcn"
                                               / f"{name}_features.pkl", valid="train")
    if "mmsa" in formats:
        out["mmsa"] = write_mmsa(corpus, root / "mmsa" / f"aligned_{mmsa_seq_len}.pkl",
                                 seq_len=mmsa_seq_len, aligned=True, seed=seed)
    out["corpus"] = corpus  # type: ignore[assignment]
    return out
