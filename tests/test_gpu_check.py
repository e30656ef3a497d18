"""The GPU check's control flow, run on the CPU (--dry-run: tiny shapes, the interpreter, no
build), so that only the GPU itself is new when a device is lent."""
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("gpu", "headline", "linear", "sweep", "build", "tests", "vocab_parallel", "graph", "trainer", "bench")


def test_gpu_check_dry_run(tmp_path):
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run",
                           str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = (tmp_path / "summary.txt").read_text().splitlines()
    assert [line.split(":")[0] for line in lines] == list(STEPS), lines
    for line in lines[1:]:
        codes = re.findall(r"exit (\d+)", line)
        assert codes and set(codes) == {"0"}, line
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) <= 8, files  # the device tool returns at most 8 files
    assert {"summary.txt", "headline.json", "linear.json", "sweep.json",
            "logs.tar.gz"} <= set(files), files
    assert "targets:" in lines[1] and "targets:" in lines[2]
