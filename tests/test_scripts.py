"""The seed's scripts/test_model.py runs from a plain checkout and prints what section 4 says."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import REPO_ROOT


def test_test_model_script_output():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "test_model.py")],
        capture_output=True, text=True, cwd="/", env=env, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for count in ("2,443,904", "2,290,176", "2,428,640"):
        assert f"Model has {count} parameters" in out
    assert out.count("Parameter count in target range (2-3M): True") == 3
    assert "Model size: 9.32 MB" in out
    assert "--- SUMMARY ---" in out
    assert "✓ embed_dim=192, num_heads=6, num_layers=4, ff_dim=512 => 2,443,904 parameters" in out
    assert "Recommended configuration:\nembed_dim=192, num_heads=6, num_layers=4, ff_dim=512" in out
    assert "Output logits shape: torch.Size([4, 64, 5000])" in out
    assert "Generated sequence shape: torch.Size([1, 20])" in out
    assert out.rstrip().endswith("✓ Found a configuration in the target parameter range!")
