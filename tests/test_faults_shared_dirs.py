"""One run per checkpoint directory, and one kind of run: every writer of a checkpoint
directory (main.py, evaluate.py in each mode) refuses a directory that another run holds or
that holds another kind of run, leaving it as it was; plot.py draws every kind of run a log
holds."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import evaluate
import main
import pack
import plot
from conftest import make_image_folder
from faultcheck import pre  # noqa: F401 - fixtures
from faultcheck import (assert_one_error_line, eval_argv, main_argv, run,
                        snapshot)
from preemption import RunLock

MODES = {'linear probe': [], 'fine-tuning': ['--weights', 'finetune'], 'kNN': ['--knn'],
         'fast linear probe': ['--fast-linear', '--lbfgs-steps', '5']}


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny runs on a shared 2-core machine
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize('mode', MODES)
def test_evaluate_refuses_a_directory_another_run_holds(mode, pre, tmp_path, capsys):
    ckdir = tmp_path / 'shared'
    holder = RunLock(ckdir).acquire()  # the run that started first, still going
    try:
        before = snapshot(ckdir)
        status, lines, _ = run(evaluate, eval_argv(pre, ckdir, *MODES[mode]), capsys)
        assert_one_error_line(status, lines, str(ckdir), 'in use by another run',
                              'another --checkpoint-dir', prog='evaluate.py')
        assert snapshot(ckdir) == before  # no log line, no checkpoint: the first run's own
    finally:
        holder.release()


def test_main_refuses_a_directory_another_run_holds(pre, tmp_path, capsys):
    ckdir = tmp_path / 'shared'
    holder = RunLock(ckdir).acquire()
    try:
        status, lines, _ = run(main, main_argv(pre.data, ckdir), capsys)
        assert_one_error_line(status, lines, 'in use by another run', prog='main.py')
        assert sorted(p.name for p in ckdir.iterdir()) == ['.lock']
    finally:
        holder.release()


@pytest.mark.parametrize('mode', MODES)
def test_evaluate_refuses_the_pretraining_directory(mode, pre, tmp_path, capsys):
    ckdir = tmp_path / 'pretraining'
    shutil.copytree(pre.ckdir, ckdir)
    before = snapshot(ckdir)
    status, lines, _ = run(evaluate, eval_argv(pre, ckdir, *MODES[mode]), capsys)
    assert_one_error_line(status, lines, str(ckdir), 'holds a pretraining run (main.py',
                          f'this is a {mode} run', 'use another --checkpoint-dir',
                          prog='evaluate.py')
    assert snapshot(ckdir) == before  # above all, its stats.txt gained no line


def test_a_kind_of_run_is_refused_where_another_kind_has_logged(pre, tmp_path, capsys):
    """The log alone tells: a directory whose stats.txt holds a kNN run takes no linear probe,
    and one holding a linear probe takes no pretraining."""
    knn_dir, probe_dir = tmp_path / 'knn', tmp_path / 'probe'
    assert run(evaluate, eval_argv(pre, knn_dir, '--knn'), capsys)[0] == 0
    status, lines, _ = run(evaluate, eval_argv(pre, knn_dir), capsys)
    assert_one_error_line(status, lines, 'holds a kNN run (evaluate.py --knn',
                          f'{knn_dir / "stats.txt"}, line 1', 'this is a linear probe run',
                          f'e.g. {tmp_path / "lincls"}')  # beside it, not inside

    assert run(evaluate, eval_argv(pre, probe_dir), capsys)[0] == 0
    (probe_dir / 'checkpoint.pth').unlink()  # even without the checkpoint, the log tells
    before = snapshot(probe_dir)
    status, lines, _ = run(main, main_argv(pre.data, probe_dir), capsys)
    assert_one_error_line(status, lines, 'holds a linear probe run', 'this is a pretraining run',
                          prog='main.py')
    assert snapshot(probe_dir) == before


def test_main_refuses_a_directory_of_evaluations(pre, tmp_path, capsys):
    ckdir = tmp_path / 'fast'
    assert run(evaluate, eval_argv(pre, ckdir, *MODES['fast linear probe']), capsys)[0] == 0
    (ckdir / 'stats.txt').unlink()  # linear.pth alone says what ran here
    status, lines, _ = run(main, main_argv(pre.data, ckdir), capsys)
    assert_one_error_line(status, lines, 'holds a fast linear probe run', 'linear.pth',
                          prog='main.py')
    assert sorted(p.name for p in ckdir.iterdir()) == ['linear.pth']


def test_evaluations_of_one_kind_share_a_directory_and_say_so(pre, tmp_path, capsys):
    ckdir = tmp_path / 'knn'
    assert run(evaluate, eval_argv(pre, ckdir, '--knn'), capsys)[0] == 0
    status, _, out = run(evaluate, eval_argv(pre, ckdir, '--knn'), capsys)
    assert status == 0
    assert f'{ckdir / "stats.txt"} holds 1 earlier kNN evaluation(s); this one runs from the ' \
           f'start and adds its line' in out
    records = [json.loads(line) for line in (ckdir / 'stats.txt').read_text().splitlines()
               if line.startswith('{')]
    assert len(records) == 2 and all('knn_top1' in r for r in records)


def test_plot_draws_every_kind_of_run_a_log_holds(pre, tmp_path, capsys):
    """A log that holds a pretraining run and, appended after it, a kNN evaluation (as an
    earlier version let happen): both are drawn, each in its column."""
    log = tmp_path / 'stats.txt'
    knn_dir = tmp_path / 'knn'
    assert run(evaluate, eval_argv(pre, knn_dir, '--knn'), capsys)[0] == 0
    log.write_text((pre.ckdir / 'stats.txt').read_text() + (knn_dir / 'stats.txt').read_text())
    fig = plot.figure([log])
    assert [ax.get_title() for ax in fig.axes if ax.get_title()] == ['pretraining', 'kNN']
    loss_ax = fig.axes[0]
    assert [line.get_label() for line in loss_ax.get_lines()] == ['loss']
    assert len(loss_ax.get_lines()[0].get_xdata()) == 3  # the pretraining's three steps
    bars = [ax for ax in fig.axes if ax.get_title() == 'kNN'][0].patches
    assert len(bars) == 2  # k = 20 and k = 200 of the one evaluation


def test_pack_refuses_a_file_another_pack_is_writing(tmp_path, capsys):
    pytest.importorskip('tables')
    if os.environ.get('HDF5_USE_FILE_LOCKING', '').upper() == 'FALSE':
        pytest.skip('HDF5_USE_FILE_LOCKING=FALSE: HDF5 takes no lock to refuse with')
    data = make_image_folder(tmp_path / 'data', per_class=2, val_per_class=1, size=16)
    packed = tmp_path / 'data.h5'
    argv = [str(data), str(packed), '--workers', '0']
    assert run(pack, argv, capsys)[0] == 0
    before = packed.read_bytes()
    holder = subprocess.Popen(  # a pack.py still writing it: HDF5 locks the file
        [sys.executable, '-c', 'import sys, tables; h5 = tables.open_file(sys.argv[1], "a"); '
         'print("open", flush=True); sys.stdin.read()', str(packed)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == 'open'
        status, lines, _ = run(pack, argv, capsys)
    finally:
        holder.communicate('', timeout=60)
    assert_one_error_line(status, lines, str(packed), 'another process has it open',
                          prog='pack.py')
    assert packed.read_bytes() == before
