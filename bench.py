"""Benchmarks, side by side in one run: the training step, and (with --data) the input pipeline.

    python bench.py                      # training step: reference settings vs --fast settings
    python bench.py --data               # + input pipeline images/s per worker process
    python bench.py --batch-size 256 --steps 20 --settings reference fast   # on a GPU
    python bench.py --knn-memory         # kNN peak memory per rank for ImageNet on 8 ranks

The training step uses synthetic tensors (ResNet-50, 8192-8192-8192 projector, 224 px, batch 256
per device by default on a GPU; smaller defaults on a CPU, printed with the results). "reference"
is the original's settings (fp16 autocast with a gradient scaler on GPU / fp32 on CPU, NCHW,
per-parameter LARS); "fast" is --fast (bf16, channels-last, torch.compile, multi-tensor LARS,
and the fast augmentation's device half, which it has to pay for: its steps start from uint8
crops in pinned host memory, copied and augmented as main.py does).
Printed as a table with ratios to the first setting; peak memory is the device's peak allocation
(CUDA) or the process's peak resident set (CPU).
"""
import argparse
import contextlib
import itertools
import json
import math
import multiprocessing
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
from PIL import Image
import torch
import torchvision

import augmentations
import distributed
import knn
import main as pretrain
import pack
from compiled_step import CompiledStep
from backbones import ARCHS
from cli import (USER_ERRORS, ArgumentParser, InputError, check_distinct, command_line,
                 default_workers, error_line, non_negative_int, positive_int, read_lines)
from data import image_folder
from monitor import Progress

SETTINGS = {
    'reference': dict(precision=None, channels_last=False, compile=False, lars_foreach=False,
                      fast_augment=False),
    'fast': dict(precision='bf16', channels_last=True, compile=True, lars_foreach=True,
                 fast_augment=True),
    'fast-nocompile': dict(precision='bf16', channels_last=True, compile=False, lars_foreach=True,
                           fast_augment=True),
    # --fast's step alone, from float tensors: the difference to 'fast' is the device half
    'fast-noaugment': dict(precision='bf16', channels_last=True, compile=True, lars_foreach=True,
                           fast_augment=False),
    # --fast inside DistributedDataParallel although one process: what torch.compile's graph
    # splitting at DDP's gradient buckets (and DDP's own copies) cost, as on several GPUs
    'fast-ddp': dict(precision='bf16', channels_last=True, compile=True, lars_foreach=True,
                     fast_augment=True, ddp=True),
}


def get_arguments():
    parser = ArgumentParser(description=__doc__.split('\n')[0], prog='bench.py')
    parser.add_argument('--device', default='auto', choices=('auto', 'cuda', 'cpu'),
                        help='where the training step runs: auto is the first GPU, else the CPU')
    parser.add_argument('--arch', default='resnet50', choices=ARCHS,
                        help='backbone of the timed model, as main.py --arch')
    parser.add_argument('--projector', default='8192-8192-8192', metavar='MLP',
                        help='projector of the timed model, as main.py --projector')
    parser.add_argument('--batch-size', type=positive_int, default=None, metavar='N',
                        help='images per step on the one device (default: 256 on a GPU, 16 on '
                             'a CPU)')
    parser.add_argument('--crop-size', type=positive_int, default=224, metavar='PX',
                        help='side of the synthetic views, as main.py --crop-size')
    parser.add_argument('--steps', type=positive_int, default=None, metavar='N',
                        help='timed steps per setting (default: 20 on a GPU, 3 on a CPU)')
    parser.add_argument('--warmup', type=non_negative_int, default=None, metavar='N',
                        help='untimed steps before them, where torch.compile compiles '
                             '(default: 10 on a GPU, 1 on a CPU)')
    parser.add_argument('--settings', nargs='+', default=['reference', 'fast'],
                        choices=sorted(SETTINGS), metavar='SETTING',
                        help='training-step settings to compare, the first being the base of '
                             'the ratios: reference (the original\'s), fast (--fast), '
                             'fast-nocompile (--fast without --compile), fast-noaugment (--fast '
                             'from float views, without the augmentation\'s device half), '
                             'fast-ddp (--fast inside DistributedDataParallel, as on several '
                             'GPUs; not with --end-to-end)')
    parser.add_argument('--breakdown', type=non_negative_int, default=0, metavar='N',
                        help='also profile N steps per setting (torch.profiler) and print where '
                             'their time goes: convolutions, BatchNorm and elementwise, matrix '
                             'products, augmentation, optimizer, copies, idle (default 0: off)')
    parser.add_argument('--end-to-end', action='store_true',
                        help='instead of the step alone: main.py\'s loader and training loop over '
                             'JPEG files (--images, or --generate generated ones), --epochs '
                             'epochs per setting, the first one untimed (compiling, warming up)')
    parser.add_argument('--generate', type=positive_int, default=None, metavar='N',
                        help='--end-to-end without --images: generate N 500x375 JPEGs (default '
                             '10000 on a GPU, 40 on a CPU); not a multiple of the batch size, '
                             'so that every epoch ends with a short batch')
    parser.add_argument('--workers', type=non_negative_int, default=None, metavar='N',
                        help='--end-to-end: DataLoader worker processes (default: as main.py)')
    parser.add_argument('--epochs', type=positive_int, default=3, metavar='N',
                        help='--end-to-end: epochs per setting, the first untimed (default 3)')
    parser.add_argument('--skip-steps', type=non_negative_int, default=5, metavar='N',
                        help='--end-to-end: steps at the start of each epoch left out of its '
                             'steady rate (the loader\'s workers starting; default 5)')
    parser.add_argument('--work-dir', type=Path, default=None, metavar='DIR',
                        help='--end-to-end: where the generated images and each setting\'s '
                             'stats.txt go (default: a temporary directory, removed after)')
    parser.add_argument('--log', type=Path, default=None, metavar='FILE',
                        help='append every result to FILE as a JSON line the moment it is '
                             'measured (a run stopped at a time limit keeps what it measured); '
                             'default: no log')
    parser.add_argument('--summary', type=Path, nargs='+', default=None, metavar='LOG',
                        help='only print one table of every result in these --log files '
                             '(default: measure, do not summarise)')
    parser.add_argument('--data', action='store_true',
                        help='also measure the input pipeline: images per CPU-second of one '
                             'worker process, reference PIL pipeline against the fast path\'s '
                             'worker half, from JPEG files and from a pack.py file')
    parser.add_argument('--knn-memory', action='store_true',
                        help='only print the kNN evaluation\'s peak memory per rank for an '
                             'ImageNet-sized bank on 8 ranks, before and after sharding the bank '
                             '(arithmetic from the code\'s shapes; runs nothing)')
    parser.add_argument('--images', default=None, metavar='DIR',
                        help='an ImageFolder DIR for --data and --end-to-end (default: '
                             'generated 500x375 JPEGs: 200 for --data)')
    return parser


def peak_memory_gib(device):
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def reset_peak_memory(device):
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)


def dynamo_counts():
    """(graph breaks, graphs compiled) so far in this process, from dynamo's own counters."""
    from torch._dynamo.utils import counters
    return sum(counters['graph_break'].values()), counters['stats']['unique_graphs']


def fresh_compiler():
    """Forget earlier settings' compiled code and counts: each setting compiles on its own."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()


REGIONS = ('augment', 'forward', 'backward', 'optimizer')


class RegionTimer:
    """Device time of each region of a step: CUDA events on the compute stream (what the GPU
    spent between the region's start and end, its idle moments included), or host time on a
    CPU. Also a torch.profiler range per region ('bench:<region>') for breakdown()."""

    def __init__(self, device):
        self.cuda = device.type == 'cuda'
        self.marks = []  # [(region, start, end)], read after a synchronize
        self.markers = None  # breakdown(): [region] of every marker kernel launched

    @contextlib.contextmanager
    def __call__(self, region):
        if self.markers is not None and self.cuda:
            # a kernel that does nothing, named spin_kernel in the profile: the GPU timeline's
            # own mark of where this region's kernels start (kernels launched by the autograd
            # engine's thread, or by compiled code, carry no trace of the Python range)
            torch.cuda._sleep(1)
            self.markers.append(region)
        with torch.profiler.record_function(f'bench:{region}'):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(
                    enable_timing=True)
                start.record()
                yield
                end.record()
            else:
                start = time.perf_counter()
                yield
                end = time.perf_counter()
        self.marks.append((region, start, end))

    def totals_ms(self):
        totals = dict.fromkeys(REGIONS, 0.0)
        for region, start, end in self.marks:
            totals[region] += start.elapsed_time(end) if self.cuda else 1000 * (end - start)
        self.marks = []
        return totals


class StepBench:
    """One setting's model, optimizer and inputs, and main.py's training step on them, from
    synthetic tensors (no loader): the step alone."""

    def __init__(self, args, setting, device):
        options = dict(SETTINGS[setting])
        self.ddp = options.pop('ddp', False)
        run_args = argparse.Namespace(
            arch=args.arch, cifar_stem=False, projector=args.projector, lambd=0.0051,
            batch_size=args.batch_size, scale_loss=1.0, learning_rate=None, weight_decay=1e-6,
            **options)
        self.device, self.args = device, args
        precision = run_args.precision or ('fp16' if device.type == 'cuda' else 'fp32')
        info = distributed.DistInfo(rank=0, local_rank=device.index or 0, world_size=1,
                                    device=device)
        torch.manual_seed(0)
        model, self.optimizer = pretrain.build_model_and_optimizer(run_args, info)
        if self.ddp:  # DDP around the compiled step even in one process, as on several GPUs
            model = torch.nn.parallel.DistributedDataParallel(
                model.module, device_ids=[device.index] if device.type == 'cuda' else None)
        for group in self.optimizer.param_groups:
            group['lr'] = 0.1 if group is self.optimizer.param_groups[0] else 0.0024
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == 'fp16')
        memory_format = torch.channels_last if run_args.channels_last else \
            torch.preserve_format
        shape = (args.batch_size, 3, args.crop_size, args.crop_size)
        augment = augmentations.FastTwoViews().to(device) if run_args.fast_augment else None
        # what main.py's training step reads: main.forward, main.views_to_device
        self.run = types.SimpleNamespace(
            args=argparse.Namespace(seed=0), info=info, model=model, precision=precision,
            augment=augment, memory_format=memory_format, compiled_step=None)
        if run_args.compile:
            self.run.compiled_step = CompiledStep(
                model, augment, pretrain.AUTOCAST_DTYPES.get(precision), device, shape,
                memory_format)
        self.precision, self.timer = precision, RegionTimer(device)
        labels = torch.zeros(args.batch_size, dtype=torch.long)
        if run_args.fast_augment:  # uint8 crops in pinned host memory, as the loader gives
            crops = [torch.randint(0, 256, shape, dtype=torch.uint8) for _ in range(2)]
            if device.type == 'cuda':
                crops, labels = [c.pin_memory() for c in crops], labels.pin_memory()
            self.host = (crops, labels)
        else:  # the reference's float views, already on the device
            self.host = None
            self.views = [torch.randn(shape, device=device).contiguous(
                memory_format=torch.channels_last if run_args.channels_last else
                torch.contiguous_format) for _ in range(2)]
        self.inputs = self._inputs()

    def _inputs(self):
        """(step, views or the compiled step's inputs) forever, as main.device_batches."""
        if self.run.compiled_step is not None and self.host is not None:
            batches = ((step, (self.host[0], self.host[1])) for step in itertools.count())
            yield from ((step, views) for step, views, _ in
                        self.run.compiled_step.prefetch(batches))
        for step in itertools.count():
            yield step, self.host[0] if self.host is not None else self.views

    def step(self):
        """main.train_one_epoch's step (without its probe, logging and checks), region by
        region."""
        step, views = next(self.inputs)
        run, timer = self.run, self.timer
        self.optimizer.zero_grad()
        compiled = run.compiled_step
        stance = compiled.stance(views[0]) if compiled else contextlib.nullcontext()
        with stance:
            with timer('augment'):
                if compiled is not None:
                    views = compiled.augment_views(*views)
                elif run.augment is not None:
                    views = pretrain.views_to_device(run, *views, step)
            with timer('forward'):
                if compiled is not None:
                    loss, _ = compiled.forward(*views)
                else:
                    loss, _ = pretrain.forward(run, views)
            with timer('backward'):
                self.scaler.scale(loss).backward()
        with timer('optimizer'):
            self.scaler.step(self.optimizer)
            self.scaler.update()


def step_images_per_second(args, setting, device):
    """Images/s of full training steps (both views, loss, backward, LARS) with one setting,
    with the device time per region, peak memory and the compiler's graph counts."""
    fresh_compiler()
    bench = StepBench(args, setting, device)
    for _ in range(args.warmup):
        bench.step()
    synchronize(device)
    bench.timer.totals_ms()
    breaks, graphs = dynamo_counts()
    reset_peak_memory(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        bench.step()
    synchronize(device)
    elapsed = time.perf_counter() - start
    regions = {k: v / args.steps for k, v in bench.timer.totals_ms().items()}
    breaks_after, graphs_after = dynamo_counts()
    return dict(rate=args.steps * args.batch_size / elapsed, memory=peak_memory_gib(device),
                precision=bench.precision, step_ms=1000 * elapsed / args.steps,
                regions=regions, graph_breaks=breaks_after, graphs=graphs,
                recompilations=graphs_after - graphs, bench=bench)


# ---------------------------------------------------------------------------------------------
# Where the step's time goes: torch.profiler over a few steps
# ---------------------------------------------------------------------------------------------

KERNEL_GROUPS = ('convolutions', 'BatchNorm and elementwise', 'matrix products', 'augmentation',
                 'optimizer', 'copies', 'idle')


def kernel_group(name, region):
    """The group of a kernel (GPU) or leaf operator (CPU) launched in `region` of the step."""
    low = name.lower()
    if low.startswith(('memcpy', 'memset')) or 'copy_kernel' in low or low in (
            'aten::copy_', 'aten::_to_copy'):
        return 'copies'
    if region in ('augment', 'optimizer'):
        return 'augmentation' if region == 'augment' else 'optimizer'
    if any(k in low for k in ('conv', 'cudnn', 'fprop', 'dgrad', 'wgrad', 'winograd',
                              'nchwtonhwc', 'nhwctonchw')):
        return 'convolutions'
    if any(k in low for k in ('gemm', 'nvjet', 'cutlass', 'matmul', 'aten::mm', 'aten::addmm',
                              'aten::bmm', 'xmma')):
        return 'matrix products'
    return 'BatchNorm and elementwise'


def _union_us(intervals):
    busy, end = 0.0, -math.inf
    for start, stop in sorted(intervals):
        if stop > end:
            busy += stop - max(start, end)
            end = stop
    return busy


def breakdown(bench, steps):
    """{group: ms per step} for `steps` profiled steps of a StepBench: device kernels on a GPU
    (leaf operators' own time on a CPU), each in the region whose 'bench:' range launched it
    (the augmentation and the optimizer by region, the rest by kernel name), and the idle
    time between the first and last kernel that no kernel covered."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    cuda = bench.device.type == 'cuda'
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    bench.timer.markers = []
    try:
        with profile(activities=activities) as prof:
            for _ in range(steps):
                bench.step()
            synchronize(bench.device)
    finally:
        markers, bench.timer.markers = bench.timer.markers, None
        bench.timer.totals_ms()
    events = list(prof.events())
    windows = sorted((e.time_range.start, e.time_range.end, e.name[len('bench:'):])
                     for e in events if e.name.startswith('bench:') and
                     e.device_type == DeviceType.CPU)

    def region_at(t):
        for start, end, region in windows:
            if start <= t <= end:
                return region
        return None

    # on a GPU: each kernel belongs to the region whose marker kernel last started before it
    spins = sorted(e.time_range.start for e in events
                   if e.device_type != DeviceType.CPU and 'spin_kernel' in e.name)
    gpu_regions = list(zip(spins, markers)) if len(spins) == len(markers) else []

    def gpu_region_at(t):
        found = None
        for start, region in gpu_regions:
            if start > t:
                break
            found = region
        return found

    def operator(e):  # on a CPU, the operators stand for kernels
        return e.device_type == DeviceType.CPU and e.name.startswith(('aten::', 'cpp_fused'))

    kernels = []  # (name, region, start, end, busy) in microseconds
    for e in events:
        if e.name.startswith('bench:'):
            continue
        if cuda and e.device_type == DeviceType.CUDA:
            if 'spin_kernel' in e.name:
                continue
            kernels.append((e.name, gpu_region_at(e.time_range.start), e.time_range.start,
                            e.time_range.end, e.time_range.elapsed_us()))
        elif not cuda and operator(e):  # its own time, its children's left to them
            outermost = e.cpu_parent is None or not operator(e.cpu_parent)
            kernels.append((e.name, region_at(e.time_range.start), e.time_range.start,
                            e.time_range.end if outermost else e.time_range.start,
                            e.self_cpu_time_total))
    groups = dict.fromkeys(KERNEL_GROUPS, 0.0)
    by_name = {}
    for name, region, _, _, busy in kernels:
        group = kernel_group(name, region)
        groups[group] += busy / 1000 / steps
        key = (name[:120], group)
        by_name[key] = by_name.get(key, 0.0) + busy / 1000 / steps
    if kernels:
        span = max(k[3] for k in kernels) - min(k[2] for k in kernels)
        groups['idle'] = (span - _union_us([k[2:4] for k in kernels])) / 1000 / steps
    groups['unattributed kernels'] = sum(1 for k in kernels if k[1] is None) / steps
    # the longest kernels and their groups: what the grouping by name rests on
    groups['top kernels'] = [[name, group, round(ms, 3)] for (name, group), ms in
                             sorted(by_name.items(), key=lambda item: -item[1])[:25]]
    return groups


# ---------------------------------------------------------------------------------------------
# End to end: main.py's own loader and training loop on JPEG files
# ---------------------------------------------------------------------------------------------

# main.py's flags for each setting (fast-ddp has none: no flag puts DDP around one process)
SETTING_FLAGS = {
    'reference': [],
    'fast': ['--fast'],
    'fast-nocompile': ['--precision', 'bf16', '--channels-last', '--lars-foreach',
                       '--fast-augment'],
    'fast-noaugment': ['--precision', 'bf16', '--channels-last', '--compile', '--lars-foreach'],
}


class StepClock(Progress):
    """main.py's progress display, also marking the end of every step on the device (a CUDA
    event, or the host clock on a CPU), so that a rate can leave out an epoch's first steps."""

    def __init__(self, *args, device=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.cuda = device is not None and device.type == 'cuda'
        self.marks = []

    def step(self, loss=None):
        super().step(loss)
        if self.cuda:
            mark = torch.cuda.Event(enable_timing=True)
            mark.record()
        else:
            mark = time.perf_counter()
        self.marks.append(mark)

    def seconds_between(self, first, last):
        a, b = self.marks[first], self.marks[last]
        return a.elapsed_time(b) / 1000 if self.cuda else b - a


def end_to_end(args, setting, device, images, work, report):
    """main.py's loader (--workers processes over `images`) and training loop, one epoch at a
    time: the first compiles and warms up, the others are timed. report(dict) gets one line
    per epoch as soon as it ends."""
    fresh_compiler()
    argv = [str(images), '--arch', args.arch, '--projector', args.projector,
            '--crop-size', str(args.crop_size), '--batch-size', str(args.batch_size),
            '--workers', str(args.workers), '--epochs', str(args.epochs),
            '--warmup-epochs', '1', '--print-freq', str(10**9), '--device', device.type,
            '--checkpoint-dir', str(work / f'e2e-{setting}'), *SETTING_FLAGS[setting]]
    run_args = pretrain.parse_arguments(argv)
    info = distributed.DistInfo(rank=0, local_rank=device.index or 0, world_size=1,
                                device=device)
    run, _, _ = pretrain.build_run(info, run_args)
    run.progress = StepClock(len(run.loader), run_args.epochs, run_args.batch_size, False,
                             device=device)
    full = run.loader.batch_size
    skip = min(args.skip_steps, max(0, len(run.loader) - 2))
    results = []
    try:
        for epoch in range(run_args.epochs):
            if epoch == 1:
                reset_peak_memory(device)
                graphs_after_warmup = dynamo_counts()[1]
            run.progress.marks = []
            start = time.perf_counter()
            pretrain.train_one_epoch(run, epoch)
            synchronize(device)
            seconds = time.perf_counter() - start
            epoch_images = run.loader.sampler.epoch_samples
            sizes = [full] * (len(run.loader) - 1) + [epoch_images - full *
                                                      (len(run.loader) - 1)]
            full_steps = len(run.loader) - (sizes[-1] != full)  # the short last batch: eager
            steady = run.progress.seconds_between(skip, full_steps - 1)
            line = dict(setting=setting, epoch=epoch, warmup=epoch == 0, images=sum(sizes),
                        seconds=round(seconds, 2),
                        epoch_images_per_s=round(sum(sizes) / seconds, 1),
                        steady_images_per_s=round(full * (full_steps - 1 - skip) / steady, 1)
                        if steady > 0 else None,
                        peak_memory_gib=round(peak_memory_gib(device), 2))
            if epoch >= 1:
                breaks, graphs = dynamo_counts()
                line.update(graph_breaks=breaks, recompilations=graphs - graphs_after_warmup)
            report(line)
            results.append(line)
    finally:
        run.log.close()
        run.stop.close()
    timed = [r for r in results if not r['warmup']]
    return dict(rate=sum(r['steady_images_per_s'] for r in timed) / len(timed),
                epoch_rate=sum(r['images'] for r in timed) / sum(r['seconds'] for r in timed),
                memory=timed[-1]['peak_memory_gib'], graph_breaks=timed[-1]['graph_breaks'],
                recompilations=timed[-1]['recompilations'],
                eager_steps=run.compiled_step.eager_steps if run.compiled_step else 0)


def synchronize(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def rounded(value, digits=3):
    """`value` as printed, to `digits` significant digits in plain notation (1340, 13.4,
    0.0134). Ratios are computed from these printed values, so a table is consistent with
    itself whatever the rates."""
    if value <= 0 or not math.isfinite(value):
        return f'{value:.1f}'
    decimals = max(0, digits - 1 - math.floor(math.log10(value)))
    return f'{value:.{decimals}f}'


def ratio(value, base):
    value, base = float(rounded(value)), float(rounded(base))
    return f'{value / base:.2f}x' if base > 0 else '-'


def print_table(title, rows, unit):
    print(f'\n{title}')
    base = rows[0][1]
    print(f'| setting | {unit} | ratio | peak memory (GiB) | notes |')
    print('|---|---|---|---|---|')
    for name, value, memory, notes in rows:
        print(f'| {name} | {rounded(value)} | {ratio(value, base)} | {memory:.2f} | {notes} |')


def announce(args, setting):
    """What is about to happen, on stderr: compiling can take minutes without a word."""
    compiling = ' (torch.compile compiles the model there: minutes on a CPU)' \
        if SETTINGS[setting]['compile'] else ''
    print(f'bench.py: {setting}: {args.warmup} untimed step{"s" if args.warmup != 1 else ""}'
          f'{compiling}, then {args.steps} timed', file=sys.stderr, flush=True)


def cpu_model():
    """The CPU's model name from /proc/cpuinfo (Linux), else what platform knows."""
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe(device):
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else \
        f'CPU ({cpu_model()}, {len(os.sched_getaffinity(0))} usable, ' \
        f'{torch.get_num_threads()} threads)'
    return (f'{name}; torch {torch.__version__}, torchvision {torchvision.__version__}, '
            f'python {platform.python_version()}')


def generate_jpegs(root, count=200, size=(500, 375), seed=0, workers=1):
    """`count` photo-like JPEGs (smooth colour fields plus sensor-like noise, quality 90) in the
    ImageFolder layout root/train/<class>/, about the size of ImageNet's typical 500x375.
    With several `workers`, chunks of images are written by as many processes (each chunk
    from its own seed, so the images differ from a one-process run's)."""
    if workers > 1 and count > workers:
        chunks = [(root, range(k, count, workers), size, (seed, k)) for k in range(workers)]
        with multiprocessing.get_context('fork').Pool(workers) as pool:
            pool.starmap(_write_jpegs, chunks)
        return root
    return _write_jpegs(root, range(count), size, seed)


def _write_jpegs(root, indices, size, seed):
    rng = np.random.default_rng(seed)
    for i in indices:
        folder = root / 'train' / f'class_{i % 4}'
        folder.mkdir(parents=True, exist_ok=True)
        coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize(size, Image.BICUBIC), dtype=np.float32)
        pixels = np.clip(smooth + rng.normal(0, 12, smooth.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f'img_{i:04d}.JPEG', quality=90)
    return root


def cpu_seconds_per_image(datasets, passes=1):
    """CPU seconds per sample of each dataset's __getitem__ (decode + augment), in one thread,
    the datasets alternating sample by sample so that load changes touch them alike."""
    totals = [0.0] * len(datasets)
    count = len(datasets[0])
    for _ in range(passes):
        for index in range(count):
            for k, dataset in enumerate(datasets):
                start = time.process_time()
                dataset[index]
                totals[k] += time.process_time() - start
    return [t / (count * passes) for t in totals]


def bench_data(images, crop_size):
    """Input pipeline images/s per worker process: reference PIL pipeline vs the fast path's
    worker half, from JPEG files and from a pack.py file of the same images."""
    work = Path(tempfile.mkdtemp(prefix='bench-data-'))
    root = Path(images) if images else generate_jpegs(work / 'images')
    packed = work / 'images.h5'
    pack.main([str(root), str(packed), '--splits', 'train', '--workers', '1'])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a DataLoader worker's setting
    torch.manual_seed(0)
    rows = []
    try:
        for source, label in ((root, 'JPEG files'), (packed, 'pack.py file')):
            reference = image_folder(source, pretrain.Transform(crop_size))
            fast = image_folder(source, augmentations.CropTransform(crop_size),
                                loader=augmentations.open_for_crop)
            ref_s, fast_s = cpu_seconds_per_image([reference, fast])
            rows.append((label, 1 / ref_s, 1 / fast_s))
        crops = [fast[i][0] for i in range(min(len(fast), 128))]
        augment = augmentations.FastTwoViews()
        start = time.process_time()
        augment(torch.stack([c[0] for c in crops]), torch.stack([c[1] for c in crops]))
        device_cpu = len(crops) / (time.process_time() - start)
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(work, ignore_errors=True)  # the generated images and the pack
    print(f'\nInput pipeline: {len(reference)} images ({"generated 500x375 JPEGs" if not images else root}), {crop_size} px crops, '
          f'two views per image, images per CPU-second of one worker process (1 thread)')
    print('| source | reference (PIL) | fast path, worker half | ratio |')
    print('|---|---|---|---|')
    for label, ref, fast_rate in rows:
        print(f'| {label} | {rounded(ref)} | {rounded(fast_rate)} | {ratio(fast_rate, ref)} |')
    print(f'The fast path\'s device half, run on this CPU (1 thread): {rounded(device_cpu)} '
          f'images/s (on a GPU it costs the workers nothing).')


def gathered_bank_peak_bytes(bank_size, dim, world_size, query_count, autocast_bytes,
                             chunk_size=256):
    """Peak bytes per rank of the kNN evaluation before the bank was sharded (knn.py up to
    commit 09e734a): every rank extracted its shard in fp32 (a list of batches, then one
    concatenated copy), all-gathered it through a padded copy and world_size received parts
    into a full fp32 bank, and under autocast every chunk of queries cast the whole bank again.
    """
    shard = math.ceil(bank_size / world_size) * dim * 4
    bank = bank_size * dim * 4
    gather = shard + shard + world_size * shard + bank  # local, padded, parts, reassembled
    queries = math.ceil(query_count / world_size) * dim * 4
    recast = bank_size * dim * autocast_bytes if autocast_bytes != 4 else 0
    scoring = bank + queries + recast + chunk_size * bank_size * autocast_bytes
    return max(2 * shard, gather, scoring)


def knn_memory_table(bank_size=1_281_167, dim=2048, world_size=8, query_count=50_000):
    """Peak memory per rank of `evaluate.py --knn` (fp32) and the fp16 kNN monitor, for
    ImageNet's train set as the bank and its val set as queries, before and after sharding."""
    print(f'\nkNN evaluation: bank {bank_size:,} x {dim}, {query_count:,} queries, {world_size} '
          f'ranks, k = {max(knn.KNN_KS)}, peak memory per rank (GiB, from the code\'s shapes; '
          f'the backbone\'s activations for one batch come on top)')
    print('| compute dtype | bank gathered on every rank (before) | bank sharded (now) | ratio |')
    print('|---|---|---|---|')
    for name, size in (('fp32 (evaluate.py --knn)', 4), ('fp16 (--knn-every under fp16)', 2)):
        before = gathered_bank_peak_bytes(bank_size, dim, world_size, query_count, size)
        after = knn.peak_bytes_per_rank(bank_size, dim, world_size, query_count, size)
        print(f'| {name} | {before / 2**30:.2f} | {after / 2**30:.2f} | {before / after:.1f}x |')


def check_arguments(args):
    """Everything the run was given, before anything is measured (one line per problem)."""
    pretrain.parse_projector(args.projector)
    check_distinct(args.settings, '--settings')
    if args.batch_size is not None and args.batch_size < 2:
        raise InputError(f'--batch-size {args.batch_size}: BatchNorm needs at least 2 images '
                         f'per step')
    if args.crop_size < 8:
        raise InputError(f'--crop-size {args.crop_size} is too small (at least 8)')
    if args.end_to_end and 'fast-ddp' in args.settings:
        raise InputError('--end-to-end runs main.py\'s loop, which has no fast-ddp setting')
    if args.images is not None:
        image_folder(args.images)  # a missing folder, or one without images, named now
    if args.log is not None and not args.log.parent.is_dir():
        raise InputError(f'--log {args.log}: no folder {args.log.parent}')


class Report:
    """Results as they come: JSON lines in --log (flushed at once) and on stdout."""

    def __init__(self, path, head):
        self.path, self.head = path, head

    def __call__(self, result):
        line = json.dumps(dict(self.head, **result))
        print(f'result: {line}', flush=True)
        if self.path is not None:
            with open(self.path, 'a') as f:
                f.write(line + '\n')


def step_tables(args, device, report):
    rows, parts = [], []
    for setting in args.settings:
        announce(args, setting)
        result = step_images_per_second(args, setting, device)
        bench = result.pop('bench')
        report(dict(kind='step', setting=setting, **{k: v for k, v in result.items()}))
        rows.append((setting, result['rate'], result['memory'], result['precision']))
        counts = (result['graph_breaks'], result['graphs'], result['recompilations'])
        groups = None
        if args.breakdown:
            try:
                groups = breakdown(bench, args.breakdown)
            except Exception as e:  # noqa: BLE001 - a profiler failure must not cost the others
                print(f'bench.py: {setting}: no breakdown: {type(e).__name__}: {e}',
                      file=sys.stderr, flush=True)
            else:
                report(dict(kind='breakdown', setting=setting, steps=args.breakdown, **groups))
        parts.append((setting, result, groups, counts))
        del bench
    print_table(f'Training step: {args.arch}, projector {args.projector}, batch '
                f'{args.batch_size} per device, {args.crop_size} px, {args.steps} timed steps '
                f'after {args.warmup}', rows, 'images/s')
    print('\nDevice time per step and region (ms), and the compiler\'s counts '
          '(graphs compiled, graph breaks, recompilations after the warm-up steps)')
    print('| setting | step | ' + ' | '.join(REGIONS) + ' | graphs | breaks | recompilations |')
    print('|---' * (len(REGIONS) + 5) + '|')
    for setting, result, _, (breaks, graphs, recompiled) in parts:
        print(f'| {setting} | {result["step_ms"]:.1f} | ' + ' | '.join(
            f'{result["regions"][r]:.1f}' for r in REGIONS) + f' | {graphs} | {breaks} | '
            f'{recompiled} |')
    if args.breakdown:
        print(f'\nKernel time per step (ms) from torch.profiler over {args.breakdown} steps: '
              f'augmentation and optimizer by the region that launched them, the rest by kernel '
              f'name; idle: no kernel running')
        print('| setting | ' + ' | '.join(KERNEL_GROUPS) + ' |')
        print('|---' * (len(KERNEL_GROUPS) + 1) + '|')
        for setting, _, groups, _ in parts:
            print(f'| {setting} | ' + ' | '.join(f'{groups[g]:.1f}' if groups else '-'
                                                 for g in KERNEL_GROUPS) + ' |')
        for setting, _, groups, _ in parts:
            if groups:
                print(f'\n{setting}: the longest kernels (ms per step, group):')
                for name, group, ms in groups['top kernels'][:10]:
                    print(f'  {ms:8.2f}  {group:27}  {name}')


def end_to_end_table(args, device, report):
    work = args.work_dir or Path(tempfile.mkdtemp(prefix='bench-e2e-'))
    try:
        images = Path(args.images) if args.images else work / 'images'
        if not args.images and not (images / 'train').is_dir():
            count = args.generate or (10000 if device.type == 'cuda' else 40)
            print(f'bench.py: generating {count} JPEGs in {images}', file=sys.stderr,
                  flush=True)
            generate_jpegs(images, count, workers=max(1, min(16, len(os.sched_getaffinity(0)))))
        rows = []
        for setting in args.settings:
            print(f'bench.py: {setting}: end to end, {args.epochs} epochs (the first untimed)',
                  file=sys.stderr, flush=True)
            result = end_to_end(args, setting, device, images, work,
                                lambda line: report(dict(kind='end-to-end-epoch', **line)))
            report(dict(kind='end-to-end', setting=setting, **result))
            rows.append((setting, result['rate'], result['memory'],
                         f'{rounded(result["epoch_rate"])} images/s over whole epochs; '
                         f'{result["graph_breaks"]} graph breaks, {result["recompilations"]} '
                         f'recompilations, {result["eager_steps"]} eager steps'))
        print_table(f'End to end: main.py\'s loader ({args.workers} workers, {images}) and '
                    f'training loop, {args.arch}, projector {args.projector}, batch '
                    f'{args.batch_size}, {args.crop_size} px; steady images/s after the first '
                    f'{args.skip_steps} steps of each timed epoch', rows, 'images/s')
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)


def read_results(paths):
    """The JSON results of --log files, read as every list is (cli.read_lines); a line that is
    not a result, or a missing file, is an InputError naming it."""
    results = []
    for path in paths:
        if not path.is_file():
            raise InputError(f'--summary {path}: no such file')
        for number, line in read_lines(path, '--summary log'):
            try:
                result = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f'{path}:{number}: not a JSON result line ({e.msg})') from None
            if not (isinstance(result, dict) and isinstance(result.get('setting'), str)
                    and isinstance(result.get('rate'), (int, float))
                    and isinstance(result.get('memory'), (int, float))):
                if isinstance(result, dict) and result.get('kind') not in ('step', 'end-to-end'):
                    continue  # breakdowns and per-epoch lines: not in the table
                raise InputError(f'{path}:{number}: a result line needs setting, rate and '
                                 f'memory')
            results.append(result)
    return results


def summary(paths):
    """One table of every step and end-to-end result in the --log files."""
    results = read_results(paths)
    print('| measure | setting | images/s | ratio to reference | peak memory (GiB) | graph '
          'breaks | recompilations |')
    print('|---|---|---|---|---|---|---|')
    for kind in ('step', 'end-to-end'):
        rows = [r for r in results if r.get('kind') == kind]
        base = next((r['rate'] for r in rows if r['setting'] == 'reference'), None)
        for r in rows:
            print(f'| {kind} | {r["setting"]} | {rounded(r["rate"])} | '
                  f'{ratio(r["rate"], base) if base else "-"} | {r["memory"]:.2f} | '
                  f'{r.get("graph_breaks", "-")} | {r.get("recompilations", "-")} |')


def main(argv=None):
    args = get_arguments().parse_args(argv)
    command = command_line('bench.py', sys.argv[1:] if argv is None else argv)
    if args.summary:
        try:
            check_distinct(args.summary, '--summary')
            summary(args.summary)
        except USER_ERRORS as e:
            sys.exit(f'bench.py: error: {error_line(e)}')
        return
    if args.knn_memory:
        print(f'# {command}')
        knn_memory_table()
        return
    try:
        check_arguments(args)
        device = torch.device('cuda', 0) if distributed.choose_device_type(args.device) == \
            'cuda' else torch.device('cpu')
        if device.type == 'cuda':
            distributed.check_gpu_supported(0)  # a one-line error, not a CUDA traceback
    except USER_ERRORS as e:
        sys.exit(f'bench.py: error: {error_line(e)}')
    gpu = device.type == 'cuda'
    args.batch_size = args.batch_size or (256 if gpu else 16)
    args.steps = args.steps or (20 if gpu else 3)
    args.warmup = args.warmup if args.warmup is not None else (10 if gpu else 1)
    if args.end_to_end and args.workers is None:
        args.workers = default_workers('bench.py')
    print(f'# {command}')
    print(f'# {describe(device)}', flush=True)
    report = Report(args.log, dict(device=describe(device), arch=args.arch,
                                   batch_size=args.batch_size, crop_size=args.crop_size))
    distributed._init_process_group(0, device.index or 0, 1, device.type)
    try:
        if args.end_to_end:
            end_to_end_table(args, device, report)
        else:
            step_tables(args, device, report)
    except USER_ERRORS as e:
        sys.exit(f'bench.py: error: {error_line(e)}')
    finally:
        distributed.cleanup()
    if args.data:
        bench_data(args.images, args.crop_size)


if __name__ == '__main__':
    main()
