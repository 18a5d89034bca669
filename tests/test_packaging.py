"""The source distribution carries everything a build from it needs.

setuptools puts the extension's .cpp sources into an sdist but not the headers they include, so an
sdist without MANIFEST.in failed to compile (csrc/cpu/*.h missing). Checked against git's list of
tracked files, so a new header or kernel cannot be left out unnoticed. The sdist is built from a copy of
the tracked files: in the checkout, an egg-info left by earlier builds feeds its old file list back in."""
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NEEDED_FOR_BUILD = ("csrc/", "kernels/", "imer_fast/", "setup.py", "pyproject.toml", "README.md", "Makefile")


def _tracked_files() -> list:
    try:
        listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: no list of tracked files to compare with")
    return listed.stdout.split()


def test_sdist_contains_every_tracked_build_file(tmp_path):
    tracked_all = _tracked_files()
    source = tmp_path / "checkout"
    for path in tracked_all:
        if (ROOT / path).is_file():
            (source / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / path, source / path)
    tracked = [path for path in tracked_all if path.startswith(NEEDED_FOR_BUILD)]
    assert any(path.endswith(".h") for path in tracked), "the comparison must cover the C++ headers"
    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "--dist-dir", str(tmp_path / "dist")], cwd=source,
                   check=True, capture_output=True)
    (archive,) = (tmp_path / "dist").glob("*.tar.gz")
    with tarfile.open(archive) as sdist:
        packed = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    missing = sorted(set(tracked) - packed)
    assert not missing, f"files the build needs are not in the sdist: {missing}"
