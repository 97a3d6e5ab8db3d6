"""Surviving interruptions: stop signals, one run per checkpoint directory (and one kind of run),
checkpoint cadence.

SLURM sends SIGUSR1 shortly before a preemption or the time limit (sbatch --signal USR1@120) and
SIGTERM on `scancel`; torchrun sends SIGTERM to its workers before an elastic restart; Ctrl-C
sends SIGINT. scancel and Ctrl-C signal the whole process group: DataLoader workers ignore all
three (data.ignore_stop_signals), so only the main process acts. Each one only sets a flag here.
The training loops of main.py and evaluate.py poll it between steps; the ranks agree on it
through the run's process group (see StopRequests), rank 0 writes a mid-epoch checkpoint, and
then SIGUSR1 under SLURM requeues the job (as the reference does) while anything else exits
cleanly.
"""
import contextlib
import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from checkpoints import checkpoint_kind
from cli import InputError
from stats import KIND_COMMANDS, kinds_in_log

# SIGINT (Ctrl-C) too, so that it ends like a SIGTERM: checkpoint written, one line, exit 0.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class Stopped(Exception):
    """A stop signal was handled: the checkpoint is written, the process should exit 0."""


class StopRequests:
    """SIGTERM/SIGUSR1/SIGINT -> a flag that every rank sees at the same step. (A signal may
    arrive twice, from the process group and forwarded by the launcher: it only sets the flag.)

    The ranks agree through the run's own process group (NCCL on GPUs, gloo on the CPU), so a
    multi-node run needs no network setting beyond what that backend needs. (A second gloo group
    would pick its network interface from the host name, which resolves to loopback on many
    clusters; NCCL finds its interfaces itself.)

    On a GPU the tiny all-reduce is queued on the device like the step's kernels, and its result
    is read one call later (`lagged`): the host then waits only for the previous step's kernels,
    never for those it has just queued, so it stays one step ahead and the GPU does not idle.
    The trade-off: the host can no longer run more than a step ahead of the GPU, and a stop
    takes effect one step after it was agreed (on every rank alike).
    """

    def __init__(self, world_size, device='cpu', lagged=None):
        self.world_size = world_size
        self.device = torch.device(device)
        self.lagged = self.device.type == 'cuda' if lagged is None else lagged
        self.pending = None  # (flags on the host, the event after their copy) of the last call
        self.received = 0
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
        start times differ between ranks), so that all ranks act on it at the same step.
        When lagged, the answer is the previous call's."""
        if self.world_size == 1:
            return self.received, bool(due)
        flags = torch.full((2,), self.received, dtype=torch.int64, device=self.device)
        flags[1].fill_(int(due))  # fills from host scalars: nothing is copied to the device
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if not self.lagged:
            signum, due = flags.tolist()
            return signum, bool(due)
        host = flags.to('cpu', non_blocking=True)  # into pinned memory: queued, not waited for
        done = torch.cuda.Event() if flags.is_cuda else None
        if done is not None:
            done.record()
        previous, self.pending = self.pending, (host, done)
        if previous is None:
            return 0, False
        host, done = previous
        if done is not None:
            done.synchronize()  # the previous step's kernels, long queued
        signum, due = host.tolist()
        return signum, bool(due)

    def close(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    @staticmethod
    def requeue_if_slurm(signum):
        """After SIGUSR1 under SLURM: put the job back in the queue (the reference's behaviour).
        True if scontrol did; a failure is a warning (the checkpoint is saved either way)."""
        job = os.environ.get('SLURM_JOB_ID')
        if signum != signal.SIGUSR1 or not job:
            return False
        try:
            result = subprocess.run(['scontrol', 'requeue', job], capture_output=True, text=True)
        except OSError as e:
            reason = str(e)
        else:
            if result.returncode == 0:
                return True
            reason = (result.stderr.strip().splitlines() or
                      [f'exit status {result.returncode}'])[-1]
        print(f'warning: scontrol requeue {job} failed ({reason}); resubmit the job to continue',
              file=sys.stderr, flush=True)
        return False


@contextlib.contextmanager
def stop_signals_end_it(is_main, what):
    """For work that leaves nothing to resume from (evaluate.py --knn, minutes long): SIGTERM or
    SIGUSR1 raises Stopped at once, after SIGUSR1 under SLURM has requeued the job (rank 0), and
    the requeued job starts the work over."""
    owner = os.getpid()

    def handle(signum, frame):
        if os.getpid() != owner:  # a forked data-loader worker: its parent decides
            return
        requeued = is_main and StopRequests.requeue_if_slurm(signum)
        raise Stopped(f'stopped by signal {signum} during {what}; nothing to save, '
                      + ('the requeued job starts it over' if requeued else 'run it again'))
    previous = {sig: signal.signal(sig, handle) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# Where each kind of run goes when a directory holds another (suggested in the refusal).
KIND_SUBDIRS = {'linear probe': 'lincls', 'fine-tuning': 'finetune', 'kNN': 'knn',
                'fast linear probe': 'fast_linear'}


def check_directory_kind(directory, kind):
    """Refuse a checkpoint directory that holds another kind of run (see stats.KINDS): its
    stats.txt would hold two kinds of log, and a resume could pick up the other run's files.
    Evidence: the runs of its stats.txt, its checkpoint.pth, a linear.pth."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    found = kinds_in_log(directory / 'stats.txt')
    checkpoint = directory / 'checkpoint.pth'
    if checkpoint.is_file():
        other = checkpoint_kind(checkpoint)
        if other is not None:
            found.setdefault(other, str(checkpoint))
        elif kind in ('kNN', 'fast linear probe'):  # they write none: it is another run's
            raise InputError(f'{directory} holds a checkpoint.pth, which a {kind} run does not '
                             f'write: use another --checkpoint-dir, e.g. '
                             f'{directory / KIND_SUBDIRS[kind]}')
    if (directory / 'linear.pth').is_file():
        found.setdefault('fast linear probe', str(directory / 'linear.pth'))
    others = [(k, where) for k, where in found.items() if k != kind]
    if not others:
        return
    other, where = others[0]
    # beside a pretraining run's files, as its evaluations are; beside another evaluation's
    # directory, not inside it
    home = directory if other == 'pretraining' else directory.parent
    instead = f', e.g. {home / KIND_SUBDIRS[kind]}' if kind in KIND_SUBDIRS else ''
    raise InputError(f'{directory} holds a {other} run ({KIND_COMMANDS[other]}; {where}), this '
                     f'is a {kind} run ({KIND_COMMANDS[kind]}): their files and logs would mix; '
                     f'use another --checkpoint-dir{instead}')


class RunLock:
    """An exclusive lock on a checkpoint directory for the life of a run (rank 0 holds it).

    flock is released by the kernel when the process dies, even by SIGKILL, so a crashed run
    never leaves a stale lock; the file's text only says who holds it. With `kind`, the
    directory is checked under the lock to hold no other kind of run (check_directory_kind).
    A directory the lock created is removed again on release when the run left nothing in it.
    """

    def __init__(self, directory, kind=None):
        self.path = directory / '.lock'
        self.kind = kind
        self.fd = None
        self.created = []  # the folders _open made, deepest first

    def acquire(self):
        while True:
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 200).decode(errors='replace').strip() or 'unknown process'
                os.close(fd)
                self._remove_created()
                raise InputError(f'{self.path.parent} is in use by another run ({holder}); wait '
                                 f'for it to finish or use another --checkpoint-dir') from None
            if self._still_there(fd):
                break
            os.close(fd)  # locked a file that its holder removed on release: take the new one
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f'pid {os.getpid()} on {socket.gethostname()} since '
                         f'{time.strftime("%Y-%m-%d %H:%M:%S")}\n'.encode())
        except OSError as e:  # a full disk: the directory could not take a checkpoint either
            self.path.unlink(missing_ok=True)  # ours while we hold the lock; no empty .lock left
            os.close(fd)
            self._remove_created()
            raise InputError(f'cannot write to {self.path.parent}: {e.strerror or e}') from None
        self.fd = fd
        if self.kind is not None:
            try:  # under the lock: no other run can start writing between check and use
                check_directory_kind(self.path.parent, self.kind)
            except InputError:
                self.release()
                raise
        return self

    def _open(self):
        try:
            missing = [d for d in (self.path.parent, *self.path.parent.parents)
                       if not d.exists()]
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.created = self.created or [d for d in missing if d.is_dir()]
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise InputError(f'cannot write to {self.path.parent}: {e.strerror or e}') from None

    def _still_there(self, fd):
        try:
            return os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def _remove_created(self):
        """Folders this lock made that are still empty: a run that failed before writing
        anything leaves the user's tree as it found it."""
        for folder in self.created:
            try:
                folder.rmdir()
            except OSError:
                break  # not empty (the run wrote there), or gone: the folders above stay too
        self.created = []

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
            self._remove_created()
