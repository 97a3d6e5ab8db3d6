"""Rerun the commands behind the README's figures and print each figure beside the README's range.

    python tests/readme_figures.py            # the demo and its two evaluations (about 3 minutes)
    python tests/readme_figures.py --suite    # the test suite too (about 11 more minutes)

The figures are the rows of the README's table headed `| figure | range seen | command |`.
Every command runs from the root of a fresh clone of this repository's current commit (in a
temporary folder, removed after), with this interpreter for `python`, one command at a time in
the table's order, so that the demo's evaluations find the demo's files. Each figure is read
from its command's output (or, for a time, measured around it) and printed next to the README's
range; the exit status is 1 when a figure falls outside its range or cannot be read, so that
the README is checked before its figures are changed. Times depend on the machine and on what
else runs on it: run this on an otherwise idle machine.
"""
import argparse
import json
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEADER = '| figure | range seen | command |'


def demo_line(what):
    """The demo's kNN line ending in `what` (main.report_demo_gain's format)."""
    pattern = re.compile(rf'^demo:\s+([\d.]+)%\s+{re.escape(what)}$', re.M)
    return lambda output, seconds: float(pattern.search(output).group(1))


def json_records(output):
    return [json.loads(line) for line in output.splitlines() if line.startswith('{')]


def knn_k20(output, seconds):
    return float([r for r in json_records(output) if 'knn_top1' in r][-1]['knn_top1']['20'])


def linear_best(output, seconds):
    return float([r for r in json_records(output) if 'best_acc1' in r][-1]['best_acc1'])


def suite_passed(output, seconds):
    return float(re.search(r'(\d+) passed', output).group(1))


def wall_time(output, seconds):
    return seconds


# How each figure of the table is read; a row whose figure is not here is an error.
FIGURES = {
    'demo: kNN top-1 after training': demo_line('after training'),
    'demo: kNN top-1 of the same network before training':
        demo_line('the same network before training'),
    "demo: kNN top-1 of torchvision's default random initialisation":
        demo_line("torchvision's default random initialisation"),
    'demo: wall time': wall_time,
    'evaluate.py --knn on the demo: top-1 (k = 20)': knn_k20,
    'evaluate.py linear probe on the demo: best top-1': linear_best,
    'evaluate.py linear probe on the demo: wall time': wall_time,
    'test suite: tests passed': suite_passed,
    'test suite: wall time': wall_time,
}


def parse_value(text):
    """'41.2%' -> 41.2, '1:40' -> 100.0 (minutes:seconds), '31 s' -> 31.0, '560' -> 560.0."""
    text = text.strip().rstrip('%').strip()
    if text.endswith(' s'):
        text = text[:-2]
    if ':' in text:
        minutes, seconds = text.split(':')
        return int(minutes) * 60 + float(seconds)
    return float(text)


def parse_range(text):
    """'40.0-42.5%' or '1:30-1:50' or '41.2%' (a single value) -> (low, high)."""
    unit = '%' if text.strip().endswith('%') else ''
    parts = text.replace('%', '').split('-')
    if len(parts) not in (1, 2):
        raise ValueError(f'range {text!r}: expected LOW-HIGH or one value')
    low, high = (parse_value(p + unit) for p in (parts * 2)[:2])
    if low > high:
        raise ValueError(f'range {text!r}: low above high')
    return low, high


def read_table(readme):
    """[(figure, (low, high), range text, command)] of the README's figures table."""
    lines = Path(readme).read_text().splitlines()
    try:
        start = lines.index(HEADER)
    except ValueError:
        raise SystemExit(f'readme_figures.py: error: {readme} has no table headed {HEADER}')
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith('|'):
            break
        cells = [c.strip() for c in line.strip('|').split('|')]
        if len(cells) != 3 or not (cells[2].startswith('`') and cells[2].endswith('`')):
            raise SystemExit(f'readme_figures.py: error: {readme}: row {line!r}: expected '
                             f'figure | range | `command`')
        figure, range_text, command = cells[0], cells[1], cells[2].strip('`')
        if figure not in FIGURES:
            raise SystemExit(f'readme_figures.py: error: {readme}: no reader for the figure '
                             f'{figure!r} (tests/readme_figures.py FIGURES)')
        rows.append((figure, parse_range(range_text), range_text, command))
    return rows


def run_command(command, cwd):
    """(output, seconds) of a README command, `python` being this interpreter."""
    words = shlex.split(command)
    if words[0] == 'python':
        words[0] = sys.executable
    start = time.monotonic()
    result = subprocess.run(words, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    seconds = time.monotonic() - start
    if result.returncode != 0:
        print(result.stdout[-3000:], file=sys.stderr)
        raise SystemExit(f'readme_figures.py: error: `{command}` failed with exit status '
                         f'{result.returncode}')
    return result.stdout, seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     prog='readme_figures.py')
    parser.add_argument('--suite', action='store_true',
                        help='also rerun the test suite (default: leave its rows out)')
    parser.add_argument('--readme', type=Path, default=ROOT / 'README.md',
                        help='the README whose table is checked (default: this repository\'s)')
    args = parser.parse_args(argv)
    rows = [row for row in read_table(args.readme)
            if args.suite or not row[0].startswith('test suite')]
    outputs, failed = {}, 0
    with tempfile.TemporaryDirectory(prefix='readme-figures-') as tmp:
        clone = Path(tmp) / 'clone'
        subprocess.run(['git', 'clone', '-q', str(ROOT), str(clone)], check=True)
        commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=clone, check=True,
                                capture_output=True, text=True).stdout.strip()
        print(f'# commit {commit}, {sys.executable}, in a fresh clone; commands in the '
              f'table\'s order', flush=True)
        print('| figure | README | measured | within |\n|---|---|---|---|', flush=True)
        for figure, (low, high), range_text, command in rows:
            if command not in outputs:
                outputs[command] = run_command(command, clone)
            try:
                value = FIGURES[figure](*outputs[command])
            except (AttributeError, IndexError, KeyError, ValueError):
                value = None
            within = value is not None and low <= value <= high
            failed += not within
            shown = 'not found' if value is None else \
                f'{int(value) // 60}:{value % 60:04.1f}' if 'wall time' in figure else f'{value:g}'
            print(f'| {figure} | {range_text} | {shown} | {"yes" if within else "NO"} |',
                  flush=True)
        shutil.rmtree(clone, ignore_errors=True)
    if failed:
        sys.exit(f'readme_figures.py: {failed} of {len(rows)} figures outside the README\'s range')


if __name__ == '__main__':
    main()
