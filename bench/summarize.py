"""Condense pytest-benchmark JSON into a results file: device, versions, command, median per case.

    python -m pytest bench --benchmark-only --benchmark-json=/tmp/raw.json
    python bench/summarize.py /tmp/raw.json bench/results/<device>/<name>.json --command "<what you ran>"

Several raw files (repeated runs) may be given: each case then lists every run's median and their
median, so the spread of a shared machine stays visible. The device and thread count are those the
benchmark process recorded (bench/conftest.py), and ``code`` is the git revision pytest-benchmark
recorded for each run (with "+dirty" when the tree had uncommitted changes); where it recorded none (a
copy without .git, such as the GPU machine's), ``--code`` or the ``IMER_FAST_CODE`` variable, which
bench/gpu_session.sh sets.
"""
import argparse
import json
import os
import platform
import statistics
import sys
from collections import defaultdict
from pathlib import Path


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def versions() -> dict:
    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        pass
    try:
        import torch_geometric

        out["torch_geometric"] = torch_geometric.__version__
    except ImportError:
        pass
    try:
        import flwr

        out["flwr"] = flwr.__version__
    except ImportError:
        pass
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("raw", nargs="+", help="pytest-benchmark --benchmark-json files")
    parser.add_argument("out", help="results file to write")
    parser.add_argument("--command", required=True, help="the command that produced the raw files")
    parser.add_argument("--code", default=os.environ.get("IMER_FAST_CODE"),
                        help="code revision when pytest-benchmark recorded none (default: $IMER_FAST_CODE)")
    args = parser.parse_args(argv)
    runs = defaultdict(list)
    groups, extra = {}, {}
    cpu = device = None
    codes = []
    for path in args.raw:
        data = json.loads(Path(path).read_text())
        machine = data.get("machine_info", {})
        cpu = machine.get("cpu", {}).get("brand_raw", cpu)
        if "torch_device" in machine:
            device = machine["torch_device"] + (f", {machine['torch_threads']} threads"
                                                if "CPU" in machine["torch_device"] else "")
        commit = data.get("commit_info", {})
        if commit.get("id") and commit["id"] != "unversioned":
            code = commit["id"][:7] + ("+dirty" if commit.get("dirty") else "")
            if code not in codes:
                codes.append(code)
        for bench in data["benchmarks"]:
            runs[bench["name"]].append(bench["stats"]["median"] * 1e3)
            groups[bench["name"]] = bench["group"]
            if bench.get("extra_info"):
                extra[bench["name"]] = bench["extra_info"]
    cases = {}
    for name, medians in sorted(runs.items()):
        cases[name] = {"group": groups[name], "median_ms": statistics.median(medians),
                       "run_medians_ms": [round(m, 4) for m in medians]}
        if name in extra:
            cases[name]["extra_info"] = extra[name]
    result = {"device": device or device_name(), "cpu": cpu, "versions": versions(), "command": args.command,
              "code": ", ".join(codes) or args.code, "runs": len(args.raw), "cases": cases}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    json.dump(result, sys.stdout, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
