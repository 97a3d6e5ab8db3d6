"""The path after the first command: what a finished run says, evaluate.py taking main.py's
settings, subset lists of any class names, defaults in --help, workers capped, one-line notes."""
import argparse
import os
import shlex
import shutil
import subprocess
import sys
import types

import pytest
import torch

import bench
import cli
import evaluate
import main
import pack
from conftest import ROOT, make_image_folder
from preemption import RunLock
from test_evaluate import pretrained_outputs


@pytest.fixture(scope='module')
def pre(tmp_path_factory):
    return pretrained_outputs(tmp_path_factory)


def pretrain_argv(pre):
    """The arguments that made `pre` (tests/test_evaluate.py's pretrained_outputs)."""
    return [str(pre.data), '--arch', 'resnet18', '--cifar-stem', '--crop-size', '32',
            '--projector', '32-32', '--batch-size', '4', '--epochs', '1', '--workers', '0',
            '--device', 'cpu', '--checkpoint-dir', str(pre.ckdir), '--print-freq', '1']


def tiny_eval(data, pretrained, ckdir, *extra):
    """evaluate.py with no --arch/--cifar-stem/--crop-size: they come from main.py's record."""
    return [str(data), str(pretrained), '--batch-size', '4', '--epochs', '1', '--workers', '0',
            '--device', 'cpu', '--checkpoint-dir', str(ckdir), *extra]


def snapshot(directory):
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}


# ---------------------------------------------------------------------------------------------
# A finished run
# ---------------------------------------------------------------------------------------------

def test_finished_run_summary_and_rerun_says_complete(pre, tmp_path, capsys, monkeypatch):
    ckdir = tmp_path / 'ck'
    shutil.copytree(pre.ckdir, ckdir)
    argv = pretrain_argv(pre)
    argv[argv.index(str(pre.ckdir))] = str(ckdir)
    before = snapshot(ckdir)
    capsys.readouterr()
    started_in = os.getcwd()  # the summary's commands are for the directory main.py ran in
    assert main.main(argv) is None  # exit status 0
    out = capsys.readouterr().out
    assert f'main.py: the run in {ckdir} is already complete (1 epoch of resnet18 --cifar-stem' \
        in out
    assert snapshot(ckdir) == before  # not even the command line is appended to stats.txt
    assert f'  {ckdir / "resnet18.pth"}  the backbone' in out
    # The summary's commands run as printed: the kNN evaluation, then the hub load.
    knn_line = next(line for line in out.splitlines() if '--knn' in line)
    knn_argv = shlex.split(knn_line.split('#')[0])
    assert knn_argv[:2] == ['python', 'evaluate.py']
    monkeypatch.chdir(tmp_path)
    evaluate.main(knn_argv[2:] + ['--workers', '0', '--device', 'cpu'])
    assert '"knn_top1": {"20": ' in (tmp_path / 'checkpoint' / 'knn' / 'stats.txt').read_text()
    hub_line = next(line for line in out.splitlines() if 'torch.hub.load' in line)
    code = shlex.split(hub_line)[2]
    done = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, CUDA_VISIBLE_DEVICES=''),
                          cwd=started_in)
    assert done.returncode == 0 and done.stdout.strip() == 'ResNet', done.stderr


def test_run_end_prints_what_to_do_next_and_leaves_no_lock(tmp_path, capsys):
    data = make_image_folder(tmp_path / 'data', per_class=2, val_per_class=1, size=16)
    ckdir = tmp_path / 'ck'
    main.main([str(data), '--arch', 'resnet18', '--cifar-stem', '--crop-size', '16',
               '--projector', '16-16', '--batch-size', '4', '--epochs', '1', '--workers', '0',
               '--device', 'cpu', '--checkpoint-dir', str(ckdir), '--no-online-probe'])
    out = capsys.readouterr().out
    assert f'main.py: finished: 1 epoch of resnet18 --cifar-stem, 16 px crops, projector 16-16 ' \
           f'on {data}.' in out
    assert f'python evaluate.py {data} {ckdir / "resnet18.pth"}  # linear probe' in out
    assert sorted(p.name for p in ckdir.iterdir()) == ['checkpoint.pth', 'resnet18.pth',
                                                       'stats.txt']


def test_finished_evaluation_rerun_says_complete(pre, tmp_path, capsys):
    argv = tiny_eval(pre.data, pre.backbone, tmp_path / 'ev')
    evaluate.main(argv)
    before = snapshot(tmp_path / 'ev')
    capsys.readouterr()
    assert evaluate.main(argv) is None
    out = capsys.readouterr().out
    assert f'evaluate.py: the evaluation in {tmp_path / "ev"} is already complete (1 epoch(s), ' \
           f'best top-1 ' in out
    assert snapshot(tmp_path / 'ev') == before


def test_run_lock_file_goes_with_the_run(tmp_path):
    lock = RunLock(tmp_path).acquire()
    with pytest.raises(cli.InputError, match='in use by another run'):
        RunLock(tmp_path).acquire()
    lock.release()
    assert not (tmp_path / '.lock').exists()
    stale = os.open(tmp_path / '.lock', os.O_RDWR | os.O_CREAT)  # a crashed run's file
    RunLock(tmp_path).acquire().release()
    os.close(stale)
    assert not (tmp_path / '.lock').exists()


# ---------------------------------------------------------------------------------------------
# evaluate.py takes main.py's settings
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('which', ['backbone', 'checkpoint'])
def test_evaluate_takes_arch_stem_and_crop_from_the_record(which, pre, tmp_path, capsys):
    pretrained = getattr(pre, which)  # resnet18.pth: from checkpoint.pth beside it
    evaluate.main(tiny_eval(pre.data, pretrained, tmp_path / 'ev'))
    out = capsys.readouterr().out
    assert f'evaluate.py: --arch resnet18 --cifar-stem --crop-size 32, as recorded in ' \
           f'{pre.checkpoint}' in out
    saved = torch.load(tmp_path / 'ev' / 'checkpoint.pth', weights_only=True)['args']
    assert (saved['arch'], saved['cifar_stem'], saved['crop_size']) == ('resnet18', True, 32)


@pytest.mark.parametrize('flags, shown', [(['--arch', 'resnet50'], '--arch resnet50'),
                                          (['--no-cifar-stem'], '--no-cifar-stem')])
def test_evaluate_flag_contradicting_the_record_is_one_line(flags, shown, pre, tmp_path,
                                                             capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(tiny_eval(pre.data, pre.backbone, tmp_path / 'ev', *flags))
    message = str(exit_info.value.code)
    assert message == (f'evaluate.py: error: {pre.backbone} was pretrained with --arch resnet18 '
                       f'--cifar-stem --crop-size 32 (recorded in {pre.checkpoint}), this run '
                       f'has {shown}; drop the flag or pass the same')
    assert not (tmp_path / 'ev').exists()


def test_evaluate_warns_when_the_crop_differs_from_pretraining(pre, tmp_path, capsys):
    evaluate.main(tiny_eval(pre.data, pre.checkpoint, tmp_path / 'ev', '--crop-size', '24',
                            '--knn'))
    captured = capsys.readouterr()
    assert 'evaluate.py: --arch resnet18 --cifar-stem, as recorded in' in captured.out
    assert f'evaluate.py: warning: evaluating at --crop-size 24, but {pre.checkpoint} was ' \
           f'pretrained at 32 px' in captured.err
    assert '"knn_top1"' in (tmp_path / 'ev' / 'stats.txt').read_text()


def test_file_without_a_record_keeps_the_defaults(pre, tmp_path, capsys):
    alone = tmp_path / 'weights.pth'
    shutil.copy(pre.backbone, alone)
    with pytest.raises(SystemExit) as exit_info:  # resnet50 assumed: keys do not match
        evaluate.main(tiny_eval(pre.data, alone, tmp_path / 'ev'))
    assert "(for --arch resnet50) does not match" in str(exit_info.value.code)
    assert 'as recorded' not in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# Subset lists
# ---------------------------------------------------------------------------------------------

def test_class_file_subset_lists_select_classes_with_underscores(pre, tmp_path, capsys):
    data = make_image_folder(tmp_path / 'data', classes=('warm_disc', 'cool_ring'), per_class=5,
                             val_per_class=1, size=32)
    listed = ['warm_disc/warm_disc_0.JPEG', 'cool_ring/cool_ring_3.JPEG']
    (tmp_path / 'list.txt').write_text('\n'.join(listed) + '\n')
    evaluate.main(tiny_eval(data, pre.backbone, tmp_path / 'ev', '--train-percent', '10',
                            '--train-files', str(tmp_path / 'list.txt')))
    out = capsys.readouterr().out
    assert f'subset list {tmp_path / "list.txt"}: 2 images, class/file lines' in out
    assert '2 of 10 train images (20%, --train-percent 10 list)' in out
    steps = [line for line in (tmp_path / 'ev' / 'stats.txt').read_text().splitlines()
             if '"step"' in line]
    assert len(steps) == 1  # 2 images at batch 4: one step, not 3


def test_subset_list_formats_are_one_per_file(tmp_path):
    simclr = tmp_path / 'simclr.txt'
    simclr.write_text('n01440764_10026.JPEG\n')
    names = evaluate.read_subset_list(simclr)
    assert evaluate.subset_list_format(names) == 'SimCLR'
    mixed = tmp_path / 'mixed.txt'
    mixed.write_text('warm_disc/warm_disc_0.JPEG\nn01440764_10026.JPEG\n')
    with pytest.raises(cli.InputError, match="first bad line: 'n01440764_10026.JPEG'"):
        evaluate.read_subset_list(mixed)


# ---------------------------------------------------------------------------------------------
# Arguments, notes and warnings
# ---------------------------------------------------------------------------------------------

def test_demo_with_a_file_for_dir_fails_before_generating(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    target = tmp_path / 'notes.txt'
    target.write_text('mine')
    with pytest.raises(SystemExit) as exit_info:
        main.main([str(target), '--demo'])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (f'main.py: error: --demo writes its dataset to DIR, but '
                                       f'{target} is a file; give a directory, or no DIR for '
                                       f'demo_data (see --help)\n')
    assert sorted(p.name for p in tmp_path.iterdir()) == ['notes.txt']
    assert target.read_text() == 'mine'


def test_demo_data_of_an_earlier_version_is_generated_again_and_user_data_kept(tmp_path):
    import data
    small = dict(per_class=2, val_per_class=1, size=24)
    earlier = make_image_folder(tmp_path / 'earlier', classes=('warm_disc', 'cool_ring'))
    data.make_demo_dataset(earlier, **small)  # the first demo's folder: its classes tell
    assert sorted(p.name for p in (earlier / 'train').iterdir()) == sorted(data.DEMO_SHAPES)
    assert (earlier / data.DEMO_MARK).read_text() == data.DEMO_VERSION
    assert sorted(p.name for p in earlier.iterdir()) == [data.DEMO_MARK, 'train', 'val']
    first = sorted((earlier / 'val').rglob('*.JPEG'))
    data.make_demo_dataset(earlier, **small)  # this version's: used as it is
    assert sorted((earlier / 'val').rglob('*.JPEG')) == first
    (earlier / data.DEMO_MARK).write_text('demo dataset 1\n')  # another version's mark
    (first[0]).unlink()
    data.make_demo_dataset(earlier, **small)
    assert sorted((earlier / 'val').rglob('*.JPEG')) == first
    mine = make_image_folder(tmp_path / 'mine', classes=('class_a', 'class_b'))
    data.make_demo_dataset(mine, **small)  # the user's own data: never touched
    assert sorted(p.name for p in (mine / 'train').iterdir()) == ['class_a', 'class_b']
    assert not (mine / data.DEMO_MARK).exists()


@pytest.mark.parametrize('cpus, workers', [(64, 8), (8, 8), (3, 3), (1, 1)])
def test_default_workers_capped_at_usable_cpus(cpus, workers, monkeypatch, capsys):
    monkeypatch.setattr(cli, 'usable_cpus', lambda: cpus)
    for script in (main, evaluate):
        args = script.parse_arguments(['data', 'x.pth'] if script is evaluate else ['data'])
        assert args.workers == workers
        out = capsys.readouterr().out
        said = f'--workers {cpus}: the default 8 capped at the {cpus} CPU(s)'
        assert (said in out) == (cpus < 8) and out.count('capped') == (cpus < 8)
    assert main.parse_arguments(['data', '--workers', '5']).workers == 5  # given: as given


def test_cpu_run_prints_plain_lines_only(tmp_path):
    """A real run restricted to one CPU, as a user starts it: no Python warning (no source
    lines), DataLoader's worker-count warning avoided by the cap, the CPU said in one line."""
    data = make_image_folder(tmp_path / 'data', per_class=2, val_per_class=1, size=16)
    script = (f'import os, sys; os.sched_setaffinity(0, {{min(os.sched_getaffinity(0))}}); '
              f'sys.argv = ["main.py"] + sys.argv[1:]; sys.path.insert(0, {str(ROOT)!r}); '
              f'import main; main.main()')
    done = subprocess.run(
        [sys.executable, '-c', script, str(data), '--arch', 'resnet18', '--cifar-stem',
         '--crop-size', '16', '--projector', '16-16', '--batch-size', '4', '--epochs', '1',
         '--checkpoint-dir', str(tmp_path / 'ck')],
        capture_output=True, text=True, timeout=300,
        env=dict(os.environ, CUDA_VISIBLE_DEVICES='', OMP_NUM_THREADS='1'))
    assert done.returncode == 0, done.stderr
    assert done.stdout.count('--workers 1: the default 8 capped at the 1 CPU(s)') == 1
    errors = [line for line in done.stderr.splitlines() if not line.startswith('epoch 1/1 ')]
    assert errors == ['note: no CUDA GPU found: running on the CPU in a single process (slow); '
                      'pass --device cpu to choose this explicitly']


def option_helps(parser):
    """{option: its --help text} as the parser's formatter writes it."""
    formatter = parser._get_formatter()
    return {action.option_strings[-1]: formatter._get_help_string(action) % vars(action)
            for action in parser._actions
            if action.option_strings and action.help is not argparse.SUPPRESS}


@pytest.mark.parametrize('script', [main, evaluate, pack, bench])
def test_help_gives_every_default(script):
    helps = option_helps(script.get_arguments())
    helps.pop('--help')
    undocumented = sorted(k for k, text in helps.items() if 'default' not in text)
    assert undocumented == []
    assert all(text.strip() for text in helps.values())


def test_help_shows_reference_defaults():
    text = main.get_arguments().format_help()
    for shown in ('(default: 1000)', '(default: 2048)', '(default: 8192-8192-8192)',
                  '(default: 0.0051)', '(default: 8, capped at'):
        assert shown in ' '.join(text.split())
    assert '(default: 100)' in ' '.join(evaluate.get_arguments().format_help().split())


def test_bench_says_what_it_does_before_compiling(capsys):
    args = types.SimpleNamespace(steps=3, warmup=1)
    bench.announce(args, 'fast')
    err = capsys.readouterr().err
    assert err == ('bench.py: fast: 1 untimed step (torch.compile compiles the model there: '
                   'minutes on a CPU), then 3 timed\n')
