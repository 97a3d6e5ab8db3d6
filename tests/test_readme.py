"""Every code block of README.md runs as written, or is listed here with the reason it is not.

Commands on the demo's files run for real, in-process, in a directory laid out as the
repository root after `python main.py --demo` (tiny stand-ins for demo_data and
checkpoint/demo, and links to the repository's modules so that torch.hub.load('.', ...) works);
`pack.py` runs on a tiny ImageFolder standing in for /path/to/imagenet. Commands that need
ImageNet, a cluster, the network or minutes have their arguments parsed by the script's own
parser (a renamed or mistyped flag fails here), and are otherwise left out for the reason
their rule gives. A code block or command that no rule covers fails the test.
"""
import re
import shlex
from pathlib import Path

import pytest

import bench
import bench_learning
import evaluate
import main
import pack
import plot
import prepare_data
from conftest import ROOT, make_image_folder

README = ROOT / 'README.md'
SCRIPTS = {'main.py': main, 'evaluate.py': evaluate, 'pack.py': pack, 'plot.py': plot,
           'bench.py': bench, 'prepare_data.py': prepare_data,
           'bench_learning.py': bench_learning}

# (pattern found in the command, what is done, why). The first matching rule applies.
RULES = [
    (r'pip install', 'skip', 'network: installs the requirements (the suite runs in that venv)'),
    (r'-m pytest', 'skip', 'the test suite itself'),
    (r'torchvision\.datasets\.CIFAR10', 'skip', 'network: downloads CIFAR-10'),
    (r'bench_learning\.py', 'parse', 'an hour: pretrains on Fashion-MNIST (tests/test_learning.py '
                                    'runs its evaluation on a tiny ImageFolder)'),
    (r'bench\.py', 'parse', 'minutes: times ResNet-50 training steps and torch.compile'),
    (r'^python prepare_data\.py cifar', 'parse', 'network: downloads CIFAR'),
    (r'^python prepare_data\.py fashion-mnist', 'parse',
     'a minute: writes 70,000 images (tests/test_prepare_data.py reads the same files)'),
    (r'^(torchrun|srun) ', 'parse', 'a cluster launcher'),
    (r'^python pack\.py ', 'run', 'on a tiny ImageFolder for /path/to/imagenet'),
    (r'/path/to/imagenet|^python main\.py (cifar10|fashion-mnist) ', 'parse',
     'ImageNet-, CIFAR- or Fashion-MNIST-sized'),
    (r'demo_data|checkpoint/demo', 'run', 'on tiny stand-ins for the demo\'s files'),
]
PYTHON_RULES = [
    (r"BarlowTwins\(backbone=", 'run', 'random tensors only'),
    (r"torch\.hub\.load\('\.', 'backbone'", 'run', 'on the demo stand-in\'s weights'),
    (r"torch\.hub\.load\('\.', 'classifier'", 'run', 'on the demo stand-in\'s linear probe'),
    (r"'resnet50', source='local'\)  # released weights", 'skip',
     'network: the first line downloads the released weights (tests/test_hubconf.py loads them '
     'from a populated cache)'),
]
OTHER_BLOCKS = [(r'^@article', 'skip', 'a citation')]


def code_blocks():
    """(language, text, line number) of every fenced block in the README."""
    text = README.read_text()
    return [(m.group(1), m.group(2), text[:m.start()].count('\n') + 1)
            for m in re.finditer(r'^```(\w*)\n(.*?)^```', text, flags=re.M | re.S)]


def commands(block):
    """The commands of a shell block: continuation lines joined, comments dropped, a quoted
    argument over several lines (python -c "...") kept whole."""
    found, pending = [], ''
    for line in re.sub(r'\\\n\s*', ' ', block).splitlines():
        pending += line
        try:
            words = shlex.split(pending, comments=True)
        except ValueError:  # a quote still open
            pending += '\n'
            continue
        if words:
            found.append(' '.join(shlex.quote(w) for w in words))
        pending = ''
    assert not pending, f'unbalanced quotes in a README block: {pending[:80]!r}'
    return found


def rule_for(command, rules):
    for pattern, action, reason in rules:
        if re.search(pattern, command, flags=re.M):
            return action, reason
    raise AssertionError(f'README command covered by no rule of tests/test_readme.py: '
                         f'{command[:100]!r}')


def script_argv(command):
    """(script name, its arguments) of a shell command: python X.py ..., torchrun ... X.py ..."""
    words = shlex.split(command)
    index = next(i for i, w in enumerate(words) if w in SCRIPTS or
                 Path(w).name in SCRIPTS and w.endswith('.py'))
    return Path(words[index]).name, words[index + 1:]


def parse_only(name, argv):
    script = SCRIPTS[name]
    if hasattr(script, 'parse_arguments'):
        return script.parse_arguments(argv)
    return script.get_arguments().parse_args(argv)


@pytest.fixture(scope='module')
def repo_root_after_demo(tmp_path_factory):
    """A directory laid out as the repository root after the demo, with tiny stand-ins."""
    root = tmp_path_factory.mktemp('readme_root')
    for module in ROOT.glob('*.py'):
        (root / module.name).symlink_to(module)
    make_image_folder(root / 'demo_data', classes=('warm_disc', 'cool_ring'), per_class=4,
                      val_per_class=2, size=32)
    images = make_image_folder(root / 'imagenet', classes=('n01440764', 'n01443537'),
                               per_class=2, val_per_class=1, size=32)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        main.main(['demo_data', '--arch', 'resnet18', '--cifar-stem', '--crop-size', '32',
                   '--projector', '32-32', '--batch-size', '4', '--epochs', '1', '--workers',
                   '0', '--device', 'cpu', '--checkpoint-dir', 'checkpoint/demo'])
    return root, images


def substituted(command, images, root):
    command = command.replace('/path/to/imagenet.h5', str(root / 'imagenet.h5'))
    return command.replace('/path/to/imagenet', str(images))


def test_every_block_is_covered_and_cheap_ones_run(repo_root_after_demo, monkeypatch, capsys):
    root, images = repo_root_after_demo
    monkeypatch.chdir(root)
    report = []
    for language, block, line in code_blocks():
        if language == 'python':
            action, reason = rule_for(block, PYTHON_RULES)
            if action == 'run':
                exec(compile(block, f'README.md:{line}', 'exec'), {})
            report.append((line, action, reason))
            continue
        if re.search(OTHER_BLOCKS[0][0], block, flags=re.M):
            report.append((line, 'skip', OTHER_BLOCKS[0][2]))
            continue
        for command in commands(block):
            action, reason = rule_for(command, RULES)
            if action != 'skip':
                name, argv = script_argv(substituted(command, images, root))
                if action == 'run':
                    assert SCRIPTS[name].main(argv) is None, command
                else:
                    parse_only(name, argv)
            report.append((line, action, reason))
    actions = [action for _, action, _ in report]
    # What the README promises a newcomer is executed: the demo's path and the Python examples.
    assert actions.count('run') >= 7 and 'parse' in actions and 'skip' in actions
    assert (root / 'curves.png').read_bytes().startswith(b'\x89PNG')
    assert '"knn_top1"' in (root / 'checkpoint' / 'demo' / 'knn' / 'stats.txt').read_text()
    assert (root / 'checkpoint' / 'demo' / 'lincls' / 'checkpoint.pth').is_file()
    assert (root / 'imagenet.h5').is_file()
    out = capsys.readouterr().out
    assert 'evaluate.py: --arch resnet18 --cifar-stem --crop-size 32, as recorded in ' \
           'checkpoint/demo/checkpoint.pth' in out


def table_commands():
    """(line number, cells, command) of every command written in a README table cell: a
    backticked `python X.py ...`, `torchrun ...` or `srun ...` naming one of the scripts."""
    found = []
    for number, line in enumerate(README.read_text().splitlines(), start=1):
        if not line.startswith('|'):
            continue
        cells = [cell.strip() for cell in line.strip().strip('|').split('|')]
        for span in re.findall(r'`([^`]+)`', line):
            if re.match(r'(python|torchrun|srun) ', span) and \
                    any(Path(w).name in SCRIPTS for w in span.split()):
                found.append((number, cells, span))
    return found


def test_commands_in_tables_parse():
    # Table cells are never run (ImageNet, a cluster): their flags are parsed, as for blocks.
    found = table_commands()
    for line, _, command in found:
        name, argv = script_argv(command)
        try:
            parse_only(name, argv)
        except SystemExit:
            pytest.fail(f'README.md:{line}: {command!r} does not parse')
    assert any(command.startswith('torchrun ') for _, _, command in found)


def test_small_batch_recipes_match_their_figures():
    # The recipes' rows: command | batch | learning rate | epochs | top-1 | source. Each command
    # is the source's run (one rate for all parameters, loss x 0.024, weight decay 1e-6) in the
    # current flags: biases at 0.024 x the rate, weight decay 1e-6 / 0.024.
    rows = [(cells, main.parse_arguments(script_argv(command)[1]))
            for _, cells, command in table_commands() if '--learning-rate-weights' in command]
    assert len(rows) >= 7
    for cells, args in rows:
        assert (args.batch_size, args.learning_rate_weights, args.epochs) == \
            (int(cells[1]), float(cells[2]), int(cells[3])), cells
        assert args.learning_rate_biases == pytest.approx(0.024 * args.learning_rate_weights)
        assert args.weight_decay == pytest.approx(1e-6 / 0.024, rel=1e-4)
        assert args.scale_loss == 1.0 and args.learning_rate is None
        assert 'github.com/facebookresearch/barlowtwins/issues/' in cells[5]
    # the figures as the source gives them (batch: top-1 after 300 epochs); 64 was not run
    top1 = {args.batch_size: cells[4] for cells, args in rows if args.epochs == 300}
    assert top1.pop(64).startswith('not run')
    assert top1 == {128: '69.7', 256: '70.7', 512: '71.4', 1024: '71.7', 2048: '71.4',
                    4096: '70.7'}


def test_rules_cover_the_commands_as_expected():
    assert rule_for('python main.py /path/to/imagenet/ --epochs 1000', RULES)[0] == 'parse'
    assert rule_for('python pack.py --check /path/to/imagenet.h5', RULES)[0] == 'run'
    assert rule_for('python evaluate.py demo_data checkpoint/demo/resnet18.pth --knn',
                    RULES)[0] == 'run'
    with pytest.raises(AssertionError, match='covered by no rule'):
        rule_for('python main.py somewhere_else', RULES)
    assert commands('python a.py x \\\n    --y 1  # note\n# only a comment\n') == \
        ['python a.py x --y 1']
    assert script_argv('torchrun --nproc-per-node 8 main.py DIR --device cpu') == \
        ('main.py', ['DIR', '--device', 'cpu'])


def test_figures_table_is_read_and_every_figure_has_a_reader():
    import readme_figures
    rows = readme_figures.read_table(README)
    figures = [figure for figure, *_ in rows]
    assert len(figures) == len(set(figures)) == len(readme_figures.FIGURES)
    for figure, (low, high), _, command in rows:
        assert low <= high, figure
        name, argv = script_argv(command) if 'pytest' not in command else (None, None)
        if name is not None:
            parse_only(name, argv)  # a command that no longer parses fails here
    assert readme_figures.parse_range('1:52-2:22') == (112, 142)
    assert readme_figures.parse_range('42.5-46.2%') == (42.5, 46.2)
    assert readme_figures.parse_range('565') == (565, 565)
    records = ('{"knn_top1": {"20": 42.5, "200": 40.0}}\n'
               '{"epoch": 9, "acc1": 38.0, "acc5": 90.0, "best_acc1": 38.75}\n'
               '565 passed, 3 skipped in 652.01s (0:10:52)\n')
    readers = readme_figures.FIGURES
    assert readers['evaluate.py --knn on the demo: top-1 (k = 20)'](records, 0) == 42.5
    assert readers['evaluate.py linear probe on the demo: best top-1'](records, 0) == 38.75
    assert readers['test suite: tests passed'](records, 0) == 565
