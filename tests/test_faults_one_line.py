"""Every script turns every error a user can cause into one line naming the file, flag or
value, with a non-zero exit: no traceback. The scripts run as a user runs them where the
exit status and stderr are the point; in-process (an uncaught exception fails the test just
as well) for the rest."""
import json

import pytest

import bench
import bench_learning
import evaluate
import main
import pack
import plot
import prepare_data
from conftest import make_image_folder
from faultcheck import one_thread, pre  # noqa: F401 - fixtures
from faultcheck import assert_one_error_line, eval_argv, run, run_script

LONG = 'x' * 300  # longer than a file name may be (255 bytes)


def test_plot_on_a_file_that_is_not_text(tmp_path):
    pytest.importorskip('matplotlib')
    blob = tmp_path / 'stats.txt'
    blob.write_bytes(bytes(range(256)) * 4)  # a checkpoint given by mistake, say
    status, lines, _ = run_script('plot.py', [blob], cwd=tmp_path)
    assert_one_error_line(status, lines, str(blob), 'not a text file', prog='plot.py')
    assert sorted(p.name for p in tmp_path.iterdir()) == ['stats.txt']


def test_plot_output_in_a_missing_folder_or_unknown_format(tmp_path, capsys):
    pytest.importorskip('matplotlib')
    log = tmp_path / 'stats.txt'
    log.write_text('main.py d\n' + json.dumps(dict(epoch=0, step=0, lr_weights=0.1,
                                                    lr_biases=0.0, loss=3.0, time=0)) + '\n')
    for output, words in ((tmp_path / 'no' / 'c.png', ['-o', 'there is no folder']),
                          (tmp_path / 'c.xyz', ['-o', 'c.xyz', 'png']),
                          (log, ['-o', 'is one of the stats files'])):
        status, lines, _ = run(plot, [str(log), '-o', str(output)], capsys)
        assert_one_error_line(status, lines, str(output), *words, prog='plot.py')
    assert sorted(p.name for p in tmp_path.iterdir()) == ['stats.txt']


@pytest.mark.parametrize('record', [
    '{"epoch": "zero", "step": 0, "loss": 1.0}',
    '{"knn_top1": {"twenty": 50.0}}',
    '{"knn_top1": [50.0]}',
    '[1, 2, 3]',
])
def test_plot_on_malformed_stats_lines(record, tmp_path, capsys):
    log = tmp_path / 'stats.txt'
    log.write_text(f'main.py d\n{record}\n')
    status, lines, _ = run(plot, [str(log), '-o', str(tmp_path / 'c.png')], capsys)
    if record.startswith('['):  # not an object: not a stats line, and there is no other
        assert_one_error_line(status, lines, 'no JSON stats lines', prog='plot.py')
    else:
        assert_one_error_line(status, lines, f'{log}:2', prog='plot.py')


@pytest.mark.parametrize('module, argv', [
    (main, lambda t: [str(t / 'data'), '--device', 'cpu', '--checkpoint-dir', str(t / LONG)]),
    (evaluate, lambda t: [str(t / LONG), 'r.pth']),
    (evaluate, lambda t: [str(t / 'data'), str(t / LONG / 'r.pth')]),
    (pack, lambda t: [str(t / LONG), str(t / 'out.h5')]),
    (pack, lambda t: ['--check', str(t / LONG)]),
    (prepare_data, lambda t: ['cifar10', str(t / LONG), '--from', str(t)]),
    (plot, lambda t: [str(t / LONG)]),
    (bench_learning, lambda t: ['--pretrained', str(t / LONG)]),
    (bench, lambda t: ['--summary', str(t / LONG)]),
], ids=lambda v: getattr(v, '__name__', ''))
def test_a_path_too_long_is_one_line_everywhere(module, argv, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_image_folder(tmp_path / 'data', per_class=2, val_per_class=1, size=16)
    status, lines, _ = run(module, argv(tmp_path), capsys)
    assert_one_error_line(status, lines, LONG)
    assert 'too long' in lines[0]


def test_finetune_whose_last_batch_holds_one_image_drops_it(pre, tmp_path, capsys):
    """13 training images at batch 4: the last step would hold one image, which BatchNorm
    cannot normalise in training mode; it is dropped with a note, as main.py does."""
    data = make_image_folder(tmp_path / 'data', classes=('n01440764', 'n01443537'),
                             per_class=6, val_per_class=1, size=24)
    extra = data / 'train' / 'n01440764' / 'n01440764_6.JPEG'
    extra.write_bytes((data / 'train' / 'n01440764' / 'n01440764_0.JPEG').read_bytes())
    ckdir = tmp_path / 'ft'
    argv = eval_argv(pre, ckdir, '--weights', 'finetune', '--lr-backbone', 0.01)
    argv[0] = str(data)
    status, lines, _ = run(evaluate, argv, capsys)
    assert status == 0, lines
    assert lines == ['note: 13 training image(s) over 1 process(es), --batch-size 4 leave a last '
                     'batch of 1 image per process in every epoch, which BatchNorm cannot '
                     'normalise (--weights finetune); it is dropped (1 image(s) per epoch; '
                     'another --batch-size avoids this)']
    steps = [json.loads(line) for line in (ckdir / 'stats.txt').read_text().splitlines()
             if line.startswith('{') and '"step"' in line]
    assert [s['step'] for s in steps] == [0, 1, 2]  # 12 of the 13 images


def test_finetune_with_one_image_per_step_fails_before_training(pre, tmp_path, capsys):
    status, lines, _ = run(evaluate, eval_argv(pre, tmp_path / 'ft', '--weights', 'finetune',
                                               '--batch-size', 1), capsys)
    assert_one_error_line(status, lines, '--batch-size 1', '1 image per process per step',
                          'BatchNorm', 'at least 2', prog='evaluate.py')
    assert not (tmp_path / 'ft').exists()
