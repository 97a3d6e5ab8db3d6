"""A command that fails leaves the folders the user named as it found them: it refuses before
writing, or writes to a temporary place and moves it into place on success. (pack.py is the
exception by design: an interrupted pack is continued by rerunning it, and its unfinished
splits are refused by every reader, tests/test_pack.py.)"""
import shutil

import pytest

import evaluate
import main
import plot
import prepare_data
from faultcheck import one_thread, pre  # noqa: F401 - fixtures
from faultcheck import assert_one_error_line, eval_argv, main_argv, run, snapshot
from test_prepare_data import fake_fashion_mnist


def test_a_refused_resume_adds_nothing_to_the_log(pre, tmp_path, capsys):
    ckdir = tmp_path / 'ck'
    shutil.copytree(pre.ckdir, ckdir)
    before = snapshot(ckdir)
    argv = main_argv(pre.data, ckdir, '--projector', '64-64', '--epochs', 2)
    status, lines, _ = run(main, argv, capsys)
    assert_one_error_line(status, lines, '--projector 32-32, this run has 64-64')
    assert snapshot(ckdir) == before  # not even the command line: the run never started


def test_a_run_that_fails_at_its_start_leaves_no_folder(pre, tmp_path, capsys):
    ckdir = tmp_path / 'runs' / 'new' / 'ck'
    status, lines, _ = run(main, main_argv(pre.data, ckdir, '--batch-size', 1), capsys)
    assert_one_error_line(status, lines, '--batch-size 1', 'BatchNorm')
    assert list(tmp_path.iterdir()) == []  # runs/new/ck, made for the lock, went with it

    listed = tmp_path / '1pct.txt'
    listed.write_text('n01440764_0.JPEG\nn01440764_77.JPEG\n')  # the second is not there
    status, lines, _ = run(evaluate, eval_argv(pre, ckdir, '--train-percent', 1,
                                               '--train-files', listed), capsys)
    assert_one_error_line(status, lines, '1 of the 2 images', 'n01440764_77.JPEG')
    assert sorted(p.name for p in tmp_path.iterdir()) == ['1pct.txt']


def test_a_failed_evaluation_adds_nothing_to_its_log(pre, tmp_path, capsys):
    ckdir = tmp_path / 'knn'
    assert run(evaluate, eval_argv(pre, ckdir, '--knn'), capsys)[0] == 0
    before = snapshot(ckdir)
    data = tmp_path / 'data'
    shutil.copytree(pre.data, data)
    (data / 'val' / 'n01443537' / 'n01443537_1.JPEG').write_bytes(b'not an image')
    argv = eval_argv(pre, ckdir, '--knn')
    argv[0] = str(data)
    status, lines, _ = run(evaluate, argv, capsys)
    assert_one_error_line(status, lines, 'cannot read image', 'n01443537_1.JPEG')
    assert snapshot(ckdir) == before


def test_plot_keeps_the_previous_figure_when_it_fails(tmp_path, capsys):
    pytest.importorskip('matplotlib')
    good = tmp_path / 'stats.txt'
    good.write_text('main.py d\n{"epoch": 0, "step": 0, "lr_weights": 0.1, "lr_biases": 0.01, '
                    '"loss": 5.0, "time": 0}\n')
    figure = tmp_path / 'curves.png'
    assert run(plot, [str(good), '-o', str(figure)], capsys)[0] == 0
    drawn = figure.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ['curves.png', 'stats.txt']
    bad = tmp_path / 'bad.txt'
    bad.write_text('main.py d\n{"epoch": 0, "step": \n')
    status, lines, _ = run(plot, [str(good), str(bad), '-o', str(figure)], capsys)
    assert_one_error_line(status, lines, f'{bad}:2', prog='plot.py')
    assert figure.read_bytes() == drawn
    assert sorted(p.name for p in tmp_path.iterdir()) == ['bad.txt', 'curves.png', 'stats.txt']


def test_prepare_data_failing_while_writing_leaves_nothing(tmp_path, capsys, monkeypatch):
    raw = tmp_path / 'raw'
    fake_fashion_mnist(raw)
    written = []

    def full_disk_after_five(pixels, size):
        if len(written) == 5:
            raise OSError(28, 'No space left on device')
        written.append(1)
        return to_rgb(pixels, size)
    to_rgb = prepare_data.to_rgb
    monkeypatch.setattr(prepare_data, 'to_rgb', full_disk_after_five)
    out = tmp_path / 'datasets' / 'small' / 'fmnist'
    status, lines, _ = run(prepare_data, ['fashion-mnist', str(out), '--from', str(raw)], capsys)
    assert_one_error_line(status, lines, f'cannot write {out}', 'No space left on device',
                          prog='prepare_data.py')
    assert sorted(p.name for p in tmp_path.iterdir()) == ['raw']  # datasets/small went too
