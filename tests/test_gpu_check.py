"""tests/gpu_check.sh, the GPU acceptance script: its CPU mode runs the same steps with tiny
settings, which proves the commands right; a failing step is reported and makes it fail."""
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT

SCRIPT = ROOT / 'tests' / 'gpu_check.sh'
STEPS = ['data', 'cuda-tests', 'defaults-then-resume', 'defaults-logged-knn', 'fast-then-resume',
         'fast-augment-then-resume', 'device-jpeg-decode', 'evaluate-freeze',
         'evaluate-finetune', 'evaluate-knn', 'torch-hub-local', 'bench-table']


def run_script(tmp_path, python, *args):
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=python)
    return subprocess.run(['bash', str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          timeout=1800)


def step_lines(stdout):
    return [line for line in stdout.splitlines() if re.match(r'(PASS|FAIL) ', line)]


def test_every_failing_step_is_reported_and_the_script_fails(tmp_path):
    # a Python that cannot run anything: every step fails, none hangs, the count is the status
    proc = run_script(tmp_path, 'false', '--device', 'cpu')
    lines = step_lines(proc.stdout)
    assert [line.split()[1] for line in lines] == STEPS
    assert all(line.startswith('FAIL ') and 'exit status' in line for line in lines)
    assert proc.returncode == len(STEPS)
    assert proc.stdout.strip().endswith(f'{len(STEPS)} step(s) failed; logs in '
                                        f'{tmp_path}/gpu_check/logs')
    assert (tmp_path / 'gpu_check' / 'logs' / 'data.log').exists()


def test_bad_arguments_are_refused(tmp_path):
    proc = run_script(tmp_path, sys.executable, '--device', 'tpu')
    assert proc.returncode == 2 and proc.stderr.startswith('usage: tests/gpu_check.sh')


@pytest.mark.slow
def test_cpu_mode_passes_every_step(tmp_path):
    # the GPU run's commands with tiny CPU settings (about 5 minutes on two busy cores)
    proc = run_script(tmp_path, sys.executable, '--device', 'cpu')
    lines = step_lines(proc.stdout)
    assert [line.split()[1] for line in lines] == STEPS, proc.stdout
    assert all(line.startswith('PASS ') for line in lines), proc.stdout
    assert proc.returncode == 0
    work = tmp_path / 'gpu_check'
    assert (work / 'default' / 'resnet18.pth').exists() and (work / 'knn' / 'stats.txt').exists()
