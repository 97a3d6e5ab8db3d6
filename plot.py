"""Plot stats.txt files of pretraining or evaluation runs (several overlay) to one PNG.

    python plot.py checkpoint/stats.txt                       # -> checkpoint/stats.png
    python plot.py run_a/stats.txt run_b/stats.txt -o compare.png
    python plot.py checkpoint/stats.txt checkpoint/lincls/stats.txt checkpoint/knn/stats.txt

One column of panels per kind of run (stats.KINDS): pretraining (main.py), linear probe,
fine-tuning, kNN and fast linear probe (evaluate.py); a file that holds several kinds of run
(each run starts with its command line) has a part in each of their columns. Pretraining and
evaluation columns show the loss, the learning rates (weights or classifier on the left axis,
biases or backbone on the right one) and the accuracies against the epochs trained: a logged
step at its fraction of the epochs, a value measured after an epoch (accuracies) at that
epoch's end, an epoch's mean loss in its middle and an epoch's rate over the whole epoch, so
that every panel counts epochs alike. kNN and fast linear probe runs each measure once: bars,
one per run, for each k (top-1) or for top-1 and top-5. A series of one point shows its value.
Needs matplotlib (pip install matplotlib), imported only here.
"""
import math
import os
import sys
from pathlib import Path

from cli import USER_ERRORS, ArgumentParser, InputError, check_distinct, error_line
from stats import KINDS, command_words, is_finite, read_runs
from stats import kind_of as run_kind

LOSS_KEYS = ('loss', 'train_loss')
LR_KEYS = ('lr_weights', 'lr_classifier')  # left axis
LR_RIGHT_KEYS = ('lr_biases', 'lr_backbone')  # right axis: 40x smaller (biases) or often 0
ACC_KEYS = ('online_acc1', 'knn_top1_k20', 'knn_top1_k200', 'acc1', 'acc5')
# main.py --demo's last line: kNN top-1 (k = 20) of the trained network and of two random ones
DEMO_KEYS = {'demo_knn_top1_trained': 'kNN k=20: trained',
             'demo_knn_top1_untrained': 'kNN k=20: before training',
             'demo_knn_top1_default_init': 'kNN k=20: default init'}
LABELS = {'train_loss': 'train_loss (epoch mean)'}
MARKER_POINTS = 30  # series with at most this many points are drawn with markers
BAR_KINDS = {'kNN': ('knn_top1', 'kNN top-1 (%)'),
             'fast linear probe': ('fast_linear', 'accuracy (%)')}


def read_stats(path):
    """The JSON records of a stats.txt in order, each with the command line that started it
    under '_command'; an InputError names a file without any."""
    records = [dict(r, _command=run.command) for run in read_runs(path) for r in run.records]
    if not records:
        raise InputError(f'{path} has no JSON stats lines')
    return records


def kind_of(records):
    """Which column the records of one run go to (see KINDS)."""
    return run_kind(records, records[0].get('_command', '') if records else '')


def runs_by_kind(path):
    """[(kind, [records of one run])] of a stats.txt: the runs of a kind that follow each other
    (a run and its resumptions) form one timeline; kNN and fast linear probe runs stay one per
    evaluation."""
    parts = []
    runs = [run for run in read_runs(path) if run.records]
    for run in runs:
        records = [dict(r, _command=run.command) for r in run.records]
        if run.kind is None:
            continue
        if parts and parts[-1][0] == run.kind and run.kind not in BAR_KINDS:
            parts[-1][1].extend(records)
        else:
            parts.append((run.kind, records))
    if not runs:
        raise InputError(f'{path} has no JSON stats lines')
    if not parts:
        raise InputError(f'{path}: its JSON lines are of no kind of run this project writes '
                         f'(no main.py or evaluate.py command line before them, no known keys)')
    return parts


def current_timeline(records):
    """The records of the run as it went on. A run resumed from a mid-epoch checkpoint after a
    crash, or rolled back by --rollbacks, logs some steps again: from such a step on, the later
    records replace the earlier ones (the steps, and the summaries of that epoch and after)."""
    kept, last_step = [], None
    for r in records:
        if 'step' in r and last_step is not None and r['step'] <= last_step:
            kept = [k for k in kept if (k['step'] < r['step'] if 'step' in k
                                        else k.get('epoch', -1) < r.get('epoch', 0))]
        if 'step' in r:
            last_step = r['step']
        kept.append(r)
    return kept


def steps_per_epoch(records):
    """The run's steps per epoch, recovered from (epoch, step) pairs: step // L == epoch."""
    pairs = [(r['epoch'], r['step']) for r in records if 'step' in r and 'epoch' in r]
    if not pairs:
        return None
    lower = max(step / (epoch + 1) for epoch, step in pairs)  # L > step / (epoch + 1)
    uppers = [step / epoch for epoch, step in pairs if epoch > 0]  # L <= step / epoch
    length = math.floor(lower) + 1
    return min(length, math.floor(min(uppers))) if uppers else max(length, 1)


def series(records, key, where='end'):
    """(x in epochs trained, y) for one key: a step at its fraction of the epochs, an epoch's
    summary at the end of its epoch (where='middle': its middle, for a mean over the epoch;
    where='span': from its start to its end, for a rate that held through it), a record with
    neither (a run's closing line) at the end of the run."""
    length = steps_per_epoch(records)
    xs, ys = [], []
    for r in records:
        if key not in r or not is_finite(r[key]):
            continue
        if 'step' in r and length:
            xs.append(r['step'] / length)
        elif 'epoch' in r:
            offsets = {'end': [1], 'middle': [0.5], 'span': [0, 1]}[where]
            xs += [r['epoch'] + offset for offset in offsets]
            ys += [r[key]] * (len(offsets) - 1)
        else:
            xs.append(run_end(records, length))
        ys.append(r[key])
    return xs, ys


def run_end(records, length):
    """Epochs trained when the run ended: its last step's epoch end, or its last summary's."""
    ends = [r['epoch'] + 1 for r in records if 'epoch' in r]
    ends += [math.ceil((r['step'] + 1) / length) for r in records if 'step' in r and length]
    return max(ends, default=0)


def plot(paths, output):
    """The figure of the stats files at `paths`, written to `output` (a temporary file in the
    same folder, renamed into place: a failed write leaves any earlier PNG as it was)."""
    check_output(paths, output)
    fig = figure(paths)
    # the same ending, so that matplotlib writes the same format; created as savefig creates
    # any file (the user's umask)
    tmp = output.with_name(f'.{output.stem}.tmp-{os.getpid()}{output.suffix}')
    try:
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, output)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        fig.clf()
    return output


def check_output(paths, output):
    """Before anything is read: the output can be written, in a format matplotlib knows, and
    it is none of the logs it is drawn from."""
    same = [p for p in paths if Path(p).exists() and output.exists()
            and os.path.samefile(p, output)]
    if same:
        raise InputError(f'-o {output} is one of the stats files to draw; name another output')
    if not output.parent.is_dir():
        raise InputError(f'-o {output}: there is no folder {output.parent}')
    if output.is_dir():
        raise InputError(f'-o {output}: it is a folder')
    matplotlib_pyplot()
    from matplotlib.backend_bases import FigureCanvasBase
    formats = FigureCanvasBase.get_supported_filetypes()
    if output.suffix.lower().lstrip('.') not in formats:
        raise InputError(f'-o {output}: matplotlib writes {", ".join(sorted(formats))} files, '
                         f'named by their ending (e.g. curves.png)')


def matplotlib_pyplot():
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError('plotting needs matplotlib: pip install matplotlib') from None
    return plt


def figure(paths):
    """The matplotlib Figure of the stats files at `paths` (see the module docstring)."""
    plt = matplotlib_pyplot()
    parts = [(Path(p), kind, current_timeline(records)) for p in paths
             for kind, records in runs_by_kind(p)]
    kinds = [k for k in KINDS if any(kind == k for _, kind, _ in parts)]
    rows = 3 if any(k not in BAR_KINDS for k in kinds) else 1
    fig, axes = plt.subplots(rows, len(kinds), figsize=(5.5 * len(kinds), 3.2 * rows),
                             squeeze=False)
    many = len(paths) > 1
    for column, kind in enumerate(kinds):
        mine = [(run_label(path, many), records) for path, k, records in parts if k == kind]
        panels = axes[:, column]
        panels[0].set_title(kind)
        if kind in BAR_KINDS:
            bar_panel(panels[0], mine, *BAR_KINDS[kind])
            for ax in panels[1:]:
                ax.axis('off')
            continue
        line_panel(panels[0], mine, LOSS_KEYS, 'loss')
        lr_panel(panels[1], mine)
        line_panel(panels[2], mine, ACC_KEYS, 'accuracy (%)', extra=DEMO_KEYS)
        panels[2].set_xlabel('epochs trained')
        same_epochs(panels)
    fig.tight_layout()
    plt.close(fig)  # pyplot forgets it; the caller still holds it
    return fig


def same_epochs(panels):
    """One epoch range, from 0, for a column (a one-epoch log would get a range around 0)."""
    xs = [x for ax in panels for axis in (ax, *ax.get_shared_x_axes().get_siblings(ax))
          for line in axis.get_lines() for x in line.get_xdata()]
    right = max(max(xs, default=1), 1)
    for ax in panels:
        ax.set_xlim(-0.03 * right, 1.03 * right)  # margins: points at the ends stay whole


def run_label(path, many):
    return f'{path.parent.name}/' if many else ''


def draw(ax, xs, ys, label, **style):
    """One series; its value written plainly where it has one: beside a lone point, in the
    legend for a value that holds throughout (such lines may lie on each other)."""
    style.setdefault('marker', 'o' if len(xs) <= MARKER_POINTS else None)
    if len(xs) > 1 and len(set(ys)) == 1:
        label = f'{label} = {ys[0]:.4g}'
    lines = ax.plot(xs, ys, label=label, linewidth=1, markersize=4, **style)
    if len(xs) == 1:
        right = xs[0] > 0  # left of a point at the end of a run, right of one at its start
        ax.annotate(f'{ys[0]:.4g}', (xs[0], ys[0]), textcoords='offset points',
                    xytext=(-5 if right else 5, 4), ha='right' if right else 'left',
                    fontsize='small', color=lines[0].get_color())
    return lines


def line_panel(ax, runs, keys, ylabel, extra=None):
    """One line per key and run; `extra` ({key: label}): keys drawn under their own label."""
    drawn = False
    for prefix, records in runs:
        labelled = [(key, LABELS.get(key, key)) for key in keys] + list((extra or {}).items())
        for key, label in labelled:
            xs, ys = series(records, key, 'middle' if key == 'train_loss' else 'end')
            if xs:
                draw(ax, xs, ys, f'{prefix}{label}')
                drawn = True
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if drawn:
        readable_scale(ax)
        ax.legend(fontsize='small' if len(ax.get_lines()) <= 3 else 'x-small', framealpha=0.6)
    else:
        ax.text(0.5, 0.5, 'not logged', ha='center', va='center', transform=ax.transAxes)


def readable_scale(ax):
    """Linear, unless the values span more than two decades: then logarithmic, with plain
    numbers as tick labels."""
    ys = [y for line in ax.get_lines() for y in line.get_ydata() if y > 0]
    if ys and max(ys) / min(ys) > 100:
        from matplotlib.ticker import ScalarFormatter
        ax.set_yscale('log')
        formatter = ScalarFormatter()
        formatter.set_scientific(False)
        ax.yaxis.set_major_formatter(formatter)


def rate_series(records, key):
    """(xs, ys, whether they are spans) of a learning rate: from the epochs' own lines where
    the run logs them (evaluate.py: the rate held through each epoch, a step drawn flat across
    it), else from its logged steps."""
    summaries = [r for r in records if 'step' not in r]
    if any(key in r for r in summaries):
        return (*series(summaries, key, 'span'), True)
    return (*series([r for r in records if 'step' in r], key), False)


def lr_panel(ax, runs):
    """Weights (or classifier) rates on the left axis, biases (or backbone) on the right, so
    that a rate 40x smaller is not flat at zero. A rate that is 0 throughout is left out."""
    right = ax.twinx()
    lines = []
    for axis, keys, style in ((ax, LR_KEYS, '-'), (right, LR_RIGHT_KEYS, '--')):
        for prefix, records in runs:
            for key in keys:
                xs, ys, spans = rate_series(records, key)
                if xs and any(ys):
                    color = f'C{len(lines) % 10}'
                    marker = {'marker': None} if spans else {}  # flat steps need no dots
                    lines += draw(axis, xs, ys, f'{prefix}{key}', linestyle=style, color=color,
                                  **marker)
    if any(line.get_linestyle() == '--' for line in lines):
        ax.set_ylabel('learning rate (solid: left axis)')
        right.set_ylabel('dashed: right axis')
    else:  # nothing on the right axis (a linear probe's classifier rate alone)
        ax.set_ylabel('learning rate')
        right.set_axis_off()
    ax.grid(alpha=0.3)
    if lines:
        ax.legend(lines, [line.get_label() for line in lines], fontsize='small')
    on_right = [y for line in lines if line.axes is right for y in line.get_ydata()]
    if not on_right:
        right.set_yticks([])
        right.set_ylabel('')
    elif min(on_right) >= 0:
        # Same schedule, other scale: at full height the dashed curve would hide the solid one.
        right.set_ylim(0, 2 * max(on_right))


def bar_panel(ax, runs, key, ylabel):
    """One group of bars per measure (each k, or top-1 and top-5), one bar per evaluation run,
    its value written on it: measures taken once are not a curve."""
    evaluations = [(f'{prefix}{evaluated_file(r)}', r[key]) for prefix, records in runs
                   for r in records if isinstance(r.get(key), dict)]
    measures = sorted({m for _, values in evaluations for m in values}, key=measure_order)
    width = 0.8 / max(len(evaluations), 1)
    for i, (label, values) in enumerate(evaluations):
        xs = [j + (i - (len(evaluations) - 1) / 2) * width for j, m in enumerate(measures)
              if m in values]
        ys = [values[m] for m in measures if m in values]
        bars = ax.bar(xs, ys, width * 0.9, label=label)
        ax.bar_label(bars, fmt='%.1f', fontsize='small', padding=2)
    ax.set_xticks(range(len(measures)), [measure_name(key, m) for m in measures])
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 100 * 1.08)
    ax.grid(alpha=0.3, axis='y')
    # below the panel (the column has nothing else): not over the bars and their values
    ax.legend(fontsize='small', loc='upper center', bbox_to_anchor=(0.5, -0.12))


def measure_order(name):
    return (0, int(name)) if name.isdigit() else (1, name)


def measure_name(key, name):
    if key == 'knn_top1':
        return f'k = {name}'
    return {'acc1': 'top-1', 'acc5': 'top-5'}.get(name, name)


def evaluated_file(record):
    """The pretrained FILE of the evaluate.py command that wrote `record`, as parent/name."""
    words = command_words(record.get('_command', ''))
    files = [w for w in words[1:] if not w.startswith('-')][1:2]
    if not files:
        return 'top-1'
    path = Path(files[0])
    return f'{path.parent.name}/{path.name}' if path.parent.name else path.name


def get_arguments():
    parser = ArgumentParser(description=__doc__.split('\n')[0], prog='plot.py')
    parser.add_argument('stats', nargs='+', type=Path, help='stats.txt files to overlay')
    parser.add_argument('-o', '--output', type=Path, default=None,
                        help='PNG to write (default: next to the first stats file, '
                             'stats.txt -> stats.png)')
    return parser


def main(argv=None):
    args = get_arguments().parse_args(argv)
    output = args.output or args.stats[0].with_suffix('.png')
    try:
        check_distinct(args.stats, 'stats file')
        plot(args.stats, output)
    except USER_ERRORS as e:
        sys.exit(f'plot.py: error: {error_line(e)}')
    except KeyboardInterrupt:
        sys.exit('plot.py: interrupted; nothing written')
    print(output)


if __name__ == '__main__':
    main()
