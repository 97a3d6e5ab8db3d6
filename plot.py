"""Plot stats.txt files of pretraining or evaluation runs (several overlay) to one PNG.

    python plot.py checkpoint/stats.txt                       # -> checkpoint/stats.png
    python plot.py run_a/stats.txt run_b/stats.txt -o compare.png
    python plot.py checkpoint/stats.txt checkpoint/lincls/stats.txt checkpoint/knn/stats.txt

One column of panels per kind of log: pretraining (main.py), linear probe, fine-tuning
(semi-supervised) and kNN (evaluate.py). Pretraining and evaluation columns show the loss, the
learning rates (weights or classifier on the left axis, biases or backbone on the right one)
and the accuracies against the epoch; the kNN column shows top-1 against k, one line per
evaluation. Needs matplotlib (pip install matplotlib), imported only here.
"""
import argparse
import json
import math
import shlex
import sys
from pathlib import Path

LOSS_KEYS = ('loss',)
LR_KEYS = ('lr_weights', 'lr_classifier')  # left axis
LR_RIGHT_KEYS = ('lr_biases', 'lr_backbone')  # right axis: 40x smaller (biases) or often 0
ACC_KEYS = ('online_acc1', 'knn_top1_k20', 'knn_top1_k200', 'acc1', 'acc5')
KINDS = ('pretraining', 'linear probe', 'fine-tuning', 'kNN')
MARKER_POINTS = 30  # series with at most this many points are drawn with markers


class StatsError(Exception):
    pass


def read_stats(path):
    """The JSON lines of a stats.txt, each with the command line that started it under
    '_command' (other text, such as rollback notes, is skipped)."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise StatsError(f'cannot read {path}: {e.strerror or e}') from None
    records, command = [], ''
    for number, line in enumerate(lines, 1):
        if line.startswith('{'):
            try:
                records.append(dict(json.loads(line), _command=command))
            except json.JSONDecodeError as e:
                raise StatsError(f'{path}:{number}: not a JSON stats line ({e.msg})') from None
        elif line.split(' ', 1)[0].endswith('.py'):
            command = line
    if not records:
        raise StatsError(f'{path} has no JSON stats lines')
    return records


def kind_of(records):
    """Which column a log goes to (see KINDS)."""
    if any(isinstance(r.get('knn_top1'), dict) for r in records):
        return 'kNN'
    if any('lr_weights' in r or 'online_acc1' in r or 'knn_top1_k20' in r for r in records):
        return 'pretraining'
    finetune = any('--weights finetune' in ' '.join(r['_command'].split()) or
                   r.get('lr_backbone', 0) > 0 for r in records)
    return 'fine-tuning' if finetune else 'linear probe'


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


def series(records, key):
    """(x in epochs, y) for one key: steps placed at fractional epochs, epoch summaries at the
    end of their epoch."""
    length = steps_per_epoch(records)
    xs, ys = [], []
    for r in records:
        if key not in r or not isinstance(r[key], (int, float)):
            continue
        if 'step' in r and length:
            xs.append(r['step'] / length)
        else:
            xs.append(r['epoch'] + 1)
        ys.append(r[key])
    return xs, ys


def plot(paths, output):
    fig = figure(paths)
    fig.savefig(output, dpi=100)
    fig.clf()
    return output


def figure(paths):
    """The matplotlib Figure of the stats files at `paths` (see the module docstring)."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        raise StatsError('plotting needs matplotlib: pip install matplotlib') from None
    runs = [(Path(p), current_timeline(read_stats(p))) for p in paths]
    kinds = [k for k in KINDS if any(kind_of(r) == k for _, r in runs)]
    rows = 3 if any(k != 'kNN' for k in kinds) else 1
    fig, axes = plt.subplots(rows, len(kinds), figsize=(5.5 * len(kinds), 3.2 * rows),
                             squeeze=False)
    many = len(runs) > 1
    for column, kind in enumerate(kinds):
        mine = [(run_label(path, many), records) for path, records in runs
                if kind_of(records) == kind]
        panels = axes[:, column]
        panels[0].set_title(kind)
        if kind == 'kNN':
            knn_panel(panels[0], mine)
            for ax in panels[1:]:
                ax.axis('off')
            continue
        line_panel(panels[0], mine, LOSS_KEYS, 'loss')
        lr_panel(panels[1], mine)
        line_panel(panels[2], mine, ACC_KEYS, 'accuracy (%)')
        panels[2].set_xlabel('epoch')
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
    marker = 'o' if len(xs) <= MARKER_POINTS else None
    return ax.plot(xs, ys, label=label, linewidth=1, marker=marker, markersize=4, **style)


def line_panel(ax, runs, keys, ylabel):
    drawn = False
    for prefix, records in runs:
        for key in keys:
            xs, ys = series(records, key)
            if xs:
                draw(ax, xs, ys, f'{prefix}{key}')
                drawn = True
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if drawn:
        readable_scale(ax)
        ax.legend(fontsize='small')
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


def lr_panel(ax, runs):
    """Weights (or classifier) rates on the left axis, biases (or backbone) on the right, so
    that a rate 40x smaller is not flat at zero. A rate that is 0 throughout is left out."""
    right = ax.twinx()
    lines = []
    for axis, keys, style in ((ax, LR_KEYS, '-'), (right, LR_RIGHT_KEYS, '--')):
        for prefix, records in runs:
            for key in keys:
                xs, ys = series(records, key)
                if xs and any(ys):
                    color = f'C{len(lines) % 10}'
                    lines += draw(axis, xs, ys, f'{prefix}{key}', linestyle=style, color=color)
    ax.set_ylabel('learning rate (solid: left axis)')
    right.set_ylabel('dashed: right axis')
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


def knn_panel(ax, runs):
    """Top-1 against k: one line per evaluation (an evaluate.py --knn log holds one JSON line
    per evaluation run into it)."""
    ks = set()
    for prefix, records in runs:
        for record in records:
            top1 = record.get('knn_top1')
            if not isinstance(top1, dict):
                continue
            points = sorted((int(k), v) for k, v in top1.items())
            ks.update(k for k, _ in points)
            ax.plot([k for k, _ in points], [v for _, v in points], marker='o', markersize=4,
                    linewidth=1, label=f'{prefix}{evaluated_file(record)}')
    ax.set_xscale('log')
    ax.set_xticks(sorted(ks), [str(k) for k in sorted(ks)])
    ax.minorticks_off()
    ax.set_xlabel('k (neighbours)')
    ax.set_ylabel('kNN top-1 (%)')
    ax.grid(alpha=0.3)
    ax.legend(fontsize='small')


def evaluated_file(record):
    """The pretrained FILE of the evaluate.py command that wrote `record`, as parent/name."""
    try:
        words = shlex.split(record['_command'])
    except ValueError:
        words = []
    files = [w for w in words[1:] if not w.startswith('-')][1:2]
    if not files:
        return 'top-1'
    path = Path(files[0])
    return f'{path.parent.name}/{path.name}' if path.parent.name else path.name


def get_arguments():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0], prog='plot.py')
    parser.add_argument('stats', nargs='+', type=Path, help='stats.txt files to overlay')
    parser.add_argument('-o', '--output', type=Path, default=None,
                        help='PNG to write (default: next to the first stats file)')
    return parser


def main(argv=None):
    args = get_arguments().parse_args(argv)
    output = args.output or args.stats[0].with_suffix('.png')
    try:
        plot(args.stats, output)
    except StatsError as e:
        sys.exit(f'plot.py: error: {e}')
    print(output)


if __name__ == '__main__':
    main()
