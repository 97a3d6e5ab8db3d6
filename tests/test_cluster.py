"""Cluster launches on the CPU: SLURM and torchrun environments, a fake scontrol, real processes.

The launch logic is decisions on the environment. These tests give it the variables SLURM and
torchrun set (one task per node, one task per GPU, the batch script without srun), put a fake
`scontrol` on PATH that records its arguments, and start real processes: two "nodes" of one CPU
process each on this machine, entering through the same `distributed.launch` a cluster run does.
"""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

import backbones
import bench
import distributed
import evaluate
import main
import preemption
from cli import InputError
from conftest import ROOT
from test_main import load_state, read_stats, tiny_args

JOB = '4242'
SLURM_TWO_NODES = {'SLURM_JOB_ID': JOB, 'SLURM_JOB_NODELIST': 'gpu[01-02]', 'SLURM_NNODES': '2',
                   'SLURM_NTASKS': '2', 'SLURM_NODEID': '1', 'SLURM_PROCID': '1',
                   'SLURM_LOCALID': '0', 'SLURM_STEP_ID': '0'}
SLURM_TASK_PER_GPU = dict(SLURM_TWO_NODES, SLURM_NTASKS='16', SLURM_PROCID='13',
                          SLURM_LOCALID='5', SLURM_STEP_TASKS_PER_NODE='8(x2)')
FAKE_SCONTROL = """#!/bin/sh
# records its arguments; `show hostnames A,B` prints A and B (no bracket ranges)
echo "$@" >> "$SCONTROL_LOG"
if [ "$1" = show ] && [ "$2" = hostnames ]; then echo "$3" | tr ',' '\\n'; fi
"""


@pytest.fixture
def scontrol(tmp_path, monkeypatch):
    """A fake scontrol first on PATH; returns the log of its calls (one line each)."""
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    (bin_dir / 'scontrol').write_text(FAKE_SCONTROL)
    (bin_dir / 'scontrol').chmod(0o755)
    log = tmp_path / 'scontrol.log'
    log.touch()
    monkeypatch.setenv('PATH', f'{bin_dir}{os.pathsep}{os.environ["PATH"]}')
    monkeypatch.setenv('SCONTROL_LOG', str(log))
    return log


def calls(log):
    return log.read_text().splitlines()


# ---------------------------------------------------------------------------------------------
# Launch plans: pure decisions on the environment
# ---------------------------------------------------------------------------------------------

def plan(env, device='cuda', ngpus=8):
    return distributed.plan_launch(env, device, ngpus, master_host=lambda: 'gpu01')


def test_torchrun_plans_take_the_gpu_each_process_sees():
    torchrun = {'RANK': '3', 'WORLD_SIZE': '8', 'LOCAL_RANK': '1', 'LOCAL_WORLD_SIZE': '4'}
    p = plan(torchrun, ngpus=4)  # every process sees the node's 4 GPUs
    assert (p.nprocs, p.rank_offset, p.local_rank, p.world_size, p.init_method, p.device_index) \
        == (1, 3, 1, 8, 'env://', 1)
    assert plan(dict(torchrun, LOCAL_RANK='3'), ngpus=1).device_index == 0  # its own GPU
    with pytest.raises(InputError, match=r'local rank 3 of 4 .*LOCAL_RANK.* sees 2 GPUs '
                                         r'\(CUDA_VISIBLE_DEVICES=0,1\)'):
        plan(dict(torchrun, LOCAL_RANK='3', CUDA_VISIBLE_DEVICES='0,1'), ngpus=2)


def test_slurm_one_task_per_node_starts_one_process_per_gpu():
    p = plan(SLURM_TWO_NODES)
    assert (p.nprocs, p.rank_offset, p.world_size, p.device_index, p.slurm) == (8, 8, 16, 0, True)
    assert list(p.device_indices()) == list(range(8))
    assert p.init_method == 'tcp://gpu01:24242'
    other_job = plan(dict(SLURM_TWO_NODES, SLURM_JOB_ID='4243'))
    assert other_job.init_method != p.init_method  # no fixed port shared by two jobs
    given = plan(dict(SLURM_TWO_NODES, MASTER_ADDR='10.0.0.1', MASTER_PORT='29500'))
    assert given.init_method == 'tcp://10.0.0.1:29500'


@pytest.mark.parametrize('ngpus, index', [(1, 0), (8, 5)], ids=['gpus-per-task', 'all-visible'])
def test_slurm_one_task_per_gpu_uses_the_gpu_the_task_sees(ngpus, index):
    p = plan(SLURM_TASK_PER_GPU, ngpus=ngpus)
    assert (p.nprocs, p.rank_offset, p.local_rank, p.world_size, p.device_index) == \
        (1, 13, 5, 16, index)


def test_slurm_task_seeing_too_few_gpus_is_a_one_line_error():
    with pytest.raises(InputError) as error:
        plan(dict(SLURM_TASK_PER_GPU, CUDA_VISIBLE_DEVICES='0,1,2,3'), ngpus=4)
    message = str(error.value)
    assert '\n' not in message and 'local rank 5 of 8' in message
    assert 'SLURM_LOCALID' in message and 'CUDA_VISIBLE_DEVICES=0,1,2,3' in message


def test_batch_script_without_srun_is_a_local_launch():
    # `#SBATCH --ntasks-per-node 8` then plain `python main.py`: no job step, one node
    batch = {'SLURM_JOB_ID': JOB, 'SLURM_JOB_NODELIST': 'gpu01', 'SLURM_NNODES': '1',
             'SLURM_JOB_NUM_NODES': '1', 'SLURM_NTASKS': '8', 'SLURM_NODEID': '0',
             'SLURM_PROCID': '0', 'SLURM_LOCALID': '0'}
    p = plan(batch)
    assert (p.nprocs, p.rank_offset, p.world_size, p.slurm) == (8, 0, 8, False)
    assert p.init_method == 'tcp://localhost:{free_port}'
    assert plan(batch, 'cpu', 0) == distributed.LaunchPlan(1, 0, 0, 1, 'cpu')
    with pytest.raises(InputError, match=r'batch script of a 2-node SLURM job .*srun'):
        plan(dict(batch, SLURM_NNODES='2', SLURM_JOB_NUM_NODES='2'))


def test_slurm_step_on_the_cpu_is_one_gloo_rank_per_task():
    p = plan(SLURM_TWO_NODES, 'cpu', 0)
    assert (p.nprocs, p.rank_offset, p.world_size, p.device_type) == (1, 1, 2, 'cpu')
    single = plan(dict(SLURM_TWO_NODES, SLURM_NNODES='1', SLURM_NTASKS='1', SLURM_PROCID='0',
                       SLURM_NODEID='0'), 'cpu', 0)
    assert (single.world_size, single.init_method) == (1, None)  # no network for a group of one
    assert plan({}, 'cuda', 4).nprocs == 4 and plan({}, 'cpu', 0).nprocs == 1


def torchrun_env(node_rank, local_rank, nnodes=2, per_node=8):
    """What `torchrun --nnodes 2 --node-rank N --nproc-per-node 8 --master-addr machine-a
    --master-port 29500` gives each process it starts (the README's two machines without a
    scheduler; torchrun's static rendezvous on machine-a:29500)."""
    rank = node_rank * per_node + local_rank
    return {'RANK': str(rank), 'LOCAL_RANK': str(local_rank), 'GROUP_RANK': str(node_rank),
            'ROLE_RANK': str(rank), 'ROLE_NAME': 'default', 'LOCAL_WORLD_SIZE': str(per_node),
            'WORLD_SIZE': str(nnodes * per_node), 'GROUP_WORLD_SIZE': str(nnodes),
            'ROLE_WORLD_SIZE': str(nnodes * per_node), 'MASTER_ADDR': 'machine-a',
            'MASTER_PORT': '29500', 'TORCHELASTIC_USE_AGENT_STORE': 'True',
            'TORCHELASTIC_RUN_ID': 'none', 'TORCHELASTIC_RESTART_COUNT': '0'}


def test_two_machines_without_a_scheduler_are_one_run_of_sixteen_ranks():
    plans = {(node, local): plan(torchrun_env(node, local)) for node in (0, 1)
             for local in range(8)}
    assert sorted(p.rank_offset for p in plans.values()) == list(range(16))  # each rank once
    for (node, local), p in plans.items():
        # one process per torchrun worker, joining through MASTER_ADDR:MASTER_PORT (env://),
        # on the GPU of its local rank
        assert (p.nprocs, p.world_size, p.init_method, p.slurm) == (1, 16, 'env://', False)
        assert (p.rank_offset, p.device_index) == (node * 8 + local, local)
    # rank 0, which writes checkpoint.pth and stats.txt, is on machine A (node rank 0)
    assert plans[0, 0].rank_offset == 0 and plans[1, 0].rank_offset == 8
    # a process given one GPU of its own (CUDA_VISIBLE_DEVICES per process) uses that one
    assert plan(dict(torchrun_env(1, 5), CUDA_VISIBLE_DEVICES='5'), ngpus=1).device_index == 0
    cpu = plan(torchrun_env(1, 1, per_node=2), 'cpu', 0)
    assert (cpu.rank_offset, cpu.world_size, cpu.device_type) == (3, 4, 'cpu')
    # torchrun's variables win over a SLURM allocation's left in the shell (salloc)
    inside = plan(dict(SLURM_TWO_NODES, **torchrun_env(1, 2)))
    assert (inside.rank_offset, inside.world_size, inside.slurm) == (10, 16, False)
    # MASTER_ADDR without torchrun joins nothing: python main.py is each machine's own run
    alone = plan({'MASTER_ADDR': 'machine-a', 'MASTER_PORT': '29500'})
    assert (alone.nprocs, alone.world_size, alone.init_method) == \
        (8, 8, 'tcp://localhost:{free_port}')


def test_tasks_per_node_list_is_expanded():
    env = {'SLURM_STEP_TASKS_PER_NODE': '8(x2),4'}
    assert [distributed._tasks_on_node(env, n) for n in range(4)] == [8, 8, 4, None]
    assert distributed._tasks_on_node({}, 0) is None


def test_rendezvous_host_comes_from_scontrol(scontrol, monkeypatch):
    env = dict(SLURM_TWO_NODES, SLURM_JOB_NODELIST='node7,node8')
    p = distributed.plan_launch(env, 'cuda', 8)
    assert p.init_method == 'tcp://node7:24242'
    assert calls(scontrol) == ['show hostnames node7,node8']
    monkeypatch.setenv('PATH', '/nonexistent')
    with pytest.raises(InputError, match='cannot expand SLURM_JOB_NODELIST=node7,node8 .*'
                                         'MASTER_ADDR'):
        distributed.plan_launch(env, 'cuda', 8)


# ---------------------------------------------------------------------------------------------
# Device choice through launch() with the torch.cuda queries faked (no GPU here)
# ---------------------------------------------------------------------------------------------

class FakeCuda:
    """torch.cuda's queries of a machine whose GPUs are all of one kind."""

    def __init__(self, count, capability, archs, name='Tesla V100-SXM2-32GB'):
        self.count, self.capability, self.archs, self.name = count, capability, archs, name

    def install(self, monkeypatch):
        monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
        monkeypatch.setattr(torch.cuda, 'device_count', lambda: self.count)
        monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda index=None: self.capability)
        monkeypatch.setattr(torch.cuda, 'get_arch_list', lambda: list(self.archs))
        monkeypatch.setattr(torch.cuda, 'get_device_name', lambda index=None: self.name)
        return self


CU130_ARCHS = ['sm_75', 'sm_80', 'sm_86', 'sm_90', 'sm_100', 'sm_120', 'compute_120']
CU126_ARCHS = ['sm_50', 'sm_60', 'sm_70', 'sm_75', 'sm_80', 'sm_86', 'sm_90']


def fake_init(monkeypatch):
    """_init_process_group recording what it was asked (CPU stand-in: no NCCL here)."""
    seen = []

    def init(rank, local_rank, world_size, device_type, init_method=None, gpu=None):
        seen.append(dict(rank=rank, local_rank=local_rank, world_size=world_size,
                         device_type=device_type, gpu=gpu))
        return distributed.DistInfo(rank, local_rank, world_size, torch.device('cpu'))
    monkeypatch.setattr(distributed, '_init_process_group', init)
    return seen


def test_launch_under_srun_gpus_per_task_sets_device_zero(scontrol, monkeypatch):
    FakeCuda(1, (9, 0), CU130_ARCHS, 'NVIDIA H100 80GB HBM3').install(monkeypatch)
    for key, value in dict(SLURM_TASK_PER_GPU, SLURM_JOB_NODELIST='node7,node8').items():
        monkeypatch.setenv(key, value)
    seen = fake_init(monkeypatch)
    assert distributed.launch(lambda info: info.rank) == 13
    assert seen == [dict(rank=13, local_rank=5, world_size=16, device_type='cuda', gpu=0)]
    assert calls(scontrol) == ['show hostnames node7,node8']


@pytest.mark.parametrize('capability, archs, runs', [
    ((7, 0), CU130_ARCHS, False),  # V100 on the default PyPI build of torch 2.11+
    ((7, 0), CU126_ARCHS, True),
    ((8, 0), CU130_ARCHS, True),  # A100
    ((8, 9), ['sm_80', 'sm_86'], True),  # a later minor version of the same major
    ((9, 0), ['sm_80', 'sm_86'], False),  # a later major needs PTX
    ((9, 0), ['sm_80', 'compute_80'], True),
    ((9, 0), ['sm_90a'], True),
    ((10, 0), ['sm_90a'], False),  # arch-specific code runs on exactly that GPU
])
def test_gpu_capability_against_the_build(capability, archs, runs):
    assert any(distributed.arch_runs_on(a, capability) for a in archs) == runs


def test_v100_on_a_build_without_sm70_is_a_one_line_error(tiny_imagefolder, tmp_path, monkeypatch,
                                                          capsys):
    FakeCuda(1, (7, 0), CU130_ARCHS).install(monkeypatch)
    seen = fake_init(monkeypatch)
    argv = tiny_args(tiny_imagefolder, tmp_path / 'ck')
    argv[argv.index('--device') + 1] = 'cuda'
    with pytest.raises(SystemExit) as exit_info:
        main.main(argv)
    assert seen == []  # nothing started on the GPU
    message = str(exit_info.value.code)
    assert '\n' not in message and message.startswith('main.py: error: GPU 0 (Tesla V100')
    assert 'compute capability 7.0' in message and 'sm_75 sm_80' in message
    assert message.endswith(distributed.CU126_INSTALL)
    FakeCuda(1, (7, 0), CU126_ARCHS).install(monkeypatch)
    distributed.check_gpu_supported(0)  # the cu126 build runs there


# ---------------------------------------------------------------------------------------------
# Stop requests agree on the run's own group, also when read one step late (as on a GPU)
# ---------------------------------------------------------------------------------------------

def test_lagged_agreement_answers_one_call_late():
    # the GPU path's bookkeeping, on a real gloo group (of one rank: the answers of several
    # ranks agreeing is the all-reduce's part, shown by test_reliability's two processes)
    dist.init_process_group('gloo', store=dist.HashStore(), rank=0, world_size=1)
    try:
        stop = preemption.StopRequests(2, 'cpu', lagged=True)
        try:
            answers = [stop.agreed(due=True)]
            stop.received = signal.SIGUSR1
            answers += [stop.agreed(), stop.agreed()]
        finally:
            stop.close()
    finally:
        distributed.cleanup()
    assert answers == [(0, False), (0, True), (int(signal.SIGUSR1), False)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
def test_lagged_agreement_on_a_gpu_queues_without_waiting():
    # NCCL over one rank: the device tensor, the pinned copy and the event of the real path
    torch.cuda.set_device(0)
    dist.init_process_group('nccl', store=dist.HashStore(), rank=0, world_size=1)
    try:
        stop = preemption.StopRequests(2, 'cuda')
        try:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode('error')
            try:
                answers = [stop.agreed(due=True)]  # queues its work, reads nothing back
            finally:
                torch.cuda.set_sync_debug_mode('default')
            stop.received = signal.SIGUSR1
            answers += [stop.agreed(), stop.agreed()]
        finally:
            stop.close()
    finally:
        distributed.cleanup()
    assert stop.lagged and answers == [(0, False), (0, True), (int(signal.SIGUSR1), False)]


# ---------------------------------------------------------------------------------------------
# Real processes: two "nodes" of one task each, as srun starts them
# ---------------------------------------------------------------------------------------------

def task_env(rank, port, nnodes=2, per_node=1):
    """The environment srun gives task `rank` of nnodes x per_node tasks."""
    env = dict(os.environ, SLURM_JOB_ID=JOB, SLURM_STEP_ID='0', SLURM_NNODES=str(nnodes),
               SLURM_NTASKS=str(nnodes * per_node), SLURM_NODEID=str(rank // per_node),
               SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank % per_node),
               SLURM_STEP_TASKS_PER_NODE=f'{per_node}(x{nnodes})',
               SLURM_JOB_NODELIST=','.join(['localhost'] * nnodes), MASTER_PORT=str(port),
               OMP_NUM_THREADS='1')
    for key in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR'):
        env.pop(key, None)
    return env


def start_tasks(script, argv, nnodes=2, per_node=1):
    port = distributed.free_port()
    # each task in its own session, so that a signal goes to a process group as SLURM sends it
    return [subprocess.Popen([sys.executable, str(ROOT / script), *argv],
                             env=task_env(rank, port, nnodes, per_node), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
            for rank in range(nnodes * per_node)]


def finish(procs, timeout=300):
    outputs = []
    for p in procs:
        try:
            outputs.append(p.communicate(timeout=timeout))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            errors = [q.communicate()[1][-2000:] for q in procs[len(outputs):]]
            raise AssertionError(f'a task did not finish in {timeout} s: {errors}') from None
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outputs)]


def wait_for_steps(path, count, procs, timeout=300):
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_text().count('"step"') >= count):
        if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
            for p in procs:
                p.kill()
            raise AssertionError(f'no {count} logged steps: {finish(procs)}')
        time.sleep(0.05)


def logged_steps(ckdir):
    _, stats = read_stats(ckdir)
    return [s['step'] for s in stats if 'step' in s]


def test_two_nodes_train_and_requeue_on_sigusr1(tiny_imagefolder, tmp_path, scontrol):
    ckdir = tmp_path / 'ck'
    procs = start_tasks('main.py', tiny_args(tiny_imagefolder, ckdir, epochs=50))
    wait_for_steps(ckdir / 'stats.txt', 2, procs)
    for p in procs:  # SLURM signals every task of the job
        os.killpg(p.pid, signal.SIGUSR1)
    results = finish(procs)
    assert [rc for rc, _, _ in results] == [0, 0], results
    assert 'world size 2' in results[0][1]
    assert 'checkpoint saved; job requeued' in results[0][2]
    assert calls(scontrol).count(f'requeue {JOB}') == 1  # rank 0 requeues, once
    assert calls(scontrol).count('show hostnames localhost,localhost') == 2
    ckpt = load_state(ckdir / 'checkpoint.pth')
    done = ckpt['epoch'] * 3 + ckpt['step_in_epoch']  # 12 images, batch 4: 3 steps per epoch
    assert logged_steps(ckdir) == list(range(done))  # the checkpoint holds every step run
    # the requeued job: both nodes start again and continue at the checkpoint's step
    results = finish(start_tasks('main.py', tiny_args(tiny_imagefolder, ckdir,
                                                      epochs=ckpt['epoch'] + 1)))
    assert [rc for rc, _, _ in results] == [0, 0], results
    assert logged_steps(ckdir) == list(range(3 * ckpt['epoch'] + 3))  # none twice, none lost
    assert (ckdir / 'resnet18.pth').exists()


def test_two_machines_with_torchrun_train_as_one_run(tiny_imagefolder, tmp_path):
    # The README's two commands, one per "machine" (here both on this one), with one CPU process
    # each: torchrun's static rendezvous on the first machine's --master-addr/--master-port.
    port = distributed.free_port()
    ckdir = tmp_path / 'ck'
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(('SLURM_', 'TORCHELASTIC_')) and
           k not in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT')}
    env['OMP_NUM_THREADS'] = '1'
    procs = [subprocess.Popen([sys.executable, '-m', 'torch.distributed.run', '--nnodes', '2',
                               '--node-rank', str(node), '--nproc-per-node', '1',
                               '--master-addr', 'localhost', '--master-port', str(port),
                               str(ROOT / 'main.py'),
                               *tiny_args(tiny_imagefolder, ckdir, epochs=1)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)
             for node in (0, 1)]
    results = finish(procs)
    assert [rc for rc, _, _ in results] == [0, 0], results
    assert 'world size 2' in results[0][1]  # machine A's process is rank 0 and logs the run
    assert 'world size' not in results[1][1]
    assert load_state(ckdir / 'checkpoint.pth')['epoch'] == 1
    assert logged_steps(ckdir) == [0, 1, 2]  # 12 images, global batch 4: each step once
    assert (ckdir / 'resnet18.pth').exists()


def test_evaluate_one_task_per_gpu_requeues_on_sigusr1_and_resumes_at_the_step(tiny_imagefolder, tmp_path,
                                                              scontrol):
    backbone = tmp_path / 'resnet18.pth'
    torch.save(backbones.build_backbone('resnet18', True)[0].state_dict(), backbone)
    ckdir = tmp_path / 'lincls'

    def eval_argv(epochs):
        return [str(tiny_imagefolder), str(backbone), '--arch', 'resnet18', '--cifar-stem',
                '--crop-size', '16', '--batch-size', '4', '--epochs', str(epochs), '--workers',
                '0', '--device', 'cpu', '--print-freq', '1', '--checkpoint-dir', str(ckdir)]
    # one node, one task per (would-be) GPU
    procs = start_tasks('evaluate.py', eval_argv(100), nnodes=1, per_node=2)
    wait_for_steps(ckdir / 'stats.txt', 2, procs)
    for p in procs:
        os.killpg(p.pid, signal.SIGUSR1)
    results = finish(procs)
    assert [rc for rc, _, _ in results] == [0, 0], results
    assert 'checkpoint saved; job requeued' in results[0][2]
    assert calls(scontrol).count(f'requeue {JOB}') == 1
    assert calls(scontrol).count('show hostnames localhost') == 2  # each task asks
    ckpt = load_state(ckdir / 'checkpoint.pth')
    done = ckpt['epoch'] * 3 + ckpt['step_in_epoch']
    assert logged_steps(ckdir) == list(range(done))
    results = finish(start_tasks('evaluate.py', eval_argv(ckpt['epoch'] + 1), nnodes=1,
                                 per_node=2))
    assert [rc for rc, _, _ in results] == [0, 0], results
    assert logged_steps(ckdir) == list(range(3 * ckpt['epoch'] + 3))
    assert load_state(ckdir / 'checkpoint.pth')['epoch'] == ckpt['epoch'] + 1
    assert calls(scontrol).count(f'requeue {JOB}') == 1


def test_knn_evaluation_requeues_and_exits_on_sigusr1(tiny_imagefolder, tmp_path, scontrol,
                                                      monkeypatch, capsys):
    # kNN keeps nothing to resume from: the requeued job runs it again
    backbone = tmp_path / 'resnet18.pth'
    torch.save(backbones.build_backbone('resnet18', True)[0].state_dict(), backbone)
    monkeypatch.setenv('SLURM_JOB_ID', JOB)

    def ignore(signum, frame):  # without evaluate's handler the signal must not end the session
        pass

    def preempted_knn(info, args):
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(10)  # interrupted by the signal's handler
        raise AssertionError('SIGUSR1 did not stop the kNN evaluation')
    monkeypatch.setattr(evaluate, 'knn_main', preempted_knn)
    before = signal.signal(signal.SIGUSR1, ignore)
    try:
        with pytest.raises(SystemExit) as exit_info:
            evaluate.main([str(tiny_imagefolder), str(backbone), '--knn', '--arch', 'resnet18',
                           '--cifar-stem', '--device', 'cpu', '--checkpoint-dir', str(tmp_path)])
    finally:
        restored = signal.signal(signal.SIGUSR1, before)
    assert restored is ignore and exit_info.value.code == 0
    assert 'during the kNN evaluation; nothing to save, the requeued job starts it over' in \
        capsys.readouterr().err
    assert calls(scontrol) == [f'requeue {JOB}']


def test_failed_requeue_is_a_warning_not_a_success(scontrol, monkeypatch, capsys):
    scontrol.parent.joinpath('bin', 'scontrol').write_text(
        '#!/bin/sh\necho "scontrol: error: Job is not requeueable" >&2\nexit 1\n')
    monkeypatch.setenv('SLURM_JOB_ID', JOB)
    assert preemption.StopRequests.requeue_if_slurm(signal.SIGUSR1) is False
    assert capsys.readouterr().err == (f'warning: scontrol requeue {JOB} failed (scontrol: error: '
                                       'Job is not requeueable); resubmit the job to continue\n')
    assert preemption.StopRequests.requeue_if_slurm(signal.SIGTERM) is False  # nothing to do
    monkeypatch.setenv('PATH', '/nonexistent')
    assert preemption.StopRequests.requeue_if_slurm(signal.SIGUSR1) is False
    assert 'No such file' in capsys.readouterr().err


def test_batch_script_of_two_nodes_stops_at_once(tiny_imagefolder, tmp_path, scontrol,
                                                 monkeypatch, capsys):
    env = task_env(0, distributed.free_port())
    del env['SLURM_STEP_ID']
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit) as exit_info:
        main.main(tiny_args(tiny_imagefolder, tmp_path / 'ck'))
    message = str(exit_info.value.code)
    assert '\n' not in message and 'batch script of a 2-node SLURM job' in message
    assert not (tmp_path / 'ck').exists() and calls(scontrol) == []


def test_bench_checks_the_gpu_too(monkeypatch):
    FakeCuda(1, (7, 0), CU130_ARCHS).install(monkeypatch)
    with pytest.raises(SystemExit) as exit_info:
        bench.main(['--device', 'cuda'])
    message = str(exit_info.value.code)
    assert message.startswith('bench.py: error: GPU 0 (Tesla V100') and '\n' not in message
