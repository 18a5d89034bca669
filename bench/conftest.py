"""Shared shapes for the benchmark suites: real-data-like dialogue batches."""
import numpy as np
import pytest
import torch


def iemocap_like_lengths(num_dialogues: int, seed: int = 0):
    """Dialogue lengths following IEMOCAP's (8-110 utterances, median 47, mean 49)."""
    rng = np.random.default_rng(seed)
    return np.clip(np.round(rng.gamma(8.0, 49.2 / 8.0, size=num_dialogues)), 8, 110).astype(int).tolist()


@pytest.fixture(scope="session")
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def synced(fn, device, *args):
    """A no-argument callable running fn(*args) and waiting for the device (what benchmarks time)."""

    def run():
        out = fn(*args)
        sync(device)
        return out

    return run


def pytest_benchmark_update_machine_info(config, machine_info):
    """Record what the timed process ran on (bench/summarize.py reads it): its torch thread count and
    device, which the summarising process need not share."""
    import torch

    machine_info["torch_threads"] = torch.get_num_threads()
    machine_info["torch_device"] = (torch.cuda.get_device_name() if torch.cuda.is_available()
                                    else f"{machine_info.get('machine', 'cpu')} CPU")
