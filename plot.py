"""Plot stats.txt files of pretraining or evaluation runs (several overlay) to one PNG.

    python plot.py checkpoint/stats.txt                       # -> checkpoint/stats.png
    python plot.py run_a/stats.txt run_b/stats.txt -o compare.png

Panels: loss, learning rates and accuracies (online probe, kNN monitor, linear evaluation) against
the epoch. Needs matplotlib (pip install matplotlib), imported only here.
"""
import argparse
import json
import math
import sys
from pathlib import Path

LOSS_KEYS = ('loss',)
LR_KEYS = ('lr_weights', 'lr_biases', 'lr_backbone', 'lr_classifier')
ACC_KEYS = ('online_acc1', 'knn_top1_k20', 'knn_top1_k200', 'acc1', 'acc5')


class StatsError(Exception):
    pass


def read_stats(path):
    """The JSON lines of a stats.txt (the first line, the command, and other text are skipped)."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise StatsError(f'cannot read {path}: {e.strerror or e}') from None
    records = []
    for number, line in enumerate(lines, 1):
        if line.startswith('{'):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise StatsError(f'{path}:{number}: not a JSON stats line ({e.msg})') from None
    if not records:
        raise StatsError(f'{path} has no JSON stats lines')
    return records


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
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        raise StatsError('plotting needs matplotlib: pip install matplotlib') from None
    runs = [(Path(p), current_timeline(read_stats(p))) for p in paths]
    panels = [('loss', LOSS_KEYS, 'log'), ('learning rate', LR_KEYS, 'linear'),
              ('accuracy (%)', ACC_KEYS, 'linear')]
    panels = [p for p in panels if any(series(r, k)[0] for _, r in runs for k in p[1])]
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 3 * len(panels)), squeeze=False)
    for ax, (title, keys, scale) in zip(axes[:, 0], panels):
        for path, records in runs:
            for key in keys:
                xs, ys = series(records, key)
                if xs:
                    label = f'{path.parent.name}/{key}' if len(runs) > 1 else key
                    ax.plot(xs, ys, label=label, linewidth=1)
        ax.set_ylabel(title)
        ax.set_yscale(scale)
        ax.grid(alpha=0.3)
        ax.legend(fontsize='small')
    axes[-1, 0].set_xlabel('epoch')
    fig.tight_layout()
    fig.savefig(output, dpi=100)
    plt.close(fig)
    return output


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0], prog='plot.py')
    parser.add_argument('stats', nargs='+', type=Path, help='stats.txt files to overlay')
    parser.add_argument('-o', '--output', type=Path, default=None,
                        help='PNG to write (default: next to the first stats file)')
    args = parser.parse_args(argv)
    output = args.output or args.stats[0].with_suffix('.png')
    try:
        plot(args.stats, output)
    except StatsError as e:
        sys.exit(f'plot.py: error: {e}')
    print(output)


if __name__ == '__main__':
    main()
