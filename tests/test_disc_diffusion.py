"""DISCDiffusion: release-compatible generators, scaling, training and label-free recovery."""
import numpy as np
import pytest
import torch

from imer_fast.data.corpus import MODALITIES
from imer_fast.diffusion.disc import GENERATOR_NAMES, DISCDiffusion
from imer_fast.testing.reference_feddisc import ReferenceUNetModel

SMALL_UNET = dict(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,), num_heads=2)
DIMS = {"text": 12, "audio": 10, "video": 14}


def small_model(**kwargs):
    defaults = dict(latent_channels=4, latent_length=8, timesteps=100, unet=SMALL_UNET, sampling_steps=10)
    defaults.update(kwargs)
    return DISCDiffusion(DIMS, 3, **defaults)


def test_generator_names_and_shapes_match_release_unet():
    torch.manual_seed(0)
    model = DISCDiffusion(DIMS, 6)
    release = ReferenceUNetModel(label_num=6)
    for m, name in GENERATOR_NAMES.items():
        ours = {k: v.shape for k, v in getattr(model, name).state_dict().items()}
        assert ours == {k: v.shape for k, v in release.state_dict().items()}, m
    keys = model.state_dict().keys()
    assert {"proj_l.0.weight", "proj_a.0.weight", "proj_v.0.weight", "latent_min", "latent_max"} <= set(keys)
    assert model.proj_l[0].weight.shape == (32 * 48, DIMS["text"])


def test_loads_release_generators_and_ignores_other_keys():
    torch.manual_seed(1)
    model = small_model()
    donor = small_model()
    release_like = {k: v for k, v in donor.state_dict().items() if k.startswith(("score_", "proj_"))}
    release_like["trans_l_with_a.layers.0.fc1.weight"] = torch.zeros(3)  # the release's classifier parts
    assert model.load_release_generators(release_like) == []
    for k, v in release_like.items():
        if k.startswith(("score_", "proj_")):
            assert torch.equal(model.state_dict()[k], v), k


def synthetic(n, generator, dims=DIMS, classes=3):
    """Features whose projected latents depend strongly on the class (what the condition carries); the
    class centres are the same for every call, the utterances come from ``generator``."""
    centre_gen = torch.Generator().manual_seed(1234)
    centers = {m: torch.randn(classes, d, generator=centre_gen) * 4 for m, d in dims.items()}
    labels = torch.randint(0, classes, (n,), generator=generator)
    features = {m: centers[m][labels] + 0.1 * torch.randn(n, d, generator=generator) for m, d in dims.items()}
    logits = torch.nn.functional.one_hot(labels, classes).float() * 6.0  # a confident pseudo-labeller
    return features, labels, logits


def test_fit_scaling_maps_training_latents_to_unit_interval():
    model = small_model()
    gen = torch.Generator().manual_seed(0)
    features, _, _ = synthetic(64, gen)
    availability = torch.ones(64, 3, dtype=torch.bool)
    ranges = model.fit_scaling([(features, availability)])
    for m in MODALITIES:
        z = model._scale(m, model.project(m, features[m]))
        assert z.min().item() == pytest.approx(-1.0, abs=1e-5) and z.max().item() == pytest.approx(1.0, abs=1e-5)
        assert ranges[m][0] < ranges[m][1]
    state = model.state_dict()
    fresh = small_model()
    fresh.load_state_dict(state)
    assert bool(fresh.scaling_fitted) and torch.equal(fresh.latent_min, model.latent_min)


def test_fit_scaling_refuses_padded_batches_with_a_hint():
    model = small_model()
    features, _, _ = synthetic(6, torch.Generator().manual_seed(0))
    padded = {m: x.reshape(2, 3, -1) for m, x in features.items()}     # a DialogueBatch's [B, L, D]
    with pytest.raises(ValueError, match="availability must be a bool tensor \\[N, 3\\]; got \\(2, 3, 3\\) "
                                         "torch.bool .*pass its .packed\\(\\) features"):
        model.fit_scaling([(padded, torch.ones(2, 3, 3, dtype=torch.bool))])
    assert not bool(model.scaling_fitted)


def test_scaling_required_before_loss_or_recover():
    model = small_model()
    features, _, logits = synthetic(4, torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError, match="fit_scaling"):
        model.loss(features, torch.ones(4, 3, dtype=torch.bool), logits)


def _trained_model(steps=300):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = small_model(sampling_steps=20)
    features, labels, logits = synthetic(256, gen)
    availability = torch.ones(256, 3, dtype=torch.bool)
    model.fit_scaling([(features, availability)])
    opt = torch.optim.Adam([p for n, p in model.named_parameters() if n.startswith("score_")], lr=3e-3)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, 256, (32,), generator=gen)
        loss, per_modality = model.loss({m: f[idx] for m, f in features.items()}, availability[idx], logits[idx],
                                        generator=gen)
        assert set(per_modality) == set(MODALITIES)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model, features, losses


@pytest.fixture(scope="module")
def trained():
    return _trained_model()


def test_training_loss_decreases(trained):
    _, _, losses = trained
    first, last = sum(losses[:15]) / 15, sum(losses[-15:]) / 15
    assert last < 0.3 * first, (first, last)


def test_recovery_beats_mean_imputation_and_keeps_present_entries(trained):
    model, train_features, _ = trained
    features, labels, logits = synthetic(96, torch.Generator().manual_seed(77))  # new utterances
    availability = torch.ones(96, 3, dtype=torch.bool)
    availability[:32, 0] = False           # text missing
    availability[32:64, 1:] = False        # audio and video missing
    availability[64:, 2] = False           # video missing
    model.eval()
    out = model.recover(features, availability, logits, seed=3)
    for k, m in enumerate(MODALITIES):
        truth = model.project(m, features[m])
        present, missing = availability[:, k], ~availability[:, k]
        assert torch.equal(out[m][present], truth[present])
        mean_latent = model.project(m, train_features[m]).mean(0, keepdim=True)
        err = (out[m][missing] - truth[missing]).pow(2).mean().item()
        mean_err = (mean_latent - truth[missing]).pow(2).mean().item()
        assert err < 0.85 * mean_err, (m, err, mean_err)


def test_recover_never_reads_labels(trained):
    """recover takes no labels; recover_batch reads a PackedBatch without touching its labels."""
    model, _, _ = trained
    features, labels, logits = synthetic(8, torch.Generator().manual_seed(1))
    availability = torch.ones(8, 3, dtype=torch.bool)
    availability[:, 1] = False

    class Poisoned:
        def __getattr__(self, name):
            raise AssertionError("labels were read at evaluation time")

    batch = _packed(features, availability, Poisoned())
    a = model.recover_batch(batch, logits, seed=0)
    b = model.recover(features, availability, logits, seed=0)
    for m in MODALITIES:
        assert torch.equal(a[m], b[m])


def _packed(features, availability, labels):
    from imer_fast.data.batching import PackedBatch

    n = availability.shape[0]
    return PackedBatch(features=features, ground_truth=features, availability=availability,
                       speakers=torch.zeros(n, dtype=torch.long), labels=labels,
                       cu_seqlens=torch.tensor([0, n], dtype=torch.int32), max_seqlen=n,
                       lengths=torch.tensor([n]), batch_index=torch.zeros(n, dtype=torch.long),
                       position=torch.arange(n), flat_index=torch.arange(n), padded_shape=(1, n),
                       dialogue_ids=["d0"])


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpm_solver"])
def test_every_sampler_and_any_pattern(trained, sampler):
    model, _, _ = trained
    features, _, logits = synthetic(5, torch.Generator().manual_seed(2))
    availability = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 0, 0]], dtype=torch.bool)
    steps = None if sampler == "ddpm" else 5  # DDPM runs every trained timestep
    out = model.recover(features, availability, logits, sampler=sampler, steps=steps, seed=1)
    again = model.recover(features, availability, logits, sampler=sampler, steps=steps, seed=1)
    for m in MODALITIES:
        assert out[m].shape == (5, 4, 8) and torch.isfinite(out[m]).all()
        assert torch.equal(out[m], again[m])


def test_speaker_and_context_conditioning():
    model = small_model(num_speakers=2, context_dim=5)
    assert model.condition_dim == 3 + 2 + 5
    logits = torch.randn(4, 3)
    cond = model.condition("text", logits, torch.tensor([0, 1, 1, 0]), torch.ones(4, 5))
    torch.testing.assert_close(cond[:, :3], torch.softmax(logits, 1))
    assert torch.equal(cond[:, 3:5], torch.tensor([[1.0, 0], [0, 1], [0, 1], [1, 0]]))
    with pytest.raises(ValueError, match="speakers must be"):
        model.condition("text", logits, None, torch.ones(4, 5))
    with pytest.raises(ValueError, match="context must be"):
        model.condition("text", logits, torch.zeros(4, dtype=torch.long), torch.ones(4, 6))


def test_temperature_sharpens_condition():
    cold, warm = small_model(temperature=0.2), small_model(temperature=1.0)
    logits = torch.tensor([[1.0, 0.0, -1.0]])
    assert cold.condition("audio", logits).max() > warm.condition("audio", logits).max()


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="feature_dims"):
        DISCDiffusion({"smell": 3}, 3)
    with pytest.raises(ValueError, match="sampler"):
        small_model(sampler="euler")
    with pytest.raises(ValueError, match="temperature"):
        small_model(temperature=0.0)
    model = small_model(latent_range={m: (-2.0, 2.0) for m in MODALITIES})
    features, _, logits = synthetic(4, torch.Generator().manual_seed(0))
    ok = torch.ones(4, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="availability must be a bool tensor"):
        model.recover(features, ok.int(), logits)
    with pytest.raises(ValueError, match=r"pseudo_logits for .text. must be \[N, 3\] with N = 4"):
        model.recover(features, ok, logits[:, :2])
    bad = dict(features, audio=features["audio"].clone())
    bad["audio"][0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"features\['audio'\] contains NaN"):
        model.recover(bad, ok, logits)
    with pytest.raises(ValueError, match=r"features\['video'\] must be \[N, 14\]"):
        model.recover(dict(features, video=features["video"][:, :3]), ok, logits)
    with pytest.raises(ValueError, match="latent_range"):
        model.set_scaling({"text": (1.0, 1.0)})
    nan_logits = logits.clone()
    nan_logits[1, 0] = float("nan")
    with pytest.raises(ValueError, match="pseudo_logits for 'text' contain NaN"):
        model.recover(features, ok, nan_logits)
    with pytest.raises(ValueError, match="steps must be an int >= 1; got 0"):
        model.recover(features, ok, logits, steps=0)
    inf_logits = logits.clone()
    inf_logits[0, 1] = float("inf")
    with pytest.raises(ValueError, match="pseudo_logits for 'text' contain NaN or inf"):
        model.recover(features, ok, inf_logits)
    with pytest.raises(ValueError, match=r"features\['text'\] is torch.float64 but the model is torch.float32"):
        model.recover(dict(features, text=features["text"].double()), ok, logits)
    with pytest.raises(ValueError, match="samples must be an int >= 1; got True"):
        model.recover(features, ok, logits, samples=True)
    with pytest.raises(ValueError, match=r"seed must be an int in \[-2\*\*63, 2\*\*63\)"):
        model.recover(features, ok, logits, seed=2 ** 63)
    missing = ok.clone()
    missing[:, 0] = False
    huge = model.recover(features, missing, logits, seed=2 ** 62)  # per-modality seeds derived without overflow
    assert torch.isfinite(huge["text"]).all()
    for same in (np.int64(5), torch.tensor(5)):  # numpy ints and 0-d int64 tensors are seeds too
        torch.testing.assert_close(model.recover(features, missing, logits, seed=same)["text"],
                                   model.recover(features, missing, logits, seed=5)["text"], rtol=0, atol=0)
    double_logits = model.recover(features, missing, logits.double(), seed=1)  # any float logits: softmax in fp32
    torch.testing.assert_close(double_logits["text"], model.recover(features, missing, logits, seed=1)["text"])
    with pytest.raises(ValueError, match="steps does not apply to sampler='ddpm'"):
        model.recover(features, ok, logits, sampler="ddpm", steps=5)


def test_sampler_settings_fail_at_construction_not_at_recovery():
    with pytest.raises(ValueError, match="ddim_discr_method must be one of"):
        small_model(ddim_discr_method="linear")
    for eta in (-1.0, 1.5):  # eta > 1 is no DDIM process (the release's square root goes NaN)
        with pytest.raises(ValueError, match=r"ddim_eta must be in \[0, 1\]"):
            small_model(ddim_eta=eta)
    with pytest.raises(ValueError, match=r"latent_length=6 must be divisible by 4"):
        small_model(latent_length=6, unet=dict(SMALL_UNET, channel_mult=(1, 2, 2)))
    with pytest.raises(ValueError, match=r"unet must not set \['label_num'\]"):
        small_model(unet=dict(SMALL_UNET, label_num=99))
    with pytest.raises(ValueError, match=r"sampling_steps=500 does not fit the sampler 'ddim'"):
        small_model(sampling_steps=500)
    with pytest.raises(ValueError, match="sampling_steps must be an int >= 1"):
        small_model(sampling_steps=0)


def test_speaker_and_context_conditions_are_checked():
    model = small_model(num_speakers=2, context_dim=3)
    logits = torch.zeros(4, 3)
    with pytest.raises(ValueError, match=r"speaker ids must lie in \[0, num_speakers = 2\); got range \[0, 2\]"):
        model.condition("text", logits, speakers=torch.tensor([0, 1, 2, 0]), context=torch.zeros(4, 3))
    with pytest.raises(ValueError, match="speakers must be an integer tensor"):
        model.condition("text", logits, speakers=torch.tensor([0.7, 1.0, 0.0, 0.0]), context=torch.zeros(4, 3))
    context = torch.zeros(4, 3)
    context[2, 1] = float("inf")
    with pytest.raises(ValueError, match="context contains NaN or inf"):
        model.condition("text", logits, speakers=torch.tensor([0, 1, 1, 0]), context=context)


def test_standard_scaling_is_the_per_element_mean_and_std_of_present_latents():
    model = small_model(scaling="standard")
    assert model.clip_denoised is False and small_model().clip_denoised is True
    gen = torch.Generator().manual_seed(5)
    features, _, _ = synthetic(80, gen)
    availability = torch.rand(80, 3, generator=gen) > 0.3
    halves = [({m: f[:40] for m, f in features.items()}, availability[:40]),
              ({m: f[40:] for m, f in features.items()}, availability[40:])]
    model.fit_scaling(halves)
    for k, m in enumerate(MODALITIES):
        z = model.project(m, features[m][availability[:, k]]).double()
        torch.testing.assert_close(model.latent_mean[k].double(), z.mean(0), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.latent_std[k].double(), z.std(0, unbiased=False), rtol=1e-4, atol=1e-5)
        x = model._scale(m, model.project(m, features[m]))
        torch.testing.assert_close(model._unscale(m, x), model.project(m, features[m]), rtol=1e-5, atol=1e-5)
    assert {"latent_mean", "latent_std"} <= set(model.state_dict())
    assert "latent_mean" not in small_model().state_dict()   # the release's keys stay as they are
    with pytest.raises(ValueError, match="latent_range fixes the release's min-max scaling"):
        small_model(scaling="standard", latent_range={"text": (0.0, 1.0)})
    with pytest.raises(ValueError, match="scaling must be one of"):
        small_model(scaling="robust")
    with pytest.raises(ValueError, match="prediction must be one of"):
        small_model(prediction="x0")


def test_observed_condition_holds_the_other_modalities_and_never_the_target():
    model = small_model(condition_observed=True, scaling="standard")
    assert model.observed_dim == 2 * (4 * 8 + 1) and model.condition_dim == 3 + model.observed_dim
    gen = torch.Generator().manual_seed(6)
    features, _, logits = synthetic(6, gen)
    availability = torch.tensor([[1, 1, 1], [1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1], [1, 0, 0]], dtype=torch.bool)
    model.fit_scaling([(features, torch.ones(6, 3, dtype=torch.bool))])
    obs = model.observed_condition("audio", features, availability)
    width = 4 * 8
    text = model._scale("text", model.project("text", features["text"])).flatten(1)
    video = model._scale("video", model.project("video", features["video"])).flatten(1)
    torch.testing.assert_close(obs[:, :width], text * availability[:, :1])
    torch.testing.assert_close(obs[:, width], availability[:, 0].float())
    torch.testing.assert_close(obs[:, width + 1:2 * width + 1], video * availability[:, 2:])
    torch.testing.assert_close(obs[:, -1], availability[:, 2].float())
    changed = dict(features, audio=features["audio"] + 100.0)     # the target's own features never enter
    assert torch.equal(model.observed_condition("audio", changed, availability), obs)
    with pytest.raises(ValueError, match="observed must be"):
        model.condition("audio", logits)
    # recovery reads them: another video changes the recovered text of an utterance that has video
    model.eval()
    missing_text = torch.tensor([[0, 1, 1]] * 6, dtype=torch.bool)
    a = model.recover(features, missing_text, logits, seed=0)["text"]
    b = model.recover(dict(features, video=features["video"] * -1.0), missing_text, logits, seed=0)["text"]
    assert not torch.allclose(a, b)


def test_recover_with_samples_is_the_mean_of_that_many_draws(trained):
    model, _, _ = trained
    features, _, logits = synthetic(7, torch.Generator().manual_seed(9))
    availability = torch.ones(7, 3, dtype=torch.bool)
    availability[:, 0] = False
    gen = torch.Generator().manual_seed(11)
    mean3 = model.recover(features, availability, logits, samples=3, generator=gen)["text"]
    # the same three draws, one sampler call over three stacked copies of the condition
    gen = torch.Generator().manual_seed(11)
    cond = model.condition("text", logits).repeat(3, 1)
    x = model.diffusion.ddim_sample(model.generator("text"), cond, 8, 21, 4, ddim_timesteps=model.sampling_steps,
                                    ddim_discr_method="quad", generator=gen)
    expected = model._unscale("text", x.view(3, 7, 4, 8).mean(0))
    torch.testing.assert_close(mean3, expected)
    one = model.recover(features, availability, logits, samples=1, seed=4)["text"]
    assert torch.equal(one, model.recover(features, availability, logits, seed=4)["text"])
    spread = lambda k: (model.recover(features, availability, logits, samples=k, seed=4)["text"]  # noqa: E731
                        - model.project("text", features["text"])).var(0).mean()
    assert spread(8) < spread(1)
    with pytest.raises(ValueError, match="samples must be an int >= 1"):
        model.recover(features, availability, logits, samples=0)
