"""benchmarks/slow_cpu.py: the command's exit status comes back, its children are at normal priority."""

import os
import sys

import pytest

from benchmark_scripts import load_benchmark


@pytest.fixture(scope="module")
def slow_cpu():
    return load_benchmark("slow_cpu")


def test_exit_status_and_normal_scheduling_of_the_command(slow_cpu, tmp_path):
    out = tmp_path / "policy"
    code = f"import os, sys; open({str(out)!r}, 'w').write(str(os.sched_getscheduler(0))); sys.exit(3)"
    policy = os.sched_getscheduler(0)  # run_slowed may make this process real-time: put back after
    try:
        assert slow_cpu.run_slowed([sys.executable, "-c", code], factor=2.0) == 3
    finally:
        os.sched_setscheduler(0, policy, os.sched_param(0))
    assert int(out.read_text()) == os.SCHED_OTHER
    with pytest.raises(ValueError, match="factor"):
        slow_cpu.run_slowed([sys.executable, "-c", "pass"], factor=0.5)
