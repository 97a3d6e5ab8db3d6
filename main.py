"""Barlow Twins pretraining (Zbontar et al., ICML 2021), faithful to the reference ImageNet code.

    python main.py /path/to/imagenet                              # one process per visible GPU
    python main.py /path/to/imagenet --epochs 1000 --batch-size 2048 --learning-rate 0.2 \\
        --lambd 0.0051 --projector 8192-8192-8192 --scale-loss 0.024   # the earlier release
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:PORT \\
        main.py /path/to/imagenet                                 # torchrun, one or many nodes
    sbatch --nodes 2 --gres gpu:8 --signal USR1@120 --wrap 'srun python main.py /path/to/imagenet'
    python main.py --demo                                         # built-in synthetic data, CPU ok

Writes checkpoint.pth every epoch (resumed automatically), stats.txt, and at the end <arch>.pth,
the backbone's state dict (resnet50.pth by default).
"""
import argparse
import dataclasses
import json
import math
import random
import sys
import time
from pathlib import Path

from PIL import Image, ImageFilter, ImageOps
import torch
import torch.distributed as dist
import torchvision
import torchvision.transforms as transforms
from torch import nn, optim

import distributed
import knn
from compiled_step import CompiledStep
from augmentations import (IMAGENET_MEAN, IMAGENET_STD, CropTransform, FastTwoViews,
                           open_for_crop, step_generator, val_transform)
from backbones import ARCHS, build_backbone
from checkpoints import (checkpoint_args, exclude_bias_and_norm, load_checkpoint_file,
                         match_state_dict, remove_temporaries, save_atomic)
from cli import (USER_ERRORS, ArgumentParser, InputError, changed_settings, changes_text,
                 command_line, crop_scale, default_workers, duration, error_line,
                 non_negative_float, non_negative_int, positive_float, positive_int,
                 probability_pair, seed, unit_fraction)
from data import (EpochSampler, SeededSamples, ignore_stop_signals, image_folder,
                  make_demo_dataset, make_eval_loader, seed_everything)
from monitor import OnlineProbe, Progress, StatsLog
from preemption import RunLock, StopRequests, Stopped, check_directory_kind

# What `--demo` changes: a CPU-sized run on the synthetic dataset. Explicit flags still win.
# The ImageNet stem at 32 px is 6.5 times cheaper than --cifar-stem; crops of at least 80% of
# the image keep the shape in both views, and no blur keeps its edges. 16 epochs of 5 steps
# fit in two minutes of a 2-core CPU; so few steps need larger ones than the reference's: LARS
# eta 0.01, and the biases and BatchNorm parameters at the weights' rate (0.2, not 0.0048), which
# lets the zero-initialised last BatchNorm of every residual branch grow: with the reference's
# rates the branches stay nearly shut and the network scores below a random one (the trials:
# BENCHMARKS.md, "The demo's settings"). --drop-last keeps a step of a few images out of a
# short run when DIR holds other data.
DEMO_DEFAULTS = dict(arch='resnet18', crop_size=32, projector='512-512-512', batch_size=64,
                     epochs=16, warmup_epochs=1, min_scale=0.8, blur_prob=(0.0, 0.0),
                     lars_eta=0.01, learning_rate_biases=0.2, workers=2, print_freq=5,
                     drop_last=True, checkpoint_dir=Path('./checkpoint/demo/'))
DEMO_DATA = Path('./demo_data')


def get_arguments():
    parser = ArgumentParser(description='Barlow Twins Training', prog='main.py')
    parser.add_argument('data', type=Path, metavar='DIR', nargs='?',
                        help='path to dataset (ImageFolder layout: DIR/train/<class>/<image>, '
                             'or a file written by pack.py)')
    parser.add_argument('--workers', default=None, type=non_negative_int, metavar='N',
                        help='number of data loader workers per process (default: 8, capped at '
                             'the CPUs this process may use)')
    parser.add_argument('--epochs', default=1000, type=positive_int, metavar='N',
                        help='number of total epochs to run')
    parser.add_argument('--batch-size', default=2048, type=positive_int, metavar='N',
                        help='global mini-batch size, divided over the processes')
    parser.add_argument('--learning-rate-weights', default=None, type=non_negative_float,
                        metavar='LR',
                        help='base learning rate for weights (default 0.2)')
    parser.add_argument('--learning-rate-biases', default=None, type=non_negative_float,
                        metavar='LR',
                        help='base learning rate for biases and batch norm parameters '
                             '(default 0.0048)')
    parser.add_argument('--learning-rate', default=None, type=non_negative_float, metavar='LR',
                        help='earlier release: one base learning rate for all parameters '
                             '(excludes --learning-rate-weights/--learning-rate-biases; default: '
                             'unset, the two rates above)')
    parser.add_argument('--scale-loss', default=1.0, type=positive_float, metavar='S',
                        help='earlier release: multiply both loss terms by S (0.024 there)')
    parser.add_argument('--weight-decay', default=1e-6, type=non_negative_float, metavar='W',
                        help='weight decay')
    parser.add_argument('--lambd', default=0.0051, type=non_negative_float, metavar='L',
                        help='weight on off-diagonal terms')
    parser.add_argument('--projector', default='8192-8192-8192', type=str, metavar='MLP',
                        help='projector MLP')
    parser.add_argument('--print-freq', default=100, type=positive_int, metavar='N',
                        help='print frequency')
    parser.add_argument('--checkpoint-dir', default=Path('./checkpoint/'), type=Path,
                        metavar='DIR', help='path to checkpoint directory (default: '
                                            './checkpoint/)')
    # Beyond the reference (README, "Flags beyond the original").
    parser.add_argument('--arch', default='resnet50', choices=ARCHS,
                        help='torchvision backbone')
    parser.add_argument('--cifar-stem', action='store_true',
                        help='3x3 stride-1 first convolution and no max-pool, for small images')
    parser.add_argument('--crop-size', default=224, type=positive_int, metavar='PX',
                        help='side of the random resized crops')
    parser.add_argument('--min-scale', default=0.08, type=crop_scale, metavar='S',
                        help='smallest area fraction of a random resized crop (default 0.08, '
                             'as the reference; crops cover S to 1 of the image)')
    parser.add_argument('--blur-prob', default=(1.0, 0.1), type=probability_pair,
                        metavar='P1,P2', help='Gaussian blur probability of view 1 and view 2 '
                                              '(default 1.0,0.1, as the reference)')
    parser.add_argument('--solarize-prob', default=(0.0, 0.2), type=probability_pair,
                        metavar='P1,P2', help='solarization probability of view 1 and view 2 '
                                              '(default 0.0,0.2, as the reference)')
    parser.add_argument('--warmup-epochs', default=10, type=non_negative_int, metavar='N',
                        help='linear learning-rate warmup length')
    parser.add_argument('--lars-eta', default=0.001, type=positive_float, metavar='ETA',
                        help='LARS trust coefficient: each weight tensor\'s step is scaled by '
                             'ETA * ||w|| / ||update|| (0.001, as the reference)')
    parser.add_argument('--lars-clip-lr', action='store_true',
                        help='cap each tensor\'s effective rate lr * trust ratio at lr, as '
                             'solo-learn\'s clip_lr (off in the reference)')
    parser.add_argument('--precision', default=None, choices=('fp16', 'bf16', 'fp32'),
                        help='autocast precision (default fp16 on GPU as the reference, fp32 on '
                             'CPU); the loss reduction is always in fp32')
    parser.add_argument('--channels-last', action='store_true',
                        help='channels-last memory format for the backbone (faster convolutions '
                             'on tensor-core GPUs)')
    parser.add_argument('--compile', action='store_true',
                        help='torch.compile the backbone and projector (state-dict keys unchanged)')
    parser.add_argument('--lars-foreach', action='store_true',
                        help='LARS with multi-tensor kernels: same result to float tolerance, a '
                             'few kernel launches per step instead of ~10 per parameter tensor')
    parser.add_argument('--fast-augment', action='store_true',
                        help='data workers only decode and crop to uint8; colour jitter, '
                             'grayscale, blur, solarize and normalisation run batched on the '
                             'training device (same distributions; pays off on GPUs)')
    parser.add_argument('--fast', action='store_true',
                        help='the fast settings together: --precision bf16 (unless given) '
                             '--channels-last --compile --lars-foreach --fast-augment')
    parser.add_argument('--exact-gradient', action='store_true',
                        help='use the exact full-batch gradient instead of the reference\'s '
                             'gradient / world size')
    parser.add_argument('--reference-world-size', default=None, type=positive_int, metavar='W',
                        help='scale gradients as the reference would with W processes, whatever '
                             'the actual number (e.g. 16 for the released checkpoint; default: '
                             'unset, the reference\'s gradient / actual world size)')
    parser.add_argument('--drop-last', action='store_true',
                        help='drop each epoch\'s incomplete last batch (the reference keeps it '
                             'but still divides by the full batch size)')
    parser.add_argument('--seed', default=0, type=seed, help='seed for initialisation, data order '
                        'and augmentations (each epoch reseeds, so resumed runs repeat exactly)')
    parser.add_argument('--checkpoint-every', default=None, type=duration, metavar='TIME',
                        help='also write checkpoint.pth in the middle of epochs every TIME (e.g. '
                             '30m, 2h, 900s); a resumed run continues at the exact step '
                             '(default: off, at epoch ends only)')
    parser.add_argument('--rollbacks', default=0, type=non_negative_int, metavar='N',
                        help='on a non-finite loss, go back to the last checkpoint and continue '
                             'with the learning rates lowered (see --rollback-lr-factor), at most '
                             'N times in the whole run; 0 (default, as the reference) stops')
    parser.add_argument('--rollback-lr-factor', default=0.5, type=unit_fraction, metavar='F',
                        help='each rollback multiplies both learning rates by F (default 0.5)')
    parser.add_argument('--bad-images', default='stop', choices=('stop', 'skip'),
                        help='an unreadable image stops the run naming the file (stop, as the '
                             'reference) or is replaced by the next readable one and counted '
                             '(skip)')
    parser.add_argument('--online-probe', action=argparse.BooleanOptionalAction, default=True,
                        help='train a linear classifier on detached features of view 1 with the '
                             'dataset labels and log its running top-1 as online_acc1 (it does '
                             'not touch the backbone\'s gradients)')
    parser.add_argument('--knn-every', default=0, type=non_negative_int, metavar='N',
                        help='every N epochs, log the weighted kNN top-1 (k=20, 200) of the '
                             'backbone features: bank DIR/train, queries DIR/val (or a held-out '
                             '10%% of DIR/train when there is no val); 0 = off')
    parser.add_argument('--tensorboard', action='store_true',
                        help='also log the stats to CHECKPOINT_DIR/tensorboard (needs the '
                             'tensorboard package)')
    parser.add_argument('--device', default='auto', choices=('auto', 'cuda', 'cpu'),
                        help='auto: every visible GPU, else the CPU with a note')
    parser.add_argument('--demo', action='store_true',
                        help=f'train on a generated synthetic dataset ({DEMO_DATA} unless DIR is '
                             f'given) with small CPU-sized defaults: '
                             + ' '.join(f'{k}={v}' for k, v in DEMO_DEFAULTS.items()))
    return parser


def parse_projector(text):
    try:
        sizes = [int(s) for s in text.split('-')]
    except ValueError:
        sizes = []
    if not sizes or any(s <= 0 for s in sizes):
        raise InputError(f"--projector '{text}': expected positive layer widths joined by '-', "
                         f"e.g. 8192-8192-8192")
    return sizes


def parse_arguments(argv=None):
    parser = get_arguments()
    command = command_line(sys.argv[0], sys.argv[1:]) if argv is None else \
        command_line('main.py', argv)
    argv = sys.argv[1:] if argv is None else list(argv)
    if '--demo' in argv:
        parser.set_defaults(**DEMO_DEFAULTS)
    args = parser.parse_args(argv)
    args.command = command
    if args.workers is None:
        args.workers = default_workers(parser.prog)
    try:
        check_arguments(args)
    except InputError as e:
        parser.error(str(e))
    return args


def check_arguments(args):
    if args.data is None:
        if not args.demo:
            raise InputError('the dataset directory DIR is required (or --demo)')
        args.data = DEMO_DATA
    if args.demo and args.data.exists() and not args.data.is_dir():
        raise InputError(f'--demo writes its dataset to DIR, but {args.data} is a file; give a '
                         f'directory, or no DIR for {DEMO_DATA}')
    if args.learning_rate is not None:
        given = [f for f, v in (('--learning-rate-weights', args.learning_rate_weights),
                                ('--learning-rate-biases', args.learning_rate_biases)) if v is not None]
        if given:
            raise InputError(f'--learning-rate (one rate for all parameters, earlier release) '
                             f'contradicts {" and ".join(given)}; use one or the other')
    else:
        args.learning_rate_weights = 0.2 if args.learning_rate_weights is None \
            else args.learning_rate_weights
        args.learning_rate_biases = 0.0048 if args.learning_rate_biases is None \
            else args.learning_rate_biases
    if args.exact_gradient and args.reference_world_size:
        raise InputError('--exact-gradient and --reference-world-size choose different gradient '
                         'scales; give at most one')
    parse_projector(args.projector)
    if args.fast:
        args.channels_last = args.compile = args.lars_foreach = args.fast_augment = True
        args.precision = args.precision or 'bf16'
    if args.crop_size < 8:
        raise InputError(f'--crop-size {args.crop_size} is too small (at least 8)')
    # Run state that --rollbacks changes; checkpoints carry it, so a resumed run keeps it.
    args.lr_scale, args.rollbacks_done = 1.0, 0


def main(argv=None):
    args = parse_arguments(argv)
    try:
        check_directory_kind(args.checkpoint_dir, 'pretraining')  # again under the run's lock
        if args.demo:
            make_demo_dataset(args.data)
        if not (Path(args.data) / 'train').is_dir():
            image_folder(args.data)  # raises the one-line error naming what is missing
        distributed.launch(main_worker, (args,), device=args.device)
    except USER_ERRORS as e:
        sys.exit(f'main.py: error: {error_line(e)}')
    except KeyboardInterrupt:  # before (or after) the run's own stop handling is in place
        sys.exit('main.py: interrupted; checkpoints written before are kept')


def main_worker(info, args):
    try:
        train(info, args)
    except USER_ERRORS as e:
        print(f'main.py: error (rank {info.rank}): {error_line(e)}', file=sys.stderr, flush=True)
        sys.exit(1)
    except Stopped as e:
        if info.is_main:
            print(f'main.py: {e}', file=sys.stderr, flush=True)
        sys.exit(0)


@dataclasses.dataclass
class Run:
    """Everything one process's training loop works with."""
    args: argparse.Namespace
    info: distributed.DistInfo
    model: nn.Module
    optimizer: optim.Optimizer
    scaler: torch.amp.GradScaler
    loader: torch.utils.data.DataLoader
    precision: str
    log: StatsLog
    progress: Progress
    stop: StopRequests
    probe: OnlineProbe = None
    knn_loaders: tuple = None
    augment: nn.Module = None  # --fast-augment's device half
    health: 'StepHealth' = None
    compiled_step: CompiledStep = None  # --compile: the forward as one graph, inputs prefetched
    start_time: float = dataclasses.field(default_factory=time.time)
    last_save: float = dataclasses.field(default_factory=time.time)

    @property
    def memory_format(self):
        return torch.channels_last if self.args.channels_last else torch.preserve_format

    @property
    def steps_per_epoch(self):
        return epoch_steps(self.loader)


def epoch_steps(loader):
    """The full epoch's length, also while a resumed epoch's loader yields fewer batches."""
    sampler, batch = loader.sampler, loader.batch_size
    return sampler.epoch_samples // batch if loader.drop_last \
        else math.ceil(sampler.epoch_samples / batch)


def train(info, args):
    """Algorithm 1 of the paper, at ImageNet scale: build, resume, train epochs, export."""
    if args.batch_size % info.world_size != 0:
        raise InputError(f'--batch-size {args.batch_size} is not divisible by the world size '
                         f'{info.world_size}')
    if finished_epochs(args) is not None:  # every rank: none of them has anything to do
        if info.is_main:
            print_summary(args, already=True)
        return
    lock = RunLock(args.checkpoint_dir, 'pretraining').acquire() if info.is_main else None
    try:
        if info.is_main:
            remove_temporaries(args.checkpoint_dir)
        run, start_epoch, start_step = build_run(info, args)
        try:
            if args.rollbacks and info.is_main and \
                    not (args.checkpoint_dir / 'checkpoint.pth').is_file():
                save_checkpoint(run, start_epoch, start_step)  # something to roll back to
            while True:
                try:
                    train_epochs(run, start_epoch, start_step)
                    break
                except Diverged as e:
                    start_epoch, start_step = roll_back(run, e)
            if args.demo:
                report_demo_gain(run)
        finally:
            run.stop.close()
            run.log.close()
    finally:
        if lock is not None:
            lock.release()
    if info.is_main:
        print_summary(args)


def report_demo_gain(run):
    """--demo: the weighted kNN top-1 (k = 20) on the demo's held-out images of the trained
    backbone, of the same network before training (main.py's zero-residual start: nearly a stem
    plus shortcuts, an easy baseline) and of the network in torchvision's default random
    initialisation (a hard one: random features of a ResNet already cluster images), one line
    each: what the run learned."""
    args, info = run.args, run.info
    transform = val_transform(args.crop_size)
    bank, queries = (image_folder(args.data, transform, split) for split in ('train', 'val'))
    per_device = max(1, args.batch_size // info.world_size)
    loaders = [make_eval_loader(d, per_device, args.workers, info) for d in (bank, queries)]
    seed_everything(args.seed)  # build_run's first draw: the run's initial backbone
    untrained, _ = build_backbone(args.arch, args.cifar_stem)
    seed_everything(args.seed)
    default_init, _ = build_backbone(args.arch, args.cifar_stem, zero_init_residual=False)
    results = []
    for net in (run.model.module.backbone, untrained.to(info.device),
                default_init.to(info.device)):
        top1 = knn.knn_evaluate(net, *loaders, info.device, len(bank.classes), ks=(20,))
        results.append(top1[20])
    run.model.train()  # knn_evaluate put the backbone in eval mode
    if info.is_main:
        print(f'demo: weighted kNN top-1 (k = 20, bank: the {len(bank)} training images) on the '
              f'{len(queries)} held-out demo images (chance {100 / len(bank.classes):g}%):',
              flush=True)
        for value, what in zip(results, ('after training', 'the same network before training',
                                         'torchvision\'s default random initialisation')):
            print(f'demo:   {value:5.1f}%  {what}', flush=True)
    run.log.write(dict(demo_knn_top1_trained=results[0], demo_knn_top1_untrained=results[1],
                       demo_knn_top1_default_init=results[2]),
                  args.epochs * run.steps_per_epoch)
    return results


def finished_epochs(args):
    """The epochs done by a run in --checkpoint-dir that has finished --epochs and exported its
    backbone, else None (also for a checkpoint that resume() has to look at more closely)."""
    path = args.checkpoint_dir / 'checkpoint.pth'
    if not (path.is_file() and (args.checkpoint_dir / f'{args.arch}.pth').is_file()):
        return None
    try:  # mmap: nothing but `epoch` is read
        ckpt = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - unreadable or the earlier release's: resume() reports it
        return None
    if not isinstance(ckpt, dict) or ckpt.get('step_in_epoch') or \
            not isinstance(ckpt.get('epoch'), int) or ckpt['epoch'] < args.epochs:
        return None
    return ckpt['epoch']


def print_summary(args, already=False):
    """What was trained, where the files are, and the commands that use them."""
    ckdir, data = args.checkpoint_dir, args.data
    backbone = ckdir / f'{args.arch}.pth'
    settings = f'{args.arch}{" --cifar-stem" if args.cifar_stem else ""}, {args.crop_size} px ' \
               f'crops, projector {args.projector}'
    epochs = finished_epochs(args) if already else args.epochs
    epochs = f'{epochs} epoch{"s" if epochs != 1 else ""}'
    head = f'the run in {ckdir} is already complete ({epochs} of ' \
           f'{settings}); nothing to do. Give a larger --epochs to train on, or another ' \
           f'--checkpoint-dir for a new run' if already else \
        f'finished: {epochs} of {settings} on {data}'
    repo = Path(__file__).resolve().parent
    repo = '.' if repo == Path.cwd().resolve() else str(repo)
    # the demo's evaluations: sized for its 320 images, their files beside the demo's own;
    # otherwise evaluate.py's default directories
    knn_dir = ckdir / 'knn' if args.demo else Path('checkpoint/knn')
    probe_dir = ckdir / 'lincls' if args.demo else Path('checkpoint/lincls')
    knn_flags = ['--checkpoint-dir', knn_dir] if args.demo else []
    # --lr-classifier 0.01: at the reference's 0.3 the demo's unnormalised features drive the
    # classifier's loss to the hundreds (top-1 38.8 against 42.1 at 0.01, BENCHMARKS.md)
    probe_flags = ['--batch-size', 64, '--epochs', 10, '--lr-classifier', 0.01,
                   '--checkpoint-dir', probe_dir] \
        if args.demo else []
    # Python string literals in double quotes, so that the shell quoting stays readable
    hub = (f'import torch; net = torch.hub.load({python_string(repo)}, "backbone", '
           f'source="local", weights={python_string(backbone)}); print(type(net).__name__)')
    logs = [ckdir / 'stats.txt', knn_dir / 'stats.txt', probe_dir / 'stats.txt']
    print(f'main.py: {head}.\n'
          f'  {backbone}  the backbone\'s weights (torchvision layout, no fc)\n'
          f'  {ckdir / "checkpoint.pth"}  the whole model and optimizer (also records the '
          f'settings)\n'
          f'  {ckdir / "stats.txt"}  the log ({shell("python", "plot.py", logs[0])} draws it)\n'
          f'Next (evaluate.py takes --arch, --cifar-stem and --crop-size from '
          f'{ckdir / "checkpoint.pth"}):\n'
          f'  {shell("python", "evaluate.py", data, backbone, "--knn", *knn_flags)}  '
          f'# weighted kNN top-1\n'
          f'  {shell("python", "evaluate.py", data, backbone, *probe_flags)}  # linear probe\n'
          f'  {shell("python", "plot.py", *logs, "-o", ckdir / "curves.png")}  '
          f'# the three logs side by side\n'
          f'  {shell("python", "-c", hub)}', flush=True)


def shell(*words):
    """A command a user can paste: each word quoted as a shell needs it (spaces, quotes,
    non-ASCII names)."""
    return command_line(words[0], words[1:])


def python_string(value):
    """A Python string literal of `value` in double quotes (json's escapes are Python's too)."""
    return json.dumps(str(value), ensure_ascii=False)


def build_run(info, args):
    log = StatsLog(args.checkpoint_dir / 'stats.txt', args.command, info.is_main,
                   args.checkpoint_dir / 'tensorboard' if args.tensorboard else None)
    seed_everything(args.seed)
    model, optimizer = build_model_and_optimizer(args, info)
    precision = args.precision or ('fp16' if info.device.type == 'cuda' else 'fp32')
    scaler = torch.amp.GradScaler(info.device.type, enabled=precision == 'fp16')
    loader = build_loader(args, info)
    probe = build_probe(args, info, model, loader.dataset.dataset)
    start_epoch, start_step = resume(args, model, optimizer, scaler, probe,
                                     data_order(args, info, loader), epoch_steps(loader))
    progress = Progress(len(loader), args.epochs, args.batch_size, info.is_main)
    run = Run(args, info, model, optimizer, scaler, loader, precision, log, progress,
              StopRequests(info.world_size, info.device), probe,
              knn.build_monitor_loaders(args, info),
              FastTwoViews(args.blur_prob, args.solarize_prob).to(info.device)
              if args.fast_augment else None,
              StepHealth(info.device, scaler.is_enabled()))
    if args.compile:
        run.compiled_step = CompiledStep(
            model, run.augment, AUTOCAST_DTYPES.get(precision), info.device,
            (loader.batch_size, 3, args.crop_size, args.crop_size), run.memory_format,
            args.seed, info.rank)
    if info.is_main:
        print_provenance(run)
        for note in loader.notes:  # after every check: a run refused gets its one error line
            print(f'note: {note}', file=sys.stderr, flush=True)
    return run, start_epoch, start_step


def train_epochs(run, start_epoch, start_step):
    args, info = run.args, run.info
    for epoch in range(start_epoch, args.epochs):
        seed_everything(args.seed, epoch, info.rank)
        train_one_epoch(run, epoch, start_step if epoch == start_epoch else 0)
        stop_if_weights_non_finite(run, (epoch + 1) * run.steps_per_epoch - 1)
        if info.is_main:  # before monitoring: a failure there must not cost the epoch
            save_checkpoint(run, epoch + 1)
        if args.knn_every and (epoch + 1) % args.knn_every == 0:
            knn_monitor(run, epoch)
    if info.is_main:
        backbone = run.model.module.backbone.state_dict()
        save_atomic(backbone, args.checkpoint_dir / f'{args.arch}.pth')


# --precision: the dtype autocast computes in (fp32: no autocast). fp16 adds the GradScaler.
AUTOCAST_DTYPES = {'fp16': torch.float16, 'bf16': torch.bfloat16}


def train_one_epoch(run, epoch, first_step=0):
    args, info = run.args, run.info
    grad_factor = gradient_factor(args, info.world_size)
    start_epoch_of_loader(run, epoch, first_step)
    steps = run.steps_per_epoch
    for step, views, labels in device_batches(run, epoch * steps + first_step):
        set_learning_rates(args, run.optimizer, step, steps)
        run.optimizer.zero_grad()
        loss, features = forward(run, views)
        run.scaler.scale(loss if grad_factor == 1 else loss * grad_factor).backward()
        scale = run.health.scale_before_step(run.scaler)
        run.scaler.step(run.optimizer)
        run.scaler.update()
        if run.probe is not None:
            run.probe.step(features, labels.to(info.device, non_blocking=True))
        run.health.after_step(step, loss, run.scaler, scale)
        logged_loss = log_step(run, epoch, step, loss) if step % args.print_freq == 0 else None
        run.progress.step(logged_loss)
        between_steps(run, epoch, step + 1 - epoch * steps)
    stop_if_non_finite(run.health, args)
    run.progress.end_epoch()
    report_skipped_images(run, epoch)


def device_batches(run, first_step):
    """(global step, views on the device, labels) for the loader's batches."""
    batches = enumerate(run.loader, start=first_step)
    if run.compiled_step is not None:  # copies on a side stream, a step ahead
        yield from run.compiled_step.prefetch(batches)
        return
    for step, ((y1, y2), labels) in batches:
        yield step, views_to_device(run, y1, y2, step), labels


def forward(run, views):
    """(loss, representation of view 1) under the run's autocast."""
    if run.compiled_step is not None:
        return run.compiled_step(*views)
    autocast_dtype = AUTOCAST_DTYPES.get(run.precision)
    with torch.autocast(run.info.device.type, dtype=autocast_dtype,
                        enabled=autocast_dtype is not None):
        return run.model.forward(*views, return_features=True)


def start_epoch_of_loader(run, epoch, first_step):
    run.loader.sampler.set_epoch(epoch)
    run.loader.sampler.start = first_step * run.loader.batch_size  # mid-epoch resume
    run.loader.dataset.set_epoch(epoch)
    run.progress.start_epoch(epoch)
    run.progress.done = first_step


def between_steps(run, epoch, steps_done):
    """Mid-epoch checkpoints on --checkpoint-every, and stopping on SIGTERM/SIGUSR1."""
    every = run.args.checkpoint_every
    # (at an epoch's last step the end-of-epoch checkpoint follows anyway)
    due = every is not None and time.time() - run.last_save >= every \
        and steps_done < run.steps_per_epoch
    signum, due = run.stop.agreed(due)  # every rank acts at the same step
    if not (signum or due):
        return
    # never checkpoint a diverged model (every rank checks: with --rollbacks all go back)
    stop_if_non_finite(run.health, run.args)
    stop_if_weights_non_finite(run, epoch * run.steps_per_epoch + steps_done - 1)
    if run.info.is_main:
        save_checkpoint(run, epoch, steps_done)
    run.last_save = time.time()
    if signum:
        requeued = run.info.is_main and StopRequests.requeue_if_slurm(signum)
        raise Stopped(f'stopped by signal {signum} at epoch {epoch}, step {steps_done} of the '
                      f'epoch; checkpoint saved' + ('; job requeued' if requeued else ''))


def report_skipped_images(run, epoch):
    skipped = run.loader.dataset.take_skipped()
    if run.info.world_size > 1 and run.args.bad_images == 'skip':
        # NCCL reduces device tensors only
        total = torch.tensor([skipped], dtype=torch.int64, device=run.info.device)
        dist.all_reduce(total)
        skipped = int(total.item())
    if run.info.is_main and skipped:
        print(f'epoch {epoch}: skipped {skipped} unreadable image(s) (see the lines '
              f'starting with "skipping:")', file=sys.stderr, flush=True)


def views_to_device(run, y1, y2, step):
    device = run.info.device
    y1, y2 = y1.to(device, non_blocking=True), y2.to(device, non_blocking=True)
    if run.augment is not None:  # --fast-augment: uint8 crops in, normalised views out
        # parameters drawn on the host: picking the samples for each op never waits for the GPU
        generator = step_generator('cpu', run.args.seed, step, run.info.rank)
        y1, y2 = run.augment(y1, y2, generator=generator)
    return y1.to(memory_format=run.memory_format), y2.to(memory_format=run.memory_format)


def log_step(run, epoch, step, loss):
    """Every --print-freq steps: the reference's JSON stats line (plus the probe's accuracy, and
    with the fp16 gradient scaler the number of updates it skipped since the last line)."""
    stop_if_non_finite(run.health, run.args)
    stats = dict(epoch=epoch, step=step,
                 lr_weights=run.optimizer.param_groups[0]['lr'],
                 lr_biases=run.optimizer.param_groups[-1]['lr'],
                 loss=loss.item(), time=int(time.time() - run.start_time))
    if run.scaler.is_enabled():
        stats['skipped_steps'] = run.health.take_skipped()
    if run.probe is not None:
        stats['online_acc1'] = run.probe.top1()  # a collective: every rank gets here
    run.log.write(stats, step)
    return stats['loss']


# With the fp16 gradient scaler (the reference's setting) a step whose loss or gradients are not
# finite is skipped and the scale halved, and training goes on, as in the reference. Only this
# many skipped steps in a row stop the run (or roll it back): by then the scale fell by 2**20
# (from its initial 2**16 to 1/16, so gradients that still overflow are not a matter of scale),
# and 20 different batches failed with the same weights, which therefore are broken. A healthy
# run skips a handful of steps at the start while the scale settles, then about one in 2000
# (each time the scaler tries a larger scale), never 20 in a row. 20 steps are 3% of an ImageNet
# epoch at batch 2048.
SKIPPED_STEPS_LIMIT = 20


class StepHealth:
    """Non-finite steps, counted on the device: no step waits for the host to look.

    Without a gradient scaler (fp32, bf16) a non-finite loss means the update was applied with
    non-finite gradients: the first one is divergence. With the scaler, divergence is
    SKIPPED_STEPS_LIMIT steps skipped in a row (a step is skipped when the scaler lowered its
    scale, i.e. found non-finite gradients, or when its loss was not finite).
    """

    def __init__(self, device, scaled):
        self.limit = SKIPPED_STEPS_LIMIT if scaled else 1
        self.first_bad_step = torch.full((), -1, dtype=torch.long, device=device)
        self.in_a_row = torch.zeros((), dtype=torch.long, device=device)
        self.skipped = torch.zeros((), dtype=torch.long, device=device)

    @staticmethod
    def scale_before_step(scaler):
        # GradScaler.update() lowers its scale tensor in place exactly when it skipped the step;
        # the public get_scale() would read it back to the host
        return scaler._scale.clone() if scaler.is_enabled() else None

    def after_step(self, step, loss, scaler, scale_before):
        bad = ~torch.isfinite(loss.detach())
        if scale_before is not None:
            skipped = scaler._scale < scale_before
            self.skipped += skipped
            bad = bad | skipped
        self.in_a_row = torch.where(bad, self.in_a_row + 1, 0)
        self.first_bad_step = torch.where((self.first_bad_step < 0) & (self.in_a_row >= self.limit),
                                          step, self.first_bad_step)

    def take_skipped(self):
        count = int(self.skipped.item())
        self.skipped.zero_()
        return count

    def reset(self):
        self.first_bad_step.fill_(-1)
        self.in_a_row.zero_()
        self.skipped.zero_()


class Diverged(InputError):
    """The loss was NaN or infinite at `step` (for SKIPPED_STEPS_LIMIT steps in a row, up to
    `step`, with the gradient scaler), or the weights were after it (the same step on every
    rank: the loss is global, the weights are the same everywhere)."""

    def __init__(self, step, args, what='loss at'):
        hint = 'a lower learning rate or --precision fp32' if args.rollbacks else \
            'a lower learning rate, --rollbacks or --precision fp32'
        super().__init__(f'non-finite {what} step {step}; stopping without saving, the last good '
                         f'checkpoint in {args.checkpoint_dir} is unchanged (try {hint})')
        self.step, self.what = step, what


def stop_if_non_finite(health, args):
    step = int(health.first_bad_step.item())
    if step < 0:
        return
    if health.limit > 1:
        raise Diverged(step, args, what=f'loss or gradients in {health.limit} skipped steps in '
                                        f'a row, up to')
    raise Diverged(step, args)


def stop_if_weights_non_finite(run, step):
    """Before a checkpoint: a finite loss at the last step says nothing of the update after it."""
    state = [t for t in run.model.state_dict().values() if t.is_floating_point()]
    state += [t for s in run.optimizer.state.values() for t in s.values()
              if torch.is_tensor(t) and t.is_floating_point()]
    if state and not bool(torch.stack([torch.isfinite(t).all() for t in state]).all()):
        raise Diverged(step, run.args, what='weights after')


def roll_back(run, error):
    """After a non-finite loss: reload the last checkpoint on every rank and lower the learning
    rates by --rollback-lr-factor; re-raise when --rollbacks are used up. Returns where to
    continue, (epoch, steps done in it)."""
    args, info = run.args, run.info
    if args.rollbacks_done >= args.rollbacks:
        if args.rollbacks:
            raise InputError(f'{error} (after {args.rollbacks_done} rollback(s), the most '
                             f'--rollbacks allows)') from None
        raise error
    if info.world_size > 1:
        dist.barrier()  # every rank is here: no checkpoint write under way
    # resume() also restores lr_scale and rollbacks_done: the checkpoint holds the current ones,
    # as every rollback rewrites it below before training goes on
    epoch, step = resume(args, run.model, run.optimizer, run.scaler, run.probe,
                         data_order(args, info, run.loader))
    run.health.reset()
    args.lr_scale *= args.rollback_lr_factor
    args.rollbacks_done += 1
    if run.probe is not None:
        run.probe.counts.zero_()  # the abandoned steps' accuracy
    if info.is_main:  # the same weights, with the new scale and count: a crash keeps them
        save_checkpoint(run, epoch, step)
    run.log.note(f'non-finite {error.what} step {error.step}: rolled back to '
                 f'{args.checkpoint_dir / "checkpoint.pth"} (epoch {epoch}, step {step} of the '
                 f'epoch), learning rates now x{args.lr_scale:g} of the schedule (rollback '
                 f'{args.rollbacks_done} of at most {args.rollbacks})')
    return epoch, step


def gradient_factor(args, world_size):
    """Multiplier on the loss before backward, choosing the gradient semantics.

    The reference all-reduces c outside autograd and DDP then averages gradients, so every
    gradient is the full-batch gradient / world_size. Factor 1 keeps that; world_size gives the
    exact full-batch gradient; world_size / R behaves as the reference at R processes.
    """
    if args.exact_gradient:
        return float(world_size)
    if args.reference_world_size:
        return world_size / args.reference_world_size
    return 1.0


def print_provenance(run):
    args, info = run.args, run.info
    per_device = args.batch_size // info.world_size
    if args.learning_rate is not None:
        rates = f'learning rate {args.learning_rate} x {args.batch_size}/256'
    else:
        rates = (f'learning rates weights {args.learning_rate_weights} / biases '
                 f'{args.learning_rate_biases} x {args.batch_size}/256')
    device = torch.cuda.get_device_name(info.device) if info.device.type == 'cuda' else 'cpu'
    print(f'torch {torch.__version__}, torchvision {torchvision.__version__}, {device}; '
          f'world size {info.world_size}, batch {args.batch_size} ({per_device} per process), '
          f'{len(run.loader)} steps per epoch, {rates}, precision {run.precision}, '
          f'gradient scale x{gradient_factor(args, info.world_size):g} of the reference\'s, '
          f'online probe {"on" if run.probe is not None else "off"}', flush=True)


def build_model_and_optimizer(args, info):
    model = BarlowTwins(args).to(info.device)
    # compiled on several GPUs: global BatchNorm that torch.compile traces without graph breaks
    model = distributed.convert_global_batchnorm(
        model, traceable=getattr(args, 'compile', False) and info.world_size > 1)
    # Two groups as in the reference: weights (ndim > 1) and biases/BatchNorm (ndim == 1); the
    # earlier release (--learning-rate) had one group over model.parameters().
    if args.learning_rate is not None:
        groups = [{'params': list(model.parameters())}]
    else:
        groups = [{'params': [p for p in model.parameters() if p.ndim != 1]},
                  {'params': [p for p in model.parameters() if p.ndim == 1]}]
    compiled = getattr(args, 'compile', False)
    optimizer = LARS(groups, lr=0, weight_decay=args.weight_decay, weight_decay_filter=True,
                     lars_adaptation_filter=True, foreach=getattr(args, 'lars_foreach', False),
                     eta=getattr(args, 'lars_eta', 0.001),
                     clip_lr=getattr(args, 'lars_clip_lr', False), compiled=compiled)
    if getattr(args, 'channels_last', False):
        model = model.to(memory_format=torch.channels_last)
    # --compile: the step is compiled as a whole (compiled_step.CompiledStep), the modules are
    # not, so parameter names and checkpoints stay as they are; one process needs no DDP
    model = distributed.data_parallel(model, info, compiled=compiled)
    if info.device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
    return model, optimizer


def build_loader(args, info):
    if args.fast_augment:
        folder = image_folder(args.data, CropTransform(args.crop_size, (args.min_scale, 1.0)),
                              loader=open_for_crop)
    else:
        folder = image_folder(args.data, Transform(args.crop_size, args.blur_prob,
                                                   args.solarize_prob, args.min_scale))
    dataset = SeededSamples(folder, args.seed, skip_bad=args.bad_images == 'skip')
    sampler = EpochSampler(dataset, num_replicas=info.world_size, rank=info.rank, shuffle=True,
                           seed=args.seed)
    per_process = args.batch_size // info.world_size
    notes = check_epoch_steps(args, info, len(dataset), sampler, per_process)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=per_process, num_workers=args.workers,
        pin_memory=info.device.type == 'cuda', sampler=sampler, drop_last=args.drop_last,
        worker_init_fn=ignore_stop_signals)
    loader.notes = notes
    return loader


def check_epoch_steps(args, info, images, sampler, per_process):
    """Every step needs at least 2 images per process: BatchNorm (the projector's, and the
    online probe's, which is per process) cannot normalise one. An epoch without steps, or with
    only such steps, is an error before training; a last batch of one image per process is
    dropped (on every rank alike: the sampler gives each the same count), with a note. A last
    batch of two images in one process is kept, with a note of what its step does. The notes
    are returned, to be printed once every other check of the run has passed."""
    where = f'{images} images, --batch-size {args.batch_size} over {info.world_size} process(es)'
    notes = []
    if per_process < 2:
        raise InputError(f'{where}: {per_process} image per process per step; BatchNorm needs at '
                         f'least 2, use a --batch-size of at least {2 * info.world_size}')
    if args.drop_last and sampler.num_samples < per_process:
        raise InputError(f'{where} with --drop-last: {sampler.num_samples} image(s) per '
                         f'process, no complete batch, so an epoch would have no step; use a '
                         f'smaller --batch-size or leave out --drop-last')
    if not args.drop_last and sampler.num_samples % per_process == 1:
        if sampler.num_samples == 1:
            raise InputError(f'{where}: 1 image per process, which BatchNorm cannot normalise; '
                             f'use fewer processes or more images')
        sampler.epoch_samples = sampler.num_samples - 1
        notes.append(f'{where} leave a last batch of 1 image per process in every epoch, '
                     f'which BatchNorm cannot normalise; it is dropped ({info.world_size} '
                     f'image(s) per epoch; --drop-last or another --batch-size avoids this)')
    if not args.drop_last and info.world_size == 1 and sampler.num_samples % per_process == 2:
        # kept, as the reference keeps it; said, since its step is not a step of the method
        notes.append(f'{where} leave a last batch of 2 images in every epoch; BatchNorm over 2 '
                     f'images gives -1 and +1 whatever its input, so the layers before the '
                     f'projector\'s BatchNorm get almost no gradient, and LARS scales what is '
                     f'left up to a full-size step in an arbitrary direction (--drop-last or '
                     f'another --batch-size avoids this)')
    return notes


def knn_monitor(run, epoch):
    bank_loader, query_loader = run.knn_loaders
    classes = run.loader.dataset.dataset.classes  # the bank is the training set (or part of it)
    autocast_dtype = AUTOCAST_DTYPES.get(run.precision)
    with torch.autocast(run.info.device.type, dtype=autocast_dtype,
                        enabled=autocast_dtype is not None):
        top1 = knn.knn_evaluate(run.model.module.backbone, bank_loader, query_loader,
                                run.info.device, num_classes=len(classes))
    run.model.train()  # knn_evaluate put the backbone in eval mode
    stats = dict(epoch=epoch, **{f'knn_top1_k{k}': v for k, v in top1.items()},
                 time=int(time.time() - run.start_time))
    run.log.write(stats, (epoch + 1) * run.steps_per_epoch)


def build_probe(args, info, model, dataset):
    if not args.online_probe or len(dataset.classes) < 2:
        return None
    feature_dim = model.module.projector[0].in_features
    return OnlineProbe(feature_dim, len(dataset.classes), info.device)


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def save_checkpoint(run, epoch, steps_done=0):
    """checkpoint.pth to continue at `epoch` after its first `steps_done` steps.

    At an epoch end this is the reference's {epoch (next to run), model, optimizer}; the extra
    entries (scaler, args, probe, step_in_epoch) are ignored by the reference code.
    """
    if steps_done >= run.steps_per_epoch:
        epoch, steps_done = epoch + 1, 0
    state = dict(epoch=epoch, step_in_epoch=steps_done, model=run.model.state_dict(),
                 optimizer=run.optimizer.state_dict(), scaler=run.scaler.state_dict(),
                 args=checkpoint_args(run.args), lr_scale=run.args.lr_scale,
                 rollbacks_done=run.args.rollbacks_done,
                 data_order=data_order(run.args, run.info, run.loader))
    if run.probe is not None:
        state['probe'] = run.probe.state_dict()
    save_atomic(state, run.args.checkpoint_dir / 'checkpoint.pth')


def data_order(args, info, loader):
    """What decides which samples an epoch's remaining steps take, in what order, and at which
    learning rates: a mid-epoch checkpoint continues exactly only if all of it is unchanged."""
    return dict(images=len(loader.dataset), classes=len(loader.dataset.dataset.classes),
                world_size=info.world_size, batch_size=args.batch_size,
                drop_last=args.drop_last, seed=args.seed, epochs=args.epochs,
                warmup_epochs=args.warmup_epochs)


ORDER_WORDS = dict(images='training images', classes='classes', world_size='processes',
                   batch_size='--batch-size', drop_last='--drop-last', seed='--seed',
                   epochs='--epochs', warmup_epochs='--warmup-epochs')


def check_data_order(path, ckpt, order):
    """A mid-epoch checkpoint with another data order or schedule is refused (its remaining
    steps would take other samples, some twice, some never); at an epoch end, as in the
    reference, any may change (e.g. more --epochs) except the class count of the online probe."""
    if order is None:
        return
    saved = dict(ckpt.get('args') or {})
    saved = {k: saved[k] for k in order if k in saved}
    saved.update(ckpt.get('data_order') or {})
    differ = [f'{ORDER_WORDS[k]} {saved[k]} then, {order[k]} now' for k in order
              if k in saved and saved[k] != order[k]]
    if not differ:
        return
    epoch, step = ckpt['epoch'], ckpt.get('step_in_epoch', 0)
    if step:  # every rank raises alike: the checkpoint and the settings are the same on all
        raise InputError(f'{path} stopped at step {step} of epoch {epoch}, and the rest of that '
                         f'epoch cannot be continued exactly ({"; ".join(differ)}); resume with '
                         f'the same settings, or use another --checkpoint-dir')
    if 'classes' in saved and saved['classes'] != order['classes'] and ckpt.get('probe'):
        raise InputError(f'{path}: the online probe was trained on {saved["classes"]} classes, '
                         f'the dataset now has {order["classes"]}; use --no-online-probe or '
                         f'another --checkpoint-dir')


def resume(args, model, optimizer, scaler, probe=None, order=None, steps_per_epoch=None):
    """Resume from checkpoint_dir/checkpoint.pth when present (ours or the reference's).

    `order` (data_order) is checked against the checkpoint's. Settings given other values than
    the checkpoint records apply from the resumed step on, and with `steps_per_epoch` (the first
    resume of a run, not a rollback) rank 0 names them. Returns (epoch, steps already done in
    that epoch)."""
    path = args.checkpoint_dir / 'checkpoint.pth'
    if not path.is_file():
        return 0, 0
    ckpt = load_checkpoint_file(path)
    if not isinstance(ckpt, dict) or not {'epoch', 'model', 'optimizer'} <= set(ckpt):
        raise InputError(f'{path} is not a main.py checkpoint (expected epoch, model, optimizer)')
    saved = ckpt.get('args') or {}
    for key in ('arch', 'projector', 'cifar_stem'):
        if key in saved and saved[key] != getattr(args, key):
            raise InputError(f'{path} was written with --{key.replace("_", "-")} {saved[key]}, '
                             f'this run has {getattr(args, key)}; use another --checkpoint-dir')
    check_data_order(path, ckpt, order)
    model.load_state_dict(match_state_dict(ckpt['model'], model, str(path)))
    saved_groups = len(ckpt['optimizer'].get('param_groups', []))
    if saved_groups != len(optimizer.param_groups):
        flags = {1: '--learning-rate', 2: '--learning-rate-weights/--learning-rate-biases'}
        raise InputError(f'{path} has {saved_groups} optimizer parameter group(s) '
                         f'({flags.get(saved_groups, "?")}) but this run has '
                         f'{len(optimizer.param_groups)} ({flags[len(optimizer.param_groups)]})')
    try:
        optimizer.load_state_dict(ckpt['optimizer'])
    except (ValueError, KeyError) as e:
        raise InputError(f'{path}: optimizer state does not match this model: {e}') from None
    last_rate = optimizer.param_groups[0]['lr']  # of the last step trained
    for group in optimizer.param_groups:
        # The earlier release's filter function means "skip 1-D tensors", which True says too;
        # keeping a function would make our own checkpoints need the full unpickler.
        for key in ('weight_decay_filter', 'lars_adaptation_filter'):
            if group[key] is exclude_bias_and_norm:
                group[key] = True
        # The optimizer's state dict holds these too. Where the checkpoint records the flags
        # (ours), this run's flags win, as they do for the learning rates, and a change is
        # named below; the reference's own checkpoints keep their values, as the reference does.
        for key, flag, default in (('weight_decay', 'weight_decay', 1e-6),
                                   ('eta', 'lars_eta', 0.001), ('clip_lr', 'lars_clip_lr', False)):
            if flag in saved:
                group[key] = getattr(args, flag, default)
    if ckpt.get('scaler'):
        scaler.load_state_dict(ckpt['scaler'])
    if probe is not None and ckpt.get('probe'):
        try:
            probe.load_state_dict(ckpt['probe'])
        except (RuntimeError, ValueError, KeyError) as e:  # another class count
            reason = str(e).strip().splitlines()[-1].strip()
            raise InputError(f'{path}: the online probe does not fit this dataset ({reason}); '
                             f'use --no-online-probe or another --checkpoint-dir') from None
    args.lr_scale = float(ckpt.get('lr_scale', 1.0))  # lowered by earlier --rollbacks
    args.rollbacks_done = int(ckpt.get('rollbacks_done', 0))
    epoch, step = ckpt['epoch'], ckpt.get('step_in_epoch', 0)
    if epoch > args.epochs or (epoch == args.epochs and step):
        done = f'{epoch} epoch(s)' + (f' and {step} step(s)' if step else '')
        raise InputError(f'{path} has trained {done}, past --epochs {args.epochs}: give '
                         f'--epochs {epoch + 1 if step else epoch} or more to continue it, or '
                         f'another --checkpoint-dir')
    changed = changed_settings(saved, vars(args), CHANGEABLE_SETTINGS)
    if changed and steps_per_epoch and distributed.world_info()[0] == 0:
        print(changed_settings_note(path, args, changed, epoch, step, last_rate,
                                    steps_per_epoch), flush=True)
    return epoch, step


# Settings a run resumed at an epoch end may change, as in the reference (more --epochs, say):
# they apply from the resumed step on, and the run names each one that changed. (The model's
# shape is refused in resume(); a mid-epoch checkpoint refuses what decides the rest of its
# epoch, check_data_order.)
CHANGEABLE_SETTINGS = ('data', 'epochs', 'warmup_epochs', 'batch_size', 'learning_rate',
                       'learning_rate_weights', 'learning_rate_biases', 'scale_loss', 'lambd',
                       'weight_decay', 'lars_eta', 'lars_clip_lr', 'crop_size', 'min_scale',
                       'blur_prob', 'solarize_prob', 'seed', 'drop_last', 'exact_gradient',
                       'reference_world_size', 'precision', 'online_probe', 'fast_augment')
SCHEDULE_SETTINGS = ('epochs', 'warmup_epochs', 'batch_size', 'learning_rate',
                     'learning_rate_weights', 'learning_rate_biases')


def changed_settings_note(path, args, changed, epoch, step, last_rate, steps_per_epoch):
    """One line: what changed since `path` was written, and where the learning rate goes."""
    note = (f'note: resuming {path} at epoch {epoch}, step {step} of the epoch, with settings '
            f'changed since it was written, which apply from here on: {changes_text(changed)}')
    if any(k in SCHEDULE_SETTINGS for k, _, _ in changed) and \
            epoch * steps_per_epoch + step < args.epochs * steps_per_epoch:  # a step is left
        rate = learning_rate_schedule(epoch * steps_per_epoch + step, steps_per_epoch,
                                      args.epochs, args.batch_size, args.warmup_epochs)
        rate *= args.lr_scale * (args.learning_rate if args.learning_rate is not None
                                 else args.learning_rate_weights)
        note += (f'; the learning-rate schedule follows them: the weights\' rate (lr_weights) '
                 f'goes from {last_rate:.4g} at the last step trained to {rate:.4g} at the next')
    return note


# ---------------------------------------------------------------------------------------------
# The method: schedule, loss, model, optimizer, augmentations
# ---------------------------------------------------------------------------------------------

def learning_rate_schedule(step, steps_per_epoch, epochs, batch_size, warmup_epochs=10):
    """Base learning rate at a global step: linear warmup, then cosine to 1/1000 of the peak."""
    max_steps = epochs * steps_per_epoch
    warmup_steps = warmup_epochs * steps_per_epoch
    base_lr = batch_size / 256
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    q = 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / (max_steps - warmup_steps)))
    end_lr = base_lr * 0.001
    return base_lr * q + end_lr * (1 - q)


def adjust_learning_rate(args, optimizer, loader, step):
    set_learning_rates(args, optimizer, step, len(loader))


def set_learning_rates(args, optimizer, step, steps_per_epoch):
    lr = learning_rate_schedule(step, steps_per_epoch, args.epochs, args.batch_size,
                                getattr(args, 'warmup_epochs', 10)) * getattr(args, 'lr_scale', 1.0)
    if getattr(args, 'learning_rate', None) is not None:
        for group in optimizer.param_groups:
            group['lr'] = lr * args.learning_rate
    else:
        optimizer.param_groups[0]['lr'] = lr * args.learning_rate_weights
        optimizer.param_groups[1]['lr'] = lr * args.learning_rate_biases


def off_diagonal(x):
    # return a flattened view of the off-diagonal elements of a square matrix
    n, m = x.shape
    assert n == m
    return x.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


class BarlowTwins(nn.Module):
    """Backbone, projector and the cross-correlation loss.

    BarlowTwins(args) builds the reference model from main.py's arguments. From Python, any
    backbone works: BarlowTwins(backbone=net, feature_dim=512, projector='2048-2048',
    lambd=0.0051); without `batch_size`, c is divided by the actual global batch. No process
    group is needed; with one, c is summed over all ranks as in the reference.
    """

    def __init__(self, args=None, backbone=None, feature_dim=None, *, projector=None,
                 lambd=None, batch_size=None, scale_loss=None):
        super().__init__()
        self.args = args

        def setting(name, value, default):
            return value if value is not None else getattr(args, name, default)

        self.lambd = setting('lambd', lambd, 0.0051)
        self.scale_loss = setting('scale_loss', scale_loss, 1.0)
        self.batch_size = setting('batch_size', batch_size, None)
        if backbone is None:
            backbone, feature_dim = build_backbone(getattr(args, 'arch', 'resnet50'),
                                                   getattr(args, 'cifar_stem', False))
        elif feature_dim is None:
            raise ValueError('BarlowTwins(backbone=...) needs feature_dim, the width of the '
                             'backbone output')
        self.backbone = backbone

        # projector
        sizes = [feature_dim] + parse_projector(setting('projector', projector, '8192-8192-8192'))
        layers = []
        for i in range(len(sizes) - 2):
            layers.append(nn.Linear(sizes[i], sizes[i + 1], bias=False))
            layers.append(nn.BatchNorm1d(sizes[i + 1]))
            layers.append(nn.ReLU(inplace=True))
        layers.append(nn.Linear(sizes[-2], sizes[-1], bias=False))
        self.projector = nn.Sequential(*layers)

        # normalization layer for the representations z1 and z2
        self.bn = nn.BatchNorm1d(sizes[-1], affine=False)

    def forward(self, y1, y2, return_features=False):
        r1 = self.backbone(y1)
        z1 = self.projector(r1)
        z2 = self.projector(self.backbone(y2))
        loss = self.loss(z1, z2)
        # The representation of view 1, for the online probe (detached there).
        return (loss, r1) if return_features else loss

    def loss(self, z1, z2):
        # empirical cross-correlation matrix: (D, N) @ (N, D), in the autocast dtype
        c = self.bn(z1).T @ self.bn(z2)
        # Everything after the product in fp32: the off-diagonal sum overflows fp16 (~1e6).
        c = c.float()
        _, world_size = distributed.world_info()
        c = c / (self.batch_size or z1.shape[0] * world_size)
        if world_size > 1:
            # sum the cross-correlation matrix between all ranks, outside autograd as the
            # reference: the value is global, the gradient flows into the local c only (see
            # gradient_factor). Written out, since autograd through an in-place collective is
            # deprecated.
            c_global = c.detach().clone()
            dist.all_reduce(c_global)
            c = c + (c_global - c.detach())
        on_diag = torch.diagonal(c).add(-1).pow(2).sum()
        off_diag = off_diagonal(c).pow(2).sum()
        return self.scale_loss * (on_diag + self.lambd * off_diag)


class LARS(optim.Optimizer):
    """LARS as in the reference: momentum buffer `mu`, trust ratio eta * ||p|| / ||g||.

    clip_lr=True (off in the reference; solo-learn's `clip_lr`) caps each tensor's effective
    rate lr * ratio at lr: the ratio becomes min(ratio / lr, 1), as solo-learn computes it.

    The filters say which parameters skip weight decay / the trust ratio: True skips 1-D
    tensors (biases, BatchNorm), a callable skips those it returns True for (the earlier
    release passed exclude_bias_and_norm), False/None skips none.
    foreach=True does the same arithmetic with a few multi-tensor kernels per group instead of
    about ten kernels per parameter (equal to float tolerance: norms may sum in another order).
    compiled=True runs every group's update as one torch.compile graph (lars_update), the
    learning rates passed as device scalars so that the schedule never recompiles it.
    """

    def __init__(self, params, lr, weight_decay=0, momentum=0.9, eta=0.001,
                 weight_decay_filter=False, lars_adaptation_filter=False, foreach=False,
                 clip_lr=False, compiled=False):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                        eta=eta, weight_decay_filter=weight_decay_filter,
                        lars_adaptation_filter=lars_adaptation_filter, clip_lr=clip_lr)
        super().__init__(params, defaults)
        self.foreach = foreach
        self.compiled = compiled

    def exclude_bias_and_norm(self, p):
        return p.ndim == 1

    def _skips(self, filter_, p):
        if filter_ is None or filter_ is False:
            return False
        if filter_ is True:
            return self.exclude_bias_and_norm(p)
        return bool(filter_(p))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.compiled:
            self._step_compiled()
            return loss
        for g in self.param_groups:
            if self.foreach:
                self._group_step_foreach(g)
                continue
            for p in g['params']:
                dp = p.grad
                if dp is None:
                    continue
                if not self._skips(g['weight_decay_filter'], p):
                    dp = dp.add(p, alpha=g['weight_decay'])
                if not self._skips(g['lars_adaptation_filter'], p):
                    param_norm = torch.norm(p)
                    update_norm = torch.norm(dp)
                    one = torch.ones_like(param_norm)
                    # the reference's arithmetic: an update so small against ||p|| that the
                    # ratio overflows gives an inf step (the run then stops on non-finite
                    # weights); --lars-foreach and --compile take ratio 1 there instead
                    q = torch.where(param_norm > 0.,
                                    torch.where(update_norm > 0,
                                                (g['eta'] * param_norm / update_norm), one), one)
                    dp = dp.mul(self._clipped(q, g))
                param_state = self.state[p]
                if 'mu' not in param_state:
                    param_state['mu'] = torch.zeros_like(p)
                mu = param_state['mu']
                mu.mul_(g['momentum']).add_(dp)
                p.add_(mu, alpha=-g['lr'])
        return loss

    def _group_step_foreach(self, g):
        params = [p for p in g['params'] if p.grad is not None]
        if not params:
            return
        updates = [p.grad for p in params]
        decayed = [i for i, p in enumerate(params) if not self._skips(g['weight_decay_filter'], p)]
        if decayed:
            summed = torch._foreach_add([updates[i] for i in decayed],
                                        [params[i] for i in decayed], alpha=g['weight_decay'])
            for i, u in zip(decayed, summed):
                updates[i] = u
        adapted = [i for i, p in enumerate(params)
                   if not self._skips(g['lars_adaptation_filter'], p)]
        if adapted:
            adapted_updates = [updates[i] for i in adapted]
            scaled = self._trust_ratios([params[i] for i in adapted], adapted_updates, g)
            torch._foreach_mul_(scaled, adapted_updates)  # ratio * update, in the ratios' memory
            for i, u in zip(adapted, scaled):
                updates[i] = u
        for p in params:
            if 'mu' not in self.state[p]:
                self.state[p]['mu'] = torch.zeros_like(p)
        mus = [self.state[p]['mu'] for p in params]
        torch._foreach_mul_(mus, g['momentum'])
        torch._foreach_add_(mus, updates)
        torch._foreach_add_(params, mus, alpha=-g['lr'])

    def _step_compiled(self):
        params, grads, mus, settings = [], [], [], []
        for index, g in enumerate(self.param_groups):
            for p in g['params']:
                if p.grad is None:
                    continue
                if 'mu' not in self.state[p]:
                    self.state[p]['mu'] = torch.zeros_like(p)
                params.append(p)
                grads.append(p.grad)
                mus.append(self.state[p]['mu'])
                decay = 0.0 if self._skips(g['weight_decay_filter'], p) else g['weight_decay']
                settings.append((index, decay, not self._skips(g['lars_adaptation_filter'], p)))
        if not params:
            return
        # one device scalar per group, refilled each step: a Python float would be a constant
        # of the graph, and every new learning rate a recompilation
        lrs = self.__dict__.setdefault('_lr_tensors', [])
        if len(lrs) != len(self.param_groups) or lrs[0].device != params[0].device:
            # float64: exact for float64 parameters, cast like `alpha` for float32 ones
            lrs[:] = [torch.zeros((), dtype=torch.float64, device=params[0].device)
                      for _ in self.param_groups]
        for lr, g in zip(lrs, self.param_groups):
            lr.fill_(g['lr'])
        groups = tuple((g['momentum'], g['eta'], bool(g.get('clip_lr')))
                       for g in self.param_groups)
        compiled_lars_update()(params, grads, mus, lrs, tuple(settings), groups)

    @staticmethod
    def _clipped(q, g):
        # (a state dict of an earlier version has no clip_lr: not clipped, as then)
        # lr 0 (the first warmup step) gives inf, clamped to 1: the step is 0 anyway
        return (q / g['lr']).clamp(max=1.0) if g.get('clip_lr') else q

    def _trust_ratios(self, params, updates, g):
        """Each update's trust ratio, in a new tensor of the update's own shape and strides.

        CUDA's multi-tensor kernels take a list pair only when corresponding tensors have equal
        sizes and strides and each is dense and non-overlapping (torch 2.14.1's
        ATen/native/ForeachUtils.h: _check_tensors_share_device_and_dtype, line 113, and
        _check_tensors_share_sizes_and_strides, lines 123-151, both called by
        check_fast_path_restrictions, line 198); otherwise foreach_tensor_mul_list_kernel_cuda
        (ATen/native/cuda/ForeachBinaryOpList.cu, FOREACH_BINARY_OP_LIST) falls back to one
        kernel per tensor. So neither a list of 0-d ratios nor stride-0 expanded views of them
        qualify: the ratios are written out into one flat buffer as long as the updates together
        (an index_select), whose slices are viewed with each update's strides. Memory: 4 bytes
        per element for the buffer (which then holds the scaled updates) and, while it is
        written, 4 for the int32 index.
        """
        param_norm = torch.stack(torch._foreach_norm(params))  # (n,)
        update_norm = torch.stack(torch._foreach_norm(updates))
        ratio = g['eta'] * param_norm / update_norm  # inf where ||update|| is 0 or too small
        q = torch.where((param_norm > 0) & (ratio < math.inf), ratio, torch.ones_like(param_norm))
        q = self._clipped(q, g).to(updates[0].dtype)
        sizes = [u.numel() for u in updates]
        # (total,): tensor i's index repeated numel_i times; output_size given, so no read-back
        index = torch.repeat_interleave(self._segment_lengths(sizes, q.device),
                                        output_size=sum(sizes))
        flat = q.index_select(0, index)
        return [part.as_strided(u.shape, u.stride())
                for part, u in zip(flat.split(sizes), updates)]

    def _segment_lengths(self, sizes, device):
        # One small host-to-device copy per parameter group, never a read-back.
        cache = self.__dict__.setdefault('_segment_cache', {})
        key = (tuple(sizes), device)
        if key not in cache:
            cache[key] = torch.tensor(sizes, dtype=torch.int32, device=device)
        return cache[key]


def lars_update(params, grads, mus, lrs, settings, groups):
    """LARS.step's arithmetic for every parameter, as a function torch.compile takes whole.

    settings[i] = (group index, weight decay or 0 where filtered, trust ratio or not) of
    params[i]; groups[k] = (momentum, eta, clip_lr) and lrs[k] (a 0-d tensor) of group k. The
    ratio scales each update directly: the foreach path's flat buffer of ratios is a view chain
    that the compiler refuses to mutate."""
    for p, g, mu, (group, decay, adapt) in zip(params, grads, mus, settings):
        momentum, eta, clip = groups[group]
        lr = lrs[group]
        update = g.add(p, alpha=decay) if decay else g
        if adapt:
            param_norm = torch.linalg.vector_norm(p)
            update_norm = torch.linalg.vector_norm(update)
            ratio = eta * param_norm / update_norm  # inf where ||update|| is 0 or too small
            q = torch.where((param_norm > 0) & (ratio < math.inf), ratio,
                            torch.ones_like(param_norm))
            if clip:
                q = (q / lr).clamp(max=1.0)
            update = update * q
        mu.mul_(momentum).add_(update)
        p.sub_(lr * mu)


_COMPILED = {}


def compiled_lars_update():
    """lars_update compiled once per process (at its first call: compiling takes seconds)."""
    if 'lars' not in _COMPILED:
        _COMPILED['lars'] = torch.compile(lars_update, fullgraph=True, dynamic=False)
    return _COMPILED['lars']


class GaussianBlur(object):
    def __init__(self, p):
        self.p = p

    def __call__(self, img):
        if random.random() < self.p:
            sigma = random.random() * 1.9 + 0.1
            return img.filter(ImageFilter.GaussianBlur(sigma))
        return img


class Solarization(object):
    def __init__(self, p):
        self.p = p

    def __call__(self, img):
        if random.random() < self.p:
            return ImageOps.solarize(img)
        return img


class Transform:
    """The two asymmetric views: view 1 always blurred, view 2 rarely blurred, sometimes solarised.

    `blur` and `solarize` hold each view's probability and `min_scale` the smallest crop area
    fraction; the defaults are the reference's (--blur-prob, --solarize-prob, --min-scale).
    """

    def __init__(self, crop_size=224, blur=(1.0, 0.1), solarize=(0.0, 0.2), min_scale=0.08):
        self.transform = self._view(crop_size, blur[0], solarize[0], min_scale)
        self.transform_prime = self._view(crop_size, blur[1], solarize[1], min_scale)

    @staticmethod
    def _view(crop_size, blur, solarize, min_scale):
        return transforms.Compose([
            transforms.RandomResizedCrop(crop_size, scale=(min_scale, 1.0),
                                         interpolation=Image.BICUBIC),
            transforms.RandomHorizontalFlip(p=0.5),
            transforms.RandomApply(
                [transforms.ColorJitter(brightness=0.4, contrast=0.4,
                                        saturation=0.2, hue=0.1)],
                p=0.8
            ),
            transforms.RandomGrayscale(p=0.2),
            GaussianBlur(p=blur),
            Solarization(p=solarize),
            transforms.ToTensor(),
            transforms.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD)
        ])

    def __call__(self, x):
        y1 = self.transform(x)
        y2 = self.transform_prime(x)
        return y1, y2


if __name__ == '__main__':
    main()
