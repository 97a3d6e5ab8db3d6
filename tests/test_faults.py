"""Real faults, made on this machine rather than monkeypatched: full disks (a small tmpfs that
the test mounts, so it needs root), truncated and odd files, signals to a process group."""
import errno
import os
import subprocess
import sys

import pytest
import torch

import checkpoints
import monitor
import preemption
from cli import InputError
from conftest import ROOT
from test_main import tiny_args


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
