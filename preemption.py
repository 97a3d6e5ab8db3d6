"""Surviving interruptions: stop signals, one run per checkpoint directory, checkpoint cadence.

SLURM sends SIGUSR1 shortly before a preemption or the time limit (sbatch --signal USR1@120) and
SIGTERM on `scancel`; torchrun sends SIGTERM to its workers before an elastic restart. Either one
only sets a flag here. The training loop polls it between steps; the ranks agree on it through a
small CPU collective (no GPU synchronisation), rank 0 writes a mid-epoch checkpoint, and then
SIGUSR1 under SLURM requeues the job (as the reference does) while anything else exits cleanly.
"""
import fcntl
import os
import signal
import socket
import subprocess
import time

import torch
import torch.distributed as dist

from cli import InputError

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequests:
    """SIGTERM/SIGUSR1 -> a flag that every rank sees at the same step."""

    def __init__(self, world_size):
        self.world_size = world_size
        self.received = 0
        self.group = None
        if world_size > 1:
            # A gloo group so that polling never waits on the GPU (NCCL would need a device tensor).
            self.group = None if dist.get_backend() == 'gloo' else dist.new_group(backend='gloo')
        self.previous = {}
        for sig in STOP_SIGNALS:
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals stay with whoever handles them
                pass

    def _handle(self, signum, frame):
        self.received = self.received or signum

    def agreed(self, due=False):
        """(stop signal or 0, whether any rank has `due` set), identical on every rank; a
        collective. `due` carries a rank's own decision that a checkpoint is due (clocks and
        start times differ between ranks), so that all ranks act on it at the same step."""
        if self.world_size == 1:
            return self.received, bool(due)
        flags = torch.tensor([self.received, int(due)], dtype=torch.int64)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
        return int(flags[0]), bool(flags[1])

    def close(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    @staticmethod
    def requeue_if_slurm(signum):
        """After SIGUSR1 under SLURM: put the job back in the queue (the reference's behaviour)."""
        job = os.environ.get('SLURM_JOB_ID')
        if signum == signal.SIGUSR1 and job:
            subprocess.run(['scontrol', 'requeue', job], check=False)
            return True
        return False


class RunLock:
    """An exclusive lock on a checkpoint directory for the life of a run (rank 0 holds it).

    flock is released by the kernel when the process dies, even by SIGKILL, so a crashed run
    never leaves a stale lock; the file's text only says who holds it.
    """

    def __init__(self, directory):
        self.path = directory / '.lock'
        self.fd = None

    def acquire(self):
        while True:
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 200).decode(errors='replace').strip() or 'unknown process'
                os.close(fd)
                raise InputError(f'{self.path.parent} is in use by another run ({holder}); wait '
                                 f'for it to finish or use another --checkpoint-dir') from None
            if self._still_there(fd):
                break
            os.close(fd)  # locked a file that its holder removed on release: take the new one
        os.ftruncate(fd, 0)
        os.write(fd, f'pid {os.getpid()} on {socket.gethostname()} since '
                     f'{time.strftime("%Y-%m-%d %H:%M:%S")}\n'.encode())
        self.fd = fd
        return self

    def _open(self):
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise InputError(f'cannot write to {self.path.parent}: {e.strerror or e}') from None

    def _still_there(self, fd):
        try:
            return os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def release(self):
        """Remove the file, then unlock: a finished run leaves no .lock behind. (A run that
        opened the file meanwhile finds it gone once it holds the lock, and retries.)"""
        if self.fd is not None:
            try:
                self.path.unlink(missing_ok=True)
            except OSError:
                pass  # a read-only directory: the lock still goes with the descriptor
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
