"""The modules and samplers on a CUDA device (Triton kernels compiled, cuBLAS GEMMs, CUDA graphs), against
the release twins on the same device and against imer_fast on the CPU (whose C++ kernels the rest of the
suite checks against the references).

Marked ``gpu``: skipped without CUDA. Run on a GPU machine with the Triton kernels compiled, e.g.
``TRITON_INTERPRET=0 pytest -m gpu tests/test_gpu_modules.py`` (``bench/gpu_session.sh`` does, with the
other GPU checks). ``IMER_FAST_GPU_TEST_DEVICE=cpu`` runs the same tests on the CPU instead (no ``gpu``
mark, the CUDA-graph test skipped): a check of the tests themselves on a machine without a GPU.

Tolerances: the GPU attention multiplies fp32 as tf32x3 (a few fp32 ulps from exact) and sums in another
order than the CPU kernels, so module outputs agree to ~1e-5 relative and gradients, through whole
networks, to ~1e-4.
"""
import os

import pytest
import torch

from imer_fast.data import make_synthetic
from imer_fast.diffusion.disc import DISCDiffusion
from imer_fast.diffusion.gaussian import GaussianDiffusion
from imer_fast.diffusion.ve_sde import VESDE, euler_maruyama_sampler
from imer_fast.nn.cond_cross_attention import CondCrossAttention
from imer_fast.nn.conditional_unet import ConditionalUNet1d
from imer_fast.nn.cross_modal_transformer import CrossModalTransformer
from imer_fast.nn.score_net import ScoreNet
from imer_fast.testing.reference_feddisc import ReferenceUNetModel
from imer_fast.testing.reference_mult import ReferenceCrossAttention, ReferenceTransformerEncoder
from imer_fast.train.feddisc import FedDISCConfig, train_feddisc
from imer_fast.train.trainer import TrainerConfig

DEVICE = torch.device(os.environ.get("IMER_FAST_GPU_TEST_DEVICE", "cuda"))
if DEVICE.type == "cuda" and DEVICE.index is None:
    DEVICE = torch.device("cuda", 0)  # the device tensors report
pytestmark = [pytest.mark.gpu] if DEVICE.type == "cuda" else []
needs_cuda = pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA graphs need a CUDA device")
SMALL_UNET = dict(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,), num_heads=2)


@pytest.fixture(autouse=True)
def exact_fp32():
    """Comparisons at fp32 tolerances: no TF32 in cuDNN convolutions (on by default, ~5e-4 relative per
    convolution) or cuBLAS products; the attention kernel then multiplies fp32 as tf32x3."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def outputs_and_grads(module, inputs, call=None, probe_seed=99):
    """(output, gradients of every input and trainable parameter of ``module``) for a fixed random output
    gradient; ``call(module, *inputs)`` runs it (default: ``module(*inputs)``)."""
    inputs = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    out = call(module, *inputs) if call is not None else module(*inputs)
    probe = randn(*out.shape, seed=probe_seed).to(out.device)
    leaves = [t for t in inputs if t.requires_grad] + [p for p in module.parameters() if p.requires_grad]
    return out.detach(), torch.autograd.grad(out, leaves, probe, allow_unused=True)


def assert_close_run(got, want, rtol, atol):
    """Outputs within (rtol, atol x output scale); gradients within (10 rtol, atol x gradient scale)."""
    (out, grads), (ref_out, ref_grads) = got, want
    torch.testing.assert_close(out.cpu(), ref_out.cpu(), rtol=rtol, atol=atol * ref_out.abs().max().item())
    scale = max(g.abs().max().item() for g in ref_grads if g is not None)
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        if r is None:
            assert g is None or not g.any(), i
        else:
            torch.testing.assert_close(g.cpu(), r.cpu(), rtol=10 * rtol, atol=atol * scale, msg=lambda m: f"grad {i}: {m}")


@pytest.mark.parametrize("cross", [False, True])
def test_cross_modal_transformer_matches_the_release_on_the_device(cross):
    torch.manual_seed(0)
    ours = CrossModalTransformer(32, 8, layers=2, attn_mask=True).to(DEVICE)
    release = ReferenceTransformerEncoder(32, 8, layers=2, attn_mask=True).to(DEVICE)
    release.load_state_dict(ours.state_dict())
    x, context = randn(50, 8, 32, seed=1).to(DEVICE), randn(41, 8, 32, seed=2).to(DEVICE)
    inputs = [x, context, context] if cross else [x]
    if cross:  # separate k and v inputs: the module's three-projection mode
        inputs[2] = randn(41, 8, 32, seed=3).to(DEVICE)
    assert_close_run(outputs_and_grads(ours, inputs), outputs_and_grads(release, inputs), rtol=1e-5, atol=1e-5)


def test_cross_modal_transformer_key_padding_matches_the_cpu():
    torch.manual_seed(0)
    cpu = CrossModalTransformer(64, 8, layers=1)
    dev = CrossModalTransformer(64, 8, layers=1).to(DEVICE)
    dev.load_state_dict(cpu.state_dict())
    x, context = randn(30, 6, 64, seed=4), randn(110, 6, 64, seed=5)
    lengths = torch.tensor([110, 1, 57, 0, 64, 99])

    def run(module, device):
        leaves = [x.to(device).requires_grad_(), context.to(device).requires_grad_()]
        out = module(leaves[0], leaves[1], leaves[1], lengths=lengths.to(device))
        grads = torch.autograd.grad(out, leaves, randn(*out.shape, seed=6).to(device))
        return out.detach(), grads

    assert_close_run(run(dev, DEVICE), run(cpu, torch.device("cpu")), rtol=1e-5, atol=1e-5)


def test_cond_cross_attention_matches_the_release_on_the_device():
    torch.manual_seed(0)
    ours = CondCrossAttention(dim=64, context_dim=6, dim_head=8, heads=8).to(DEVICE)
    release = ReferenceCrossAttention(dim=64, context_dim=6, dim_head=8, heads=8).to(DEVICE)
    release.load_state_dict(ours.state_dict())
    x, context = randn(32, 48, 64, seed=7).to(DEVICE), randn(32, 2, 6, seed=8).to(DEVICE)
    assert_close_run(outputs_and_grads(ours, [x, context]), outputs_and_grads(release, [x, context]),
                     rtol=1e-5, atol=1e-5)


def test_conditional_unet_matches_the_release_on_the_device():
    torch.manual_seed(0)
    release = ReferenceUNetModel(label_num=6).to(DEVICE)
    with torch.no_grad():  # biases and norm affines away from their trivial initial values
        for p in release.parameters():
            if p.dim() == 1:
                p.normal_(0, 0.2)
    ours = ConditionalUNet1d(label_num=6).to(DEVICE)
    ours.load_state_dict(release.state_dict())
    x, y = randn(4, 32, 48, seed=9).to(DEVICE), torch.softmax(randn(4, 6, seed=10), 1).to(DEVICE)
    t = torch.tensor([0, 17, 500, 999], device=DEVICE)

    def call(m, x_, y_):
        return m(x_, t, y_)

    assert_close_run(outputs_and_grads(ours, [x, y], call), outputs_and_grads(release, [x, y], call),
                     rtol=1e-4, atol=1e-5)


def _small_unet(device):
    torch.manual_seed(0)
    return ConditionalUNet1d(label_num=6, **SMALL_UNET).to(device).eval()


def test_ddim_from_the_same_start_noise_matches_the_cpu():
    cpu_model = _small_unet("cpu")
    dev_model = _small_unet(DEVICE)
    y, x_T = torch.softmax(randn(8, 6, seed=11), 1), randn(8, 32, 48, seed=12)
    diffusion = GaussianDiffusion(1000)

    def sample(model, device):
        return diffusion.ddim_sample(model, y.to(device), 48, 8, 32, ddim_timesteps=20, noise=x_T.to(device))

    torch.testing.assert_close(sample(dev_model, DEVICE).cpu(), sample(cpu_model, "cpu"), rtol=1e-4, atol=1e-4)


@needs_cuda
def test_cuda_graph_replays_the_eager_sampling_loop():
    from imer_fast.diffusion.graphed import GraphedSampler

    model = _small_unet(DEVICE)
    diffusion = GaussianDiffusion(1000)
    y = torch.softmax(randn(16, 6, seed=13), 1).to(DEVICE)

    def loop(y_, seed):
        return diffusion.ddim_sample(model, y_, 48, 16, 32, ddim_timesteps=10, ddim_eta=1.0, seed=seed)

    graphed = GraphedSampler(loop, y)
    replay = graphed(y, seed=1234)
    eager = loop(y, torch.tensor(1234, device=DEVICE))
    torch.testing.assert_close(replay, eager, rtol=1e-6, atol=1e-6)
    assert not torch.equal(graphed(y, seed=1235), replay)  # a new seed is new noise


def test_score_net_and_euler_maruyama_match_the_cpu():
    sde = VESDE(25.0)
    torch.manual_seed(0)
    cpu = ScoreNet(sde.marginal_prob_std, channels=[32, 32, 64, 64], embed_dim=64).eval()
    dev = ScoreNet(sde.marginal_prob_std, channels=[32, 32, 64, 64], embed_dim=64).to(DEVICE).eval()
    dev.load_state_dict(cpu.state_dict())
    x, cond = randn(4, 32, 48, seed=14), randn(4, 32, 48, seed=15)
    t = torch.tensor([0.05, 0.3, 0.7, 0.99])

    def call(m, x_, c_):
        return m(x_, t.to(x_.device), c_)

    assert_close_run(outputs_and_grads(dev, [x.to(DEVICE), cond.to(DEVICE)], call),
                     outputs_and_grads(cpu, [x, cond], call), rtol=1e-4, atol=1e-5)

    def sample(m, device):
        with torch.no_grad():
            return euler_maruyama_sampler(m, sde.marginal_prob_std, sde.diffusion_coeff, 4, 10,
                                          condition=cond.to(device), device=device, seed=7)

    torch.testing.assert_close(sample(dev, DEVICE).cpu(), sample(cpu, "cpu"), rtol=1e-3, atol=1e-3)


def test_disc_diffusion_loss_and_recovery_match_the_cpu():
    dims = {"text": 12, "audio": 10, "video": 8}

    def build(device):
        torch.manual_seed(0)
        model = DISCDiffusion(dims, 3, latent_channels=4, latent_length=8, timesteps=100, unet=SMALL_UNET,
                              sampling_steps=10).to(device)
        return model

    features = {m: randn(24, d, seed=20 + d) for m, d in dims.items()}
    availability = torch.ones(24, 3, dtype=torch.bool)
    availability[:8, 0] = False
    availability[8:16, 1:] = False
    logits = randn(24, 3, seed=30)
    recovered = []
    for device in (DEVICE, torch.device("cpu")):
        model = build(device)
        on = {m: f.to(device) for m, f in features.items()}
        model.fit_scaling([(on, availability.to(device))])
        loss, _ = model.loss(on, availability.to(device), logits.to(device))
        grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad], allow_unused=True)
        assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads if g is not None)
        model.eval()
        with torch.no_grad():  # counter-based noise: the same draws on every device
            recovered.append(model.recover(on, availability.to(device), logits.to(device), seed=3))
    for m in dims:
        torch.testing.assert_close(recovered[0][m].cpu(), recovered[1][m], rtol=1e-3, atol=1e-3)


def test_feddisc_trains_on_the_device_with_bf16_autocast(tmp_path):
    corpus = make_synthetic("iemocap6", seed=0, scale=0.05, feature_dims=12)
    trainer = TrainerConfig(progress=False, out_dir=str(tmp_path), lr=1e-3, device=str(DEVICE), amp=True)
    config = FedDISCConfig(preset="small", extractor_epochs=1, generator_epochs=1, classifier_epochs=1, batch_size=4,
                           eval_rates=(0.5,), sampling_steps=2, trainer=trainer)
    results = train_feddisc(corpus, config)
    for system in results["systems"].values():
        for entry in system["history"]:
            assert all(v == v and abs(v) < 1e6 for v in entry.values() if isinstance(v, float)), entry
        assert all(0.0 <= m["WA"] <= 1.0 for m in system["evaluation"].values())
