"""The benchmark scripts run (their quick modes: a check that they work, not measurements)."""
import json
import subprocess
import sys

from tests.conftest import ROOT


def test_replay_benchmark_quick_mode_prints_its_figures(ray_address):
    result = subprocess.run(
        [sys.executable, "benchmarks/replay.py", "--quick", "--address", ray_address],
        cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    for name in ("bytes_per_transition", "insert_transitions_per_s", "sample_batches_per_s",
                 "sampler_ops_per_s", "snapshot_s_per_100k", "restore_s_per_100k"):
        assert figures[name] > 0, name
    assert figures["quick"] is True
