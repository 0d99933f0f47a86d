"""The embedded model's training script: a run interrupted and resumed equals an uninterrupted one."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "data" / "models" / "train.py"


def train(out: Path, *extra: str) -> None:
    args = [sys.executable, str(SCRIPT), "--out", str(out), "--steps", "4", "--batch", "1", "--seq", "128",
            "--save-every", "3", "--eval-every", "2", "--final-windows", "1", *extra]
    run = subprocess.run(args, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-2000:]


def test_resumed_training_equals_uninterrupted(tmp_path):
    train(tmp_path / "straight")
    train(tmp_path / "resumed", "--stop-at", "2")  # an interruption after step 2, its state saved
    assert not (tmp_path / "resumed" / "model.safetensors").exists()
    train(tmp_path / "resumed", "--resume")
    digest = [hashlib.sha256((tmp_path / d / "model.safetensors").read_bytes()).hexdigest()
              for d in ("straight", "resumed")]
    assert digest[0] == digest[1]
    card = (tmp_path / "resumed" / "README.md").read_text()
    assert digest[0] in card and "| numbers |" in card
    assert (tmp_path / "resumed" / "loss.svg").read_text().startswith("<?xml")
