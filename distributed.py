"""Process groups: who am I, how many of us, which device, and how we all started.

One function, `launch`, runs a worker function in every process a run needs:

* torchrun (or any launcher that sets RANK / WORLD_SIZE / LOCAL_RANK): this process is one rank.
* SLURM: either one task per GPU (srun --ntasks-per-node=GPUs) or, as the reference does, one task
  per node that starts one process per local GPU. The rendezvous host is the first node of the job;
  the port is derived from the job id, so two jobs sharing a node do not collide. What SIGUSR1
  (requeue) and SIGTERM do is preemption.py's business; a launcher that spawned processes
  forwards both to them.
* a plain `python main.py` on a machine with N GPUs: one process per GPU on a free local port.
* no GPU (or --device cpu): a single CPU process, with a gloo process group of size one so that
  the training code is the same as in the distributed case.

BatchNorm statistics must be global across ranks (the reference uses nn.SyncBatchNorm). SyncBatchNorm
refuses CPU tensors, so CPU runs with more than one process use `GlobalBatchNorm`, which all-reduces
the per-channel sums with a differentiable collective.
"""
import dataclasses
import os
import signal
import socket
import subprocess
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from cli import InputError


@dataclasses.dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self):
        return self.rank == 0


def world_info():
    """The DistInfo of this process (a single CPU process when no group is initialised)."""
    if dist.is_available() and dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    else:
        rank, world_size = 0, 1
    return rank, world_size


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(('localhost', 0))
        return s.getsockname()[1]


def _slurm_port(job_id):
    # Every node computes the same port without talking to the others; different jobs on one
    # node get different ports (the reference's fixed 58472 collides there).
    return 20000 + int(job_id) % 20000


def _slurm_master_host():
    nodelist = os.environ['SLURM_JOB_NODELIST']
    out = subprocess.check_output(['scontrol', 'show', 'hostnames', nodelist])
    return out.decode().splitlines()[0]


def choose_device_type(requested):
    """'cuda' or 'cpu' from --device auto|cuda|cpu; never silently idle without a GPU."""
    if requested == 'cpu':
        return 'cpu'
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        return 'cuda'
    if requested == 'cuda':
        raise InputError('--device cuda was given but no CUDA GPU is visible; '
                         'pass --device cpu to run on the CPU')
    # One plain line: a Python warning would add its source line, which tells a user nothing.
    print('note: no CUDA GPU found: running on the CPU in a single process (slow); pass '
          '--device cpu to choose this explicitly', file=sys.stderr, flush=True)
    return 'cpu'


def _init_process_group(rank, local_rank, world_size, device_type, init_method=None):
    if device_type == 'cuda':
        torch.cuda.set_device(local_rank)
        device = torch.device('cuda', local_rank)
        backend = 'nccl'
    else:
        device = torch.device('cpu')
        backend = 'gloo'
    if not dist.is_initialized():
        if world_size == 1 and init_method is None:
            # A group of one needs no network: an in-memory store.
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        else:
            dist.init_process_group(backend, init_method=init_method or 'env://',
                                    rank=rank, world_size=world_size)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


@dataclasses.dataclass(frozen=True)
class LaunchPlan:
    """How this launcher takes part: `nprocs` processes with global ranks rank_offset, ... ."""
    nprocs: int
    rank_offset: int
    local_rank: int  # of the first process this launcher runs
    world_size: int
    device_type: str
    init_method: str = None  # None: a group of one, in memory
    slurm: bool = False  # informational: the plan came from SLURM's variables


def plan_launch(env, device_type, ngpus, master_host=None):
    """Pure decision from the environment (torchrun, then SLURM, then local GPUs, then CPU)."""
    if 'RANK' in env and 'WORLD_SIZE' in env:  # torchrun, or any env:// launcher
        return LaunchPlan(1, int(env['RANK']), int(env.get('LOCAL_RANK', 0)),
                          int(env['WORLD_SIZE']), device_type, 'env://')
    if 'SLURM_JOB_ID' in env and env.get('SLURM_JOB_NODELIST') and ngpus > 0:
        host = env.get('MASTER_ADDR') or (master_host or _slurm_master_host)()
        port = env.get('MASTER_PORT') or _slurm_port(env['SLURM_JOB_ID'])
        init_method = f'tcp://{host}:{port}'
        nnodes = int(env.get('SLURM_NNODES', 1))
        ntasks = int(env.get('SLURM_NTASKS', nnodes))
        if ntasks > nnodes:  # one task per GPU: SLURM already started every process
            return LaunchPlan(1, int(env['SLURM_PROCID']), int(env.get('SLURM_LOCALID', 0)),
                              ntasks, 'cuda', init_method, slurm=True)
        # One task per node, as the reference: it starts one process per local GPU.
        node = int(env.get('SLURM_NODEID', 0))
        return LaunchPlan(ngpus, node * ngpus, 0, nnodes * ngpus, 'cuda', init_method, slurm=True)
    if ngpus > 1:
        return LaunchPlan(ngpus, 0, 0, ngpus, 'cuda', 'tcp://localhost:{free_port}')
    return LaunchPlan(1, 0, 0, 1, device_type)


def _run_in_this_process(local_rank, fn, fn_args, plan):
    rank = plan.rank_offset + (local_rank if plan.nprocs > 1 else 0)
    local_rank = local_rank if plan.nprocs > 1 else plan.local_rank
    info = _init_process_group(rank, local_rank, plan.world_size, plan.device_type,
                               plan.init_method)
    try:
        return fn(info, *fn_args)
    finally:
        cleanup()


def launch(fn, fn_args=(), device='auto'):
    """Run fn(DistInfo, *fn_args) in every process of this run (see the module docstring)."""
    device_type = choose_device_type(device)
    ngpus = torch.cuda.device_count() if device_type == 'cuda' else 0
    plan = plan_launch(os.environ, device_type, ngpus)
    if plan.init_method and '{free_port}' in plan.init_method:
        plan = dataclasses.replace(plan, init_method=plan.init_method.format(free_port=free_port()))
    if plan.nprocs == 1:
        return _run_in_this_process(0, fn, fn_args, plan)
    context = mp.spawn(_run_in_this_process, (fn, fn_args, plan), nprocs=plan.nprocs, join=False)

    def forward(signum, frame):
        # Stop signals sent to this launcher only (kill PID) reach the training processes,
        # which save a checkpoint and exit; SLURM signals them directly as well.
        for process in context.processes:
            if process.is_alive():
                os.kill(process.pid, signum)
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, forward)
    try:
        while not context.join():
            pass
    except mp.ProcessExitedException as e:
        # The failing worker has already printed its own one-line error.
        sys.exit(e.exit_code or 1)


def cleanup():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose backward also sums the incoming gradients over ranks."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def all_reduce_sum(x):
    """Differentiable sum over all ranks (torch.distributed.nn's version is deprecated)."""
    return _AllReduceSum.apply(x)


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics cover the whole global batch, on any device.

    Same parameters, buffers and state-dict keys as nn.BatchNorm1d/2d (so checkpoints are
    interchangeable with SyncBatchNorm ones). Per-channel count, sum and sum of squares are
    all-reduced with a differentiable collective, so the backward pass also sees the global
    statistics, as SyncBatchNorm's does.
    """

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f'expected at least 2D input (got {x.dim()}D input)')

    def forward(self, x):
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        # Statistics in fp32 whatever the autocast dtype; two passes (mean, then centred squares)
        # rather than E[x^2] - E[x]^2, which cancels badly when |mean| >> std.
        xf = x.float()
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        local_count = torch.tensor([x.numel() / x.shape[1]], dtype=torch.float32, device=x.device)
        sums = all_reduce_sum(torch.cat([local_count, xf.sum(dims)]))  # (1 + C,) over ranks
        count = sums[0]
        mean = sums[1:] / count
        centred = xf - mean.view(shape)
        var = all_reduce_sum((centred * centred).sum(dims)) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else \
                    1.0 / float(self.num_batches_tracked)
                unbiased = var * (count / (count - 1).clamp(min=1))
                self.running_mean.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
                self.running_var.mul_(1 - momentum).add_(unbiased.detach(), alpha=momentum)
        y = centred * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert_global_batchnorm(module):
    """Replace every BatchNorm layer with one whose statistics are global across ranks.

    CUDA: nn.SyncBatchNorm (as the reference). CPU: GlobalBatchNorm. State-dict keys are unchanged.
    """
    if any(p.is_cuda for p in module.parameters()):
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _convert_to_global(module)


def _convert_to_global(module):
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        out = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats)
        if module.affine:
            with torch.no_grad():
                out.weight = module.weight
                out.bias = module.bias
        out.running_mean = module.running_mean
        out.running_var = module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.training = module.training
    for name, child in module.named_children():
        out.add_module(name, _convert_to_global(child))
    return out
