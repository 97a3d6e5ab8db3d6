"""tests/gpu_perf.sh, the GPU speed report: its CPU mode runs the same bench.py commands with
tiny settings; a failing stage is reported and counted in the exit status."""
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT

SCRIPT = ROOT / 'tests' / 'gpu_perf.sh'


def run_script(tmp_path, python, *args):
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=python)
    return subprocess.run(['bash', str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          timeout=1800)


def stage_lines(stdout):
    return [line for line in stdout.splitlines() if re.match(r'(PASS|FAIL) ', line)]


def test_every_failing_stage_is_reported_and_counted(tmp_path):
    proc = run_script(tmp_path, 'false', '--device', 'cpu')
    lines = stage_lines(proc.stdout)
    assert [line.split()[1] for line in lines] == ['step', 'end-to-end']
    assert all(line.startswith('FAIL ') and 'exit status' in line for line in lines)
    assert proc.returncode == 2
    assert (tmp_path / 'gpu_perf' / 'bench.log').exists()


def test_only_runs_the_stages_named(tmp_path):
    proc = run_script(tmp_path, 'false', '--device', 'cpu', '--only', 'end-to-end')
    assert [line.split()[1] for line in stage_lines(proc.stdout)] == ['end-to-end']


@pytest.mark.parametrize('args', [('--device', 'tpu'), ('--only', 'steps'), ('extra',)])
def test_bad_arguments_are_refused(tmp_path, args):
    proc = run_script(tmp_path, sys.executable, *args)
    assert proc.returncode == 2 and proc.stderr.startswith('usage: tests/gpu_perf.sh')


@pytest.mark.slow
def test_cpu_mode_measures_every_stage(tmp_path):
    # the GPU run's commands with tiny CPU settings (about 2 minutes on two cores)
    proc = run_script(tmp_path, sys.executable, '--device', 'cpu')
    lines = stage_lines(proc.stdout)
    assert [line.split()[1] for line in lines] == ['step', 'end-to-end'], proc.stdout
    assert all(line.startswith('PASS ') for line in lines), proc.stdout
    assert proc.returncode == 0
    results = [json.loads(line) for line in
               (tmp_path / 'gpu_perf' / 'results.jsonl').read_text().splitlines()]
    kinds = {(r['kind'], r['setting']) for r in results}
    assert {('step', 'reference'), ('step', 'fast-nocompile'), ('breakdown', 'reference'),
            ('end-to-end', 'reference'), ('end-to-end', 'fast-nocompile')} <= kinds
    summary = (tmp_path / 'gpu_perf' / 'summary.md').read_text()
    assert summary.count('| step |') == 2 and summary.count('| end-to-end |') == 2
