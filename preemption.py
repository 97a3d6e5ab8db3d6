"""Surviving interruptions: stop signals, one run per checkpoint directory, checkpoint cadence.

SLURM sends SIGUSR1 shortly before a preemption or the time limit (sbatch --signal USR1@120) and
SIGTERM on `scancel`; torchrun sends SIGTERM to its workers before an elastic restart; Ctrl-C
sends SIGINT. scancel and Ctrl-C signal the whole process group: DataLoader workers ignore both
(data.ignore_stop_signals), so only the main process acts. Each one only sets a flag here.
The training loop polls it between steps; the ranks agree on it through a small CPU collective (no GPU synchronisation), rank 0 writes a mid-epoch checkpoint, and then
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

# SIGINT (Ctrl-C) too, so that it ends like a SIGTERM: checkpoint written, one line, exit 0.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopRequests:
    """SIGTERM/SIGUSR1/SIGINT -> a flag that every rank sees at the same step. (A signal may
    arrive twice, from the process group and forwarded by the launcher: it only sets the flag.)"""

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
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            created = not self.path.exists()
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise InputError(f'cannot write to {self.path.parent}: {e.strerror or e}') from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors='replace').strip() or 'unknown process'
            os.close(fd)
            raise InputError(f'{self.path.parent} is in use by another run ({holder}); wait for '
                             f'it to finish or use another --checkpoint-dir') from None
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f'pid {os.getpid()} on {socket.gethostname()} since '
                         f'{time.strftime("%Y-%m-%d %H:%M:%S")}\n'.encode())
        except OSError as e:  # a full disk: the directory could not take a checkpoint either
            if created:
                self.path.unlink(missing_ok=True)
            os.close(fd)
            raise InputError(f'cannot write to {self.path.parent}: {e.strerror or e}') from None
        self.fd = fd
        return self

    def release(self):
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
