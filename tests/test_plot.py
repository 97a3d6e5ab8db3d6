"""plot.py on the four kinds of logs: a column each, every series visible and on its own scale."""
import json

import pytest

import plot

pytest.importorskip('matplotlib')


def write_log(path, command, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(command + '\n' + ''.join(json.dumps(r) + '\n' for r in records))
    return path


@pytest.fixture
def logs(tmp_path):
    steps = 6  # per epoch, logged every 2 steps, for 3 epochs
    pretraining = [dict(epoch=s // steps, step=s, lr_weights=0.05 * s / 18,
                        lr_biases=0.0012 * s / 18, loss=600 - 20 * s, time=s, online_acc1=10 + s)
                   for s in range(0, 18, 2)]
    pretraining.append(dict(epoch=2, knn_top1_k20=21.0, knn_top1_k200=19.5, time=20))
    linear = [dict(epoch=0, step=s, lr_backbone=0, lr_classifier=0.3, loss=2.3 - 0.1 * s,
                   time=s) for s in range(3)]
    linear.append(dict(epoch=0, acc1=31.0, acc5=70.0, best_acc1=31.0, best_acc5=70.0))
    finetune = [dict(epoch=0, step=0, lr_backbone=0.005, lr_classifier=0.5, loss=2.31, time=0),
                dict(epoch=0, acc1=12.0, acc5=55.0, best_acc1=12.0, best_acc5=55.0)]
    knn_line = dict(temperature=0.07, bank_size=400, val_size=100, train_percent=100, time=5)
    knn_log = tmp_path / 'knn' / 'stats.txt'
    write_log(knn_log, 'evaluate.py demo_data checkpoint/a/resnet18.pth --knn',
              [dict(knn_top1={'20': 19.0, '200': 17.0}, **knn_line)])
    with open(knn_log, 'a') as f:  # a second evaluation appended to the same log
        f.write('evaluate.py demo_data checkpoint/b/resnet18.pth --knn\n')
        f.write(json.dumps(dict(knn_top1={'20': 23.5, '200': 21.5}, **knn_line)) + '\n')
    return dict(
        pretraining=write_log(tmp_path / 'pre' / 'stats.txt', 'main.py --demo', pretraining),
        linear=write_log(tmp_path / 'lin' / 'stats.txt', 'evaluate.py d f.pth', linear),
        finetune=write_log(tmp_path / 'semi' / 'stats.txt', 'evaluate.py d f.pth --weights '
                           'finetune --train-perc 10', finetune),
        knn=knn_log)


def lines_by_label(ax):
    return {line.get_label(): line for line in ax.get_lines()}


def test_each_kind_of_log_gets_its_column(logs):
    kinds = [plot.kind_of(plot.read_stats(logs[k])) for k in ('pretraining', 'linear',
                                                               'finetune', 'knn')]
    assert kinds == ['pretraining', 'linear probe', 'fine-tuning', 'kNN']
    fig = plot.figure([logs['knn'], logs['finetune'], logs['linear'], logs['pretraining']])
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ['pretraining', 'linear probe', 'fine-tuning', 'kNN']  # in that order


def test_pretraining_panels_are_readable(logs):
    fig = plot.figure([logs['pretraining']])
    loss_ax, lr_ax, acc_ax, lr_right = fig.axes
    assert loss_ax.get_yscale() == 'linear'  # 600 to 260: no logarithmic axis
    assert set(lines_by_label(lr_ax)) == {'lr_weights'}
    biases = lines_by_label(lr_right)['lr_biases']  # its own axis, not flat at 0 beside 0.05
    assert lr_right.get_ylim() == (0, pytest.approx(2 * 0.0012 * 16 / 18))  # below the other
    assert max(biases.get_ydata()) == pytest.approx(0.0012 * 16 / 18)
    accuracy = lines_by_label(acc_ax)
    assert set(accuracy) == {'online_acc1', 'knn_top1_k20', 'knn_top1_k200'}
    assert accuracy['knn_top1_k20'].get_marker() == 'o'  # one point: visible
    assert list(accuracy['knn_top1_k20'].get_xdata()) == [3]  # at the end of epoch 2


def test_single_point_evaluations_are_visible_and_overlaid(logs):
    fig = plot.figure([logs['linear'], logs['finetune']])
    acc_axes = [ax for ax in fig.axes if ax.get_ylabel() == 'accuracy (%)']
    semi = lines_by_label(acc_axes[1])
    assert set(semi) == {'semi/acc1', 'semi/acc5'}  # several runs: named by their directory
    assert semi['semi/acc1'].get_marker() == 'o' and list(semi['semi/acc1'].get_ydata()) == [12]
    lo, hi = acc_axes[1].get_xlim()
    assert lo < 0 < 1 < hi  # the one epoch lies inside the axis, not at a degenerate range
    lr_right = [ax for ax in fig.axes if ax.get_ylabel() == 'dashed: right axis']
    assert len(lr_right) == 1  # lr_backbone 0 throughout (linear probe): left out, no axis
    assert set(lines_by_label(lr_right[0])) == {'semi/lr_backbone'}


def test_knn_evaluations_are_plotted_against_k(logs):
    fig = plot.figure([logs['knn']])
    (ax,) = [ax for ax in fig.axes if ax.get_visible() and ax.axison]
    lines = lines_by_label(ax)
    assert set(lines) == {'a/resnet18.pth', 'b/resnet18.pth'}  # one line per evaluation
    assert list(lines['b/resnet18.pth'].get_xdata()) == [20, 200]
    assert list(lines['b/resnet18.pth'].get_ydata()) == [23.5, 21.5]
    assert ax.get_xlabel() == 'k (neighbours)'


def test_wide_loss_ranges_get_a_log_axis_with_plain_ticks(tmp_path):
    records = [dict(epoch=0, step=s, lr_weights=0.1, lr_biases=0.002, loss=10.0 ** (4 - s),
                    time=s) for s in range(4)]
    fig = plot.figure([write_log(tmp_path / 'stats.txt', 'main.py d', records)])
    loss_ax = fig.axes[0]
    assert loss_ax.get_yscale() == 'log'
    fig.canvas.draw()
    labels = [t.get_text() for t in loss_ax.get_yticklabels() if t.get_text()]
    assert '1000' in labels and not any('^' in label or 'e' in label for label in labels)


def test_plot_writes_a_png_of_all_kinds(logs, tmp_path):
    output = plot.plot(list(logs.values()), tmp_path / 'all.png')
    data = output.read_bytes()
    assert data.startswith(b'\x89PNG\r\n\x1a\n') and len(data) > 50_000
