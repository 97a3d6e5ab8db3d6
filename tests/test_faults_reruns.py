"""A rerun does what it says. For each script that resumes, and each setting a rerun may change:

    main.py       epoch-end checkpoint: settings may change, apply from the resumed step on, and
                  are named with the learning rate that follows; mid-epoch: the data order is
                  refused (tests/test_bad_input.py); the model's shape is refused
    evaluate.py   linear probe / fine-tuning: the same, the cosine laid over the new --epochs;
                  another backbone is refused, and mid-epoch another data order
    --knn         nothing to resume: runs again and adds its line (test_faults_shared_dirs.py)
    --fast-linear the same fit runs again and replaces linear.pth, saying so; another refused
    pack.py       continues from its last commit; another source is refused (tests/test_pack.py)
"""
import json
import math
import shutil

import pytest
import torch

import evaluate
import main
from faultcheck import one_thread, pre  # noqa: F401 - fixtures
from faultcheck import (assert_one_error_line, eval_argv, main_argv, run,
                        snapshot)


@pytest.fixture(scope='module')
def probe(pre, tmp_path_factory):
    """A finished 1-epoch linear probe on the tiny backbone (copied by the tests that go on)."""
    ckdir = tmp_path_factory.mktemp('probe') / 'lincls'
    assert evaluate.main(eval_argv(pre, ckdir)) is None
    return ckdir


def epoch_lines(ckdir):
    lines = (ckdir / 'stats.txt').read_text().splitlines()
    return [json.loads(line) for line in lines if line.startswith('{') and 'acc1' in line]


def load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def test_probe_rerun_with_more_epochs_lays_the_cosine_over_them(pre, probe, tmp_path, capsys):
    ckdir = tmp_path / 'lincls'
    shutil.copytree(probe, ckdir)
    status, _, out = run(evaluate, eval_argv(pre, ckdir, '--epochs', 4), capsys)
    assert status == 0
    assert f'note: resuming {ckdir / "checkpoint.pth"} at epoch 1 with settings changed since ' \
           f'it was written, which apply from here on: --epochs 1 then, 4 now; the cosine ' \
           f'schedule is laid over --epochs 4 from these rates: learning rate of this epoch ' \
           f'classifier 0 -> 0.2561' in out
    rates = [e['lr_classifier'] for e in epoch_lines(ckdir)]
    # as a 4-epoch probe from the start would have had them: never 0 in between, no restart
    assert rates == pytest.approx([0.3 * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(4)])
    assert load(ckdir / 'checkpoint.pth')['scheduler']['T_max'] == 4


def test_probe_rerun_with_another_rate_and_weight_decay_uses_them(pre, probe, tmp_path, capsys):
    ckdir = tmp_path / 'lincls'
    shutil.copytree(probe, ckdir)
    argv = eval_argv(pre, ckdir, '--epochs', 2, '--lr-classifier', 0.1, '--weight-decay', 0.001)
    status, _, out = run(evaluate, argv, capsys)
    assert status == 0
    assert '--epochs 1 then, 2 now; --lr-classifier 0.3 then, 0.1 now; --weight-decay 1e-06 ' \
           'then, 0.001 now' in out
    assert '--epochs 2 from these rates: learning rate of this epoch classifier 0 -> 0.05' in out
    assert [e['lr_classifier'] for e in epoch_lines(ckdir)] == pytest.approx([0.3, 0.05])
    groups = load(ckdir / 'checkpoint.pth')['optimizer']['param_groups']
    assert [g['weight_decay'] for g in groups] == [0.001]


def test_rerun_with_the_same_settings_says_nothing_changed(pre, probe, tmp_path, capsys):
    ckdir = tmp_path / 'lincls'
    shutil.copytree(probe, ckdir)
    status, _, out = run(evaluate, eval_argv(pre, ckdir), capsys)
    assert status == 0 and 'already complete' in out and 'note: resuming' not in out


def test_finetune_resumed_on_other_pretrained_weights_is_refused(pre, tmp_path, capsys):
    ckdir = tmp_path / 'finetune'
    argv = eval_argv(pre, ckdir, '--weights', 'finetune', '--lr-backbone', '0.01')
    assert run(evaluate, argv, capsys)[0] == 0
    other = tmp_path / 'other' / 'resnet18.pth'  # same file name, other weights
    other.parent.mkdir()
    shutil.copy(pre.checkpoint, other.parent / 'checkpoint.pth')  # the record of the settings
    state = load(pre.backbone)
    state['conv1.weight'] = state['conv1.weight'] * 2
    torch.save(state, other)
    before = snapshot(ckdir)
    status, lines, _ = run(evaluate, eval_argv(pre, ckdir, '--weights', 'finetune',
                                               '--lr-backbone', '0.01', '--epochs', 2,
                                               pretrained=other), capsys)
    assert_one_error_line(status, lines, 'checkpoint.pth was trained from other pretrained '
                          'weights', str(other), 'use another --checkpoint-dir')
    assert snapshot(ckdir) == before


def test_mid_epoch_probe_checkpoint_refuses_another_batch_size(pre, probe, tmp_path, capsys):
    ckdir = tmp_path / 'lincls'
    shutil.copytree(probe, ckdir)
    ckpt = load(ckdir / 'checkpoint.pth')
    ckpt.update(epoch=0, step_in_epoch=1)  # as if stopped by a signal after step 1
    torch.save(ckpt, ckdir / 'checkpoint.pth')
    before = snapshot(ckdir)
    status, lines, _ = run(evaluate, eval_argv(pre, ckdir, '--batch-size', 2), capsys)
    assert_one_error_line(status, lines, 'stopped at step 1 of epoch 0',
                          '--batch-size 4 then, 2 now', 'resume with the same settings')
    assert snapshot(ckdir) == before


def test_main_rerun_names_what_changed_and_uses_it(pre, tmp_path, capsys):
    ckdir = tmp_path / 'pre'
    shutil.copytree(pre.ckdir, ckdir)
    argv = main_argv(pre.data, ckdir, '--epochs', 2, '--weight-decay', 1e-4, '--lars-eta',
                     0.002)
    status, _, out = run(main, argv, capsys)
    assert status == 0
    note = next(line for line in out.splitlines() if line.startswith('note: resuming'))
    assert note.startswith(f'note: resuming {ckdir / "checkpoint.pth"} at epoch 1, step 0 of '
                           f'the epoch, with settings changed since it was written, which apply '
                           f'from here on: --epochs 1 then, 2 now; --weight-decay 1e-06 then, '
                           f'0.0001 now; --lars-eta 0.001 then, 0.002 now; the learning-rate '
                           f'schedule follows them: the weights\' rate (lr_weights) goes from ')
    steps = [json.loads(line) for line in (ckdir / 'stats.txt').read_text().splitlines()
             if line.startswith('{') and '"step"' in line]
    last, nxt = steps[2]['lr_weights'], steps[3]['lr_weights']
    assert note.endswith(f'from {last:.4g} at the last step trained to {nxt:.4g} at the next')
    groups = load(ckdir / 'checkpoint.pth')['optimizer']['param_groups']
    assert {(g['weight_decay'], g['eta']) for g in groups} == {(1e-4, 0.002)}


def test_reference_checkpoint_keeps_its_weight_decay_on_resume(pre, tmp_path, capsys):
    # the reference's checkpoint records no flags: its optimizer's values stay, as there
    ckdir = tmp_path / 'pre'
    shutil.copytree(pre.ckdir, ckdir)
    ckpt = load(ckdir / 'checkpoint.pth')
    for group in ckpt['optimizer']['param_groups']:
        group['weight_decay'] = 1.5e-6
    torch.save({k: ckpt[k] for k in ('epoch', 'model', 'optimizer')}, ckdir / 'checkpoint.pth')
    (ckdir / 'resnet18.pth').unlink()
    assert run(main, main_argv(pre.data, ckdir, '--epochs', 2), capsys)[0] == 0
    groups = load(ckdir / 'checkpoint.pth')['optimizer']['param_groups']
    assert {g['weight_decay'] for g in groups} == {1.5e-6}


def test_main_rerun_with_fewer_epochs_than_trained_is_refused(pre, tmp_path, capsys):
    # a 2-epoch checkpoint whose backbone was not exported yet: a rerun with --epochs 1 would
    # train nothing and export the 2-epoch network as a 1-epoch run's
    ckdir = tmp_path / 'pre'
    shutil.copytree(pre.ckdir, ckdir)
    assert run(main, main_argv(pre.data, ckdir, '--epochs', 2), capsys)[0] == 0
    (ckdir / 'resnet18.pth').unlink()
    before = snapshot(ckdir)
    status, lines, _ = run(main, main_argv(pre.data, ckdir, '--epochs', 1), capsys)
    assert_one_error_line(status, lines, str(ckdir / 'checkpoint.pth'), 'trained 2 epoch(s)',
                          'past --epochs 1', '--epochs 2 or more')
    assert snapshot(ckdir) == before


def test_fast_linear_rerun_fits_again_or_refuses(pre, tmp_path, capsys):
    ckdir = tmp_path / 'fast'
    argv = eval_argv(pre, ckdir, '--fast-linear', '--lbfgs-steps', 5)
    assert run(evaluate, argv, capsys)[0] == 0
    status, _, out = run(evaluate, argv, capsys)
    assert status == 0
    assert f'{ckdir / "linear.pth"} was fitted with the same settings; fitting again, it will ' \
           f'be replaced' in out
    assert sum('"fast_linear"' in line for line in (ckdir / 'stats.txt').read_text()
               .splitlines()) == 2
    before = snapshot(ckdir)
    status, lines, _ = run(evaluate, argv + ['--weight-decay', '0.01'], capsys)
    assert_one_error_line(status, lines, 'linear.pth was fitted with other settings',
                          '--weight-decay 1e-06 then, 0.01 now', 'use another --checkpoint-dir')
    assert snapshot(ckdir) == before
