"""Sampler throughput of the diffusion recovery models: latents/s and µs per step.

    python bench/profile_sampler.py                       # every sampler, B = 32, 256, 1024
    python bench/profile_sampler.py --samplers ddim50 --batch-sizes 256 --implementations ours reference
    python bench/profile_sampler.py --graph               # CUDA: replay whole loops as one CUDA graph
    python bench/profile_sampler.py --trace traces/       # also write a torch.profiler trace per run
    python bench/profile_sampler.py --time-steps 5        # time 5 steps per loop and extrapolate (slow CPUs)

Samplers: ``ddim50`` (DISCDiffusion's denoiser, FedDISC ``UNetModel`` defaults, 6 classes, DDIM 50
"quad" steps), ``ddpm1000`` (same denoiser, ancestral DDPM over 1,000 steps), ``em100`` (IMDer
``ScoreNet``, VE-SDE Euler–Maruyama 100 steps with a condition). Implementations: ``ours`` (imer_fast
modules and fused steps; noise from the in-kernel counter generator), ``reference`` (the eager
release-semantics twins in ``imer_fast.testing``), ``compiled`` (``torch.compile`` of the reference
denoiser, mode ``--compile-mode``). Every step of a loop costs one denoiser call plus one update, so
``--time-steps K`` times a K-step loop of the same sampler and scales to the full count; the JSON
marks such rows ``"extrapolated_from_steps": K``. The implementations of one (sampler, batch) are timed
round-robin, repeat by repeat, so a shared machine's drift affects them alike. Writes JSON (device, versions, command, medians)
to ``--out`` (default ``bench/results/<device>/sampler_profile.json``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SAMPLERS = {"ddim50": 50, "ddpm1000": 1000, "em100": 100}
IMPLEMENTATIONS = ("ours", "reference", "compiled")
NUM_CLASSES, CHANNELS, LENGTH = 6, 32, 48


def code_revision() -> str:
    """$IMER_FAST_CODE (bench/gpu_session.sh sets it), else the checkout's revision (+dirty), else None."""
    if os.environ.get("IMER_FAST_CODE"):
        return os.environ["IMER_FAST_CODE"]
    try:
        rev = subprocess.run(["git", "rev-parse", "--short=7", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return rev + ("+dirty" if dirty else "")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace(" ", "-").lower()
    return f"cpu-{os.cpu_count()}core"


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        out["cuda"] = torch.version.cuda
    return out


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def build_unet_sampler(kind: str, impl: str, batch: int, steps: int, device, compile_mode: str):
    """A no-argument callable running one full (or ``steps``-step) DDIM/DDPM loop."""
    from imer_fast.diffusion.gaussian import GaussianDiffusion
    from imer_fast.nn.conditional_unet import ConditionalUNet1d
    from imer_fast.testing.reference_feddisc import ReferenceGaussianDiffusion, ReferenceUNetModel

    torch.manual_seed(0)
    reference = ReferenceUNetModel(label_num=NUM_CLASSES).to(device).eval()
    y = torch.softmax(torch.randn(batch, NUM_CLASSES, device=device), 1)
    if impl == "ours":
        model = ConditionalUNet1d(label_num=NUM_CLASSES).to(device).eval()
        model.load_state_dict(reference.state_dict())
        diffusion = GaussianDiffusion(1000)
        seed = torch.zeros((), dtype=torch.int64, device=device)
    else:
        model = reference if impl == "reference" else torch.compile(reference, mode=compile_mode)
        diffusion = ReferenceGaussianDiffusion(1000)
        seed = None
    extra = {"seed": seed} if impl == "ours" else {}
    if kind == "ddim50":
        return lambda: diffusion.ddim_sample(model, y, LENGTH, batch, CHANNELS, ddim_timesteps=steps, **extra), y
    if impl == "ours":
        return lambda: diffusion.sample(model, y, LENGTH, batch, CHANNELS, num_steps=steps, **extra), y
    if steps == 1000:
        return lambda: diffusion.sample(model, y, LENGTH, batch, CHANNELS), y

    def first_steps():  # the reference's own loop body (p_sample) for the first `steps` steps
        img = torch.randn(batch, CHANNELS, LENGTH, device=device)
        for i in reversed(range(1000 - steps, 1000)):
            img = diffusion.p_sample(model, img, torch.full((batch,), i, device=device, dtype=torch.long), y)
        return img

    return first_steps, y


def build_em_sampler(impl: str, batch: int, steps: int, device, compile_mode: str):
    from imer_fast.diffusion.ve_sde import VESDE, euler_maruyama_sampler
    from imer_fast.nn.score_net import ScoreNet
    from imer_fast.testing.reference_imder import ReferenceScoreNet, reference_euler_maruyama_sampler

    sde = VESDE(25.0)
    torch.manual_seed(0)
    reference = ReferenceScoreNet(sde.marginal_prob_std).to(device).eval()
    condition = torch.randn(batch, CHANNELS, LENGTH, device=device)
    if impl == "ours":
        model = ScoreNet(sde.marginal_prob_std).to(device).eval()
        model.load_state_dict(reference.state_dict())
        seed = torch.zeros((), dtype=torch.int64, device=device)
        return (lambda: euler_maruyama_sampler(model, sde.marginal_prob_std, sde.diffusion_coeff, batch,
                                               num_steps=steps, condition=condition, device=device, seed=seed),
                condition)
    model = reference if impl == "reference" else torch.compile(reference, mode=compile_mode)
    return (lambda: reference_euler_maruyama_sampler(model, sde.marginal_prob_std, sde.diffusion_coeff, batch,
                                                     num_steps=steps, device=device, condition=condition),
            condition)


def time_interleaved(runs: dict, device, repeats: int) -> dict:
    """Seconds per call of each runner, the runners taking turns (round-robin) so that every
    implementation sees the same machine conditions (shared CPUs drift over minutes)."""
    times = {name: [] for name in runs}
    with torch.no_grad():
        for run in runs.values():
            run()  # warm-up: kernel compilation, allocator
        sync(device)
        for _ in range(repeats):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                sync(device)
                times[name].append(time.perf_counter() - start)
    return times


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=list(SAMPLERS))
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[32, 256, 1024])
    parser.add_argument("--implementations", nargs="+", default=["ours"], choices=IMPLEMENTATIONS)
    parser.add_argument("--compile-mode", default="reduce-overhead")
    parser.add_argument("--time-steps", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--graph", action="store_true", help="CUDA only: capture ours' loops as CUDA graphs")
    parser.add_argument("--trace", type=Path, default=None, help="folder for torch.profiler chrome traces")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for kind in args.samplers:
        full = SAMPLERS[kind]
        steps = min(full, args.time_steps) if args.time_steps else full
        for batch in args.batch_sizes:
            runs, graphed = {}, {}
            for impl in args.implementations:
                if kind == "em100":
                    run, cond = build_em_sampler(impl, batch, steps, device, args.compile_mode)
                else:
                    run, cond = build_unet_sampler(kind, impl, batch, steps, device, args.compile_mode)
                graphed[impl] = args.graph and impl == "ours" and device.type == "cuda"
                runs[impl] = _graph_of(kind, batch, steps, device, cond) if graphed[impl] else run
            all_times = time_interleaved(runs, device, args.repeats)
            for impl, run in runs.items():
                times = all_times[impl]
                median = statistics.median(times)
                per_step_us = median / steps * 1e6
                row = {"sampler": kind, "implementation": impl, "batch": batch, "steps": full,
                       "cuda_graph": graphed[impl], "median_s_per_loop": median * full / steps,
                       "us_per_step": per_step_us, "latents_per_s": batch / (median * full / steps),
                       "repeats": args.repeats, "times_s": times}
                if steps != full:
                    row["extrapolated_from_steps"] = steps
                rows.append(row)
                print(f"{kind:9s} {impl:9s} B={batch:5d} {per_step_us:10.1f} us/step "
                      f"{row['latents_per_s']:10.1f} latents/s" + (" (graph)" if graphed[impl] else ""), flush=True)
                _write(args, device, argv, rows)  # after every row: a time-boxed run keeps what it measured
                if args.trace is not None:
                    args.trace.mkdir(parents=True, exist_ok=True)
                    with torch.profiler.profile() as prof, torch.no_grad():
                        run()
                        sync(device)
                    prof.export_chrome_trace(str(args.trace / f"{kind}_{impl}_B{batch}.json"))
    result, out = _write(args, device, argv, rows)
    print(f"wrote {out}")
    return result


def _write(args, device, argv, rows):
    label = device_label(device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else _cpu_model()
    result = {"device": label, "device_name": name, "threads": torch.get_num_threads(), "versions": versions(),
              "code": code_revision(),
              "command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + (argv or sys.argv[1:])), "rows": rows}
    out = args.out or ROOT / "bench" / "results" / label / "sampler_profile.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result, out


def _graph_of(kind, batch, steps, device, cond):
    """ours' loop for ``kind`` as a CUDA graph: rebuilt around the static condition and seed buffers."""
    from imer_fast.diffusion.graphed import GraphedSampler

    if kind == "em100":
        from imer_fast.diffusion.ve_sde import VESDE, euler_maruyama_sampler
        from imer_fast.nn.score_net import ScoreNet

        sde = VESDE(25.0)
        torch.manual_seed(0)
        model = ScoreNet(sde.marginal_prob_std).to(device).eval()
        fn = lambda c, seed: euler_maruyama_sampler(model, sde.marginal_prob_std, sde.diffusion_coeff,  # noqa: E731
                                                    batch, num_steps=steps, condition=c, device=device, seed=seed)
    else:
        from imer_fast.diffusion.gaussian import GaussianDiffusion
        from imer_fast.nn.conditional_unet import ConditionalUNet1d

        torch.manual_seed(0)
        model = ConditionalUNet1d(label_num=NUM_CLASSES).to(device).eval()
        if kind == "ddim50":
            diffusion = GaussianDiffusion(1000)
            fn = lambda y, seed: diffusion.ddim_sample(model, y, LENGTH, batch, CHANNELS,  # noqa: E731
                                                       ddim_timesteps=steps, seed=seed)
        else:
            diffusion = GaussianDiffusion(1000)
            fn = lambda y, seed: diffusion.sample(model, y, LENGTH, batch, CHANNELS, seed=seed,  # noqa: E731
                                                  num_steps=steps)
    graph = GraphedSampler(fn, cond)
    return lambda: graph(cond, 0)


if __name__ == "__main__":
    main()
