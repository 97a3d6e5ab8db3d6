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
import math
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
from backbones import ARCHS
from cli import ArgumentParser, InputError, non_negative_int, positive_int
from data import image_folder

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
                             'from float views, without the augmentation\'s device half)')
    parser.add_argument('--data', action='store_true',
                        help='also measure the input pipeline: images per CPU-second of one '
                             'worker process, reference PIL pipeline against the fast path\'s '
                             'worker half, from JPEG files and from a pack.py file')
    parser.add_argument('--knn-memory', action='store_true',
                        help='only print the kNN evaluation\'s peak memory per rank for an '
                             'ImageNet-sized bank on 8 ranks, before and after sharding the bank '
                             '(arithmetic from the code\'s shapes; runs nothing)')
    parser.add_argument('--images', default=None, metavar='DIR',
                        help='an ImageFolder DIR for --data (default: 200 generated 500x375 '
                             'JPEGs)')
    return parser


def peak_memory_gib(device):
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def step_images_per_second(args, setting, device):
    """Images/s of full training steps (both views, loss, backward, LARS) with one setting."""
    run_args = argparse.Namespace(
        arch=args.arch, cifar_stem=False, projector=args.projector, lambd=0.0051,
        batch_size=args.batch_size, scale_loss=1.0, learning_rate=None, weight_decay=1e-6,
        **SETTINGS[setting])
    precision = run_args.precision or ('fp16' if device.type == 'cuda' else 'fp32')
    info = distributed.DistInfo(rank=0, local_rank=device.index or 0, world_size=1, device=device)
    torch.manual_seed(0)
    model, optimizer = pretrain.build_model_and_optimizer(run_args, info)
    for group in optimizer.param_groups:
        group['lr'] = 0.1 if group is optimizer.param_groups[0] else 0.0024
    scaler = torch.amp.GradScaler(device.type, enabled=precision == 'fp16')
    dtype = {'fp16': torch.float16, 'bf16': torch.bfloat16}.get(precision)
    memory_format = torch.channels_last if run_args.channels_last else torch.contiguous_format
    shape = (args.batch_size, 3, args.crop_size, args.crop_size)
    if run_args.fast_augment:
        crops = [torch.randint(0, 256, shape, dtype=torch.uint8) for _ in range(2)]
        if device.type == 'cuda':
            crops = [c.pin_memory() for c in crops]
        # what main.py's training loop reads in views_to_device
        run = types.SimpleNamespace(args=argparse.Namespace(seed=0), info=info,
                                    augment=augmentations.FastTwoViews().to(device),
                                    memory_format=memory_format)
    else:
        y1 = torch.randn(shape, device=device).contiguous(memory_format=memory_format)
        y2 = torch.randn(shape, device=device).contiguous(memory_format=memory_format)
    steps_done = 0

    def step():
        nonlocal y1, y2, steps_done
        if run_args.fast_augment:
            y1, y2 = pretrain.views_to_device(run, *crops, steps_done)
        steps_done += 1
        optimizer.zero_grad()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = model.forward(y1, y2)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    for _ in range(args.warmup):
        step()
    synchronize(device)
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    synchronize(device)
    elapsed = time.perf_counter() - start
    return args.steps * args.batch_size / elapsed, peak_memory_gib(device), precision


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


def generate_jpegs(root, count=200, size=(500, 375), seed=0):
    """`count` photo-like JPEGs (smooth colour fields plus sensor-like noise, quality 90) in the
    ImageFolder layout root/train/<class>/, about the size of ImageNet's typical 500x375."""
    rng = np.random.default_rng(seed)
    for i in range(count):
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


def main(argv=None):
    args = get_arguments().parse_args(argv)
    if args.knn_memory:
        print(f'# bench.py {" ".join(sys.argv[1:] if argv is None else argv)}')
        knn_memory_table()
        return
    device = torch.device('cuda', 0) if distributed.choose_device_type(args.device) == 'cuda' \
        else torch.device('cpu')
    gpu = device.type == 'cuda'
    try:
        if gpu:
            distributed.check_gpu_supported(0)  # a one-line error, not a CUDA traceback
    except InputError as e:
        sys.exit(f'bench.py: error: {e}')
    args.batch_size = args.batch_size or (256 if gpu else 16)
    args.steps = args.steps or (20 if gpu else 3)
    args.warmup = args.warmup if args.warmup is not None else (10 if gpu else 1)
    print(f'# bench.py {" ".join(sys.argv[1:] if argv is None else argv)}')
    print(f'# {describe(device)}')
    distributed._init_process_group(0, device.index or 0, 1, device.type)
    try:
        rows = []
        for setting in args.settings:
            announce(args, setting)
            rate, memory, precision = step_images_per_second(args, setting, device)
            rows.append((setting, rate, memory, precision))
        print_table(f'Training step: {args.arch}, projector {args.projector}, batch '
                    f'{args.batch_size} per device, {args.crop_size} px, {args.steps} timed steps '
                    f'after {args.warmup}', rows, 'images/s')
    finally:
        distributed.cleanup()
    if args.data:
        bench_data(args.images, args.crop_size)


if __name__ == '__main__':
    main()
