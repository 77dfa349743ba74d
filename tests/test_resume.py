"""Resume: a run killed with SIGKILL mid-batch and resumed equals the uninterrupted run; a run loading its programs
from the compile cache equals the run that compiled them."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

from jaxcrystal import run

ARGS = ["--structure", "perovskite", "--num-candidates", "6", "--batch-size", "3", "--steps", "20",
        "--checkpoint-every", "5", "--seed", "3", "--quiet"]  # fmt: skip


def _cli(*args):
    return [sys.executable, "-m", "jaxcrystal.run", *args]


def _wait_for_mid_run_checkpoint(proc, out, timeout=600):
    """Returns once batch 1 has a checkpoint before its last step (batch 0 complete, batch 1 interrupted)."""
    meta = out / "checkpoints" / "batch_001" / "meta.json"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}")
        if meta.exists():
            try:
                step = json.loads(meta.read_text())["step"]
            except (json.JSONDecodeError, OSError):
                step = None
            if step is not None and step < 20:
                return step
        time.sleep(0.02)
    pytest.fail("no mid-run checkpoint appeared")


def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    subprocess.run(_cli(*ARGS, "--out", str(whole)), check=True, capture_output=True)
    proc = subprocess.Popen(_cli(*ARGS, "--out", str(broken)), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    step = _wait_for_mid_run_checkpoint(proc, broken)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 0 < step < 20
    assert not (broken / "result_summary.csv").exists()  # the run really was cut short
    assert not list(broken.rglob("*.tmp"))
    done = subprocess.run(_cli("--resume", str(broken)), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    a, b = np.load(whole / "result.npz"), np.load(broken / "result.npz")
    assert sorted(a.files) == sorted(b.files)
    for key in a.files:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    pd.testing.assert_frame_equal(pd.read_csv(whole / "result.csv"), pd.read_csv(broken / "result.csv"))
    assert sorted(p.name for p in (whole / "poscar").iterdir()) == sorted(p.name for p in (broken / "poscar").iterdir())


def test_resume_refuses_other_options_and_missing_folders(tmp_path, capsys):
    assert run.main(["--resume", str(tmp_path), "--steps", "5"]) == 2
    assert "drop --steps" in capsys.readouterr().err
    assert run.main(["--resume", str(tmp_path / "nothing")]) == 2
    assert "config.json" in capsys.readouterr().err


def test_compile_cache_is_filled_then_reused_with_the_same_result(tmp_path):
    """The first run compiles and stores its programs; the second loads every one and gives the same candidates."""
    cache = tmp_path / "cache"
    args = ["--structure", "perovskite", "--num-candidates", "2", "--steps", "3", "--seed", "1", "--quiet"]
    subprocess.run(_cli(*args, "--out", str(tmp_path / "a"), "--compile-cache", str(cache)), check=True)
    entries = sorted(p.name for p in cache.iterdir())
    assert entries
    subprocess.run(_cli(*args, "--out", str(tmp_path / "b"), "--compile-cache", str(cache)), check=True)
    assert sorted(p.name for p in cache.iterdir()) == entries  # nothing compiled anew
    a, b = np.load(tmp_path / "a" / "result.npz"), np.load(tmp_path / "b" / "result.npz")
    for key in a.files:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
