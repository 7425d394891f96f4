"""bench/gpu_check.py, the first script to run on a GPU node, runs end to end on CPU (--device cpu)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_device_cpu_passes(tmp_path):
    """A small CPU run: parity of the CPU engines against ONNX Runtime fp32 on one Lytro pair and
    triple (or the examples without ../shared), pairs/s, a 2-image stack_v4; last line OK."""
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "RAY_MFF_CACHE": str(tmp_path / "cache"),
           "OMP_NUM_THREADS": "1", "RAY_MFF_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--device", "cpu", "--limit", "1",
                           "--size", "96", "--batches", "1,2", "--seconds", "0.1", "--stack-limit", "2"],
                          capture_output=True, text=True, timeout=300, env=env)
    print(proc.stdout[-3000:], proc.stderr[-3000:])
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0 and lines[-1] == "gpu_check: OK"
    table = "\n".join(lines)
    assert "torch fp32" in table and "onnx fp16" in table and "pairs/s b2" in table and "stack_v4" in table
    row = next(line for line in lines if line.startswith("stacknet_s torch-cpu fp32"))  # the default model
    assert row.split()[3] == "ok"
