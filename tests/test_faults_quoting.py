"""What a user pastes works: the command line in stats.txt and the commands a script prints
are quoted as a shell needs (a space, a quote, a non-ASCII name), so that a shell splits them
back into exactly the words that were run; and a seed is used whole or refused."""
import contextlib
import io
import json
import shlex

import pytest

import bench_learning
import evaluate
import main
import prepare_data
from conftest import make_image_folder
from faultcheck import one_thread  # noqa: F401 - fixtures
from faultcheck import assert_one_error_line, main_argv, run
from test_prepare_data import fake_fashion_mnist

ODD = "données d'essai"  # a space, a quote and a non-ASCII letter


@pytest.fixture(scope='module')
def odd_run(tmp_path_factory):
    """A finished tiny main.py run whose data and checkpoint folders have odd names, and what
    it printed."""
    root = tmp_path_factory.mktemp('quoting')
    data = make_image_folder(root / ODD, classes=('n01440764', 'n01443537'), per_class=3,
                             val_per_class=1, size=16)
    ckdir = root / 'runs' / f'{ODD} ck'
    argv = main_argv(data, ckdir, '--no-online-probe')
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main.main(argv)
    return root, data, ckdir, argv, out.getvalue()


def test_the_logged_command_line_splits_back_into_its_words(odd_run):
    _, _, ckdir, argv, _ = odd_run
    first = (ckdir / 'stats.txt').read_text(encoding='utf-8').splitlines()[0]
    assert shlex.split(first) == ['main.py', *argv]


def test_the_printed_next_commands_run_as_pasted(odd_run, monkeypatch):
    root, data, ckdir, _, out = odd_run
    commands = {line.split('  # ')[1]: shlex.split(line.split('  # ')[0])
                for line in out.splitlines() if line.startswith('  python ') and '  # ' in line}
    backbone = str(ckdir / 'resnet18.pth')
    assert commands['weighted kNN top-1'] == ['python', 'evaluate.py', str(data), backbone,
                                              '--knn']
    assert commands['linear probe'] == ['python', 'evaluate.py', str(data), backbone]
    assert commands['the three logs side by side'][2] == str(ckdir / 'stats.txt')
    hub = next(line for line in out.splitlines() if 'torch.hub.load' in line)
    code = shlex.split(hub.strip())[2]
    assert f'weights={json.dumps(backbone, ensure_ascii=False)}' in code
    compile(code, '<pasted>', 'exec')  # a valid Python line with the path intact

    monkeypatch.chdir(root)  # where the commands write their logs (evaluate.py's defaults)
    knn = commands['weighted kNN top-1'][2:] + ['--workers', '0', '--device', 'cpu']
    assert evaluate.main(knn) is None
    log = (root / 'checkpoint' / 'knn' / 'stats.txt').read_text(encoding='utf-8')
    assert shlex.split(log.splitlines()[0]) == ['evaluate.py', *knn]


def test_prepare_data_prints_a_command_that_pastes(tmp_path, capsys):
    fake_fashion_mnist(tmp_path / 'raw')
    out = tmp_path / ODD
    assert prepare_data.main(['fashion-mnist', str(out), '--from', str(tmp_path / 'raw')]) is None
    printed = capsys.readouterr().out.strip().split('train on it with: ')[1]
    assert shlex.split(printed) == ['python', 'main.py', str(out), '--arch', 'resnet18',
                                    '--cifar-stem', '--crop-size', '32']


@pytest.mark.parametrize('module', [main, evaluate, bench_learning],
                         ids=lambda m: m.__name__)
@pytest.mark.parametrize('seed', ['4294967296', '-1', '1e3'])
def test_a_seed_outside_its_range_is_refused_not_folded(module, seed, tmp_path, capsys,
                                                        monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = {main: ['data'], evaluate: ['data', 'r.pth'], bench_learning: []}[module]
    status, lines, _ = run(module, argv + [f'--seed={seed}'], capsys)
    assert status == 2
    assert_one_error_line(status, lines, '--seed', 'from 0 to 4294967295', repr(seed))
    assert list(tmp_path.iterdir()) == []


def test_the_largest_seed_is_taken_whole():
    assert main.parse_arguments(['data', '--seed', '4294967295']).seed == 4294967295
