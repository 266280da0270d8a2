"""Supply chain: no code path of ftkit unpickles, loads YAML unsafely or trusts remote code unasked."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "ftkit"
UNSAFE = {
    r"\bpickle\.loads?\(|\bcloudpickle\b|\bdill\.load": "pickle loads run code from the file",
    r"\byaml\.(load|unsafe_load|full_load)\(": "yaml.load builds Python objects; use ftkit.safe_yaml",
    r"torch\.load\((?![^)]*weights_only=True)": "torch.load without weights_only=True unpickles",
    r"weights_only\s*=\s*False": "weights_only=False unpickles",
    r"trust_remote_code\s*=\s*True": "trust_remote_code only when the recipe or --trust-remote-code asks",
    r"(?<![.\w])(eval|exec)\(": "no eval/exec of text",
}


@pytest.mark.parametrize("pattern", sorted(UNSAFE))
def test_no_unsafe_loader_in_the_source(pattern):
    hits = [f"{p.relative_to(SRC.parent)}:{i}: {line.strip()}" for p in sorted(SRC.rglob("*.py"))
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
            if re.search(pattern, line) and not line.lstrip().startswith("#")]
    assert not hits, f"{UNSAFE[pattern]}:\n" + "\n".join(hits)


def test_a_planted_pickle_checkpoint_is_never_executed(tmp_path):
    """What every checkpoint read in ftkit's path goes through (Trainer's resume: torch.load(weights_only=True))."""
    import pickle

    import torch

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    planted = tmp_path / "rng_state.pth"
    planted.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(pickle.UnpicklingError):
        torch.load(planted, weights_only=True)
    assert not marker.exists()
