"""Evaluate Barlow Twins representations: linear probe, semi-supervised fine-tuning, kNN.

    python evaluate.py /path/to/imagenet /path/to/resnet50.pth --lr-classifier 0.3
        # linear probe (frozen backbone, 100% labels), one process per visible GPU
    python evaluate.py /path/to/imagenet /path/to/resnet50.pth --weights finetune --train-perc 1 \\
        --epochs 20 --lr-backbone 0.005 --lr-classifier 0.5 --weight-decay 0
        # semi-supervised, 1% of the labels (SimCLR's list; 10 for 10%)
    torchrun --nproc-per-node 8 evaluate.py /path/to/imagenet /path/to/resnet50.pth   # torchrun
    sbatch --nodes 1 --gres gpu:8 --signal USR1@120 \\
        --wrap 'srun python evaluate.py /path/to/imagenet /path/to/resnet50.pth'      # SLURM
    python evaluate.py /path/to/imagenet checkpoint/checkpoint.pth --knn
        # weighted kNN (k=20, 200) on frozen features: a monitor that takes minutes
    python evaluate.py demo_data checkpoint/demo/resnet18.pth --knn   # the demo's weights
        # --arch, --cifar-stem and --crop-size come from what main.py recorded (checkpoint.pth)

The pretrained FILE may be a backbone state dict (<arch>.pth from main.py, the released
resnet50.pth, a torchvision-style dict whose fc.* keys are ignored) or a full checkpoint.pth from
main.py or from the original code (`module.backbone.*` keys). Writes stats.txt and checkpoint.pth
(resumed automatically) to --checkpoint-dir, whose default depends on the mode (see --help).
"""
import argparse
import dataclasses
import hashlib
import math
import os
import re
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import torch
import torch.distributed as dist
import torchvision
from torch import nn, optim

import distributed
from augmentations import train_transform, val_transform
from backbones import (ARCHS, build_backbone, describe_settings, load_backbone_state,
                       recorded_settings)
from checkpoints import checkpoint_args, load_checkpoint_file, match_state_dict, save_atomic
from cli import (USER_ERRORS, ArgumentParser, InputError, changed_settings, changes_text,
                 command_line, default_workers, error_line, non_negative_float,
                 non_negative_int, positive_float, positive_int, positive_ints, read_lines, seed)
from data import (EpochSampler, align_classes, ignore_stop_signals, image_folder,
                  make_eval_loader, seed_everything)
from knn import KNN_KS, KNN_TEMPERATURE, extract_features, knn_evaluate
from linear_fit import fit_linear, top_k_accuracy
from monitor import StatsLog
from preemption import RunLock, StopRequests, Stopped, check_directory_kind, stop_signals_end_it
from stats import read_runs

SUBSET_URL = ('https://raw.githubusercontent.com/google-research/simclr/master/imagenet_subsets/'
              '{percent}percent.txt')
SETTING_DEFAULTS = dict(arch='resnet50', cifar_stem=False, crop_size=224)
SUBSET_LINE = re.compile(r'[^\s/_]+_[^\s/]+')  # n01440764_10026.JPEG: <class>_<rest>
CLASS_FILE_LINE = re.compile(r'[^/]+/[^/]+\.\w+')  # warm_disc/warm_disc_0001.JPEG: any class


def default_checkpoint_dir(weights, train_percent, knn=False, fast_linear=False):
    """Distinct per mode, so that auto-resume never picks up another kind of run's state."""
    if knn:
        return Path('./checkpoint/knn/')
    if fast_linear:
        return Path('./checkpoint/fast_linear' + ('' if train_percent == 100 else
                                                   f'_{train_percent}pct') + '/')
    name = {'freeze': 'lincls', 'finetune': 'finetune' if train_percent == 100 else 'semisup'}
    suffix = '' if train_percent == 100 else f'_{train_percent}pct'
    return Path(f'./checkpoint/{name[weights]}{suffix}/')


def default_subset_cache_dir():
    return Path(torch.hub.get_dir()) / 'simclr_imagenet_subsets'


def get_arguments():
    parser = ArgumentParser(description='Evaluate resnet features on ImageNet',
                                 prog='evaluate.py')
    parser.add_argument('data', type=Path, metavar='DIR',
                        help='path to dataset (ImageFolder layout: DIR/train and DIR/val)')
    parser.add_argument('pretrained', type=Path, metavar='FILE',
                        help='pretrained model: <arch>.pth backbone state dict, torchvision-style '
                             'state dict (fc.* ignored), or a full checkpoint.pth from main.py '
                             'or the original code')
    parser.add_argument('--weights', default='freeze', choices=('finetune', 'freeze'),
                        help='finetune or freeze resnet weights')
    parser.add_argument('--train-percent', '--train-perc', default=100, type=int,
                        choices=(100, 10, 1),
                        help='size of training set in percent (1 and 10: the SimCLR subsets)')
    parser.add_argument('--workers', default=None, type=non_negative_int, metavar='N',
                        help='number of data loader workers per process (default: 8, capped at '
                             'the CPUs this process may use)')
    parser.add_argument('--epochs', default=100, type=positive_int, metavar='N',
                        help='number of total epochs to run')
    parser.add_argument('--batch-size', default=256, type=positive_int, metavar='N',
                        help='global mini-batch size, divided over the processes (training and '
                             'validation)')
    parser.add_argument('--lr-backbone', default=0.0, type=non_negative_float, metavar='LR',
                        help='backbone base learning rate (finetune only)')
    parser.add_argument('--lr-classifier', default=0.3, type=non_negative_float, metavar='LR',
                        help='classifier base learning rate')
    parser.add_argument('--weight-decay', default=1e-6, type=non_negative_float, metavar='W',
                        help='weight decay')
    parser.add_argument('--print-freq', default=100, type=positive_int, metavar='N',
                        help='print frequency (steps)')
    parser.add_argument('--checkpoint-dir', default=None, type=Path, metavar='DIR',
                        help='path to checkpoint directory (default: ./checkpoint/lincls/ for '
                             'freeze at 100%%, ./checkpoint/lincls_{1,10}pct/ for freeze on a '
                             'subset, ./checkpoint/finetune/ for finetune at 100%%, '
                             './checkpoint/semisup_{1,10}pct/ for finetune on a subset, '
                             './checkpoint/knn/ with --knn)')
    # Beyond the reference.
    # None: taken from what main.py recorded for FILE, else the default in the help.
    parser.add_argument('--arch', default=None, choices=ARCHS,
                        help='torchvision backbone, as given to main.py (default: as recorded '
                             'for FILE, else resnet50)')
    parser.add_argument('--cifar-stem', action=argparse.BooleanOptionalAction, default=None,
                        help='3x3 stride-1 first convolution and no max-pool, as given to '
                             'main.py (default: as recorded for FILE, else off)')
    parser.add_argument('--crop-size', default=None, type=positive_int, metavar='PX',
                        help='training crop side; validation resizes to crop*256/224 and '
                             'center-crops to it (default: the pretraining crop recorded for '
                             'FILE, else 224)')
    parser.add_argument('--train-files', default=None, type=Path, metavar='FILE',
                        help='local subset list, one image per line, either in the SimCLR '
                             'format (n01440764_10026.JPEG: the class is the part before the '
                             'first _) or as <class>/<file> (any class names); needs '
                             '--train-percent 1 or 10 (default: SimCLR\'s list for that '
                             'percentage, downloaded once and cached)')
    parser.add_argument('--subset-cache-dir', default=None, type=Path, metavar='DIR',
                        help='where downloaded subset lists are kept (default: '
                             '<torch.hub.get_dir()>/simclr_imagenet_subsets, i.e. '
                             '~/.cache/torch/hub/... unless TORCH_HOME is set)')
    parser.add_argument('--knn', action='store_true',
                        help='only run the weighted kNN evaluation on frozen features (train '
                             'set, or its subset, as the bank) and log {k: top-1}')
    parser.add_argument('--knn-k', default=KNN_KS, type=positive_ints, metavar='K[,K...]',
                        help='neighbour counts for --knn (default 20,200; capped at the bank size)')
    parser.add_argument('--knn-temperature', default=KNN_TEMPERATURE, type=positive_float,
                        metavar='T',
                        help='kNN vote weight exp(cosine similarity / T) (default 0.07)')
    parser.add_argument('--fast-linear', action='store_true',
                        help='the fast linear probe: features of the frozen backbone computed '
                             'once (validation transform, no augmentation), standardised, and a '
                             'linear classifier fitted on them by full-batch L-BFGS with '
                             '--weight-decay as its L2 weight; minutes instead of --epochs of '
                             'the reference protocol, which stays the default')
    parser.add_argument('--lbfgs-steps', default=500, type=positive_int, metavar='N',
                        help='most L-BFGS iterations of --fast-linear')
    parser.add_argument('--seed', default=0, type=seed,
                        help='seed for the head initialisation, data order and augmentations')
    parser.add_argument('--device', default='auto', choices=('auto', 'cuda', 'cpu'),
                        help='auto: every visible GPU, else the CPU with a note')
    return parser


def parse_arguments(argv=None):
    parser = get_arguments()
    command = command_line(sys.argv[0], sys.argv[1:]) if argv is None else \
        command_line('evaluate.py', argv)
    args = parser.parse_args(argv)
    args.command = command
    # Which settings were given; the others come from FILE's record in main() (see --help).
    args.given_settings = {k for k in SETTING_DEFAULTS if getattr(args, k) is not None}
    for key, default in SETTING_DEFAULTS.items():
        setattr(args, key, default if getattr(args, key) is None else getattr(args, key))
    if args.train_files is not None and args.train_percent == 100:
        parser.error('--train-files selects a subset: give --train-percent 1 or 10 with it')
    if args.crop_size < 8:
        parser.error(f'--crop-size {args.crop_size} is too small (at least 8)')
    if args.workers is None:
        args.workers = default_workers(parser.prog)
    if args.fast_linear and (args.knn or args.weights == 'finetune'):
        parser.error('--fast-linear fits a classifier on frozen features: it goes with neither '
                     '--knn nor --weights finetune')
    if args.checkpoint_dir is None:
        args.checkpoint_dir = default_checkpoint_dir(args.weights, args.train_percent, args.knn,
                                                     args.fast_linear)
    return args


def main(argv=None):
    args = parse_arguments(argv)
    try:
        for split in ('train', 'val'):
            if not (args.data / split).is_dir():
                image_folder(args.data, split=split)  # the one-line error naming what is missing
        if not args.pretrained.exists():
            raise InputError(f'pretrained file {args.pretrained} does not exist')
        if not args.pretrained.is_file():
            raise InputError(f'pretrained file {args.pretrained} is not a file')
        take_recorded_settings(args)
        load_backbone_state(args.pretrained, args.arch, args.cifar_stem)  # fail before launching
        if args.train_percent != 100:
            args.train_files = subset_list_file(args.train_percent, args.train_files,
                                                args.subset_cache_dir)
            names = read_subset_list(args.train_files)
            print(f'evaluate.py: subset list {args.train_files}: {len(names)} images, '
                  f'{subset_list_format(names)} lines' + repeated_note(names), flush=True)
        check_directory_kind(args.checkpoint_dir, run_kind(args))  # again under the run's lock
        distributed.launch(main_worker, (args,), device=args.device)
    except USER_ERRORS as e:
        sys.exit(f'evaluate.py: error: {error_line(e)}')
    except KeyboardInterrupt:  # before (or after) the run's own stop handling is in place
        sys.exit('evaluate.py: interrupted; checkpoints written before are kept')


def run_kind(args):
    """The kind of run (stats.KINDS) this command is."""
    if args.knn:
        return 'kNN'
    if args.fast_linear:
        return 'fast linear probe'
    return 'fine-tuning' if args.weights == 'finetune' else 'linear probe'


def lock_checkpoint_dir(args, info):
    """One run at a time in --checkpoint-dir, and one kind of run (rank 0 holds the lock)."""
    return RunLock(args.checkpoint_dir, run_kind(args)).acquire() if info.is_main else None


def main_worker(info, args):
    try:
        if args.knn:
            with stop_signals_end_it(info.is_main, 'the kNN evaluation'):
                knn_main(info, args)
        elif args.fast_linear:
            with stop_signals_end_it(info.is_main, 'the fast linear probe'):
                fast_linear_main(info, args)
        else:
            linear_eval(info, args)
    except USER_ERRORS as e:
        where = f' (rank {info.rank})' if info.world_size > 1 else ''
        print(f'evaluate.py: error{where}: {error_line(e)}', file=sys.stderr, flush=True)
        sys.exit(1)
    except Stopped as e:
        if info.is_main:
            print(f'evaluate.py: {e}', file=sys.stderr, flush=True)
        sys.exit(0)


def take_recorded_settings(args):
    """--arch, --cifar-stem and --crop-size from what main.py recorded for the pretrained file,
    where not given. A given --arch or --cifar-stem that contradicts the record is an error; a
    given crop that differs from the pretraining crop is allowed, with a warning."""
    recorded, source = recorded_settings(args.pretrained)
    given = {k: getattr(args, k) for k in args.given_settings}
    clash = {k: v for k, v in given.items() if k in recorded and k != 'crop_size'
             and v != recorded[k]}
    if clash:
        raise InputError(f'{args.pretrained} was pretrained with {describe_settings(recorded)} '
                         f'(recorded in {source}), this run has {_flags(clash)}; '
                         f'drop the flag or pass the same')
    taken = {k: v for k, v in recorded.items() if k not in given}
    for key, value in taken.items():
        setattr(args, key, value)
    if taken:
        print(f'evaluate.py: {_flags(taken)}, as recorded in {source}', flush=True)
    pretrained_crop = recorded.get('crop_size')
    if pretrained_crop is not None and pretrained_crop != args.crop_size:
        print(f'evaluate.py: warning: evaluating at --crop-size {args.crop_size}, but '
              f'{args.pretrained} was pretrained at {pretrained_crop} px: accuracies will differ '
              f'from an evaluation at the pretraining crop', file=sys.stderr, flush=True)


def _flags(settings):
    return (describe_settings(settings) + (' --no-cifar-stem' if settings.get('cifar_stem') is
                                           False else '')).strip()


# ---------------------------------------------------------------------------------------------
# Linear probe / fine-tuning, as the reference
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Training:
    """What one process's linear-probe / fine-tuning loop works with."""
    args: argparse.Namespace
    info: distributed.DistInfo
    model: nn.Module
    optimizer: optim.Optimizer
    scheduler: optim.lr_scheduler.LRScheduler
    loader: torch.utils.data.DataLoader
    log: StatsLog
    stop: StopRequests
    best_acc: dict
    classes: list = None  # the training set's class names, saved with the classifier
    order: dict = None  # data_order(), saved with each checkpoint
    digest: str = None  # pretrained_digest(), saved with each checkpoint
    start_time: float = dataclasses.field(default_factory=time.time)

    @property
    def steps_per_epoch(self):
        # the whole epoch's, also while a resumed epoch's loader yields fewer batches
        return math.ceil(self.loader.sampler.epoch_samples / self.loader.batch_size)


def linear_eval(info, args):
    """Build, resume, then per epoch: train, validate on all ranks, check, checkpoint."""
    if args.batch_size % info.world_size != 0:
        raise InputError(f'--batch-size {args.batch_size} is not divisible by the world size '
                         f'{info.world_size}')
    done = finished_evaluation(args)
    if done is not None:  # every rank: none of them has anything to do
        if info.is_main:
            print(f'evaluate.py: the evaluation in {args.checkpoint_dir} is already complete '
                  f'({done["epoch"]} epoch(s), best top-1 {done["top1"]:.2f}%, top-5 '
                  f'{done["top5"]:.2f}%); its log is {args.checkpoint_dir / "stats.txt"}. Give a '
                  f'larger --epochs to train on, or another --checkpoint-dir for a new run',
                  flush=True)
        return
    lock = lock_checkpoint_dir(args, info)
    try:
        train_and_validate(info, args)
    finally:
        if lock is not None:
            lock.release()


def train_and_validate(info, args):
    stats_log = open_stats_log(args, info)
    seed_everything(args.seed)
    pretrained = load_backbone_state(args.pretrained, args.arch, args.cifar_stem)
    train_set, val_set = build_datasets(args, train_transform(args.crop_size))
    model, optimizer, scheduler = build_model(args, info, pretrained, len(train_set.classes))
    train_loader, val_loader = build_loaders(args, info, train_set, val_set)
    order, digest = data_order(args, info, train_set), pretrained_digest(pretrained)
    start_epoch, start_step, best_acc = resume(args, model, optimizer, scheduler, pretrained,
                                               order, digest)
    if info.is_main:
        print_provenance(args, info, train_set, val_set)
    run = Training(args, info, model, optimizer, scheduler, train_loader, stats_log,
                   StopRequests(info.world_size, info.device), best_acc,
                   list(train_set.classes), order, digest)
    try:
        for epoch in range(start_epoch, args.epochs):
            train_loss = train_one_epoch(run, epoch, start_step if epoch == start_epoch else 0)
            end_epoch(run, epoch, val_loader, pretrained, train_loss)
    finally:
        run.stop.close()
        stats_log.close()


def finished_evaluation(args):
    """{epoch, top1, top5} of an evaluation in --checkpoint-dir that has done --epochs, else
    None (also for a checkpoint that resume() has to look at more closely)."""
    path = args.checkpoint_dir / 'checkpoint.pth'
    if not path.is_file():
        return None
    try:  # mmap: the tensors are not read
        ckpt = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - unreadable or the reference's: resume() reports it
        return None
    saved = ckpt.get('args') if isinstance(ckpt, dict) else None
    if not isinstance(saved, dict) or not isinstance(ckpt.get('best_acc'), dict) or \
            any(saved.get(k) != getattr(args, k) for k in ('weights', 'train_percent', 'arch')) \
            or not isinstance(ckpt.get('epoch'), int) or ckpt['epoch'] < args.epochs:
        return None
    if saved.get('pretrained') != str(args.pretrained):  # the same weights by another path?
        digest = ckpt.get('pretrained_digest')
        if digest is None or digest != pretrained_digest(
                load_backbone_state(args.pretrained, args.arch, args.cifar_stem)):
            return None
    return dict(epoch=ckpt['epoch'], **ckpt['best_acc'])


def end_epoch(run, epoch, val_loader, pretrained, train_loss):
    """Check the weights, validate, log, check the frozen backbone, step the schedule,
    checkpoint. The epoch's line has the reference's accuracies, and the mean training loss of
    the epoch and its learning rates (one point per epoch, whatever --print-freq)."""
    stop_if_weights_non_finite(run.model, run.optimizer, run.args, epoch)
    acc1, acc5 = validate(run.model.module, val_loader, run.info.device)
    best = run.best_acc = dict(top1=max(run.best_acc['top1'], acc1),
                               top5=max(run.best_acc['top5'], acc5))
    groups = run.optimizer.param_groups
    run.log.write(dict(epoch=epoch, acc1=acc1, acc5=acc5, best_acc1=best['top1'],
                       best_acc5=best['top5'], train_loss=train_loss,
                       lr_classifier=groups[0]['lr'],
                       lr_backbone=groups[1]['lr'] if len(groups) == 2 else 0), epoch)
    if run.args.weights == 'freeze':  # sanity check: the frozen backbone must not have moved
        changed = changed_keys(run.model.module, pretrained)
        if changed:
            raise RuntimeError(f'frozen backbone changed during training: {changed[:5]}')
    run.scheduler.step()
    save_checkpoint(run, epoch + 1)


def save_checkpoint(run, epoch, steps_done=0):
    """checkpoint.pth (rank 0) to continue at `epoch` after its first `steps_done` steps; the
    reference's keys, plus step_in_epoch, args, classes (the training set's class names, in
    the order of the classifier's outputs), data_order and pretrained_digest (what a resume
    checks), which the reference ignores."""
    if run.info.is_main:
        state = dict(epoch=epoch, step_in_epoch=steps_done, best_acc=run.best_acc,
                     model=run.model.state_dict(), optimizer=run.optimizer.state_dict(),
                     scheduler=run.scheduler.state_dict(), args=checkpoint_args(run.args),
                     classes=run.classes, data_order=run.order, pretrained_digest=run.digest)
        save_atomic(state, run.args.checkpoint_dir / 'checkpoint.pth')


def train_one_epoch(run, epoch, first_step=0):
    """The epoch's steps from `first_step` on; on SIGTERM/SIGUSR1 (agreed by every rank at one
    step) checkpoint there, requeue under SLURM after SIGUSR1, and raise Stopped. Returns the
    mean training loss of the steps it ran (over all ranks)."""
    args, info, loader = run.args, run.info, run.loader
    seed_everything(args.seed, epoch, info.rank)
    loader.sampler.set_epoch(epoch)
    # a resumed epoch: the samples it has not seen yet
    loader.sampler.start = min(first_step * loader.batch_size, loader.sampler.epoch_samples)
    # freeze: the whole model in eval mode as the reference, so BatchNorm statistics stay fixed
    # (the head is a Linear layer, which has no train/eval difference).
    run.model.train(args.weights == 'finetune')
    criterion = nn.CrossEntropyLoss()
    # First step with a non-finite loss on this rank, kept on the device (no wait per step).
    bad_step = torch.full((), -1, dtype=torch.long, device=info.device)
    loss_sum = torch.zeros(2, dtype=torch.float64, device=info.device)  # sum, steps
    first = epoch * run.steps_per_epoch + first_step
    for step, (images, target) in enumerate(loader, start=first):
        output = run.model(images.to(info.device, non_blocking=True))
        loss = criterion(output, target.to(info.device, non_blocking=True))
        run.optimizer.zero_grad()
        loss.backward()
        run.optimizer.step()
        bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss.detach()), step, bad_step)
        loss_sum[0] += loss.detach()
        loss_sum[1] += 1
        if step % args.print_freq == 0:
            log_step(run, epoch, step, loss)
        signum, _ = run.stop.agreed()
        if signum:  # never checkpoint a diverged model: every rank checks
            stop_if_non_finite(run, epoch, bad_step)
            stop_if_weights_non_finite(run.model, run.optimizer, args, epoch)
            stop_at(run, signum, epoch, step + 1 - epoch * run.steps_per_epoch)
    stop_if_non_finite(run, epoch, bad_step)
    if info.world_size > 1:
        dist.all_reduce(loss_sum)
    total, steps = loss_sum.tolist()
    return total / steps if steps else None  # resumed after the epoch's last step


def log_step(run, epoch, step, loss):
    loss = loss.detach() / run.info.world_size
    if run.info.world_size > 1:
        dist.all_reduce(loss)  # mean over ranks, as the reference's reduce to rank 0
    if not torch.isfinite(loss):  # the mean over ranks: every rank stops here
        raise diverged(run.args, epoch, f'loss at step {step}')
    groups = run.optimizer.param_groups
    run.log.write(dict(epoch=epoch, step=step,
                       lr_backbone=groups[1]['lr'] if len(groups) == 2 else 0,
                       lr_classifier=groups[0]['lr'], loss=loss.item(),
                       time=int(time.time() - run.start_time)), step)


def stop_at(run, signum, epoch, steps_done):
    # A mid-epoch checkpoint resumes at the exact step: the rest of the epoch sees the samples
    # an uninterrupted run would have (their random crops are drawn afresh). After the epoch's
    # last step, the resumed run starts with its validation.
    save_checkpoint(run, epoch, steps_done)
    requeued = run.info.is_main and StopRequests.requeue_if_slurm(signum)
    raise Stopped(f'stopped by signal {signum} at epoch {epoch}, step {steps_done} of the epoch; '
                  f'checkpoint saved' + ('; job requeued' if requeued else ''))


def stop_if_non_finite(run, epoch, bad_step):
    if run.info.world_size > 1:
        dist.all_reduce(bad_step, op=dist.ReduceOp.MAX)  # the ranks stop together
    if int(bad_step) >= 0:
        raise diverged(run.args, epoch, f'loss at step {int(bad_step)}')


def diverged(args, epoch, what):
    return InputError(f'non-finite {what} (epoch {epoch}); stopping without saving, the last good '
                      f'checkpoint in {args.checkpoint_dir} is unchanged (try a lower '
                      f'--lr-classifier or --lr-backbone)')


def stop_if_weights_non_finite(model, optimizer, args, epoch):
    """Before validating and checkpointing: the update after the last finite loss may not be."""
    state = [t for t in model.state_dict().values() if t.is_floating_point()]
    state += [t for s in optimizer.state.values() for t in s.values()
              if torch.is_tensor(t) and t.is_floating_point()]
    if state and not bool(torch.stack([torch.isfinite(t).all() for t in state]).all()):
        raise diverged(args, epoch, 'weights after the last step')


@torch.no_grad()
def validate(model, loader, device):
    """Top-1/top-5 in percent over the whole dataset: each rank scores its shard (ShardSampler,
    no padding) and the counts are summed, so every image counts exactly once."""
    model.eval()
    counts = torch.zeros(3, dtype=torch.long, device=device)  # correct top-1, top-5, total
    for images, target in loader:
        output = model(images.to(device, non_blocking=True))
        target = target.to(device, non_blocking=True)
        top = output.topk(min(5, output.shape[1]), dim=1).indices  # (B, 5)
        hits = top == target[:, None]
        counts += torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum(),
                               torch.tensor(len(target), device=device)])
    _, world_size = distributed.world_info()
    if world_size > 1:
        dist.all_reduce(counts)
    correct1, correct5, total = counts.tolist()
    return 100.0 * correct1 / max(total, 1), 100.0 * correct5 / max(total, 1)


def open_stats_log(args, info):
    """stats.txt in the checkpoint dir: the command line, then JSON lines (rank 0 only)."""
    return StatsLog(args.checkpoint_dir / 'stats.txt', args.command, info.is_main)


def train_images(args, train_set):
    """'40 of 400 train images (10.0%, --train-percent 1 list)': the fraction selected."""
    total = getattr(train_set, 'subset_of', None)
    if total is None:
        return f'{len(train_set)} train images'
    return (f'{len(train_set)} of {total} train images ({100 * len(train_set) / total:.3g}%, '
            f'--train-percent {args.train_percent} list)')


def print_provenance(args, info, train_set, val_set):
    device = torch.cuda.get_device_name(info.device) if info.device.type == 'cuda' else 'cpu'
    mode = 'kNN' if args.knn else 'fast linear probe' if args.fast_linear else args.weights
    print(f'torch {torch.__version__}, torchvision {torchvision.__version__}, {device}; world '
          f'size {info.world_size}; {mode} {args.arch}, {train_images(args, train_set)}, '
          f'{len(val_set)} val images, batch {args.batch_size} '
          f'({args.batch_size // info.world_size} per process)', flush=True)
    if args.knn or args.fast_linear:
        return
    if args.weights == 'freeze' and args.lr_backbone:
        print(f'note: --lr-backbone {args.lr_backbone} is ignored with --weights freeze',
              flush=True)
    if args.weights == 'finetune' and not args.lr_backbone:
        print('note: --weights finetune with --lr-backbone 0: the backbone weights stay fixed '
              '(BatchNorm statistics still update)', flush=True)


def build_model(args, info, pretrained, num_classes):
    """The backbone with its loaded weights and a new linear head as `fc` (torchvision layout);
    SGD over the head (and the backbone with finetune), cosine annealing over the epochs."""
    net, feature_dim = build_backbone(args.arch, args.cifar_stem)
    net.load_state_dict(pretrained)
    net.fc = nn.Linear(feature_dim, num_classes)
    net.fc.weight.data.normal_(mean=0.0, std=0.01)
    net.fc.bias.data.zero_()
    if args.weights == 'freeze':
        net.requires_grad_(False)
        net.fc.requires_grad_(True)
    classifier_parameters, model_parameters = [], []
    for name, param in net.named_parameters():
        (classifier_parameters if name in {'fc.weight', 'fc.bias'} else model_parameters) \
            .append(param)
    net.to(info.device)
    param_groups = [dict(params=classifier_parameters, lr=args.lr_classifier)]
    if args.weights == 'finetune':
        param_groups.append(dict(params=model_parameters, lr=args.lr_backbone))
    optimizer = optim.SGD(param_groups, 0, momentum=0.9, weight_decay=args.weight_decay)
    scheduler = optim.lr_scheduler.CosineAnnealingLR(optimizer, args.epochs)
    device_ids = [info.device.index] if info.device.type == 'cuda' else None
    model = nn.parallel.DistributedDataParallel(net, device_ids=device_ids)
    if info.device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
    return model, optimizer, scheduler


def changed_keys(net, reference):
    """Keys of `reference` whose tensor differs (bit for bit) in net's state dict."""
    state = net.state_dict()
    return [k for k, v in reference.items() if not torch.equal(state[k].cpu(), v)]


def pretrained_digest(state):
    """A fingerprint of the pretrained weights, so that a resumed fine-tuning (whose backbone
    has moved away from them) can tell that it is resumed on the same FILE."""
    digest = hashlib.blake2b(digest_size=16)
    for key in sorted(state):
        tensor = state[key].detach().cpu()
        # as float32: the same weights read from an fp16/bf16 file or from the fp32 network
        # they were loaded into give the same fingerprint
        tensor = tensor.float() if tensor.is_floating_point() else tensor
        digest.update(key.encode())
        digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()


def data_order(args, info, train_set):
    """What decides which samples the rest of an epoch takes: a mid-epoch checkpoint continues
    exactly only if all of it is unchanged."""
    return dict(images=len(train_set), world_size=info.world_size, batch_size=args.batch_size,
                seed=args.seed)


ORDER_WORDS = dict(images='training images', world_size='processes',
                   batch_size='--batch-size', seed='--seed')
# Settings a resumed run may change at an epoch end: they apply from the resumed epoch on, and
# the run names each one that changed (the kind of run and the backbone are refused instead).
CHANGEABLE_SETTINGS = ('data', 'train_files', 'epochs', 'batch_size', 'lr_classifier',
                       'lr_backbone', 'weight_decay', 'crop_size', 'seed')
OPTIMIZER_SETTINGS = ('epochs', 'lr_classifier', 'lr_backbone', 'weight_decay')


def resume(args, model, optimizer, scheduler, pretrained, order=None, digest=None):
    """Resume from checkpoint_dir/checkpoint.pth when present (ours or the reference's).

    A checkpoint of another kind of run or backbone is refused; a mid-epoch one with another
    data order (`order`, see data_order) too. Other settings may change: they apply from the
    resumed epoch on (the cosine schedule laid over this run's --epochs), and rank 0 says which.
    Returns (epoch, steps already done in it, best accuracies so far)."""
    path = args.checkpoint_dir / 'checkpoint.pth'
    if not path.is_file():
        return 0, 0, dict(top1=0.0, top5=0.0)
    ckpt = load_checkpoint_file(path)
    needed = {'epoch', 'best_acc', 'model', 'optimizer', 'scheduler'}
    if not isinstance(ckpt, dict) or not needed <= set(ckpt):
        raise InputError(f'{path} is not an evaluate.py checkpoint (expected '
                         f'{", ".join(sorted(needed))}); use another --checkpoint-dir')
    saved = ckpt.get('args') or {}
    for key in ('weights', 'train_percent', 'arch', 'cifar_stem'):
        if key in saved and saved[key] != getattr(args, key):
            raise InputError(f'{path} was written with --{key.replace("_", "-")} {saved[key]}, '
                             f'this run has {getattr(args, key)}; use another --checkpoint-dir')
    if digest and ckpt.get('pretrained_digest') not in (None, digest):
        raise InputError(f'{path} was trained from other pretrained weights '
                         f'({saved.get("pretrained", "another file")}) than {args.pretrained}; '
                         f'use another --checkpoint-dir')
    epoch, step = ckpt['epoch'], ckpt.get('step_in_epoch', 0)
    check_data_order(path, ckpt, order, epoch, step)
    model.load_state_dict(match_state_dict(ckpt['model'], model, str(path)))
    if len(ckpt['optimizer'].get('param_groups', [])) != len(optimizer.param_groups):
        raise InputError(f'{path} holds a {"freeze" if args.weights == "finetune" else "finetune"}'
                         f' run, this one is --weights {args.weights}; use another '
                         f'--checkpoint-dir')
    optimizer.load_state_dict(ckpt['optimizer'])
    scheduler.load_state_dict(ckpt['scheduler'])
    if args.weights == 'freeze' and changed_keys(model.module, pretrained):
        raise InputError(f'{path} was trained on another pretrained backbone than '
                         f'{args.pretrained}; use another --checkpoint-dir')
    names = [k for k in CHANGEABLE_SETTINGS if k != 'lr_backbone' or args.weights == 'finetune']
    changed = changed_settings(saved, vars(args), names)
    if scheduler.T_max != args.epochs and 'epochs' not in saved:  # the reference's records none
        changed.insert(0, ('epochs', scheduler.T_max, args.epochs))
    rates = [g['lr'] for g in optimizer.param_groups]  # of the epoch the checkpoint stopped in
    if any(k in OPTIMIZER_SETTINGS for k, _, _ in changed):
        follow_settings(args, optimizer, scheduler)
    if changed and distributed.world_info()[0] == 0:
        print(changed_settings_note(path, args, changed, epoch, rates, optimizer), flush=True)
    best = ckpt['best_acc']
    best = vars(best) if isinstance(best, argparse.Namespace) else best  # the reference's
    return epoch, step, dict(top1=best['top1'], top5=best['top5'])


def check_data_order(path, ckpt, order, epoch, step):
    """A mid-epoch checkpoint with another data order is refused: the rest of its epoch would
    take other samples, some twice, some never."""
    saved = ckpt.get('data_order') or {}
    differ = [f'{ORDER_WORDS[k]} {saved[k]} then, {order[k]} now' for k in (order or {})
              if k in saved and saved[k] != order[k]]
    if step and differ:
        raise InputError(f'{path} stopped at step {step} of epoch {epoch}, and the rest of that '
                         f'epoch cannot be continued exactly ({"; ".join(differ)}); resume with '
                         f'the same settings, or use another --checkpoint-dir')


def follow_settings(args, optimizer, scheduler):
    """This run's --epochs, learning rates and weight decay over a resumed optimizer: the cosine
    schedule laid over --epochs from the given rates, at the epoch reached (the scheduler's
    recursive steps then continue it)."""
    bases = [args.lr_classifier, args.lr_backbone][:len(optimizer.param_groups)]
    scheduler.T_max = args.epochs
    scheduler.base_lrs = bases
    for group, base in zip(optimizer.param_groups, bases):
        group['initial_lr'] = base
        group['weight_decay'] = args.weight_decay
        group['lr'] = scheduler.eta_min + (base - scheduler.eta_min) * \
            (1 + math.cos(math.pi * scheduler.last_epoch / args.epochs)) / 2
    scheduler._last_lr = [group['lr'] for group in optimizer.param_groups]


def changed_settings_note(path, args, changed, epoch, rates, optimizer):
    """One line: what changed since `path` was written, and the learning rates that follow."""
    note = (f'note: resuming {path} at epoch {epoch} with settings changed since it was '
            f'written, which apply from here on: {changes_text(changed)}')
    if any(k in OPTIMIZER_SETTINGS for k, _, _ in changed):
        names = ('classifier', 'backbone')
        moves = ', '.join(f'{name} {old:.4g} -> {group["lr"]:.4g}' for name, old, group in
                          zip(names, rates, optimizer.param_groups))
        note += (f'; the cosine schedule is laid over --epochs {args.epochs} from these rates: '
                 f'learning rate of this epoch {moves}')
    return note


# ---------------------------------------------------------------------------------------------
# Data: datasets, subsets, loaders
# ---------------------------------------------------------------------------------------------

def build_datasets(args, transform):
    """DIR/train (or its subset) with `transform`, DIR/val with the validation transform."""
    train_set = image_folder(args.data, transform, 'train')
    val_set = image_folder(args.data, val_transform(args.crop_size), 'val')
    align_classes(val_set, train_set)
    if args.train_percent != 100:
        select_subset(train_set, read_subset_list(args.train_files), args.train_files)
    return train_set, val_set


def subset_list_file(percent, train_files=None, cache_dir=None):
    """The subset list to use: --train-files, else the cached SimCLR list, downloaded once."""
    if train_files is not None:
        if not Path(train_files).exists():
            raise InputError(f'--train-files {train_files} does not exist')
        if not Path(train_files).is_file():
            raise InputError(f'--train-files {train_files} is not a file')
        return Path(train_files)
    path = Path(cache_dir or default_subset_cache_dir()) / f'{percent}percent.txt'
    if path.is_file():
        return path
    url = SUBSET_URL.format(percent=percent)
    print(f'Downloading {url} to {path}', flush=True)
    tmp = path.with_name(f'.{path.name}.tmp-{os.getpid()}')
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(url, timeout=60) as response:
            tmp.write_bytes(response.read())
        if subset_list_format(read_subset_list(tmp)) != 'SimCLR':
            raise ValueError('not in the SimCLR format')  # a proxy's error page, say
        os.replace(tmp, path)
    except (OSError, ValueError, InputError) as e:
        reason = getattr(e, 'reason', None) or e
        raise InputError(f'cannot get the {percent}% subset list from {url} ({reason}); pass '
                         f'--train-files FILE with a local copy, or place it at {path}') from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_subset_list(path):
    """The images of a subset list: SimCLR's `<class>_<id>.JPEG` file names, or `<class>/<file>`
    paths (for class names that contain `_`), one format per file, read as every list is
    (cli.read_lines: byte-order mark, line endings, blank lines and # comments). An image listed
    twice is taken once: the list keeps its first place, and `repeated` on the result counts
    the extra lines."""
    lines = read_lines(path, 'subset list')
    pattern = CLASS_FILE_LINE if lines and '/' in lines[0][1] else SUBSET_LINE
    bad = [(number, n) for number, n in lines if not pattern.fullmatch(n)]
    if not lines or bad:
        example = f'; first bad line: {bad[0][1][:80]!r} (line {bad[0][0]})' if bad \
            else ' (it lists no image)'
        raise InputError(f'{path} is not a subset list of file names such as '
                         f'n01440764_10026.JPEG or of <class>/<file> lines such as '
                         f'n01440764/n01440764_10026.JPEG{example}')
    names = SubsetNames(dict.fromkeys(n for _, n in lines))
    names.repeated = len(lines) - len(names)
    return names


class SubsetNames(list):
    """The distinct images of a subset list, in order; `repeated`: lines that named one again."""
    repeated = 0


def repeated_note(names):
    repeated = getattr(names, 'repeated', 0)
    return f' ({repeated} line(s) repeat an image listed before: each image counts once)' \
        if repeated else ''


def subset_list_format(names):
    """'SimCLR' or 'class/file', for a list read_subset_list accepted."""
    return 'class/file' if '/' in names[0] else 'SimCLR'


def select_subset(dataset, names, list_path):
    """Keep exactly the listed images (DIR/train/<class>/<name>); any missing is an error."""
    root = Path(dataset.root)
    available = {Path(p).relative_to(root).as_posix(): t for p, t in dataset.samples}
    samples, missing = [], []
    for name in names:
        rel = name if '/' in name else f'{name.split("_")[0]}/{name}'
        if rel in available:
            samples.append((str(root / rel), available[rel]))
        else:
            missing.append(rel)
    if missing:
        shown = ', '.join(missing[:5]) + (' ...' if len(missing) > 5 else '')
        raise InputError(f'{len(missing)} of the {len(names)} images listed in {list_path} are '
                         f'missing under {root}: {shown}')
    dataset.subset_of = len(dataset.samples)  # for the fraction in the log
    dataset.samples = dataset.imgs = samples
    dataset.targets = [t for _, t in samples]


def check_finetune_batches(args, info, sampler, per_rank):
    """Fine-tuning trains the backbone's BatchNorm layers, which cannot normalise a batch of one
    image: a step of 1 image per process is an error before training, and an epoch's last batch
    of 1 image per process is dropped (on every rank alike), with a note."""
    where = f'{sampler.num_samples * info.world_size} training image(s) over {info.world_size} ' \
            f'process(es), --batch-size {args.batch_size}'
    if per_rank < 2:
        raise InputError(f'{where}: {per_rank} image per process per step; --weights finetune '
                         f'trains BatchNorm, which needs at least 2: use a --batch-size of at '
                         f'least {2 * info.world_size}')
    if sampler.num_samples % per_rank == 1:
        if sampler.num_samples == 1:
            raise InputError(f'{where}: 1 image per process, which BatchNorm cannot normalise '
                             f'(--weights finetune); use fewer processes or more images')
        sampler.epoch_samples = sampler.num_samples - 1
        if info.is_main:
            print(f'note: {where} leave a last batch of 1 image per process in every epoch, '
                  f'which BatchNorm cannot normalise (--weights finetune); it is dropped '
                  f'({info.world_size} image(s) per epoch; another --batch-size avoids this)',
                  file=sys.stderr, flush=True)


def build_loaders(args, info, train_set, val_set):
    per_rank = args.batch_size // info.world_size
    sampler = EpochSampler(train_set, num_replicas=info.world_size, rank=info.rank, shuffle=True,
                           seed=args.seed)
    if args.weights == 'finetune' and not (args.knn or args.fast_linear):
        check_finetune_batches(args, info, sampler, per_rank)
    train_loader = torch.utils.data.DataLoader(
        train_set, batch_size=per_rank, num_workers=args.workers,
        pin_memory=info.device.type == 'cuda', sampler=sampler, worker_init_fn=ignore_stop_signals)
    return train_loader, make_eval_loader(val_set, per_rank, args.workers, info)


# ---------------------------------------------------------------------------------------------
# Weighted k-nearest neighbours on frozen features (knn.py)
# ---------------------------------------------------------------------------------------------

def knn_main(info, args):
    """kNN keeps nothing to resume from: a rerun evaluates again, and adds its line to the log
    beside the earlier ones (several backbones can be compared in one log)."""
    lock = lock_checkpoint_dir(args, info)
    try:
        stats_log = open_stats_log(args, info)
        # the bank is sharded: every process needs a training image; queries may be fewer
        backbone, bank_set, val_set, per_rank = frozen_backbone_and_sets(info, args,
                                                                         ('training',))
        if info.is_main:
            say_earlier_runs(args, 'kNN', 'this one runs from the start and adds its line')
        start_time = time.time()
        top1 = knn_evaluate(backbone, make_eval_loader(bank_set, per_rank, args.workers, info),
                            make_eval_loader(val_set, per_rank, args.workers, info), info.device,
                            len(bank_set.classes), args.knn_k, args.knn_temperature)
        stats_log.write(dict(knn_top1=top1, temperature=args.knn_temperature,
                             bank_size=len(bank_set), val_size=len(val_set),
                             train_percent=args.train_percent,
                             time=int(time.time() - start_time)), 0)
        stats_log.close()
    finally:
        if lock is not None:
            lock.release()
    return top1


def say_earlier_runs(args, kind, what_now):
    log = args.checkpoint_dir / 'stats.txt'
    earlier = [run for run in read_runs(log, strict=False) if run.kind == kind] \
        if log.is_file() else []
    if earlier:
        print(f'evaluate.py: {log} holds {len(earlier)} earlier {kind} evaluation(s); '
              f'{what_now}', flush=True)


def frozen_backbone_and_sets(info, args, sharded):
    """(the pretrained backbone on this rank's device, DIR/train (or its subset), DIR/val, the
    batch per rank), both sets under the validation transform: what --knn and --fast-linear
    work on. `sharded` names the sets ('training', 'validation') of which every process needs
    at least one image; the provenance is printed once they are checked."""
    backbone, _ = build_backbone(args.arch, args.cifar_stem)
    backbone.load_state_dict(load_backbone_state(args.pretrained, args.arch, args.cifar_stem))
    train_set, val_set = build_datasets(args, val_transform(args.crop_size))
    sizes = {'training': len(train_set), 'validation': len(val_set)}
    if min(sizes[name] for name in sharded) < info.world_size:
        counts = ' and '.join(f'{sizes[name]} {name}' for name in sharded)
        raise InputError(f'{counts} images are too few for {info.world_size} processes')
    if info.is_main:
        print_provenance(args, info, train_set, val_set)
    return backbone.to(info.device), train_set, val_set, max(1, args.batch_size // info.world_size)


# ---------------------------------------------------------------------------------------------
# The fast linear probe: one pass of the backbone, then L-BFGS on the features (linear_fit.py)
# ---------------------------------------------------------------------------------------------

def fast_linear_main(info, args):
    lock = lock_checkpoint_dir(args, info)
    try:
        return fit_fast_linear(info, args)
    finally:
        if lock is not None:
            lock.release()


# What a linear.pth was fitted with: a rerun with other values would replace it with another
# classifier, and is refused.
FAST_LINEAR_SETTINGS = ('pretrained_digest', 'data', 'train_percent', 'train_files', 'arch',
                        'cifar_stem', 'crop_size', 'weight_decay', 'lbfgs_steps')


def check_fast_linear_rerun(args, info, digest):
    """A rerun of the same fit fits again and replaces linear.pth (saying so); one with other
    settings, or on another backbone, is refused: its classifier would replace the other's."""
    path = args.checkpoint_dir / 'linear.pth'
    if not path.is_file():
        return
    saved = load_checkpoint_file(path)
    saved = dict(saved.get('args') or {}) if isinstance(saved, dict) else {}
    now = dict(vars(args), pretrained_digest=digest)
    changed = changed_settings(saved, now, FAST_LINEAR_SETTINGS)
    differ = ['other pretrained weights' if change[0] == 'pretrained_digest'
              else changes_text([change]) for change in changed]
    if differ:
        raise InputError(f'{path} was fitted with other settings ({"; ".join(differ)}); a fit '
                         f'would replace it: use another --checkpoint-dir')
    if info.is_main:
        print(f'evaluate.py: {path} was fitted with the same settings; fitting again, it will '
              f'be replaced', flush=True)


def fit_fast_linear(info, args):
    """Features of DIR/train (or its subset) and DIR/val, each rank its shard, then the
    classifier fitted on all of them; writes linear.pth (rank 0), then logs top-1/top-5."""
    stats_log = open_stats_log(args, info)
    backbone, train_set, val_set, per_rank = frozen_backbone_and_sets(
        info, args, ('training', 'validation'))
    digest = pretrained_digest(backbone.state_dict())
    check_fast_linear_rerun(args, info, digest)
    start_time = time.time()
    train_x, train_y = extract_features(backbone, make_eval_loader(
        train_set, per_rank, args.workers, info), info.device, normalize=False)
    val_x, val_y = extract_features(backbone, make_eval_loader(
        val_set, per_rank, args.workers, info), info.device, normalize=False)
    features_time = time.time() - start_time
    classifier = fit_linear(train_x, train_y, len(train_set.classes), args.weight_decay,
                            args.lbfgs_steps)
    # the same classifier on every rank: all of them stop here alike
    if not all(bool(torch.isfinite(t).all()) for t in classifier.state_dict().values()):
        raise InputError(f'the fast linear probe of {args.pretrained} is not finite (non-finite '
                         f'features or a diverged fit); nothing saved')
    acc = top_k_accuracy(classifier, val_x, val_y)
    if info.is_main:
        # the classifier's weights, with the class names of its outputs and the settings (the
        # backbone it was fitted on: args['pretrained'] and its digest), before the log says
        # that it was fitted
        save_atomic(dict(classifier.state_dict(), classes=list(train_set.classes),
                         args=dict(checkpoint_args(args), pretrained_digest=digest)),
                    args.checkpoint_dir / 'linear.pth')
    stats_log.write(dict(fast_linear=dict(acc1=acc[1], acc5=acc[5]),
                         weight_decay=args.weight_decay, train_size=len(train_set),
                         val_size=len(val_set), train_percent=args.train_percent,
                         features_time=int(features_time), time=int(time.time() - start_time)),
                    0)
    stats_log.close()
    return acc


if __name__ == '__main__':
    main()
