"""Process groups: who am I, how many of us, which device, and how we all started.

One function, `launch`, runs a worker function in every process a run needs:

* torchrun (or any launcher that sets RANK / WORLD_SIZE / LOCAL_RANK): this process is one rank.
* SLURM job step (srun): either one task per GPU (srun --ntasks-per-node=GPUs, each task using the
  GPU it sees, or its local rank's if it sees them all) or, as the reference does, one task per
  node that starts one process per local GPU. The rendezvous host is the first node of the step;
  the port is derived from the job id, so two jobs sharing a node do not collide. What SIGUSR1
  (requeue) and SIGTERM do is preemption.py's business; a launcher that spawned processes
  forwards both to them.
* SLURM batch script without srun (no SLURM_STEP_ID): it runs on the job's first node only, so
  it is a plain local launch there; a job of several nodes is refused with a one-line error.
* a plain `python main.py` on a machine with N GPUs: one process per GPU on a free local port.
* no GPU (or --device cpu): a single CPU process, with a gloo process group of size one so that
  the training code is the same as in the distributed case (under srun: one per task).

BatchNorm statistics must be global across ranks (the reference uses nn.SyncBatchNorm). SyncBatchNorm
refuses CPU tensors, so CPU runs with more than one process use `GlobalBatchNorm`, which all-reduces
the per-channel sums with a differentiable collective.
"""
import dataclasses
import os
import re
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


def _slurm_master_host(nodelist):
    """The first host of a SLURM node list (the reference's rendezvous host)."""
    try:
        out = subprocess.run(['scontrol', 'show', 'hostnames', nodelist], check=True,
                             capture_output=True, text=True).stdout.split()
    except (OSError, subprocess.CalledProcessError) as e:
        raise InputError(f'cannot expand SLURM_JOB_NODELIST={nodelist} with scontrol ({e}); set '
                         f'MASTER_ADDR to the first node\'s host name') from None
    if not out:
        raise InputError(f'scontrol show hostnames {nodelist} printed no host name; set '
                         f'MASTER_ADDR to the first node\'s host name')
    return out[0]


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


# ---------------------------------------------------------------------------------------------
# Which GPUs this torch build can run on
# ---------------------------------------------------------------------------------------------

PYPI_INSTALL = 'pip install torch==2.14.1 torchvision==0.29.2'
CU126_INSTALL = PYPI_INSTALL + ' --index-url https://download.pytorch.org/whl/cu126'


def arch_runs_on(arch, capability):
    """Whether a get_arch_list() entry runs on a GPU of `capability` (major, minor).

    sm_XY machine code runs on X.Y and later minor versions of major X (sm_90a only on 9.0);
    compute_XY PTX is compiled at load time for X.Y and every later GPU.
    """
    match = re.fullmatch(r'(sm|compute)_(\d+)(\d)([a-z]?)', arch)
    if not match:
        return False
    kind, major, minor, suffix = match[1], int(match[2]), int(match[3]), match[4]
    if suffix:
        return capability == (major, minor)
    if kind == 'compute':
        return capability >= (major, minor)
    return capability[0] == major and capability[1] >= minor


def install_command(capability):
    """The pip command of a torch build with kernels for `capability` (README, Install)."""
    # CUDA 12.8 and 13 builds of torch 2.11+ start at sm_75; the CUDA 12.6 ones still have sm_70.
    return CU126_INSTALL if capability < (7, 5) else PYPI_INSTALL


def check_gpu_supported(index, cuda=torch.cuda):
    """One-line error, before any kernel runs, when this build has no kernels for GPU `index`
    (otherwise the first kernel fails with "no kernel image is available")."""
    archs = cuda.get_arch_list()
    capability = tuple(cuda.get_device_capability(index))
    if not archs or any(arch_runs_on(arch, capability) for arch in archs):
        return
    raise InputError(f'GPU {index} ({cuda.get_device_name(index)}) has compute capability '
                     f'{capability[0]}.{capability[1]}, but torch {torch.__version__} has kernels '
                     f'for {" ".join(archs)} only; install a build for it: '
                     f'{install_command(capability)}')


# ---------------------------------------------------------------------------------------------
# Launch: who takes part, on which device
# ---------------------------------------------------------------------------------------------

def device_index(local_rank, local_world_size, ngpus, variables, env):
    """The GPU this process uses, from what it can see: the only one, or its local rank among
    all of the node's GPUs (SLURM's --gpus-per-task and per-process CUDA_VISIBLE_DEVICES give
    each process one GPU, numbered 0)."""
    if ngpus == 1:
        return 0
    if local_rank < ngpus and (local_world_size is None or local_world_size <= ngpus):
        return local_rank
    of = '' if local_world_size is None else f' of {local_world_size}'
    raise InputError(f'this process is local rank {local_rank}{of} on its node ({variables}) '
                     f'but sees {ngpus} GPUs (CUDA_VISIBLE_DEVICES='
                     f'{env.get("CUDA_VISIBLE_DEVICES", "unset")}); give each process one GPU '
                     f'or let every process see all of the node\'s GPUs')


def _init_process_group(rank, local_rank, world_size, device_type, init_method=None,
                        gpu=None):
    if device_type == 'cuda':
        gpu = local_rank if gpu is None else gpu
        torch.cuda.set_device(gpu)
        device = torch.device('cuda', gpu)
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
    """How this launcher takes part: `nprocs` processes with global ranks rank_offset, ...,
    local ranks local_rank, ... and GPUs device_index, ... ."""
    nprocs: int
    rank_offset: int
    local_rank: int  # of the first process this launcher runs
    world_size: int
    device_type: str
    init_method: str = None  # None: a group of one, in memory
    slurm: bool = False  # informational: the plan came from SLURM's variables
    device_index: int = 0  # the first process's GPU, among those this process sees

    def device_indices(self):
        return range(self.device_index, self.device_index + self.nprocs) \
            if self.device_type == 'cuda' else range(0)


def plan_launch(env, device_type, ngpus, master_host=None):
    """Pure decision from the environment (torchrun, then SLURM, then local GPUs, then CPU)."""
    if 'RANK' in env and 'WORLD_SIZE' in env:  # torchrun, or any env:// launcher
        local_rank = int(env.get('LOCAL_RANK', 0))
        local_world = int(env['LOCAL_WORLD_SIZE']) if 'LOCAL_WORLD_SIZE' in env else None
        gpu = device_index(local_rank, local_world, ngpus, 'LOCAL_RANK, LOCAL_WORLD_SIZE',
                           env) if device_type == 'cuda' else 0
        return LaunchPlan(1, int(env['RANK']), local_rank, int(env['WORLD_SIZE']), device_type,
                          'env://', device_index=gpu)
    if 'SLURM_JOB_ID' in env and env.get('SLURM_JOB_NODELIST'):
        if 'SLURM_STEP_ID' in env or 'SLURM_STEPID' in env:
            return _plan_slurm_step(env, device_type, ngpus, master_host)
        _refuse_multi_node_batch_shell(env)
    if device_type == 'cuda' and ngpus > 1:
        return LaunchPlan(ngpus, 0, 0, ngpus, 'cuda', 'tcp://localhost:{free_port}')
    return LaunchPlan(1, 0, 0, 1, device_type)


def _refuse_multi_node_batch_shell(env):
    # sbatch runs its script on the first node only: a world spanning the job's nodes would wait
    # forever for the others. On one node, the batch shell is a plain launch (the reference's
    # one process per local GPU), whatever --ntasks-per-node says.
    nodes = int(env.get('SLURM_JOB_NUM_NODES') or env.get('SLURM_NNODES') or 1)
    if nodes > 1:
        raise InputError(f'this is the batch script of a {nodes}-node SLURM job (SLURM_NNODES='
                         f'{nodes}, no SLURM_STEP_ID), which runs on its first node only; start '
                         f'the run with srun (srun python ...) so that every node takes part')


def _plan_slurm_step(env, device_type, ngpus, master_host):
    """One task per node (the reference: it starts one process per local GPU) or one task per
    process (srun --ntasks-per-node GPUS: SLURM started every process)."""
    nodelist = env.get('SLURM_STEP_NODELIST') or env['SLURM_JOB_NODELIST']
    nnodes = int(env.get('SLURM_STEP_NUM_NODES') or env.get('SLURM_NNODES') or 1)
    ntasks = int(env.get('SLURM_STEP_NUM_TASKS') or env.get('SLURM_NTASKS') or nnodes)
    node = int(env.get('SLURM_NODEID', 0))
    if ntasks > nnodes or device_type != 'cuda':
        nprocs, world_size, rank = 1, ntasks, int(env.get('SLURM_PROCID', 0))
        local_rank = int(env.get('SLURM_LOCALID', 0))
        gpu = device_index(local_rank, _tasks_on_node(env, node), ngpus,
                           'SLURM_LOCALID, SLURM_STEP_TASKS_PER_NODE', env) \
            if device_type == 'cuda' else 0
    else:
        nprocs, world_size, rank, local_rank, gpu = ngpus, nnodes * ngpus, node * ngpus, 0, 0
    if world_size == 1:
        return LaunchPlan(nprocs, 0, local_rank, 1, device_type, slurm=True, device_index=gpu)
    host = env.get('MASTER_ADDR') or (master_host or (lambda: _slurm_master_host(nodelist)))()
    port = env.get('MASTER_PORT') or _slurm_port(env['SLURM_JOB_ID'])
    return LaunchPlan(nprocs, rank, local_rank, world_size, device_type, f'tcp://{host}:{port}',
                      slurm=True, device_index=gpu)


def _tasks_on_node(env, node):
    """Tasks of this step on node `node`, from SLURM's compressed list ("8(x2),4"); None if
    srun did not say (the job's SLURM_TASKS_PER_NODE may count more tasks than this step has)."""
    spec = env.get('SLURM_STEP_TASKS_PER_NODE', '')
    counts = []
    for part in filter(None, spec.split(',')):
        match = re.fullmatch(r'(\d+)(?:\(x(\d+)\))?', part.strip())
        if not match:
            return None
        counts += [int(match[1])] * int(match[2] or 1)
    return counts[node] if node < len(counts) else None


def _run_in_this_process(index, fn, fn_args, plan):
    """Process `index` (0 .. nprocs-1) of this launcher's plan."""
    info = _init_process_group(plan.rank_offset + index, plan.local_rank + index,
                               plan.world_size, plan.device_type, plan.init_method,
                               gpu=plan.device_index + index)
    try:
        result = fn(info, *fn_args)
    except SystemExit as e:  # a one-line error (code 1) or a handled stop signal (code 0)
        cleanup(wait_for_all=e.code in (None, 0))
        raise
    except BaseException:
        cleanup()
        raise
    cleanup(wait_for_all=True)
    return result


def launch(fn, fn_args=(), device='auto'):
    """Run fn(DistInfo, *fn_args) in every process of this run (see the module docstring)."""
    device_type = choose_device_type(device)
    ngpus = torch.cuda.device_count() if device_type == 'cuda' else 0
    plan = plan_launch(os.environ, device_type, ngpus)
    for index in plan.device_indices():
        check_gpu_supported(index)
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
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):  # Ctrl-C: no launcher traceback
        signal.signal(sig, forward)
    try:
        while not context.join():
            pass
    except mp.ProcessExitedException as e:
        # The failing worker has already printed its own one-line error.
        sys.exit(e.exit_code or 1)


def cleanup(wait_for_all=False):
    """Destroy this process's group. `wait_for_all` (a rank that ended normally): first a
    barrier, so that no rank closes its connections while another still reads from them; a
    gloo rank that loses its peer mid-transfer can abort its whole process at teardown
    ("terminate called without an active exception"). Only where every rank ends normally:
    after a failure the others may never reach the barrier."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if wait_for_all and dist.get_world_size() > 1:
        dist.barrier()
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


class SingleProcess(nn.Module):
    """What DistributedDataParallel is to one process without its work: the model as
    `.module` (so state-dict keys keep DDP's `module.` prefix and checkpoints are the same
    files), no gradient buckets, no buffer broadcast."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def data_parallel(model, info, compiled=False):
    """The training model as every rank holds it: DistributedDataParallel, as the reference,
    except a compiled model in a single process, which gets SingleProcess. There DDP would
    only copy every gradient into its buckets and broadcast the buffers at every step, and
    torch.compile would split the step's graph at the bucket boundaries for nothing."""
    if compiled and info.world_size == 1:
        return SingleProcess(model)
    device_ids = [info.device.index] if info.device.type == 'cuda' else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def convert_global_batchnorm(module, traceable=False):
    """Replace every BatchNorm layer with one whose statistics are global across ranks.

    CUDA: nn.SyncBatchNorm (as the reference), unless `traceable` (torch.compile with more than
    one process): its autograd function drops empty ranks' statistics with boolean masks
    (`count_all[mask]`, torch/nn/modules/_functions.py, torch 2.14.1 lines 97-100), a shape
    that depends on values, so torch.compile breaks the graph at every layer. GlobalBatchNorm's
    collectives trace. CPU: GlobalBatchNorm. State-dict keys are unchanged.
    """
    if any(p.is_cuda for p in module.parameters()) and not traceable:
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
