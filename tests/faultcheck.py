"""What the tests/test_faults_*.py modules share: the tiny pretrained run they evaluate, the
command lines they give, and running a script the way a user would see it (exit status and
the lines of stderr), in-process or as a process of its own."""
import os
import subprocess
import sys
import types
import warnings

import pytest
import torch

import main
from conftest import ROOT, make_image_folder

# Categories Python does not show by default: anything else counts as a line a user sees.
HIDDEN_WARNINGS = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    """One torch thread in the modules that import it: their runs are tiny, and a second
    thread only adds start-up cost."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def pre(tmp_path_factory):
    return pretrained(tmp_path_factory)


def pretrained(tmp_path_factory):
    """A tiny main.py run made once per test session, cheap to evaluate (2 classes of 6
    training and 2 validation images, resnet18 with the ImageNet stem at 16 px): data, ckdir,
    backbone (resnet18.pth), checkpoint."""
    root = tmp_path_factory.getbasetemp() / 'faults_pretrained'
    data, ckdir = root / 'data', root / 'ck'
    if not (ckdir / 'resnet18.pth').is_file():
        make_image_folder(data, classes=('n01440764', 'n01443537'), size=24)
        main.main(main_argv(data, ckdir))
    return types.SimpleNamespace(data=data, ckdir=ckdir, backbone=ckdir / 'resnet18.pth',
                                 checkpoint=ckdir / 'checkpoint.pth')


def main_argv(data, ckdir, *extra):
    """main.py's tiny CPU settings: one epoch of 3 steps on 12 images; later flags win."""
    return [str(data), '--arch', 'resnet18', '--crop-size', '16',
            '--projector', '32-32', '--batch-size', '4', '--epochs', '1', '--workers', '0',
            '--device', 'cpu', '--checkpoint-dir', str(ckdir), '--print-freq', '1',
            '--warmup-epochs', '1', *map(str, extra)]


def eval_argv(pre, ckdir, *extra, pretrained=None):
    """evaluate.py on the tiny run's backbone (its settings taken from main.py's record): one
    epoch of 3 steps; later flags win."""
    return [str(pre.data), str(pretrained or pre.backbone), '--batch-size', '4', '--epochs', '1',
            '--workers', '0', '--device', 'cpu', '--print-freq', '1', '--checkpoint-dir',
            str(ckdir), *map(str, extra)]


def run(module, argv, capsys):
    """module.main(argv) in this process: (exit status, the lines a user would see on stderr,
    stdout). An exception other than SystemExit propagates: a traceback fails the test."""
    capsys.readouterr()
    code = 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        try:
            module.main(argv)
        except SystemExit as e:
            code = e.code
    out, err = capsys.readouterr()
    message = code if isinstance(code, str) else ''  # Python prints it on stderr
    status = 0 if code is None else 1 if isinstance(code, str) else code
    lines = [line for line in (err + '\n' + message).splitlines() if line.strip()]
    lines += [f'{w.category.__name__}: {w.message}' for w in caught
              if not issubclass(w.category, HIDDEN_WARNINGS)]
    return status, lines, out


def run_script(script, argv, cwd, timeout=300):
    """python SCRIPT ARGV as a user runs it: (exit status, stderr lines, stdout)."""
    done = subprocess.run([sys.executable, str(ROOT / script), *map(str, argv)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, CUDA_VISIBLE_DEVICES='', OMP_NUM_THREADS='1'))
    return done.returncode, done.stderr.splitlines(), done.stdout


def snapshot(root):
    """{path: bytes} of every file under root."""
    return {p: p.read_bytes() for p in sorted(root.rglob('*')) if p.is_file()}


def assert_one_error_line(status, lines, *words, prog=None):
    """A failure as a user should see it: a non-zero exit, exactly one line, no traceback, and
    the words that say what and where."""
    assert status not in (0, None), lines
    assert len(lines) == 1 and not any('Traceback' in line for line in lines), lines
    line = lines[0]
    if prog:
        assert line.startswith(f'{prog}: error'), line
    missing = [w for w in words if w not in line]
    assert not missing, f'{missing} not in: {line}'
    return line
