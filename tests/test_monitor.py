"""Watching a run: online probe, progress, stats log and the plot command."""
import io
import json
import subprocess
import sys

import pytest
import torch

import cli
import main
import monitor
import plot
from conftest import ROOT, make_image_folder


def demo_args(data, ckdir, *extra, epochs=4):
    return [str(data), '--arch', 'resnet18', '--cifar-stem', '--crop-size', '32',
            '--projector', '64-64', '--batch-size', '16', '--epochs', str(epochs),
            '--workers', '0', '--device', 'cpu', '--checkpoint-dir', str(ckdir),
            '--print-freq', '5', '--warmup-epochs', '1', *extra]


@pytest.fixture(scope='module')
def probe_runs(tmp_path_factory):
    """A short pretraining run with the online probe ('with', 4 epochs), and one epoch of the
    same run with and without it ('with_1', 'without': 5 steps, all in the warmup, tell whether
    the probe touches the backbone; the two together cost half of the 4-epoch run)."""
    root = tmp_path_factory.mktemp('probe')
    # three classes told apart by a colour cast: what a probe on a few steps' features can learn
    data = make_image_folder(root / 'data', classes=('class_a', 'class_b', 'class_c'),
                             per_class=27, val_per_class=2, size=40)
    (data / 'train' / 'class_c' / 'class_c_26.JPEG').unlink()  # 80 images: 5 steps of 16
    main.main(demo_args(data, root / 'with'))
    main.main(demo_args(data, root / 'with_1', '--print-freq', '1', epochs=1))
    main.main(demo_args(data, root / 'without', '--no-online-probe', '--print-freq', '1',
                        epochs=1))
    return root


def stats_of(ckdir):
    return [json.loads(line) for line in (ckdir / 'stats.txt').read_text().splitlines()
            if line.startswith('{')]


def test_online_probe_learns_above_chance(probe_runs):
    accs = [s['online_acc1'] for s in stats_of(probe_runs / 'with')]
    assert len(accs) == 4  # 80 images / 16 = 5 steps per epoch, logged every 5 steps
    # 3 classes (chance 33.3%). One epoch's running accuracy counts 80 predictions, a binomial
    # standard deviation of 5.3 points at chance: the last two epochs together (160 predictions,
    # 3.7 points) must reach 60%, 7 deviations above it (seen: 83.8 and 87.5), and beat the
    # first epoch.
    assert sum(accs[2:]) / 2 >= 60.0, accs
    assert min(accs[2:]) > accs[0], accs
    assert all('online_acc1' not in s for s in stats_of(probe_runs / 'without'))


def test_online_probe_leaves_backbone_bit_identical(probe_runs):
    with_probe = torch.load(probe_runs / 'with_1' / 'resnet18.pth', weights_only=True)
    without = torch.load(probe_runs / 'without' / 'resnet18.pth', weights_only=True)
    assert with_probe.keys() == without.keys()
    for key in with_probe:
        assert torch.equal(with_probe[key], without[key]), key
    losses = [s['loss'] for s in stats_of(probe_runs / 'with_1')]
    assert len(losses) == 5 and losses == [s['loss'] for s in stats_of(probe_runs / 'without')]


def test_probe_state_is_checkpointed(probe_runs):
    ckpt = torch.load(probe_runs / 'with' / 'checkpoint.pth', weights_only=True)
    assert set(ckpt['probe']) == {'head', 'optimizer'}
    assert ckpt['probe']['head']['1.weight'].shape == (3, 512)
    assert 'probe' not in torch.load(probe_runs / 'without' / 'checkpoint.pth', weights_only=True)


def test_plot_writes_png_from_real_stats(probe_runs, tmp_path):
    output = tmp_path / 'curves.png'
    proc = subprocess.run([sys.executable, str(ROOT / 'plot.py'),
                           str(probe_runs / 'with' / 'stats.txt'),
                           str(probe_runs / 'without' / 'stats.txt'), '-o', str(output)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    data = output.read_bytes()
    assert data.startswith(b'\x89PNG\r\n\x1a\n') and len(data) > 10_000


def test_plot_rejects_a_file_without_stats(tmp_path):
    bad = tmp_path / 'stats.txt'
    bad.write_text('main.py /data\n')
    proc = subprocess.run([sys.executable, str(ROOT / 'plot.py'), str(bad)],
                          capture_output=True, text=True)
    assert proc.returncode != 0
    assert proc.stderr.strip().count('\n') == 0 and 'no JSON stats lines' in proc.stderr


def test_steps_per_epoch_recovered_from_stats():
    # 7 steps per epoch, logged every 3 steps
    records = [dict(epoch=s // 7, step=s) for s in range(0, 70, 3)]
    assert plot.steps_per_epoch(records) == 7
    xs, _ = plot.series([dict(r, loss=1.0) for r in records], 'loss')
    assert xs[-1] == pytest.approx(69 / 7)
    # epoch summaries (evaluate.py) sit at the end of their epoch
    assert plot.series([dict(epoch=0, acc1=5.0), dict(epoch=1, acc1=9.0)], 'acc1') == \
        ([1, 2], [5.0, 9.0])


def test_plot_keeps_the_records_that_replaced_a_rerun_stretch():
    # steps 0-5 logged, a kNN summary after epoch 0 (3 steps per epoch) and epoch 1; then a
    # rollback to the start of epoch 1 logs steps 3-5 again, and a new epoch-1 summary
    first = [dict(epoch=s // 3, step=s, loss=1.0) for s in range(6)]
    records = first[:3] + [dict(epoch=0, knn=10.0)] + first[3:] + [dict(epoch=1, knn=11.0)] + \
        [dict(epoch=1, step=s, loss=2.0) for s in range(3, 6)] + [dict(epoch=1, knn=12.0)]
    kept = plot.current_timeline(records)
    assert [(r.get('step'), r.get('knn'), r.get('loss')) for r in kept] == \
        [(0, None, 1.0), (1, None, 1.0), (2, None, 1.0), (None, 10.0, None),
         (3, None, 2.0), (4, None, 2.0), (5, None, 2.0), (None, 12.0, None)]
    assert plot.current_timeline(first) == first  # nothing rerun: unchanged


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_plain_lines_and_terminal_redraw(monkeypatch):
    clock = iter(range(0, 1000, 10))  # every call to time.time() advances 10 s
    monkeypatch.setattr(monitor.time, 'time', lambda: next(clock))
    log = io.StringIO()
    progress = monitor.Progress(steps_per_epoch=4, epochs=3, images_per_step=32, enabled=True,
                                stream=log, interval=25)
    progress.start_epoch(0)
    for loss in (9.0, None, None, None):
        progress.step(loss)
    progress.end_epoch()
    lines = log.getvalue().splitlines()
    assert 2 <= len(lines) <= 3 and '\r' not in log.getvalue()
    done_counts = [line.split()[3] for line in lines]
    assert len(done_counts) == len(set(done_counts))  # no line repeated at the epoch end
    assert lines[-1].startswith('epoch 1/3 [####################] 4/4')
    assert 'img/s' in lines[-1] and 'loss 9' in lines[-1]
    assert 'ETA epoch 00:00:00 run 00:' in lines[-1]  # 8 steps left in the run

    terminal = FakeTerminal()
    progress = monitor.Progress(4, 3, 32, enabled=True, stream=terminal)
    progress.start_epoch(1)
    progress.step(2.0)
    progress.end_epoch()
    assert terminal.getvalue().startswith('\repoch 2/3') and terminal.getvalue().endswith('\n')

    quiet = io.StringIO()
    progress = monitor.Progress(4, 3, 32, enabled=False, stream=quiet)
    progress.start_epoch(0)
    progress.step(1.0)
    progress.end_epoch()
    assert quiet.getvalue() == ''


def test_tensorboard_flag_without_package_is_a_clear_error(tmp_path, monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith('torch.utils.tensorboard'):
            raise ImportError('No module named tensorboard')
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, '__import__', no_tensorboard)
    with pytest.raises(cli.InputError, match='pip install tensorboard'):
        monitor.StatsLog(tmp_path / 'stats.txt', 'cmd', enabled=True,
                         tensorboard_dir=tmp_path / 'tb')


def test_knn_monitor_logs_at_requested_epochs(tiny_imagefolder, tmp_path):
    from test_main import assert_same_tensors, tiny_args
    main.main(tiny_args(tiny_imagefolder, tmp_path / 'knn', '--knn-every', '2', epochs=4))
    main.main(tiny_args(tiny_imagefolder, tmp_path / 'plain', epochs=4))
    knn = [s for s in stats_of(tmp_path / 'knn') if 'knn_top1_k20' in s]
    assert [s['epoch'] for s in knn] == [1, 3]
    assert all(set(s) == {'epoch', 'knn_top1_k20', 'knn_top1_k200', 'time'} for s in knn)
    # 4 val images: every accuracy is a multiple of 25%
    assert all(s[k] in (0.0, 25.0, 50.0, 75.0, 100.0) for s in knn for k in s if 'knn' in k)
    # evaluating in between epochs does not change training
    assert_same_tensors(torch.load(tmp_path / 'knn' / 'resnet18.pth', weights_only=True),
                        torch.load(tmp_path / 'plain' / 'resnet18.pth', weights_only=True))


def test_knn_monitor_holds_out_train_images_without_val(tiny_imagefolder, tmp_path):
    import shutil
    from test_main import tiny_args
    shutil.rmtree(tiny_imagefolder / 'val')
    main.main(tiny_args(tiny_imagefolder, tmp_path / 'ck', '--knn-every', '1', epochs=1))
    knn = [s for s in stats_of(tmp_path / 'ck') if 'knn_top1_k20' in s]
    # 12 training images: every 10th (2 images) are the queries, so accuracies are 0/50/100%
    assert len(knn) == 1 and knn[0]['knn_top1_k20'] in (0.0, 50.0, 100.0)
