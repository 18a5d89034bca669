"""The end-to-end benchmark suites still run against the current training API (each benchmark body
once, untimed: ``--benchmark-disable``), so that an API change cannot leave ``bench/`` broken until
the next time someone measures. Only the ``small`` cases run; the op-level suites call the ops
directly and are covered by the op tests."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUITES = ["bench_feddisc_epoch.py", "bench_rohydr_epoch.py", "bench_drkf_epoch.py", "bench_federated_round.py"]


@pytest.mark.slow
@pytest.mark.parametrize("suite", SUITES)
def test_system_benchmark_suite_runs(suite):
    done = subprocess.run([sys.executable, "-m", "pytest", str(ROOT / "bench" / suite), "-k", "small",
                           "--benchmark-disable", "-q", "-x", "-p", "no:randomly", "-p", "no:cacheprovider"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout.splitlines()[-1], done.stdout[-2000:]


def test_summarize_records_the_given_revision_where_pytest_benchmark_has_none(tmp_path):
    """The GPU machine's copy has no .git: pytest-benchmark then records the commit id "unversioned"."""
    import json

    raw = {"machine_info": {"cpu": {"brand_raw": "test cpu"}}, "commit_info": {"id": "unversioned", "dirty": False},
           "benchmarks": [{"name": "case", "group": "g", "stats": {"median": 0.002}}]}
    (tmp_path / "raw.json").write_text(json.dumps(raw))
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "summarize.py"), str(tmp_path / "raw.json"),
                           str(tmp_path / "out.json"), "--command", "x", "--code", "abc1234"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["code"] == "abc1234" and result["cases"]["case"]["median_ms"] == 2.0
