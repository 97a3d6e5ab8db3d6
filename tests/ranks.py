"""The two halves of every multi-process test, so that each one ends cleanly.

    def _worker(rank, port, out_dir):       # in a child process
        with ranks.group(rank, port):       # gloo, world size 2
            ...
    ranks.spawn(_worker, (ranks.free_port(), tmp_path))   # in the test

`group` leaves the process group the way distributed.launch does: a rank that finished waits at
a barrier for the others before it tears its connections down (a gloo rank whose peer vanishes
mid-transfer can abort its process at teardown). `spawn` waits for every rank to exit, up to a
deadline, and then fails with the ranks' own errors, terminating any rank still running; a rank
that hangs in a collective fails the test instead of hanging the suite.
tests/test_test_hygiene.py checks that no test starts ranks or tears a group down another way.
"""
import contextlib
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import distributed

free_port = distributed.free_port


@contextlib.contextmanager
def group(rank, port, world_size=2, threads=1):
    """A gloo process group over localhost for the body; `threads` torch threads per rank (two
    ranks on a 2-core machine: one each)."""
    torch.set_num_threads(threads)
    dist.init_process_group('gloo', init_method=f'tcp://localhost:{port}', rank=rank,
                            world_size=world_size)
    try:
        yield
    except BaseException:
        distributed.cleanup()
        raise
    distributed.cleanup(wait_for_all=True)


def spawn(fn, args=(), nprocs=2, timeout=900):
    """fn(rank, *args) in `nprocs` fresh processes; returns once every one has exited 0."""
    context = mp.start_processes(fn, args, nprocs=nprocs, join=False, start_method='spawn')
    deadline = time.monotonic() + timeout
    try:
        # join() raises as soon as a rank fails (and then terminates the others)
        while not context.join(timeout=0.5):
            if time.monotonic() > deadline:
                raise AssertionError(f'{fn.__name__}: not every rank finished within {timeout} s '
                                     f'(exit codes {[p.exitcode for p in context.processes]})')
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
            process.join(10)
            if process.is_alive():
                process.kill()
                process.join()
