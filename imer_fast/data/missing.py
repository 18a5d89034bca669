"""Missing-modality protocols.

A protocol decides which modalities of every utterance are *available*. It returns a boolean
availability matrix ``[N, 3]`` in :data:`~imer_fast.data.corpus.MODALITIES` order (text, audio,
video); ``True`` means "observed". Protocols never modify stored features: the batching code zeroes
the unavailable entries of the model input and keeps the unmasked features as ground truth.

Common interface::

    protocol.sample(num_utterances, rng, batch_index=None, num_batches=None, present=None) -> bool [N, 3]

``rng`` is a ``numpy.random.Generator``; utterance-level protocols (:attr:`level` ``"utterance"``)
ignore the batch arguments, batch-level ones (``"batch"``) require them. ``present`` (bool ``[3]``,
default all) names the modalities the corpus has: masks are drawn over those only, so a text + audio
corpus gets GCNet's two-modality masks (every utterance keeps text or audio, the rate is counted over
the two) rather than three-modality masks with video cut away afterwards, which could leave an
utterance nothing. An absent modality is never available.

Protocols
---------
``none``
    Everything available.
``gcnet:<rate>``
    GCNet / CPM-Net per-utterance random masks, ``0 <= rate <= 0.7`` (see :class:`GCNetMissing`).
``imder:<rate>``
    IMDer's batch-level schedule, ``rate`` in ``{0.0, 0.1, ..., 0.7}`` (see :class:`IMDerMissing`).
``fixed:<pattern>``
    FedDISC-style fixed availability, e.g. ``fixed:tv`` (see :class:`FixedAvailability`).

:func:`make_protocol` parses these strings; :func:`all_patterns` and :func:`evaluate_patterns` list
the seven non-empty availability patterns for evaluation.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from .corpus import MODALITIES, MODALITY_CODES, canonical_modality

__all__ = [
    "MissingProtocol", "NoMissing", "GCNetMissing", "IMDerMissing", "FixedAvailability",
    "make_protocol", "gcnet", "imder", "fixed", "all_patterns", "evaluate_patterns", "pattern_name", "pattern_mask",
    "missing_fraction", "IMDER_MISS_TWO", "IMDER_MISS_ONE", "GCNET_MAX_RATE",
]

NUM_MODALITIES = len(MODALITIES)
GCNET_MAX_RATE = 0.7
"""Largest GCNet missing rate for three modalities (the release asserts ``rate <= 0.7``)."""

IMDER_MISS_TWO = (0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0)
"""IMDer: fraction of batches that drop two modalities, for MR = 0.1 ... 0.7."""
IMDER_MISS_ONE = (0.1, 0.2, 0.3, 0.2, 0.1, 0.0, 0.0)
"""IMDer: fraction of batches that drop one modality (after the two-drop batches)."""

_CODE_ORDER = "".join(MODALITY_CODES[m] for m in MODALITIES)  # "tav"


def pattern_name(available: Union[Iterable[bool], np.ndarray]) -> str:
    """Name of an availability row in canonical order, e.g. ``[True, False, True] -> "tv"``."""
    row = np.asarray(available, dtype=bool).reshape(-1)
    if row.shape[0] != NUM_MODALITIES:
        raise ValueError(f"available: expected {NUM_MODALITIES} flags in {MODALITIES} order, got "
                         f"{row.shape[0]}")
    return "".join(c for c, a in zip(_CODE_ORDER, row) if a)


def pattern_mask(pattern) -> np.ndarray:
    """Boolean ``[3]`` availability of a pattern.

    ``pattern`` may be a string of modality codes (``"tv"``, ``"vt"``; ``l`` is accepted for text
    as in FedDISC), a ``+``/``,`` separated list of names (``"text+video"``), or an iterable of
    modality names/codes (``{"text", "video"}``). At least one modality is required.
    """
    if isinstance(pattern, str):
        text = pattern.strip().lower()
        if any(sep in text for sep in "+, "):
            items = [t for t in text.replace("+", ",").replace(" ", ",").split(",") if t]
        elif text in ("text", "audio", "video", "vision", "visual", "language", "acoustic"):
            items = [text]
        else:
            items = list(text)
    else:
        try:
            items = [str(p) for p in pattern]
        except TypeError as exc:
            raise ValueError(f"pattern: expected a string such as 'tv' or a collection of modality "
                             f"names, got {pattern!r}") from exc
    mask = np.zeros(NUM_MODALITIES, dtype=bool)
    for it in items:
        try:
            m = canonical_modality(it)
        except ValueError as exc:
            raise ValueError(f"pattern: unknown modality {it!r} in {pattern!r}; expected codes "
                             f"among 't', 'a', 'v' (or 'l') or names among {MODALITIES}") from exc
        mask[MODALITIES.index(m)] = True
    if not mask.any():
        raise ValueError(f"pattern: at least one modality must be available, got {pattern!r}")
    return mask


def missing_fraction(availability: np.ndarray) -> float:
    """Fraction of ``False`` entries of an availability matrix (0 for an empty matrix)."""
    a = np.asarray(availability, dtype=bool)
    return float(1.0 - a.mean()) if a.size else 0.0


class MissingProtocol(ABC):
    """Base class of missing-modality protocols (see the module docstring)."""

    #: ``"utterance"``: independent of batches; ``"batch"``: needs batch_index/num_batches.
    level: str = "utterance"

    @abstractmethod
    def sample(self, num_utterances: int, rng: np.random.Generator,
               batch_index: Optional[int] = None, num_batches: Optional[int] = None,
               present: Optional[Sequence[bool]] = None) -> np.ndarray:
        """Availability ``bool [num_utterances, 3]`` (MODALITIES order) over the ``present`` modalities."""

    @property
    @abstractmethod
    def spec(self) -> str:
        """String that :func:`make_protocol` parses back into an equal protocol."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, MissingProtocol) and self.spec == other.spec

    def __hash__(self) -> int:
        return hash(self.spec)

    @staticmethod
    def _check_n(num_utterances) -> int:
        if isinstance(num_utterances, bool) or not isinstance(num_utterances, (int, np.integer)) \
                or num_utterances < 0:
            raise ValueError(f"num_utterances: expected a non-negative integer, got "
                             f"{num_utterances!r}")
        return int(num_utterances)

    @staticmethod
    def _present(present) -> np.ndarray:
        """The corpus's modalities as bool ``[3]`` (all three when ``present`` is None)."""
        if present is None:
            return np.ones(NUM_MODALITIES, dtype=bool)
        mask = np.asarray(present)
        if mask.shape != (NUM_MODALITIES,) or mask.dtype != bool:
            raise ValueError(f"present: expected {NUM_MODALITIES} booleans in {MODALITIES} order, got "
                             f"{present!r}")
        if not mask.any():
            raise ValueError(f"present: the corpus must have at least one of {MODALITIES}, got none")
        return mask


class NoMissing(MissingProtocol):
    """Every modality of every utterance is available."""

    def sample(self, num_utterances, rng, batch_index=None, num_batches=None, present=None):
        return np.tile(self._present(present), (self._check_n(num_utterances), 1))

    @property
    def spec(self) -> str:
        return "none"


class GCNetMissing(MissingProtocol):
    """GCNet / CPM-Net per-utterance random availability at missing rate ``rate``.

    Every utterance keeps at least one modality and the overall fraction of missing entries is the
    requested rate: with ``keep = 1 - rate``,

    * ``rate == 0``: everything available;
    * ``keep <= 1/3`` (``rate >= 2/3``): exactly one modality per utterance, chosen uniformly —
      the missing fraction is then 2/3, the most that keeping one modality allows, so rates in
      ``(2/3, 0.7]`` give 2/3 exactly like the release;
    * otherwise (``mode="exact"``, the default): start from a uniformly chosen guaranteed modality
      per utterance (a one-hot row, as CPM-Net does) and switch on
      ``round(keep * 3N) - N`` of the ``2N`` remaining entries, chosen uniformly without
      replacement. The missing fraction is then within ``1/(6N)`` of the rate, i.e. within the
      release's 0.005 tolerance for ``N >= 34``;
    * ``mode="retry"``: CPM-Net's own scheme — add ones independently with the probability that
      gives the target rate and redraw until the fraction is within 0.005 of it (at most 1,000
      draws, then the ``"exact"`` draw is used; tiny ``N`` cannot reach the tolerance).

    On a corpus with ``v < 3`` modalities (``present``) the masks are drawn over those ``v``, as
    GCNet's ``view_num`` does: ``3`` above reads ``v``, and the rate is capped at ``1 - 1/v`` (1/2 for
    two modalities; a one-modality corpus is always complete).

    GCNet draws a host mask and a guest mask for every (padded) position and then picks the row of
    the speaking party; since each row is an independent draw from the same distribution, drawing
    one row per utterance, as here, is equivalent. GCNet redraws masks every epoch for training
    and testing: the batching code seeds ``rng`` with ``(seed, epoch)`` to do the same
    reproducibly.
    """

    def __init__(self, rate: float, mode: str = "exact", tolerance: float = 0.005):
        try:
            rate = float(rate)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"rate: expected a number in [0, {GCNET_MAX_RATE}], got {rate!r}") from exc
        if not (0.0 <= rate <= GCNET_MAX_RATE + 1e-9):
            raise ValueError(f"rate: GCNet missing rate must be in [0, {GCNET_MAX_RATE}] for "
                             f"{NUM_MODALITIES} modalities (every utterance keeps one), got {rate}")
        if mode not in ("exact", "retry"):
            raise ValueError(f"mode: expected 'exact' or 'retry', got {mode!r}")
        self.rate = min(rate, GCNET_MAX_RATE)
        self.mode = mode
        self.tolerance = float(tolerance)

    @property
    def spec(self) -> str:
        return f"gcnet:{self.rate:g}" + ("" if self.mode == "exact" else ":retry")

    def sample(self, num_utterances, rng, batch_index=None, num_batches=None, present=None):
        n = self._check_n(num_utterances)
        columns = np.flatnonzero(self._present(present))
        out = np.zeros((n, NUM_MODALITIES), dtype=bool)
        out[:, columns] = self._sample_over(n, len(columns), rng)
        return out

    def _sample_over(self, n: int, v: int, rng) -> np.ndarray:
        """Masks ``[n, v]`` over the corpus's ``v`` modalities (the rate is capped at ``1 - 1/v``)."""
        keep = 1.0 - min(self.rate, 1.0 - 1.0 / v)
        if keep >= 1.0:
            return np.ones((n, v), dtype=bool)
        base = np.zeros((n, v), dtype=bool)
        if n == 0:
            return base
        base[np.arange(n), rng.integers(0, v, size=n)] = True
        if keep <= 1.0 / v + 1e-12:
            return base
        if self.mode == "retry":
            p = (keep * v - 1.0) / (v - 1.0)  # probability for each of the v-1 free entries
            for _ in range(1000):
                extra = (rng.random((n, v)) < p) & ~base
                mat = base | extra
                if abs(missing_fraction(mat) - (1.0 - keep)) < self.tolerance:
                    return mat
        free = np.flatnonzero(~base.reshape(-1))
        add = int(round(keep * v * n)) - n
        add = min(max(add, 0), free.size)
        flat = base.reshape(-1).copy()
        flat[rng.choice(free, size=add, replace=False)] = True
        return flat.reshape(n, v)


class IMDerMissing(MissingProtocol):
    """IMDer's batch-level missing schedule.

    For missing rate ``MR`` in ``{0.1, ..., 0.7}`` let ``i = round(10 MR) - 1``. Of the
    ``num_batches`` batches of an epoch (in iteration order), the first
    ``ceil(IMDER_MISS_TWO[i] * num_batches)`` drop two modalities (one kept, chosen uniformly per
    batch), the next ``ceil(IMDER_MISS_ONE[i] * num_batches)`` drop one (chosen uniformly per
    batch), and the rest are complete. Every utterance of a batch shares its pattern. The missing
    fraction ``(2 miss_2 + miss_1) / 3`` equals ``MR`` up to 0.6; ``MR = 0.7`` drops two modalities
    in every batch, i.e. 2/3 (the most possible while keeping one). On a corpus with ``v < 3``
    modalities (``present``) a batch drops at most ``v - 1`` of them.

    Differences from the release, on purpose:

    * ``MR = 0.0`` drops nothing. The release computes ``int(MR * 10 - 1) = -1`` and indexes
      ``miss_2[-1] = 1.0``, so its "complete" runs drop two modalities in every batch.
    * The release divides its batch counters by ``round(num_batches / 10) * 10``, which skews the
      fractions for loaders whose length is not a multiple of 10 and divides by zero below 5
      batches; we count against ``num_batches`` itself. ``release_counting=True`` reproduces the
      release's counting (except for the ``MR = 0`` defect) for comparisons.
    * The release computes ``int(MR * 10 - 1)``, which truncates ``0.3 * 10 - 1 = 1.9999...`` for
      some float inputs; we round.
    """

    level = "batch"

    def __init__(self, rate: float, release_counting: bool = False):
        try:
            rate = float(rate)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"rate: expected one of 0.0, 0.1, ..., 0.7, got {rate!r}") from exc
        idx = int(round(10 * rate)) - 1
        if abs(10 * rate - round(10 * rate)) > 1e-6 or not -1 <= idx <= 6:
            raise ValueError(f"rate: IMDer missing rate must be one of 0.0, 0.1, ..., 0.7, got "
                             f"{rate}")
        self.rate = (idx + 1) / 10.0
        self.index = idx
        self.release_counting = bool(release_counting)

    @property
    def spec(self) -> str:
        return f"imder:{self.rate:g}" + (":release" if self.release_counting else "")

    def schedule(self, num_batches: int) -> np.ndarray:
        """Number of dropped modalities (0, 1 or 2) of every batch of an epoch, ``int64 [B]``."""
        if isinstance(num_batches, bool) or not isinstance(num_batches, (int, np.integer)) \
                or num_batches < 0:
            raise ValueError(f"num_batches: expected a non-negative integer, got {num_batches!r}")
        nb = int(num_batches)
        out = np.zeros(nb, dtype=np.int64)
        if self.index < 0 or nb == 0:
            return out
        f2, f1 = IMDER_MISS_TWO[self.index], IMDER_MISS_ONE[self.index]
        if self.release_counting:
            denom = float(np.round(nb / 10) * 10)
            if denom <= 0:
                return out  # the release compares NaN counters: no batch drops anything
            two = one = 0
            for b in range(nb):
                if two / denom < f2:
                    out[b] = 2
                    two += 1
                elif one / denom < f1:
                    out[b] = 1
                    one += 1
            return out
        n2 = min(nb, int(math.ceil(f2 * nb - 1e-9)))
        n1 = min(nb - n2, int(math.ceil(f1 * nb - 1e-9)))
        out[:n2] = 2
        out[n2:n2 + n1] = 1
        return out

    def sample(self, num_utterances, rng, batch_index=None, num_batches=None, present=None):
        n = self._check_n(num_utterances)
        columns = np.flatnonzero(self._present(present))
        if batch_index is None or num_batches is None:
            raise ValueError(f"IMDer missing protocol is batch-level: batch_index and num_batches "
                             f"are required, got batch_index={batch_index!r}, "
                             f"num_batches={num_batches!r}")
        if not 0 <= int(batch_index) < int(num_batches):
            raise ValueError(f"batch_index: expected 0 <= batch_index < num_batches={num_batches}, "
                             f"got {batch_index}")
        # a corpus with v < 3 modalities drops at most v - 1 of them
        dropped = min(int(self.schedule(int(num_batches))[int(batch_index)]), len(columns) - 1)
        row = np.zeros(NUM_MODALITIES, dtype=bool)
        row[columns] = True
        if dropped == len(columns) - 1 and dropped > 0:
            row[:] = False
            row[columns[rng.integers(0, len(columns))]] = True
        elif dropped == 1:
            row[columns[rng.integers(0, len(columns))]] = False
        return np.tile(row, (n, 1))


class FixedAvailability(MissingProtocol):
    """A fixed availability pattern for every utterance (FedDISC clients, per-pattern evaluation).

    ``FixedAvailability("tv")``, ``FixedAvailability({"text", "video"})`` and
    ``FixedAvailability("text+video")`` are equal; at least one modality is required. FedDISC's
    IEMOCAP clients are ``{l, v}``, ``{l, a}`` and ``{v, a}``; ``l`` is accepted for text. On a
    corpus that lacks some of the pattern's modalities only the others are available; a pattern
    that keeps none of the corpus's modalities is an error.
    """

    def __init__(self, pattern):
        self.mask = pattern_mask(pattern)

    @property
    def name(self) -> str:
        return pattern_name(self.mask)

    @property
    def modalities(self) -> Tuple[str, ...]:
        return tuple(m for m, a in zip(MODALITIES, self.mask) if a)

    @property
    def spec(self) -> str:
        return f"fixed:{self.name}"

    def sample(self, num_utterances, rng=None, batch_index=None, num_batches=None, present=None):
        mask = self.mask & self._present(present)
        if not mask.any():
            corpus = [m for m, p in zip(MODALITIES, self._present(present)) if p]
            raise ValueError(f"pattern: {self.spec!r} keeps none of the corpus's modalities {corpus}")
        return np.tile(mask, (self._check_n(num_utterances), 1))


def fixed(pattern) -> FixedAvailability:
    """Shorthand for :class:`FixedAvailability`, e.g. ``fixed("tv")``."""
    return FixedAvailability(pattern)


def gcnet(rate: float, mode: str = "exact") -> GCNetMissing:
    """Shorthand for :class:`GCNetMissing`, e.g. ``gcnet(0.3)``."""
    return GCNetMissing(rate, mode=mode)


def imder(rate: float, release_counting: bool = False) -> IMDerMissing:
    """Shorthand for :class:`IMDerMissing`, e.g. ``imder(0.5)``."""
    return IMDerMissing(rate, release_counting=release_counting)


def all_patterns(present: Optional[Sequence[bool]] = None) -> List[str]:
    """The non-empty availability patterns: ``["t", "a", "v", "ta", "tv", "av", "tav"]``, or those made
    of the ``present`` modalities only (bool ``[3]``: e.g. ``["t", "a", "ta"]`` for a text + audio corpus)."""
    columns = [int(c) for c in np.flatnonzero(MissingProtocol._present(present))]
    out = []
    for k in range(1, len(columns) + 1):
        for bits in _combinations(columns, k):
            out.append("".join(_CODE_ORDER[b] for b in bits))
    return out


def _combinations(columns: List[int], k: int):
    from itertools import combinations

    return combinations(columns, k)


def evaluate_patterns(patterns: Optional[Iterable[str]] = None, present: Optional[Sequence[bool]] = None
                      ) -> Iterator[Tuple[str, FixedAvailability]]:
    """Yield ``(pattern_name, FixedAvailability)`` for every pattern (default: all patterns of the
    ``present`` modalities, i.e. all seven for a three-modality corpus)."""
    for p in (all_patterns(present) if patterns is None else patterns):
        proto = FixedAvailability(p)
        yield proto.name, proto


def make_protocol(spec: Union[str, MissingProtocol, None]) -> MissingProtocol:
    """Build a protocol from a string.

    Accepted: ``None``/``"none"``/``"full"``/``""`` -> :class:`NoMissing`; ``"gcnet:0.3"``
    (optionally ``"gcnet:0.3:retry"``); ``"imder:0.5"`` (optionally ``"imder:0.5:release"``);
    ``"fixed:tv"`` (any pattern accepted by :func:`pattern_mask`). A protocol instance is returned
    unchanged.
    """
    if spec is None:
        return NoMissing()
    if isinstance(spec, MissingProtocol):
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"spec: expected a protocol string such as 'gcnet:0.3', got "
                         f"{type(spec).__name__}")
    text = spec.strip()
    low = text.lower()
    if low in ("", "none", "full", "complete"):
        return NoMissing()
    kind, _, rest = low.partition(":")
    known = "'none', 'gcnet:<rate>', 'imder:<rate>', 'fixed:<pattern>'"
    if kind == "gcnet":
        rate, _, opt = rest.partition(":")
        if not rate:
            raise ValueError(f"spec: 'gcnet' needs a missing rate, e.g. 'gcnet:0.3'; got {spec!r}")
        if opt not in ("", "exact", "retry"):
            raise ValueError(f"spec: unknown gcnet option {opt!r} in {spec!r}; expected 'retry'")
        return GCNetMissing(_parse_rate(rate, spec), mode=opt or "exact")
    if kind == "imder":
        rate, _, opt = rest.partition(":")
        if not rate:
            raise ValueError(f"spec: 'imder' needs a missing rate, e.g. 'imder:0.5'; got {spec!r}")
        if opt not in ("", "release"):
            raise ValueError(f"spec: unknown imder option {opt!r} in {spec!r}; expected 'release'")
        return IMDerMissing(_parse_rate(rate, spec), release_counting=opt == "release")
    if kind == "fixed":
        if not rest:
            raise ValueError(f"spec: 'fixed' needs a pattern, e.g. 'fixed:tv'; got {spec!r}")
        return FixedAvailability(rest)
    raise ValueError(f"spec: unknown missing protocol {kind!r} in {spec!r}; expected one of {known}")


def _parse_rate(text: str, spec: str) -> float:
    try:
        return float(text)
    except ValueError as exc:
        raise ValueError(f"spec: missing rate {text!r} in {spec!r} is not a number") from exc
