"""Guard against committing build outputs or models: a submission over the size limit lands nothing."""
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LIMIT = 1 << 20  # 1 MiB: the largest source or data file this repo should ever hold


def test_no_tracked_file_over_one_mib():
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    big = []
    for name in filter(None, out.decode().split("\0")):
        path = ROOT / name
        if path.is_file() and path.stat().st_size > LIMIT:
            big.append(f"{name} ({path.stat().st_size >> 10} KiB)")
    assert not big, "files too large to commit (ignore them instead): " + ", ".join(big)
