"""Preemption, crashes and broken storage lose nothing (main.py on CPU)."""
import errno
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

import cli
import main
import preemption
import ranks
from conftest import ROOT, SimulatedKill
from test_main import assert_same_tensors, crash_at_step, load_state, read_stats, tiny_args


def test_parse_duration():
    assert cli.parse_duration('30m') == 1800
    assert cli.parse_duration('2h') == 7200
    assert cli.parse_duration('1.5h') == 5400
    assert cli.parse_duration('45') == 45
    with pytest.raises(ValueError):
        cli.parse_duration('soon')


def test_mid_epoch_checkpoint_resumes_exactly(tiny_imagefolder, tmp_path, monkeypatch):
    straight, broken = tmp_path / 'straight', tmp_path / 'broken'
    main.main(tiny_args(tiny_imagefolder, straight, epochs=3))
    with monkeypatch.context() as m:
        crash_at_step(m, 5)  # epoch 1 has run steps 3 and 4
        with pytest.raises(SimulatedKill):
            main.main(tiny_args(tiny_imagefolder, broken, '--checkpoint-every', '0s', epochs=3))
    ckpt = load_state(broken / 'checkpoint.pth')
    assert (ckpt['epoch'], ckpt['step_in_epoch']) == (1, 2)
    # resumed with another worker count: the views depend only on (seed, epoch, sample)
    main.main(tiny_args(tiny_imagefolder, broken, epochs=3, workers=2))
    _, stats = read_stats(broken)
    assert [s['step'] for s in stats] == [0, 1, 2, 3, 4, 5, 6, 7, 8]  # nothing ran twice
    assert_same_tensors(load_state(straight / 'resnet18.pth'), load_state(broken / 'resnet18.pth'))


def start(data, ckdir, *extra, epochs):
    return subprocess.Popen([sys.executable, str(ROOT / 'main.py'),
                             *tiny_args(data, ckdir, *extra, epochs=epochs)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for(condition, proc, timeout=120):
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None:
            return False
        if time.time() > deadline:
            proc.kill()
            raise AssertionError('timed out')
        time.sleep(0.005)
    return True


def logged_steps(ckdir):
    path = ckdir / 'stats.txt'
    return path.read_text().count('"step"') if path.exists() else 0


def test_sigterm_saves_and_run_resumes_mid_epoch(tiny_imagefolder, tmp_path):
    straight, stopped = tmp_path / 'straight', tmp_path / 'stopped'
    main.main(tiny_args(tiny_imagefolder, straight, epochs=4))
    proc = start(tiny_imagefolder, stopped, epochs=4)
    assert wait_for(lambda: logged_steps(stopped) >= 5, proc), proc.stderr.read()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert 'stopped by signal' in err and 'checkpoint saved' in err
    ckpt = load_state(stopped / 'checkpoint.pth')
    done = ckpt['epoch'] * 3 + ckpt['step_in_epoch']
    assert 5 <= done < 12, (ckpt['epoch'], ckpt['step_in_epoch'])
    assert not (stopped / 'resnet18.pth').exists()
    main.main(tiny_args(tiny_imagefolder, stopped, epochs=4))
    assert_same_tensors(load_state(straight / 'resnet18.pth'), load_state(stopped / 'resnet18.pth'))


def test_sigkill_at_random_moments_never_loses_the_run(tiny_imagefolder, tmp_path):
    """Six SIGKILLs (three during a checkpoint write), resumed each time: same final weights."""
    straight, killed = tmp_path / 'straight', tmp_path / 'killed'
    epochs = 6  # 18 steps; a checkpoint after every step
    main.main(tiny_args(tiny_imagefolder, straight, epochs=epochs))
    rng = random.Random(1)
    kills, kills_during_write = 0, 0
    while kills < 6:
        proc = start(tiny_imagefolder, killed, '--checkpoint-every', '0s', epochs=epochs)
        if kills % 2 == 1:  # kill while a checkpoint is being written
            writing = lambda: any(p.name.startswith('.checkpoint.pth.tmp') for p in killed.iterdir())
            alive = wait_for(lambda: killed.exists() and writing(), proc)
            kills_during_write += alive
        else:  # kill after the next logged step, at a random moment
            before = logged_steps(killed)
            alive = wait_for(lambda: logged_steps(killed) > before, proc)
            time.sleep(rng.uniform(0, 0.3))
        proc.kill()
        proc.wait()
        assert alive or proc.returncode == 0, proc.stderr.read()
        kills += 1
        if (killed / 'checkpoint.pth').exists():
            ckpt = load_state(killed / 'checkpoint.pth')  # never corrupt
            assert ckpt['epoch'] < epochs, 'the run finished before six kills'
    assert kills_during_write >= 3
    main.main(tiny_args(tiny_imagefolder, killed, epochs=epochs))
    assert_same_tensors(load_state(straight / 'resnet18.pth'), load_state(killed / 'resnet18.pth'))
    # temporary files of writes cut short are cleared by the next run
    assert [p.name for p in killed.iterdir() if '.tmp-' in p.name] == []


def test_second_run_on_same_directory_is_refused(tiny_imagefolder, tmp_path, capsys):
    ckdir = tmp_path / 'ck'
    other = preemption.RunLock(ckdir).acquire()
    try:
        with pytest.raises(SystemExit) as exit_info:
            main.main(tiny_args(tiny_imagefolder, ckdir, epochs=1))
    finally:
        other.release()
    assert exit_info.value.code == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and 'in use by another run' in err[0] and f'pid {os.getpid()}' in err[0]
    assert not (ckdir / 'stats.txt').exists()
    main.main(tiny_args(tiny_imagefolder, ckdir, epochs=1))  # free again once released
    assert (ckdir / 'resnet18.pth').exists()


def test_disk_full_keeps_previous_checkpoint(tiny_imagefolder, tmp_path, monkeypatch, capsys):
    ckdir = tmp_path / 'ck'
    main.main(tiny_args(tiny_imagefolder, ckdir, epochs=1))
    before = (ckdir / 'checkpoint.pth').read_bytes()
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)  # write the bytes, then fail as a full disk would
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(main.torch, 'save', full_disk)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main.main(tiny_args(tiny_imagefolder, ckdir, epochs=2))
    assert exit_info.value.code == 1
    err = [line for line in capsys.readouterr().err.splitlines() if 'error' in line]
    assert len(err) == 1 and 'No space left on device' in err[0] and 'unchanged' in err[0]
    assert (ckdir / 'checkpoint.pth').read_bytes() == before
    assert [p.name for p in ckdir.iterdir() if 'tmp' in p.name] == []


def test_skip_bad_images_counts_them(tiny_imagefolder, tmp_path, capsys):
    bad = tiny_imagefolder / 'train' / 'class_b' / 'class_b_3.JPEG'
    bad.write_bytes(bad.read_bytes()[:200])
    main.main(tiny_args(tiny_imagefolder, tmp_path / 'ck', '--bad-images', 'skip', epochs=2))
    err = capsys.readouterr().err
    assert err.count('skipping: cannot read image') == 2 and 'class_b_3.JPEG' in err
    assert 'epoch 0: skipped 1 unreadable image(s)' in err
    assert 'epoch 1: skipped 1 unreadable image(s)' in err
    assert (tmp_path / 'ck' / 'resnet18.pth').exists()


def poison_loss(monkeypatch, from_call, while_lr_scale=1.0, until_call=None):
    """The loss turns NaN from its `from_call`-th computation on (0-based; up to, not including,
    `until_call`), as long as the run's learning rates are at `while_lr_scale` of the schedule
    (None: whatever they are)."""
    calls = []
    original = main.BarlowTwins.loss

    def loss(self, z1, z2):
        value = original(self, z1, z2)
        calls.append(None)
        poisoned = from_call < len(calls) <= (until_call or len(calls)) and \
            (while_lr_scale is None or self.args.lr_scale == while_lr_scale)
        return value * float('nan') if poisoned else value

    monkeypatch.setattr(main.BarlowTwins, 'loss', loss)


def test_rollback_continues_from_the_last_checkpoint_with_lower_rates(tiny_imagefolder, tmp_path,
                                                                     monkeypatch, capsys):
    ckdir = tmp_path / 'ck'
    with monkeypatch.context() as m:
        poison_loss(m, from_call=4)  # step 4: epoch 1 (3 steps per epoch), its second step
        main.main(tiny_args(tiny_imagefolder, ckdir, '--rollbacks', '2', epochs=3))
    err = capsys.readouterr().err
    assert 'non-finite loss at step 4: rolled back to' in err and '(epoch 1, step 0' in err
    assert 'x0.5 of the schedule (rollback 1 of at most 2)' in err
    lines, stats = read_stats(ckdir)
    assert any(line.startswith('non-finite loss at step 4: rolled back') for line in lines)
    # step 3 ran, step 4 diverged (not logged), then epoch 1 again from its first step
    assert [s['step'] for s in stats] == [0, 1, 2, 3, 3, 4, 5, 6, 7, 8]
    first, again = stats[3], stats[4]
    assert again['lr_weights'] == pytest.approx(0.5 * first['lr_weights'])
    assert again['lr_biases'] == pytest.approx(0.5 * first['lr_biases'])
    assert again['loss'] == first['loss']  # same weights, same samples and views
    ckpt = load_state(ckdir / 'checkpoint.pth')
    assert (ckpt['epoch'], ckpt['lr_scale'], ckpt['rollbacks_done']) == (3, 0.5, 1)
    # a resumed run keeps the lowered rates: one more epoch
    main.main(tiny_args(tiny_imagefolder, ckdir, '--rollbacks', '2', epochs=4))
    _, stats = read_stats(ckdir)
    schedule = main.learning_rate_schedule(9, 3, 4, 4, warmup_epochs=1)
    assert stats[-3]['step'] == 9 and stats[-3]['lr_weights'] == pytest.approx(0.5 * 0.2 * schedule)


def test_rollback_before_the_first_checkpoint_and_when_used_up(tiny_imagefolder, tmp_path,
                                                              monkeypatch, capsys):
    ckdir = tmp_path / 'ck'
    with monkeypatch.context() as m:
        poison_loss(m, from_call=1, while_lr_scale=None)  # diverges at step 1, every time
        with pytest.raises(SystemExit) as exit_info:
            main.main(tiny_args(tiny_imagefolder, ckdir, '--rollbacks', '2',
                                '--rollback-lr-factor', '0.1', epochs=2))
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    # a checkpoint of the initial state was written to go back to; after the first rollback
    # every loss is poisoned, from step 0 on
    assert err.count(': rolled back to') == 2
    assert 'non-finite loss at step 1: rolled back' in err
    assert 'non-finite loss at step 0: rolled back' in err
    assert '(epoch 0, step 0 of the epoch)' in err
    assert 'x0.1 of the schedule (rollback 1' in err and 'x0.01 of the schedule (rollback 2' in err
    assert err.strip().splitlines()[-1].endswith(
        'non-finite loss at step 0; stopping without saving, the last good checkpoint in '
        f'{ckdir} is unchanged (try a lower learning rate or --precision fp32) '
        '(after 2 rollback(s), the most --rollbacks allows)')
    ckpt = load_state(ckdir / 'checkpoint.pth')
    # the initial weights, with the rates and count of the last rollback
    assert (ckpt['epoch'], ckpt['step_in_epoch'], ckpt['rollbacks_done']) == (0, 0, 2)
    assert ckpt['lr_scale'] == pytest.approx(0.01)


@pytest.mark.parametrize('flag, value', [('--rollbacks', '-1'), ('--rollback-lr-factor', '1'),
                                         ('--rollback-lr-factor', '0'),
                                         ('--rollback-lr-factor', 'half')])
def test_rollback_flags_refuse_bad_values(tiny_imagefolder, tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as exit_info:
        main.main(tiny_args(tiny_imagefolder, tmp_path / 'ck', flag, value))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flag in err[0] and value in err[0]


def test_two_processes_roll_back_together(tiny_imagefolder, tmp_path):
    from test_main import _two_process_worker
    port = ranks.free_port()
    ckdir = tmp_path / 'ck'
    # absurd rates diverge within a few steps; one rollback brings them to 0.2 x the schedule
    argv = tiny_args(tiny_imagefolder, ckdir, '--learning-rate-weights', '2e30',
                     '--learning-rate-biases', '2e30', '--warmup-epochs', '0', '--rollbacks', '1',
                     '--rollback-lr-factor', '1e-31')
    ranks.spawn(_two_process_worker, (port, argv))
    lines, stats = read_stats(ckdir)
    notes = [line for line in lines if ': rolled back to' in line]
    assert len(notes) == 1 and '(epoch 0, step 0 of the epoch)' in notes[0]  # rank 0 only
    steps = [s['step'] for s in stats]
    assert steps[-6:] == list(range(6))  # the whole run again from the initial checkpoint
    assert all(s['lr_weights'] == pytest.approx(0.2 * main.learning_rate_schedule(
        s['step'], 3, 2, 4, warmup_epochs=0)) for s in stats[-6:])
    ckpt = load_state(ckdir / 'checkpoint.pth')
    assert (ckpt['epoch'], ckpt['rollbacks_done']) == (2, 1)
    assert ckpt['lr_scale'] == pytest.approx(1e-31)


def poison_weights(monkeypatch, at_call):
    """The `at_call`-th LARS step (0-based) leaves a NaN in the first weight, the loss of that
    step being finite, as long as the learning rates are at full scale."""
    calls = []
    original = main.LARS.step

    def step(self, closure=None):
        result = original(self, closure)
        calls.append(None)
        if len(calls) == at_call + 1:
            self.param_groups[0]['params'][0].data.view(-1)[0] = float('nan')
        return result

    monkeypatch.setattr(main.LARS, 'step', step)


def test_non_finite_weights_are_never_checkpointed(tiny_imagefolder, tmp_path, monkeypatch,
                                                   capsys):
    ckdir = tmp_path / 'ck'
    with monkeypatch.context() as m:
        poison_weights(m, at_call=2)  # the last step of epoch 0: every loss in it was finite
        with pytest.raises(SystemExit) as exit_info:
            main.main(tiny_args(tiny_imagefolder, ckdir, epochs=2))
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith('non-finite weights after step 2; stopping without saving, the last '
                            f'good checkpoint in {ckdir} is unchanged (try a lower learning '
                            'rate, --rollbacks or --precision fp32)')
    assert not (ckdir / 'checkpoint.pth').exists()
    # with --rollbacks: back to the initial state, which the run wrote first
    with monkeypatch.context() as m:
        poison_weights(m, at_call=2)
        main.main(tiny_args(tiny_imagefolder, ckdir, '--rollbacks', '1', epochs=2))
    lines, stats = read_stats(ckdir)
    assert any(line.startswith('non-finite weights after step 2: rolled back to') and
               '(epoch 0, step 0 of the epoch)' in line for line in lines)
    assert [s['step'] for s in stats][-6:] == list(range(6))
    ckpt = load_state(ckdir / 'checkpoint.pth')
    assert all(torch.isfinite(v).all() for v in ckpt['model'].values() if v.is_floating_point())
    assert (ckpt['epoch'], ckpt['lr_scale'], ckpt['rollbacks_done']) == (2, 0.5, 1)


def test_rollback_rewrites_the_checkpoint_with_the_new_rates(tiny_imagefolder, tmp_path,
                                                            monkeypatch):
    # a crash right after a rollback must not resume at the old rates with the count reset
    ckdir = tmp_path / 'ck'
    roll_back = main.roll_back

    def roll_back_then_crash(run, error):
        roll_back(run, error)
        raise SimulatedKill

    with monkeypatch.context() as m:
        poison_loss(m, from_call=4)
        m.setattr(main, 'roll_back', roll_back_then_crash)
        with pytest.raises(SimulatedKill):
            main.main(tiny_args(tiny_imagefolder, ckdir, '--rollbacks', '3', epochs=3))
    ckpt = load_state(ckdir / 'checkpoint.pth')
    assert (ckpt['epoch'], ckpt['step_in_epoch'], ckpt['lr_scale'], ckpt['rollbacks_done']) == \
        (1, 0, 0.5, 1)


def _agree_worker(rank, port, out):
    with ranks.group(rank, port):
        stop = preemption.StopRequests(2)
        try:
            results = [stop.agreed(due=rank == 1), stop.agreed(due=False)]
        finally:
            stop.close()
    (out / f'rank{rank}').write_text(repr(results))


def test_ranks_agree_on_a_checkpoint_that_one_of_them_finds_due(tmp_path):
    # each rank's clock decides on its own; all must then checkpoint (and check) at one step
    ranks.spawn(_agree_worker, (ranks.free_port(), tmp_path))
    for rank in (0, 1):
        assert (tmp_path / f'rank{rank}').read_text() == repr([(0, True), (0, False)])



def small_initial_scale(monkeypatch):
    """A gradient scaler starting at 2**4: the default 2**16 makes this tiny model's fp16
    gradients overflow in the first steps (skipped too, but not by the test's choice)."""
    real = torch.amp.GradScaler
    monkeypatch.setattr(main.torch.amp, 'GradScaler',
                        lambda *args, **kwargs: real(*args, init_scale=2.0 ** 4, **kwargs))


def test_fp16_scaler_skips_non_finite_steps_and_goes_on(tiny_imagefolder, tmp_path, monkeypatch):
    # the reference's GradScaler skips an update whose loss or gradients are not finite, and
    # the run continues; the skipped updates are counted per logging interval
    ckdir = tmp_path / 'ck'
    small_initial_scale(monkeypatch)
    with monkeypatch.context() as m:
        poison_loss(m, from_call=2, until_call=4)  # steps 2 and 3
        main.main(tiny_args(tiny_imagefolder, ckdir, '--precision', 'fp16', '--print-freq', '2'))
    lines, stats = read_stats(ckdir)
    assert not any('non-finite' in line for line in lines)
    assert [s['step'] for s in stats] == [0, 2, 4]
    # step 2's update counts in the line of step 2, step 3's in that of step 4
    assert [s['skipped_steps'] for s in stats] == [0, 1, 1]
    ckpt = load_state(ckdir / 'checkpoint.pth')
    assert ckpt['epoch'] == 2 and ckpt['scaler']['scale'] == 2.0 ** 4 / 2 ** 2
    assert (ckdir / 'resnet18.pth').exists()


def test_fp16_scaler_stops_after_too_many_skipped_steps_in_a_row(tiny_imagefolder, tmp_path,
                                                                 monkeypatch, capsys):
    ckdir = tmp_path / 'ck'
    small_initial_scale(monkeypatch)
    monkeypatch.setattr(main, 'SKIPPED_STEPS_LIMIT', 2)
    # the GradScaler of --precision fp16 on fp32 arithmetic: what is checked here is how skipped
    # steps are counted, stopped on and rolled back, and fp16 autocast on this CPU costs 13x an
    # fp32 step (3.3 s against 0.25 s for ResNet-18 on 8 images); the test above runs it for real
    monkeypatch.setattr(main, 'AUTOCAST_DTYPES', {})
    argv = tiny_args(tiny_imagefolder, ckdir, '--precision', 'fp16', epochs=1)
    with monkeypatch.context() as m:
        poison_loss(m, from_call=1)  # every step from step 1 on
        with pytest.raises(SystemExit) as exit_info:
            main.main(argv)
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        'non-finite loss or gradients in 2 skipped steps in a row, up to step 2; stopping '
        f'without saving, the last good checkpoint in {ckdir} is unchanged (try a lower '
        'learning rate, --rollbacks or --precision fp32)')
    assert not (ckdir / 'checkpoint.pth').exists()
    # --rollbacks keeps its meaning: back to the last checkpoint (here the initial state)
    (ckdir / 'stats.txt').unlink()
    with monkeypatch.context() as m:
        poison_loss(m, from_call=1)  # at full rates only
        main.main(argv + ['--rollbacks', '1'])
    lines, stats = read_stats(ckdir)
    notes = [line for line in lines if ': rolled back to' in line]
    assert len(notes) == 1 and notes[0].startswith(
        'non-finite loss or gradients in 2 skipped steps in a row, up to step 2: rolled back')
    # step 1 was skipped, logged, and the run went on to step 2
    assert [(s['step'], s['skipped_steps']) for s in stats] == \
        [(0, 0), (1, 1), (0, 0), (1, 0), (2, 0)]
    ckpt = load_state(ckdir / 'checkpoint.pth')
    assert (ckpt['epoch'], ckpt['lr_scale'], ckpt['rollbacks_done']) == (1, 0.5, 1)

def test_fp32_stops_at_the_first_non_finite_loss(tiny_imagefolder, tmp_path, monkeypatch,
                                                 capsys):
    # no scaler: the update of a non-finite loss was applied, the weights are gone
    ckdir = tmp_path / 'ck'
    with monkeypatch.context() as m:
        poison_loss(m, from_call=1, until_call=2)
        with pytest.raises(SystemExit):
            main.main(tiny_args(tiny_imagefolder, ckdir, epochs=1))
    assert 'non-finite loss at step 1; stopping' in capsys.readouterr().err
    lines, stats = read_stats(ckdir)
    assert all('skipped_steps' not in s for s in stats)
