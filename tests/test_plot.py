"""plot.py on the five kinds of logs: a column each, every series visible and on its own scale,
epochs counted alike, measures taken once as bars."""
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
    # the linear probe's panel has nothing on a right axis, and says no such thing
    assert [ax.get_ylabel() for ax in fig.axes].count('learning rate') == 1


def test_knn_evaluations_are_bars_per_run_not_a_line_through_k(logs):
    fig = plot.figure([logs['knn']])
    (ax,) = [ax for ax in fig.axes if ax.get_visible() and ax.axison]
    assert ax.get_lines() == []  # k is not time: no line joins k = 20 to k = 200
    assert [t.get_text() for t in ax.get_xticklabels()] == ['k = 20', 'k = 200']
    bars = {(round(b.get_x() + b.get_width() / 2), b.get_height()) for b in ax.patches}
    assert bars == {(0, 19.0), (1, 17.0), (0, 23.5), (1, 21.5)}  # one bar per run and k
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ['a/resnet18.pth', 'b/resnet18.pth']  # one evaluation each
    values = sorted(t.get_text() for t in ax.texts)
    assert values == ['17.0', '19.0', '21.5', '23.5']  # each value written on its bar


def test_fast_linear_probes_are_bars_of_top1_and_top5(tmp_path):
    log = write_log(tmp_path / 'fast' / 'stats.txt', 'evaluate.py d ck/resnet18.pth '
                    '--fast-linear', [dict(fast_linear=dict(acc1=61.5, acc5=90.0),
                                           weight_decay=1e-6, train_size=12, val_size=4,
                                           train_percent=100, features_time=1, time=2)])
    fig = plot.figure([log])
    (ax,) = [ax for ax in fig.axes if ax.axison]
    assert ax.get_title() == 'fast linear probe'
    assert [t.get_text() for t in ax.get_xticklabels()] == ['top-1', 'top-5']
    assert sorted(b.get_height() for b in ax.patches) == [61.5, 90.0]


def test_epochs_count_alike_in_every_panel(tmp_path):
    """A 3-epoch linear probe logging step 0 only (--print-freq larger than the run): its
    epoch lines give the loss (the epoch's mean, mid-epoch), the rates (over each epoch) and
    the accuracies (at each epoch's end), all on one axis of epochs trained, from 0 to 3."""
    records = [dict(epoch=0, step=0, lr_backbone=0, lr_classifier=0.3, loss=2.3, time=0)]
    rates = [0.3, 0.225, 0.075]
    records += [dict(epoch=e, acc1=10.0 * (e + 1), acc5=90.0, best_acc1=10.0 * (e + 1),
                     best_acc5=90.0, train_loss=2.0 - e / 2, lr_classifier=rates[e],
                     lr_backbone=0) for e in range(3)]
    fig = plot.figure([write_log(tmp_path / 'stats.txt', 'evaluate.py d f.pth', records)])
    loss_ax, lr_ax, acc_ax = fig.axes[:3]
    loss = lines_by_label(loss_ax)
    assert list(loss['loss'].get_xdata()) == [0]  # the one logged step: its value is written
    assert [t.get_text() for t in loss_ax.texts] == ['2.3']
    assert list(loss['train_loss (epoch mean)'].get_xdata()) == [0.5, 1.5, 2.5]
    classifier = lines_by_label(lr_ax)['lr_classifier']
    assert list(classifier.get_xdata()) == [0, 1, 1, 2, 2, 3]  # each rate over its epoch
    assert list(classifier.get_ydata()) == [0.3, 0.3, 0.225, 0.225, 0.075, 0.075]
    assert list(lines_by_label(acc_ax)['acc1'].get_xdata()) == [1, 2, 3]
    assert all(ax.get_xlim() == loss_ax.get_xlim() for ax in (lr_ax, acc_ax))
    assert acc_ax.get_xlabel() == 'epochs trained'


def test_the_demos_closing_line_is_drawn_with_its_values(logs, tmp_path):
    records = plot.read_stats(logs['pretraining'])
    log = write_log(tmp_path / 'demo' / 'stats.txt', 'main.py --demo',
                    [{k: v for k, v in r.items() if k != '_command'} for r in records]
                    + [dict(demo_knn_top1_trained=37.7, demo_knn_top1_untrained=16.0,
                            demo_knn_top1_default_init=46.3)])
    fig = plot.figure([log])
    acc_ax = fig.axes[2]
    lines = lines_by_label(acc_ax)
    trained = lines['kNN k=20: trained']
    assert list(trained.get_xdata()) == [3] and list(trained.get_ydata()) == [37.7]  # run end
    assert {'16', '37.7', '46.3'} <= {t.get_text() for t in acc_ax.texts}


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
