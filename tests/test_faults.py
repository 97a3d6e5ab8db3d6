"""Real faults, made on this machine rather than monkeypatched: full disks (a small tmpfs that
the test mounts, so it needs root), truncated and odd files, signals to a process group."""
import errno
import os
import shutil
import signal
import subprocess
import sys
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoints
import data
import main
import monitor
import preemption
from cli import InputError
from conftest import ROOT, make_image_folder
from test_main import load_state, read_stats, tiny_args
from test_reliability import logged_steps, wait_for


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size) -> a fresh directory on a tmpfs of that size, unmounted afterwards."""
    mounted = []

    def mount(size):
        if os.geteuid() != 0:
            pytest.skip('mounting a tmpfs (a real full disk) needs root')
        where = tmp_path / f'tmpfs{len(mounted)}'
        where.mkdir()
        done = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(where)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f'cannot mount a tmpfs here: {done.stderr.strip()}')
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(['umount', '-l', str(where)], check=False)


def fill(directory, leave=0):
    """Fill the file system of `directory` until writes fail, then free `leave` bytes."""
    filler = directory / 'filler'
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        while True:
            os.write(fd, b'\0' * 65536)
    except OSError as e:
        assert e.errno == errno.ENOSPC
    try:
        os.ftruncate(fd, max(0, os.fstat(fd).st_size - leave))
    finally:
        os.close(fd)
    return filler


def error_lines(stderr):
    return [line for line in stderr.splitlines() if 'error' in line.lower()]


def test_save_atomic_on_a_full_disk_keeps_the_previous_file(tmpfs):
    disk = tmpfs('8m')
    path = disk / 'checkpoint.pth'
    checkpoints.save_atomic({'x': torch.arange(10)}, path)
    before = path.read_bytes()
    fill(disk)
    with pytest.raises(InputError) as caught:  # torch.save raises RuntimeError here, not OSError
        checkpoints.save_atomic({'x': torch.zeros(1 << 20)}, path)
    message = str(caught.value)
    assert '\n' not in message and 'No space left on device' in message and 'unchanged' in message
    assert path.read_bytes() == before
    assert sorted(p.name for p in disk.iterdir()) == ['checkpoint.pth', 'filler']


def test_run_lock_on_a_full_disk_leaves_no_lock_file(tmpfs):
    disk = tmpfs('1m')
    fill(disk)
    with pytest.raises(InputError, match='No space left on device'):
        preemption.RunLock(disk / 'ck').acquire()
    assert not (disk / 'ck' / '.lock').exists()


def test_stats_log_on_a_full_disk_is_one_line(tmpfs):
    disk = tmpfs('1m')
    fill(disk)
    with pytest.raises(InputError, match='stats.txt: No space left on device'):
        log = monitor.StatsLog(disk / 'stats.txt', 'main.py x', enabled=True)
        log.write({'loss': 1.0, 'text': 'x' * 100000}, 0)


def run_main(*argv):
    return subprocess.run([sys.executable, str(ROOT / 'main.py'), *map(str, argv)],
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, CUDA_VISIBLE_DEVICES='', OMP_NUM_THREADS='1'))


def test_main_on_a_full_disk_exits_with_one_line_and_keeps_the_checkpoint(tiny_imagefolder, tmpfs):
    ckdir = tmpfs('256m') / 'ck'
    done = run_main(*tiny_args(tiny_imagefolder, ckdir, epochs=1))
    assert done.returncode == 0, done.stderr
    before = (ckdir / 'checkpoint.pth').read_bytes()
    fill(ckdir, leave=256 << 10)  # room for the log lines, not for another checkpoint
    done = run_main(*tiny_args(tiny_imagefolder, ckdir, epochs=2))
    assert done.returncode == 1
    assert 'Traceback' not in done.stderr, done.stderr
    lines = error_lines(done.stderr)
    assert len(lines) == 1 and 'checkpoint.pth' in lines[0] and 'No space left' in lines[0], lines
    assert (ckdir / 'checkpoint.pth').read_bytes() == before
    assert [p.name for p in ckdir.iterdir() if '.tmp-' in p.name] == []


def test_main_with_a_fresh_checkpoint_dir_on_a_full_disk(tiny_imagefolder, tmpfs):
    disk = tmpfs('1m')
    fill(disk)
    done = run_main(*tiny_args(tiny_imagefolder, disk / 'ck', epochs=1))
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and 'No space left on device' in lines[0], lines
    assert not (disk / 'ck' / '.lock').exists()


# ---------------------------------------------------------------------------------------------
# Signals to the whole process group (scancel, SLURM time limits, Ctrl-C)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT])
def test_signal_to_the_process_group_checkpoints_and_exits_cleanly(tiny_imagefolder, tmp_path,
                                                                   signum):
    ckdir = tmp_path / 'ck'
    proc = subprocess.Popen([sys.executable, str(ROOT / 'main.py'),
                             *tiny_args(tiny_imagefolder, ckdir, epochs=50, workers=2)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True,
                            env=dict(os.environ, CUDA_VISIBLE_DEVICES='', OMP_NUM_THREADS='1'))
    try:
        assert wait_for(lambda: logged_steps(ckdir) >= 2, proc), proc.stderr.read()
        os.killpg(proc.pid, signum)  # the main process and its DataLoader workers alike
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err
    assert 'Traceback' not in err and 'exited unexpectedly' not in err, err
    stopped = [line for line in err.splitlines() if 'stopped by signal' in line]
    assert len(stopped) == 1 and f'signal {int(signum)}' in stopped[0], err
    ckpt = load_state(ckdir / 'checkpoint.pth')
    assert ckpt['epoch'] * 3 + ckpt['step_in_epoch'] >= 2


# ---------------------------------------------------------------------------------------------
# Batches BatchNorm cannot normalise; monitoring that fails
# ---------------------------------------------------------------------------------------------

def test_last_batch_of_one_image_is_dropped_with_a_note(tiny_imagefolder, tmp_path, capsys):
    extra = tiny_imagefolder / 'train' / 'class_a' / 'class_a_99.JPEG'
    shutil.copyfile(tiny_imagefolder / 'train' / 'class_a' / 'class_a_0.JPEG', extra)  # 13 images
    main.main(tiny_args(tiny_imagefolder, tmp_path / 'ck', epochs=1))
    err = capsys.readouterr().err
    assert 'last batch of 1 image per process' in err and 'dropped' in err
    _, stats = read_stats(tmp_path / 'ck')
    assert [s['step'] for s in stats] == [0, 1, 2]  # 4 + 4 + 4 images; the 13th is left out
    assert load_state(tmp_path / 'ck' / 'checkpoint.pth')['epoch'] == 1


def test_main_notes_a_last_batch_of_two_images(tiny_imagefolder, tmp_path, capsys):
    for k in (98, 99):  # 14 images, batch 4: 4 + 4 + 4 + 2
        shutil.copyfile(tiny_imagefolder / 'train' / 'class_a' / 'class_a_0.JPEG',
                        tiny_imagefolder / 'train' / 'class_a' / f'class_a_{k}.JPEG')
    main.main(tiny_args(tiny_imagefolder, tmp_path / 'ck', epochs=1))
    err = capsys.readouterr().err
    assert 'last batch of 2 images' in err and '--drop-last' in err
    _, stats = read_stats(tmp_path / 'ck')
    assert [s['step'] for s in stats] == [0, 1, 2, 3]  # kept, as the reference keeps it
    main.main(tiny_args(tiny_imagefolder, tmp_path / 'dropped', '--drop-last', epochs=1))
    assert 'last batch of 2' not in capsys.readouterr().err


def test_knn_monitor_skips_bad_images_and_never_costs_the_checkpoint(tiny_imagefolder, tmp_path,
                                                                     capsys):
    for bad in (tiny_imagefolder / 'train' / 'class_b' / 'class_b_3.JPEG',  # bank and training
                tiny_imagefolder / 'val' / 'class_a' / 'class_a_1.JPEG'):  # the kNN queries only
        bad.write_bytes(bad.read_bytes()[:200])
    ckdir = tmp_path / 'ck'
    main.main(tiny_args(tiny_imagefolder, ckdir, '--bad-images', 'skip', '--knn-every', '1',
                        epochs=1))
    _, stats = read_stats(ckdir)
    assert any('knn_top1_k20' in s for s in stats)
    assert 'skipping: cannot read image' in capsys.readouterr().err
    # stop: the monitor's error comes after the epoch's checkpoint, so a rerun goes on from it
    shutil.copyfile(tiny_imagefolder / 'train' / 'class_b' / 'class_b_0.JPEG',
                    tiny_imagefolder / 'train' / 'class_b' / 'class_b_3.JPEG')
    with pytest.raises(SystemExit) as exit_info:
        main.main(tiny_args(tiny_imagefolder, ckdir, '--knn-every', '1', epochs=2))
    assert exit_info.value.code == 1
    assert 'class_a_1.JPEG' in capsys.readouterr().err
    assert load_state(ckdir / 'checkpoint.pth')['epoch'] == 2


# ---------------------------------------------------------------------------------------------
# Images that PIL's convert('RGB') turns wrong
# ---------------------------------------------------------------------------------------------

def saved(tmp_path, name, img, **kwargs):
    path = tmp_path / name
    img.save(path, **kwargs)
    return path


@pytest.mark.parametrize('name', ['grey16.png', 'grey16.tif'])
def test_sixteen_bit_images_are_scaled_not_saturated(tmp_path, name):
    ramp = np.linspace(0, 65535, 64 * 64).round().astype(np.uint16).reshape(64, 64)
    path = saved(tmp_path, name, Image.fromarray(ramp))
    expected = (ramp.astype(np.float64) / 257).round()
    for img in (data.load_rgb(path), data.decode_rgb(path.read_bytes(), name)):
        pixels = np.asarray(img)
        assert img.mode == 'RGB' and pixels.shape == (64, 64, 3)
        assert np.abs(pixels[..., 0] - expected).max() <= 1  # not clipped to 255
        assert (pixels[..., 0] == pixels[..., 2]).all()


@pytest.mark.parametrize('name, array, words', [
    ('float.tif', np.linspace(0, 1, 256, dtype=np.float32).reshape(16, 16), 'floating-point'),
    ('int32.tif', np.arange(256, dtype=np.int32).reshape(16, 16) * 1000, '32-bit integer')])
def test_images_without_an_8_bit_range_are_refused_in_one_line(tmp_path, name, array, words):
    path = saved(tmp_path, name, Image.fromarray(array))
    with pytest.raises(InputError) as caught:
        data.load_rgb(path)
    assert '\n' not in str(caught.value) and name in str(caught.value)
    assert words in str(caught.value)


def test_palette_with_transparency_keeps_its_colours_without_a_warning(tmp_path):
    img = Image.new('P', (8, 8))
    img.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    img.paste(1, (0, 0, 4, 8))
    path = saved(tmp_path, 'p.png', img, transparency=bytes([0, 255] + [255] * 254))
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        pixels = np.asarray(data.load_rgb(path))
    assert tuple(pixels[0, 0]) == (200, 100, 50) and tuple(pixels[0, 7]) == (10, 20, 30)


# ---------------------------------------------------------------------------------------------
# pack.py on a disk that fills up
# ---------------------------------------------------------------------------------------------

def run_pack(*argv):
    return subprocess.run([sys.executable, str(ROOT / 'pack.py'), *map(str, argv)],
                          capture_output=True, text=True, timeout=300)


def check_pack(out, capsys):
    """`pack.py --check OUT --workers 0` in this process, for files a finished pack left sound
    (a damaged one is checked with run_pack, so that HDF5 failing on it hard stays in a child
    process): its exit status and stderr, as run_pack gives them, except that a traceback
    fails the test. Saves a Python start-up with torch per check."""
    import pack
    capsys.readouterr()
    try:
        pack.main(['--check', str(out), '--workers', '0'])
        code, message = 0, ''
    except SystemExit as e:  # sys.exit('pack.py: error: ...') prints its text when it exits
        code, message = (1, f'{e.code}\n') if isinstance(e.code, str) else (e.code, '')
    return SimpleNamespace(returncode=code, stderr=capsys.readouterr().err + message)


@pytest.fixture(scope='module')
def pack_source(tmp_path_factory):
    pytest.importorskip('tables')
    return make_image_folder(tmp_path_factory.mktemp('pack_source'), per_class=40,
                             val_per_class=20, size=128)  # about 2 MB of JPEGs


@pytest.mark.parametrize('workers, commit_every', [('0', '1000'), ('2', '10')])
def test_pack_on_a_full_disk_never_reports_done_and_the_rerun_completes(pack_source, tmpfs,
                                                                        workers, commit_every,
                                                                        capsys):
    disk = tmpfs('2m')
    out = disk / 'out.h5'
    done = run_pack(pack_source, out, '--workers', workers, '--commit-every', commit_every)
    assert done.returncode == 1, done.stderr
    assert 'done' not in done.stderr and 'Traceback' not in done.stderr, done.stderr
    lines = error_lines(done.stderr)
    assert len(lines) == 1 and 'No space left on device' in lines[0], done.stderr
    checked = run_pack('--check', out, '--workers', '0')  # the full disk may have damaged it
    assert checked.returncode != 0 and 'OK' not in checked.stderr
    if commit_every == '10':  # stopped at a commit before HDF5 lost anything: the rerun goes on
        subprocess.run(['mount', '-o', 'remount,size=16m', str(disk)], check=True)
        assert run_pack(pack_source, out, '--workers', workers).returncode == 0
        checked = check_pack(out, capsys)
        assert checked.returncode == 0 and checked.stderr.splitlines()[-1] == f'{out}: OK'


def test_pack_that_cannot_start_on_a_full_disk_leaves_nothing_the_rerun_refuses(pack_source,
                                                                                 tmpfs):
    disk = tmpfs('1m')
    filler = fill(disk)
    out = disk / 'out.h5'
    done = run_pack(pack_source, out, '--workers', '0')
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and 'No space left on device' in lines[0], done.stderr
    filler.unlink()
    subprocess.run(['mount', '-o', 'remount,size=16m', str(disk)], check=True)
    done = run_pack(pack_source, out, '--workers', '0')
    assert done.returncode == 0, done.stderr


def test_check_notices_a_split_the_file_lists_but_lacks(pack_source, tmp_path, capsys):
    tables = pytest.importorskip('tables')
    out = tmp_path / 'out.h5'
    assert run_pack(pack_source, out, '--workers', '0').returncode == 0
    with tables.open_file(str(out), 'a') as h5:
        h5.remove_node('/val', recursive=True)
    checked = check_pack(out, capsys)
    assert checked.returncode == 1
    assert checked.stderr.strip().splitlines()[-1].endswith("has no split 'val' (splits in it: "
                                                            "train)")
