"""RoHyDR (arXiv 2505.17501) as one recovery-plus-classification model.

Pieces (state-dict names follow the release, ``Siowllience/RoHyDR`` ``trains/mainNets/model/rohydr.py``):

- per-modality input projections to a ``C × L`` latent (32 × 48) [``proj_l``, ``proj_a``, ``proj_v``]:
  for sequences ``[N, T, D]`` the release's ``Conv1d(D → C, kernel 3, no padding, no bias)`` (T = 50 →
  48 steps); for one utterance vector ``[N, D]`` (our corpora) ``Linear(D → C·L)`` viewed as
  ``[N, C, L]``. As in the release, the projections are never trained (it computes them under
  ``no_grad``; its pretrained checkpoint supplies them): no optimiser group holds them;
- unimodal recovery: one conditional generator per modality [``score_l``, ``score_a``, ``score_v``]
  conditioned on what is available, exactly as the release builds the condition: one available
  modality → its latent; two → ``cat_va`` / ``cat_la`` / ``cat_lv`` (Conv1d 2C → C, 1×1) over the
  concatenation of the two (target text: video‖audio; video: text‖audio; audio: text‖video).
  ``generator="dit"``: :class:`~imer_fast.nn.dit.DiT1d` trained with the DDPM ε-loss of
  :class:`~imer_fast.diffusion.GaussianDiffusion` and sampled with DDIM over the SAME timestep range
  (the release trains over 1,000 steps but samples with a scheduler built for 50 training steps);
  ``generator="score"``: IMDer's :class:`~imer_fast.nn.ScoreNet` with the VE-SDE loss and
  Euler–Maruyama sampler (the release's May 2025 version);
- the RCAN refiners [``rec_l``, ``rec_a``, ``rec_v``] on the generated latents;
- MulT fusion [``trans_l_with_a`` … ``trans_v_mem``], fused vector ``6C`` (192), run on recovered and
  on ground-truth latents with the same weights, and its head [``proj1``, ``proj2``, ``out_layer``]:
  ``out_layer(proj2(dropout(relu(proj1(F)))) + F)``;
- the multimodal reconstructor [``reconstruction.model``] (Linear 192→80→96→192, LeakyReLU 0.2,
  BN, Tanh) and discriminator [``discriminator.model``] (BN → 192→128→64→1, Sigmoid) on the fused
  vector. The release wraps both once more (``reconstruction.Model.model``); that level is dropped.

Generators work on standardised latents: ``(z − μ_m) / σ_m`` with one mean and standard deviation per
modality fitted on training data (:meth:`RoHyDR.fit_scaling`, buffers in the state_dict). The release
diffuses the raw latents and, through diffusers' default ``clip_sample``, clips its DDIM estimates of
them to [−1, 1]; standardising gives the diffusion process the unit scale it assumes instead.

Prediction (``forward``) reads only the observed features and the availability mask — never labels,
never the ground truth of a missing entry. Availability is per utterance (any pattern, mixed in a
batch); only the missing entries are generated. An utterance that is missing a modality is predicted
from ``head(R(F_rec))`` and a complete one from ``head(F)``, the release's rule (it decides per batch).
An utterance with no modality at all has nothing to condition on: its latents stay zero.

``recovery="zero"`` is the no-recovery baseline with the same fusion and head: missing latents are
zeros, and no generator, refiner, reconstructor or discriminator is built.
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.batching import DialogueBatch, PackedBatch
from ..data.corpus import MODALITIES
from ..diffusion.gaussian import PREDICTIONS, GaussianDiffusion
from ..diffusion.ve_sde import VESDE, euler_maruyama_sampler, ve_sde_loss
from ..nn.dit import DiT1d
from ..nn.rcan import rcan_refiner
from ..nn.score_net import ScoreNet
from ..ops.counter_rng import counter_normal
from .layers import IMPLEMENTATIONS, layer_set

_NAME = "RoHyDR"
GENERATORS = ("dit", "score")
RECOVERY_MODES = ("diffusion", "zero")
TASKS = ("regression", "classification")
SHORT = {"text": "l", "audio": "a", "video": "v"}
RECOVERY_MODULE_PREFIXES = ("score_", "cat_", "rec_")  # generators, condition convs, refiners: the "recovery" group
# Target modality -> (the two others in the release's concatenation order, the 1×1 conv merging them).
PAIR_CONDITION = {"text": (("video", "audio"), "cat_va"), "video": (("text", "audio"), "cat_la"),
                  "audio": (("text", "video"), "cat_lv")}
DIT_DEFAULTS = dict(hidden_size=64, depth=6, num_heads=16, mlp_ratio=4.0, positions="learned")
SCORE_DEFAULTS = dict(channels=(32, 64, 128, 256), embed_dim=256)
MULT_DEFAULTS = dict(num_heads=8, layers=4, mem_layers=None, attn_dropout=0.5, attn_dropout_a=0.5, attn_dropout_v=0.5,
                     relu_dropout=0.5, res_dropout=0.5, embed_dropout=0.5, output_dropout=0.5, attn_mask=True)

Batch = Union[DialogueBatch, PackedBatch]


class FusionReconstructor(nn.Module):
    """Linear(F → h1) → Dropout → LeakyReLU(0.2) → Linear(h1 → h2) → Dropout → BN → LeakyReLU(0.2) →
    Linear(h2 → F) → Tanh (the release's ``decoder_v1``; MOSI h1 = 80, h2 = 96, dropout 0.4)."""

    def __init__(self, fusion_dim: int, hidden: Tuple[int, int] = (80, 96), dropout: float = 0.4):
        super().__init__()
        h1, h2 = hidden
        self.model = nn.Sequential(nn.Linear(fusion_dim, h1), nn.Dropout(dropout), nn.LeakyReLU(0.2),
                                   nn.Linear(h1, h2), nn.Dropout(dropout), nn.BatchNorm1d(h2), nn.LeakyReLU(0.2),
                                   nn.Linear(h2, fusion_dim), nn.Tanh())

    def forward(self, fused: Tensor) -> Tensor:
        return self.model(fused)


class FusionDiscriminator(nn.Module):
    """BN(F) → Linear(F → h1) → LeakyReLU(0.2) → Linear(h1 → h2) → Tanh → Linear(h2 → 1) → Sigmoid: the
    probability that a fused vector comes from complete ground-truth inputs (MOSI h1 = 128, h2 = 64)."""

    def __init__(self, fusion_dim: int, hidden: Tuple[int, int] = (128, 64)):
        super().__init__()
        h1, h2 = hidden
        self.model = nn.Sequential(nn.BatchNorm1d(fusion_dim), nn.Linear(fusion_dim, h1), nn.LeakyReLU(0.2),
                                   nn.Linear(h1, h2), nn.Tanh(), nn.Linear(h2, 1), nn.Sigmoid())

    def forward(self, fused: Tensor) -> Tensor:
        return self.model(fused)


class RoHyDR(nn.Module):
    """RoHyDR recovery + fusion + prediction (module doc).

    Args:
        feature_dims: modality -> input width, for all three modalities.
        task: "regression" (one output, MOSI labels in [−3, 3]) or "classification" (``num_classes`` logits).
        num_classes: classes of a classification task.
        input_length: None for utterance vectors [N, D] (Linear projection); T for sequences [N, T, D]
            (the release's Conv1d, kernel 3, no padding: T must be ``latent_length + 2``).
        latent_channels, latent_length: the latent (release 32 × 48).
        recovery: "diffusion" or "zero" (the no-recovery baseline).
        generator: "dit" (release Dec 2025) or "score" (release May 2025, IMDer's ScoreNet).
        dit: overrides of the DiT (release hidden 64, depth 6, 16 heads, MLP ratio 4, learned positions).
        score: overrides of the ScoreNet (release channels (32, 64, 128, 256), embed_dim 256; it needs 32
            latent channels and a latent length that is a multiple of 8).
        timesteps, sampling_steps: the DDPM process of the DiT and its DDIM steps (uniform spacing);
            ``sampling_steps`` is also the Euler–Maruyama step count of the score generator.
        prediction: what the DiT predicts, "eps" (the release) or "v" (ours; see
            :meth:`~imer_fast.diffusion.GaussianDiffusion.noise_predictor`).
        sigma: the VE-SDE's σ (release 25).
        refiner_blocks, refiner_reduction: the RCAN group (release 20 blocks, reduction 16).
        mult: overrides of the MulT fusion (:data:`MULT_DEFAULTS`: the release's MOSI settings;
            ``mem_layers`` None = ``max(layers, 3)`` as the release).
        reconstructor_hidden, reconstructor_dropout, discriminator_hidden: release MOSI (80, 96), 0.4, (128, 64).
        layers: "fused" or "reference" (eager MulT / ScoreNet twins, every fused op forced to its ``_ref``).
    """

    def __init__(self, feature_dims: Mapping[str, int], *, task: str = "regression", num_classes: int = 1,
                 input_length: Optional[int] = None, latent_channels: int = 32, latent_length: int = 48,
                 recovery: str = "diffusion", generator: str = "dit", dit: Optional[Mapping] = None,
                 score: Optional[Mapping] = None, timesteps: int = 1000, sampling_steps: int = 50,
                 prediction: str = "eps",
                 sigma: float = 25.0, refiner_blocks: int = 20, refiner_reduction: int = 16,
                 mult: Optional[Mapping] = None, reconstructor_hidden: Tuple[int, int] = (80, 96),
                 reconstructor_dropout: float = 0.4, discriminator_hidden: Tuple[int, int] = (128, 64),
                 layers: str = "fused"):
        super().__init__()
        missing = [m for m in MODALITIES if m not in feature_dims]
        if missing:
            raise ValueError(f"{_NAME}: feature_dims must give a width for every modality {MODALITIES}; missing "
                             f"{missing}")
        for name, value, allowed in (("task", task, TASKS), ("recovery", recovery, RECOVERY_MODES),
                                     ("generator", generator, GENERATORS), ("layers", layers, IMPLEMENTATIONS)):
            if value not in allowed:
                raise ValueError(f"{_NAME}: {name} must be one of {allowed}; got {value!r}")
        if task == "classification" and (not isinstance(num_classes, int) or num_classes < 2):
            raise ValueError(f"{_NAME}: num_classes must be an int >= 2 for classification; got {num_classes!r}")
        if input_length is not None and input_length != latent_length + 2:
            raise ValueError(f"{_NAME}: input_length must be latent_length + 2 = {latent_length + 2} (the release's "
                             f"kernel-3, unpadded Conv1d); got {input_length}")
        if prediction not in PREDICTIONS:
            raise ValueError(f"{_NAME}: prediction must be one of {PREDICTIONS}; got {prediction!r}")
        if sampling_steps < 2:
            raise ValueError(f"{_NAME}: sampling_steps must be >= 2; got {sampling_steps}")
        self.task, self.recovery_mode, self.generator_kind = task, recovery, generator
        self.num_outputs = 1 if task == "regression" else num_classes
        self.feature_dims = {m: int(feature_dims[m]) for m in MODALITIES}
        self.input_length = input_length
        self.latent_shape = (latent_channels, latent_length)
        self.sampling_steps, self.prediction = sampling_steps, prediction
        self.layers = layer_set(layers)
        self.layers_name = layers
        c, length = self.latent_shape

        self.register_buffer("latent_mean", torch.zeros(len(MODALITIES)))
        self.register_buffer("latent_std", torch.ones(len(MODALITIES)))
        self.register_buffer("scaling_fitted", torch.tensor(recovery == "zero"))

        for m in MODALITIES:
            d = self.feature_dims[m]
            proj = (nn.Linear(d, c * length) if input_length is None else nn.Conv1d(d, c, 3, padding=0, bias=False))
            proj.requires_grad_(False)
            self.add_module(f"proj_{SHORT[m]}", proj)

        settings = {**MULT_DEFAULTS, **dict(mult or {})}
        unknown = set(settings) - set(MULT_DEFAULTS)
        if unknown:
            raise ValueError(f"{_NAME}: unknown mult settings {sorted(unknown)}; expected some of "
                             f"{sorted(MULT_DEFAULTS)}")
        if c % settings["num_heads"]:
            raise ValueError(f"{_NAME}: latent_channels ({c}) must be divisible by mult num_heads "
                             f"({settings['num_heads']})")
        self.output_dropout = settings["output_dropout"]
        mem_layers = settings["mem_layers"] or max(settings["layers"], 3)
        by_keys = {"l": settings["attn_dropout"], "a": settings["attn_dropout_a"], "v": settings["attn_dropout_v"]}

        def encoder(width: int, p: float, depth: int) -> nn.Module:
            return self.layers.transformer(embed_dim=width, num_heads=settings["num_heads"], layers=depth,
                                           attn_dropout=p, relu_dropout=settings["relu_dropout"],
                                           res_dropout=settings["res_dropout"],
                                           embed_dropout=settings["embed_dropout"], attn_mask=settings["attn_mask"],
                                           position_embedding=False)   # as the release's encoders

        for q, k in (("l", "a"), ("l", "v"), ("a", "l"), ("a", "v"), ("v", "l"), ("v", "a")):
            self.add_module(f"trans_{q}_with_{k}", encoder(c, by_keys[k], settings["layers"]))
        for s in ("l", "a", "v"):
            self.add_module(f"trans_{s}_mem", encoder(2 * c, settings["attn_dropout"], mem_layers))
        self.fusion_dim = 6 * c
        self.proj1 = nn.Linear(self.fusion_dim, self.fusion_dim)
        self.proj2 = nn.Linear(self.fusion_dim, self.fusion_dim)
        self.out_layer = nn.Linear(self.fusion_dim, self.num_outputs)
        # Built last, what only the recovery model has after what every model has: seeded alike, RoHyDR
        # and its zero-fill baseline share their (frozen) projections, MulT fusion and head weights.
        if recovery == "diffusion":
            if generator == "dit":
                for m in MODALITIES:
                    self.add_module(f"score_{SHORT[m]}", DiT1d(c, length, cond_channels=c,
                                                               **{**DIT_DEFAULTS, **dict(dit or {})}))
                self.diffusion = GaussianDiffusion(timesteps)
            else:
                score_kwargs = {**SCORE_DEFAULTS, **dict(score or {})}
                if c != 32 or score_kwargs["channels"][0] != c or length % 8:
                    raise ValueError(f"{_NAME}: generator='score' (IMDer's ScoreNet) needs latent_channels = 32 = "
                                     f"score channels[0] and a latent_length that is a multiple of 8; got "
                                     f"{c} × {length}, channels {tuple(score_kwargs['channels'])}")
                self.sde = VESDE(sigma)
                net_cls = ScoreNet
                if layers == "reference":
                    from ..testing.reference_imder import ReferenceScoreNet as net_cls
                for m in MODALITIES:
                    self.add_module(f"score_{SHORT[m]}", net_cls(self.sde.marginal_prob_std, **score_kwargs))
            for _, name in PAIR_CONDITION.values():
                self.add_module(name, nn.Conv1d(2 * c, c, 1))
            for m in MODALITIES:
                self.add_module(f"rec_{SHORT[m]}", rcan_refiner(c, refiner_blocks, refiner_reduction))
            self.reconstruction = FusionReconstructor(self.fusion_dim, reconstructor_hidden, reconstructor_dropout)
            self.discriminator = FusionDiscriminator(self.fusion_dim, discriminator_hidden)

    # ---- parameter groups (one optimiser each in the three-stage update) ---------------------------

    def parameter_groups(self) -> Dict[str, list]:
        """``recovery`` (generators, condition convs, refiners: stage 1), ``discriminator`` and
        ``reconstructor`` (stage 2), ``fusion`` (MulT encoders + head: stage 3). The projections are in
        none (never trained, as in the release). The zero-fill baseline has only ``fusion``."""
        fusion = [p for n, p in self.named_parameters() if n.startswith(("trans_", "proj1.", "proj2.", "out_layer."))]
        if self.recovery_mode == "zero":
            return {"fusion": fusion}
        recovery = [p for n, p in self.named_parameters() if n.startswith(RECOVERY_MODULE_PREFIXES)]
        return {"recovery": recovery, "discriminator": list(self.discriminator.parameters()),
                "reconstructor": list(self.reconstruction.parameters()), "fusion": fusion}

    # ---- latents ------------------------------------------------------------------------------

    def project(self, modality: str, features: Tensor) -> Tensor:
        """Latent [N, C, L] of ``features`` ([N, D] utterance vectors or [N, T, D] sequences, as built)."""
        d = self.feature_dims[modality]
        if self.input_length is None:
            if not isinstance(features, Tensor) or features.dim() != 2 or features.shape[1] != d:
                got = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
                raise ValueError(f"{_NAME}: features[{modality!r}] must be [N, {d}] (utterance vectors); got {got}")
            return getattr(self, f"proj_{SHORT[modality]}")(features).view(features.shape[0], *self.latent_shape)
        expected = (self.input_length, d)
        if not isinstance(features, Tensor) or features.dim() != 3 or tuple(features.shape[1:]) != expected:
            got = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
            raise ValueError(f"{_NAME}: features[{modality!r}] must be [N, {self.input_length}, {d}] (sequences); "
                             f"got {got}")
        return getattr(self, f"proj_{SHORT[modality]}")(features.transpose(1, 2))

    def latents(self, features: Mapping[str, Tensor], availability: Optional[Tensor] = None) -> Dict[str, Tensor]:
        """Projected latents of every modality; zeros where ``availability`` [N, 3] is False."""
        out = {}
        for k, m in enumerate(MODALITIES):
            z = self.project(m, features[m])
            out[m] = z if availability is None else z * availability[:, k].to(z.dtype).view(-1, 1, 1)
        return out

    @torch.no_grad()
    def fit_scaling(self, batches) -> Dict[str, Tuple[float, float]]:
        """Fit the per-modality mean and standard deviation of the latents the generators work on, from
        ``(features, availability)`` pairs of training data (available entries only)."""
        sums = torch.zeros(len(MODALITIES), dtype=torch.float64)
        squares = torch.zeros_like(sums)
        counts = torch.zeros_like(sums)
        for features, availability in batches:
            for k, m in enumerate(MODALITIES):
                rows = availability[:, k].to(torch.bool)
                if bool(rows.any()):
                    z = self.project(m, features[m][rows]).double()
                    sums[k] += z.sum().cpu()
                    squares[k] += z.square().sum().cpu()
                    counts[k] += z.numel()
        if bool((counts == 0).any()):
            empty = [m for k, m in enumerate(MODALITIES) if counts[k] == 0]
            raise ValueError(f"{_NAME}.fit_scaling: no available entries for modalities {empty}")
        mean = sums / counts
        std = (squares / counts - mean.square()).clamp_min(1e-12).sqrt()
        self.latent_mean.copy_(mean.to(self.latent_mean.dtype))
        self.latent_std.copy_(std.to(self.latent_std.dtype))
        self.scaling_fitted.fill_(True)
        return {m: (float(mean[k]), float(std[k])) for k, m in enumerate(MODALITIES)}

    def standardise(self, modality: str, z: Tensor) -> Tensor:
        k = MODALITIES.index(modality)
        return (z - self.latent_mean[k]) / self.latent_std[k]

    def unstandardise(self, modality: str, z: Tensor) -> Tensor:
        k = MODALITIES.index(modality)
        return z * self.latent_std[k] + self.latent_mean[k]

    # ---- unimodal recovery --------------------------------------------------------------------

    def condition(self, target: str, standardised: Mapping[str, Tensor], availability: Tensor) -> Tuple[Tensor, Tensor]:
        """The generator condition [N, C, L] for ``target`` and the rows that have one (some other modality
        available): the single available latent, or ``cat_*`` over both when both are available."""
        (first, second), conv = PAIR_CONDITION[target]
        has1 = availability[:, MODALITIES.index(first)].view(-1, 1, 1)
        has2 = availability[:, MODALITIES.index(second)].view(-1, 1, 1)
        z1, z2 = standardised[first], standardised[second]
        both = getattr(self, conv)(torch.cat([z1, z2], dim=1))
        cond = torch.where(has1 & has2, both, torch.where(has1, z1, z2))
        return cond, (has1 | has2).view(-1)

    def generator(self, modality: str) -> nn.Module:
        return getattr(self, f"score_{SHORT[modality]}")

    def refiner(self, modality: str) -> nn.Module:
        return getattr(self, f"rec_{SHORT[modality]}")

    def generator_loss(self, target: str, x0: Tensor, cond: Tensor,
                       generator: Optional[torch.Generator] = None) -> Tensor:
        """The generator's denoising loss on standardised latents ``x0`` [n, C, L] given ``cond``: DDPM ε-MSE
        with t ~ U{0, …, T−1} (DiT) or the VE-SDE score-matching loss (ScoreNet)."""
        net = self.generator(target)
        if self.generator_kind == "dit":
            t = torch.randint(0, self.diffusion.timesteps, (x0.shape[0],), device=x0.device, generator=generator)
            return self.diffusion.train_losses(net, x0, t, cond, generator=generator, prediction=self.prediction)
        return ve_sde_loss(net, x0, self.sde.marginal_prob_std, condition=cond, generator=generator)

    def sample(self, target: str, cond: Tensor, *, seed: Optional[int] = None, steps: Optional[int] = None,
               differentiable: bool = False) -> Tensor:
        """Standardised latents [n, C, L] generated for ``target`` from ``cond`` [n, C, L] (DDIM over the
        trained timestep range, or Euler–Maruyama over t ∈ [1, 1e-3]); ``seed`` makes the noise repeatable.
        ``differentiable`` (DiT only): keep the graph through every DDIM step, so that a loss on the result
        trains the generator and the condition, as RoHyDR's DiT release trains them."""
        net, (c, length), n = self.generator(target), self.latent_shape, cond.shape[0]
        steps = steps or self.sampling_steps
        if self.generator_kind == "dit":
            return self.diffusion.ddim_sample(self.diffusion.noise_predictor(net, self.prediction), cond, length, n, c,
                                              ddim_timesteps=steps, ddim_discr_method="uniform", clip_denoised=False,
                                              seed=seed, differentiable=differentiable)
        if differentiable:
            raise ValueError(f"{_NAME}.sample: differentiable sampling needs generator='dit' (the release's "
                             f"ScoreNet version samples without gradient); this model's generator is 'score'")
        return self._sample_score(net, cond, n, c, length, steps, seed)

    @torch.no_grad()
    def _sample_score(self, net: nn.Module, cond: Tensor, n: int, c: int, length: int, steps: int,
                      seed: Optional[int]) -> Tensor:
        start_std = float(self.sde.marginal_prob_std(torch.ones((), dtype=cond.dtype)))
        if seed is None:
            init = torch.randn((n, c, length), device=cond.device, dtype=cond.dtype) * start_std
        else:
            seed_tensor = torch.tensor(seed, dtype=torch.int64, device=cond.device)
            init = counter_normal(seed_tensor, 0, (n, c, length), dtype=cond.dtype, device=cond.device) * start_std
        return euler_maruyama_sampler(net, self.sde.marginal_prob_std, self.sde.diffusion_coeff, n, steps,
                                      condition=cond, init_x=init, seed=seed)

    def _require_scaling(self) -> None:
        if not bool(self.scaling_fitted):
            raise RuntimeError(f"{_NAME}: the latent scaling is not fitted; call fit_scaling(train batches) first")

    def recoverable_rows(self, availability: Tensor) -> Dict[str, Tensor]:
        """Modality -> indices of the utterances missing it that have some other modality to condition on."""
        out = {}
        for k, m in enumerate(MODALITIES):
            (first, second), _ = PAIR_CONDITION[m]
            others = availability[:, MODALITIES.index(first)] | availability[:, MODALITIES.index(second)]
            out[m] = (~availability[:, k] & others).nonzero().flatten()
        return out

    def draw(self, observed: Mapping[str, Tensor], availability: Tensor, *, seed: Optional[int] = None,
             steps: Optional[int] = None, differentiable: bool = False) -> Dict[str, Tensor]:
        """Modality -> standardised generated latents of its :meth:`recoverable_rows` (in row order);
        ``differentiable``: see :meth:`sample` (the graph then also reaches the ``cat_*`` convs)."""
        self._require_scaling()
        with torch.set_grad_enabled(bool(differentiable)):
            standardised = {m: self.standardise(m, observed[m]) for m in MODALITIES}
            out = {}
            for k, (m, rows) in enumerate(self.recoverable_rows(availability).items()):
                if rows.numel():
                    cond, _ = self.condition(m, standardised, availability)
                    out[m] = self.sample(m, cond[rows], seed=None if seed is None else seed * len(MODALITIES) + k,
                                         steps=steps, differentiable=differentiable)
        return out

    def recover(self, observed: Mapping[str, Tensor], availability: Tensor, *, seed: Optional[int] = None,
                steps: Optional[int] = None, samples: Optional[Mapping[str, Tensor]] = None) -> Dict[str, Tensor]:
        """Latents of every modality: ``observed`` where available; where missing (and some modality is
        available) generated, refined by the RCAN refiner and mapped back to the latent scale. Zeros
        for ``recovery="zero"`` and for utterances with no modality. ``samples`` (from :meth:`draw`)
        reuses earlier draws instead of sampling again."""
        if self.recovery_mode == "zero":
            return dict(observed)
        if samples is None:
            samples = self.draw(observed, availability, seed=seed, steps=steps)
        out = {}
        for m, rows in self.recoverable_rows(availability).items():
            latent = observed[m]
            if rows.numel():
                refined = self.unstandardise(m, self.refiner(m)(samples[m]))
                latent = latent.index_copy(0, rows, refined.to(latent.dtype))
            out[m] = latent
        return out

    # ---- fusion and prediction ----------------------------------------------------------------

    def fuse(self, latents: Mapping[str, Tensor]) -> Tensor:
        """MulT fusion of three latents [N, C, L] into the fused vector [N, 6C]."""
        seq = {SHORT[m]: latents[m].permute(2, 0, 1) for m in MODALITIES}  # [L, N, C]
        last = []
        for s, (k1, k2) in (("l", ("a", "v")), ("a", ("l", "v")), ("v", ("l", "a"))):
            h1 = getattr(self, f"trans_{s}_with_{k1}")(seq[s], seq[k1], seq[k1])
            h2 = getattr(self, f"trans_{s}_with_{k2}")(seq[s], seq[k2], seq[k2])
            last.append(getattr(self, f"trans_{s}_mem")(torch.cat([h1, h2], dim=2))[-1])
        return torch.cat(last, dim=1)

    def head(self, fused: Tensor) -> Tensor:
        """``out_layer(proj2(dropout(relu(proj1(F)))) + F)``: [N] for regression, [N, classes] otherwise."""
        hidden = F.dropout(F.relu(self.proj1(fused)), p=self.output_dropout, training=self.training)
        out = self.out_layer(self.proj2(hidden) + fused)
        return out.squeeze(1) if self.task == "regression" else out

    def predict_fused(self, fused: Tensor, incomplete: Tensor) -> Tensor:
        """``head(R(F))`` for the ``incomplete`` rows (with recovery), ``head(F)`` for the others."""
        if self.recovery_mode == "diffusion" and bool(incomplete.any()):
            fused = torch.where(incomplete.view(-1, 1), self.reconstruction(fused), fused)
        return self.head(fused)

    def predict(self, features: Mapping[str, Tensor], availability: Tensor, *, seed: Optional[int] = None,
                steps: Optional[int] = None) -> Dict[str, Tensor]:
        """Label-free prediction from observed ``features`` (modality -> [N, D] or [N, T, D]; entries of
        unavailable modalities are never read) and ``availability`` bool [N, 3]."""
        self._check_availability(features, availability)
        with self.layers.context():
            observed = self.latents(features, availability)
            latents = self.recover(observed, availability, seed=seed, steps=steps)
            fused = self.fuse(latents)
            prediction = self.predict_fused(fused, ~availability.all(dim=1))
        return {"prediction": prediction, "latents": latents, "fused": fused}

    def forward(self, batch: Batch, *, seed: Optional[int] = None, steps: Optional[int] = None) -> Dict[str, Tensor]:
        """:meth:`predict` on a :class:`DialogueBatch` or :class:`PackedBatch` (packed utterance order); the
        batch's labels and ground truth are not read."""
        packed = batch.packed() if isinstance(batch, DialogueBatch) else batch
        if not isinstance(packed, PackedBatch):
            raise ValueError(f"{_NAME}: batch must be a DialogueBatch or PackedBatch; got {type(batch).__name__}")
        return self.predict(packed.features, packed.availability, seed=seed, steps=steps)

    def _check_availability(self, features: Mapping[str, Tensor], availability: Tensor) -> None:
        if not isinstance(availability, Tensor) or availability.dtype != torch.bool or availability.dim() != 2 \
                or availability.shape[1] != len(MODALITIES):
            got = f"{tuple(availability.shape)} {availability.dtype}" if isinstance(availability, Tensor) \
                else type(availability).__name__
            raise ValueError(f"{_NAME}: availability must be a bool tensor [N, {len(MODALITIES)}]; got {got}")
        if not isinstance(features, Mapping) or any(m not in features for m in MODALITIES):
            got = sorted(features) if isinstance(features, Mapping) else type(features).__name__
            raise ValueError(f"{_NAME}: features must map every modality {MODALITIES} to a tensor (zeros where "
                             f"unavailable); got {got}")
        n = availability.shape[0]
        for m in MODALITIES:
            if not isinstance(features[m], Tensor) or features[m].shape[0] != n:
                got = tuple(features[m].shape) if isinstance(features[m], Tensor) else type(features[m]).__name__
                raise ValueError(f"{_NAME}: features[{m!r}] must have N = {n} rows (availability's); got {got}")
