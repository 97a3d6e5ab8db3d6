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
    python evaluate.py demo_data checkpoint/demo/resnet18.pth --arch resnet18 --cifar-stem \\
        --crop-size 32 --device cpu                                                  # the demo

The pretrained FILE may be a backbone state dict (<arch>.pth from main.py, the released
resnet50.pth, a torchvision-style dict whose fc.* keys are ignored) or a full checkpoint.pth from
main.py or from the original code (`module.backbone.*` keys). Writes stats.txt and checkpoint.pth
(resumed automatically) to --checkpoint-dir, whose default depends on the mode (see --help).
"""
import argparse
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
import torch.nn.functional as F
import torchvision
import torchvision.transforms as transforms
from torch import nn, optim

import distributed
import main as pretrain  # main.py; `main` below is this script's entry point
from data import InputError, image_folder
from monitor import StatsLog

SUBSET_URL = ('https://raw.githubusercontent.com/google-research/simclr/master/imagenet_subsets/'
              '{percent}percent.txt')
SUBSET_LINE = re.compile(r'[^\s/_]+_[^\s/]+')  # n01440764_10026.JPEG: <class>_<rest>
KNN_KS = (20, 200)
KNN_TEMPERATURE = 0.07


def default_checkpoint_dir(weights, train_percent, knn=False):
    """Distinct per mode, so that auto-resume never picks up another kind of run's state."""
    if knn:
        return Path('./checkpoint/knn/')
    name = {'freeze': 'lincls', 'finetune': 'finetune' if train_percent == 100 else 'semisup'}
    suffix = '' if train_percent == 100 else f'_{train_percent}pct'
    return Path(f'./checkpoint/{name[weights]}{suffix}/')


def default_subset_cache_dir():
    return Path(torch.hub.get_dir()) / 'simclr_imagenet_subsets'


def positive_ints(text):
    try:
        values = tuple(pretrain.positive_int(v) for v in text.split(','))
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(f'expected positive integers joined by commas, '
                                         f'e.g. 20,200, got {text}') from None
    return values


def get_arguments():
    parser = pretrain.ArgumentParser(description='Evaluate resnet features on ImageNet',
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
    parser.add_argument('--workers', default=8, type=pretrain.non_negative_int, metavar='N',
                        help='number of data loader workers per process')
    parser.add_argument('--epochs', default=100, type=pretrain.positive_int, metavar='N',
                        help='number of total epochs to run')
    parser.add_argument('--batch-size', default=256, type=pretrain.positive_int, metavar='N',
                        help='global mini-batch size, divided over the processes (training and '
                             'validation)')
    parser.add_argument('--lr-backbone', default=0.0, type=float, metavar='LR',
                        help='backbone base learning rate (finetune only)')
    parser.add_argument('--lr-classifier', default=0.3, type=float, metavar='LR',
                        help='classifier base learning rate')
    parser.add_argument('--weight-decay', default=1e-6, type=float, metavar='W',
                        help='weight decay')
    parser.add_argument('--print-freq', default=100, type=pretrain.positive_int, metavar='N',
                        help='print frequency (steps)')
    parser.add_argument('--checkpoint-dir', default=None, type=Path, metavar='DIR',
                        help='path to checkpoint directory (default: ./checkpoint/lincls/ for '
                             'freeze at 100%%, ./checkpoint/lincls_{1,10}pct/ for freeze on a '
                             'subset, ./checkpoint/finetune/ for finetune at 100%%, '
                             './checkpoint/semisup_{1,10}pct/ for finetune on a subset, '
                             './checkpoint/knn/ with --knn)')
    # Beyond the reference.
    parser.add_argument('--arch', default='resnet50', choices=pretrain.ARCHS,
                        help='torchvision backbone, as given to main.py')
    parser.add_argument('--cifar-stem', action='store_true',
                        help='3x3 stride-1 first convolution and no max-pool, as given to main.py')
    parser.add_argument('--crop-size', default=224, type=pretrain.positive_int, metavar='PX',
                        help='training crop side; validation resizes to crop*256/224 and '
                             'center-crops to it')
    parser.add_argument('--train-files', default=None, type=Path, metavar='FILE',
                        help='local subset list in the SimCLR format (one file name per line, '
                             'e.g. n01440764_10026.JPEG) instead of downloading it; needs '
                             '--train-percent 1 or 10')
    parser.add_argument('--subset-cache-dir', default=None, type=Path, metavar='DIR',
                        help='where downloaded subset lists are kept (default: '
                             '<torch.hub.get_dir()>/simclr_imagenet_subsets, i.e. '
                             '~/.cache/torch/hub/... unless TORCH_HOME is set)')
    parser.add_argument('--knn', action='store_true',
                        help='only run the weighted kNN evaluation on frozen features (train '
                             'set, or its subset, as the bank) and log {k: top-1}')
    parser.add_argument('--knn-k', default=KNN_KS, type=positive_ints, metavar='K[,K...]',
                        help='neighbour counts for --knn (default 20,200; capped at the bank size)')
    parser.add_argument('--knn-temperature', default=KNN_TEMPERATURE, type=float, metavar='T',
                        help='kNN vote weight exp(cosine similarity / T) (default 0.07)')
    parser.add_argument('--seed', default=0, type=int,
                        help='seed for the head initialisation, data order and augmentations')
    parser.add_argument('--device', default='auto', choices=('auto', 'cuda', 'cpu'),
                        help='auto: every visible GPU, else the CPU with a warning')
    return parser


def parse_arguments(argv=None):
    parser = get_arguments()
    command = ' '.join(sys.argv if argv is None else ['evaluate.py'] + list(argv))
    args = parser.parse_args(argv)
    args.command = command
    if args.train_files is not None and args.train_percent == 100:
        parser.error('--train-files selects a subset: give --train-percent 1 or 10 with it')
    if args.crop_size < 8:
        parser.error(f'--crop-size {args.crop_size} is too small (at least 8)')
    if args.knn_temperature <= 0:
        parser.error(f'--knn-temperature must be positive, got {args.knn_temperature}')
    if args.checkpoint_dir is None:
        args.checkpoint_dir = default_checkpoint_dir(args.weights, args.train_percent, args.knn)
    return args


def main(argv=None):
    args = parse_arguments(argv)
    try:
        for split in ('train', 'val'):
            if not (args.data / split).is_dir():
                image_folder(args.data, split=split)  # the one-line error naming what is missing
        if not args.pretrained.is_file():
            raise InputError(f'pretrained file {args.pretrained} does not exist')
        load_backbone_state(args.pretrained, args.arch, args.cifar_stem)  # fail before launching
        if args.train_percent != 100:
            args.train_files = subset_list_file(args.train_percent, args.train_files,
                                                args.subset_cache_dir)
            read_subset_list(args.train_files)
    except InputError as e:
        sys.exit(f'evaluate.py: error: {e}')
    distributed.launch(main_worker, (args,), device=args.device)


def main_worker(info, args):
    try:
        (knn_main if args.knn else linear_eval)(info, args)
    except InputError as e:
        where = f' (rank {info.rank})' if info.world_size > 1 else ''
        print(f'evaluate.py: error{where}: {e}', file=sys.stderr, flush=True)
        sys.exit(1)


# ---------------------------------------------------------------------------------------------
# Linear probe / fine-tuning, as the reference
# ---------------------------------------------------------------------------------------------

def linear_eval(info, args):
    """Build, resume, then per epoch: train, validate on all ranks, check, checkpoint."""
    if args.batch_size % info.world_size != 0:
        raise InputError(f'--batch-size {args.batch_size} is not divisible by the world size '
                         f'{info.world_size}')
    stats_log = open_stats_log(args, info)
    pretrain.seed_everything(args.seed)
    pretrained = load_backbone_state(args.pretrained, args.arch, args.cifar_stem)
    train_set, val_set = build_datasets(args, train_transform(args.crop_size))
    model, optimizer, scheduler = build_model(args, info, pretrained, len(train_set.classes))
    start_epoch, best_acc = resume(args, model, optimizer, scheduler, pretrained)
    train_loader, val_loader = build_loaders(args, info, train_set, val_set)
    if info.is_main:
        print_provenance(args, info, len(train_set), len(val_set))

    start_time = time.time()
    for epoch in range(start_epoch, args.epochs):
        pretrain.seed_everything(args.seed, epoch, info.rank)
        train_loader.sampler.set_epoch(epoch)
        train_one_epoch(model, train_loader, optimizer, args, info, epoch, stats_log,
                        start_time)
        acc1, acc5 = validate(model.module, val_loader, info.device)
        best_acc = dict(top1=max(best_acc['top1'], acc1), top5=max(best_acc['top5'], acc5))
        stats_log.write(dict(epoch=epoch, acc1=acc1, acc5=acc5, best_acc1=best_acc['top1'],
                             best_acc5=best_acc['top5']), epoch)
        if args.weights == 'freeze':  # sanity check: the frozen backbone must not have moved
            changed = changed_keys(model.module, pretrained)
            if changed:
                raise RuntimeError(f'frozen backbone changed during training: {changed[:5]}')
        scheduler.step()
        if info.is_main:
            state = dict(epoch=epoch + 1, best_acc=best_acc, model=model.state_dict(),
                         optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                         args=pretrain.checkpoint_args(args))
            pretrain.save_atomic(state, args.checkpoint_dir / 'checkpoint.pth')
    stats_log.close()


def train_one_epoch(model, loader, optimizer, args, info, epoch, stats_log, start_time):
    # freeze: the whole model in eval mode as the reference, so BatchNorm statistics stay fixed
    # (the head is a Linear layer, which has no train/eval difference).
    model.train(args.weights == 'finetune')
    criterion = nn.CrossEntropyLoss()
    for step, (images, target) in enumerate(loader, start=epoch * len(loader)):
        output = model(images.to(info.device, non_blocking=True))
        loss = criterion(output, target.to(info.device, non_blocking=True))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % args.print_freq == 0:
            loss = loss.detach() / info.world_size
            if info.world_size > 1:
                dist.all_reduce(loss)  # mean over ranks, as the reference's reduce to rank 0
            groups = optimizer.param_groups
            stats_log.write(dict(epoch=epoch, step=step,
                                 lr_backbone=groups[1]['lr'] if len(groups) == 2 else 0,
                                 lr_classifier=groups[0]['lr'], loss=loss.item(),
                                 time=int(time.time() - start_time)), step)


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


def print_provenance(args, info, train_size, val_size):
    device = torch.cuda.get_device_name(info.device) if info.device.type == 'cuda' else 'cpu'
    mode = 'kNN' if args.knn else args.weights
    print(f'torch {torch.__version__}, torchvision {torchvision.__version__}, {device}; world '
          f'size {info.world_size}; {mode} {args.arch}, {train_size} train images '
          f'({args.train_percent}%), {val_size} val images, batch {args.batch_size} '
          f'({args.batch_size // info.world_size} per process)', flush=True)
    if args.knn:
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
    net, feature_dim = pretrain.build_backbone(args.arch, args.cifar_stem)
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


def resume(args, model, optimizer, scheduler, pretrained):
    """Resume from checkpoint_dir/checkpoint.pth when present (ours or the reference's)."""
    path = args.checkpoint_dir / 'checkpoint.pth'
    if not path.is_file():
        return 0, dict(top1=0.0, top5=0.0)
    ckpt = pretrain.load_checkpoint_file(path)
    needed = {'epoch', 'best_acc', 'model', 'optimizer', 'scheduler'}
    if not isinstance(ckpt, dict) or not needed <= set(ckpt):
        raise InputError(f'{path} is not an evaluate.py checkpoint (expected '
                         f'{", ".join(sorted(needed))}); use another --checkpoint-dir')
    saved = ckpt.get('args') or {}
    for key in ('weights', 'train_percent', 'arch', 'cifar_stem'):
        if key in saved and saved[key] != getattr(args, key):
            raise InputError(f'{path} was written with --{key.replace("_", "-")} {saved[key]}, '
                             f'this run has {getattr(args, key)}; use another --checkpoint-dir')
    model.load_state_dict(pretrain.match_state_dict(ckpt['model'], model, str(path)))
    if len(ckpt['optimizer'].get('param_groups', [])) != len(optimizer.param_groups):
        raise InputError(f'{path} holds a {"freeze" if args.weights == "finetune" else "finetune"}'
                         f' run, this one is --weights {args.weights}; use another '
                         f'--checkpoint-dir')
    optimizer.load_state_dict(ckpt['optimizer'])
    scheduler.load_state_dict(ckpt['scheduler'])
    if scheduler.T_max != args.epochs and distributed.world_info()[0] == 0:
        print(f'note: {path} continues its cosine schedule over {scheduler.T_max} epochs; '
              f'--epochs {args.epochs} only changes where training stops', flush=True)
    if args.weights == 'freeze' and changed_keys(model.module, pretrained):
        raise InputError(f'{path} was trained on another pretrained backbone than '
                         f'{args.pretrained}; use another --checkpoint-dir')
    best = ckpt['best_acc']
    best = vars(best) if isinstance(best, argparse.Namespace) else best  # the reference's
    return ckpt['epoch'], dict(top1=best['top1'], top5=best['top5'])


# ---------------------------------------------------------------------------------------------
# Pretrained files
# ---------------------------------------------------------------------------------------------

def read_pretrained(path):
    """(candidate backbone state dict without fc.*, the saved main.py args or {}) from any
    accepted format: a backbone or torchvision-style state dict, or a full checkpoint whose
    'model' holds `[module.]backbone.*` keys (main.py, the original) or a torchvision layout
    (an evaluate.py checkpoint)."""
    obj = pretrain.load_checkpoint_file(path)
    if not isinstance(obj, dict):
        raise InputError(f'{path} holds a {type(obj).__name__}, not a state dict or checkpoint')
    saved = obj.get('args') if isinstance(obj.get('args'), dict) else {}
    state = obj['model'] if isinstance(obj.get('model'), dict) else obj
    state = pretrain.strip_module_prefix(state)
    backbone = {k[len('backbone.'):]: v for k, v in state.items() if k.startswith('backbone.')}
    state = backbone or state
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise InputError(f'{path} is neither a state dict nor a checkpoint with "model": '
                         f'non-tensor entries {", ".join(map(str, not_tensors[:5]))}')
    return {k: v for k, v in state.items() if not k.startswith('fc.')}, saved


def load_backbone_state(path, arch='resnet50', cifar_stem=False):
    """The state dict for main.build_backbone(arch, cifar_stem), checked strictly: besides
    the ignored classifier (fc.*), any missing, unexpected or reshaped key is an InputError
    naming the keys."""
    state, saved = read_pretrained(path)
    return check_backbone_state(state, saved, path, arch, cifar_stem)


def check_backbone_state(state, saved, path, arch, cifar_stem):
    """load_backbone_state's check, on read_pretrained's result."""
    if saved.get('arch', arch) != arch or bool(saved.get('cifar_stem', cifar_stem)) != cifar_stem:
        flags = f'--arch {saved.get("arch", arch)}' + (' --cifar-stem' if saved.get(
            'cifar_stem', cifar_stem) else '')
        raise InputError(f'{path} was pretrained with {flags}; pass the same flags')
    net, _ = pretrain.build_backbone(arch, cifar_stem)
    what = f'{path} (for --arch {arch}{" --cifar-stem" if cifar_stem else ""})'
    return pretrain.match_state_dict(state, net, what)


# ---------------------------------------------------------------------------------------------
# Data: transforms, subsets, sharded evaluation loaders
# ---------------------------------------------------------------------------------------------

def train_transform(crop_size=224):
    return transforms.Compose([
        transforms.RandomResizedCrop(crop_size),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(mean=pretrain.IMAGENET_MEAN, std=pretrain.IMAGENET_STD),
    ])


def val_transform(crop_size=224):
    return transforms.Compose([
        transforms.Resize(round(crop_size * 256 / 224)),  # 256 for 224
        transforms.CenterCrop(crop_size),
        transforms.ToTensor(),
        transforms.Normalize(mean=pretrain.IMAGENET_MEAN, std=pretrain.IMAGENET_STD),
    ])


def build_datasets(args, transform):
    """DIR/train (or its subset) with `transform`, DIR/val with the validation transform."""
    train_set = image_folder(args.data, transform, 'train')
    val_set = image_folder(args.data, val_transform(args.crop_size), 'val')
    align_classes(val_set, train_set)
    if args.train_percent != 100:
        select_subset(train_set, read_subset_list(args.train_files), args.train_files)
    return train_set, val_set


def align_classes(val_set, train_set):
    """Give val the train set's label indices (ImageFolder numbers the classes it finds)."""
    if val_set.classes == train_set.classes:
        return
    unknown = sorted(set(val_set.classes) - set(train_set.classes))
    if unknown:
        raise InputError(f'{val_set.root} has classes missing from the training set: '
                         f'{", ".join(unknown[:5])}' + (' ...' if len(unknown) > 5 else ''))
    samples = [(p, train_set.class_to_idx[val_set.classes[t]]) for p, t in val_set.samples]
    val_set.samples = val_set.imgs = samples
    val_set.targets = [t for _, t in samples]
    val_set.classes, val_set.class_to_idx = train_set.classes, train_set.class_to_idx


def subset_list_file(percent, train_files=None, cache_dir=None):
    """The subset list to use: --train-files, else the cached SimCLR list, downloaded once."""
    if train_files is not None:
        if not Path(train_files).is_file():
            raise InputError(f'--train-files {train_files} does not exist')
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
        read_subset_list(tmp)  # a proxy's error page must not be cached as the list
        os.replace(tmp, path)
    except (OSError, ValueError, InputError) as e:
        reason = getattr(e, 'reason', None) or e
        raise InputError(f'cannot get the {percent}% subset list from {url} ({reason}); pass '
                         f'--train-files FILE with a local copy, or place it at {path}') from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_subset_list(path):
    """File names from a SimCLR subset list (one `<class>_<id>.JPEG` per line)."""
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f'cannot read subset list {path}: {e}') from None
    names = [line.strip() for line in lines if line.strip()]
    bad = [n for n in names if not SUBSET_LINE.fullmatch(n)]
    if not names or bad:
        example = f'; first bad line: {bad[0][:80]!r}' if bad else ' (it is empty)'
        raise InputError(f'{path} is not a subset list of file names such as '
                         f'n01440764_10026.JPEG{example}')
    return names


def select_subset(dataset, names, list_path):
    """Keep exactly the listed images (DIR/train/<class>/<name>); any missing is an error."""
    root = Path(dataset.root)
    available = {Path(p).relative_to(root).as_posix(): t for p, t in dataset.samples}
    samples, missing = [], []
    for name in names:
        rel = f'{name.split("_")[0]}/{name}'
        if rel in available:
            samples.append((str(root / rel), available[rel]))
        else:
            missing.append(rel)
    if missing:
        shown = ', '.join(missing[:5]) + (' ...' if len(missing) > 5 else '')
        raise InputError(f'{len(missing)} of the {len(names)} images listed in {list_path} are '
                         f'missing under {root}: {shown}')
    dataset.samples = dataset.imgs = samples
    dataset.targets = [t for _, t in samples]


class ShardSampler(torch.utils.data.Sampler):
    """Indices rank, rank + W, rank + 2W, ...: each sample on exactly one rank, no padding
    (DistributedSampler pads to equal shards, which would count some images twice)."""

    def __init__(self, length, rank=0, world_size=1):
        self.length, self.rank, self.world_size = length, rank, world_size

    def __iter__(self):
        return iter(range(self.rank, self.length, self.world_size))

    def __len__(self):
        return len(range(self.rank, self.length, self.world_size))


def make_eval_loader(dataset, batch_size, workers, info):
    """A loader over this rank's ShardSampler shard, for validate() and the kNN features."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, num_workers=workers,
        pin_memory=info.device.type == 'cuda',
        sampler=ShardSampler(len(dataset), info.rank, info.world_size))


def build_loaders(args, info, train_set, val_set):
    per_rank = args.batch_size // info.world_size
    sampler = torch.utils.data.distributed.DistributedSampler(
        train_set, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=args.seed)
    train_loader = torch.utils.data.DataLoader(
        train_set, batch_size=per_rank, num_workers=args.workers,
        pin_memory=info.device.type == 'cuda', sampler=sampler)
    return train_loader, make_eval_loader(val_set, per_rank, args.workers, info)


# ---------------------------------------------------------------------------------------------
# Weighted k-nearest neighbours on frozen features
# ---------------------------------------------------------------------------------------------

def knn_predict(features, bank, bank_labels, num_classes, k=20, t=KNN_TEMPERATURE,
                chunk_size=256):
    """Class predictions (Q,) of the weighted kNN classifier (Wu et al. 2018, as DINO reports).

    features (Q, D) and bank (N, D): similarity is the cosine (rows are L2-normalised here when
    they are not already); the k most similar bank rows (k capped at N) vote for their label
    with weight exp(similarity / t); the prediction is the class with the largest total.
    Memory: chunk_size x N similarities at a time (256 x 1.28M floats = 1.3 GB for ImageNet).
    """
    k = min(k, bank.shape[0])
    if not ((bank.norm(dim=1) - 1).abs() <= 1e-3).all():
        bank = F.normalize(bank, dim=1)
    predictions = [torch.empty(0, dtype=torch.long, device=features.device)]
    for chunk in features.split(chunk_size):
        similarity = F.normalize(chunk, dim=1) @ bank.T  # (q, D) @ (D, N) -> (q, N)
        top_similarity, top_index = similarity.topk(k, dim=1)  # (q, k)
        weights = (top_similarity / t).exp()
        scores = torch.zeros(len(chunk), num_classes, dtype=weights.dtype, device=weights.device)
        scores.scatter_add_(1, bank_labels[top_index], weights)  # (q, num_classes)
        predictions.append(scores.argmax(dim=1))
    return torch.cat(predictions)


@torch.no_grad()
def extract_features(backbone, loader, device, gather=False):
    """L2-normalised features and labels of this rank's shard, in eval mode; with gather=True,
    of the whole dataset on every rank (the loader must use a ShardSampler then)."""
    backbone.eval()
    features, labels = [], []
    for images, target in loader:
        features.append(F.normalize(backbone(images.to(device, non_blocking=True)).float(), dim=1))
        labels.append(target.to(device, non_blocking=True))
    if not features:  # fewer images than processes
        if gather:
            raise InputError(f'{len(loader.dataset)} images are too few for '
                             f'{distributed.world_info()[1]} processes')
        return torch.empty(0, 0, device=device), torch.empty(0, dtype=torch.long, device=device)
    features, labels = torch.cat(features), torch.cat(labels)
    if gather:
        features = gather_shards(features, loader)
        labels = gather_shards(labels, loader)
    return features, labels


def gather_shards(x, loader):
    """Reassemble per-rank ShardSampler shards (rank r holds rows r, r + W, ...) in order."""
    _, world_size = distributed.world_info()
    if world_size == 1:
        return x
    if not isinstance(loader.sampler, ShardSampler):
        raise ValueError('extract_features(gather=True) needs a loader with a ShardSampler')
    n = loader.sampler.length
    padded = x.new_zeros((math.ceil(n / world_size),) + x.shape[1:])
    padded[:len(x)] = x
    parts = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(parts, padded)
    out = x.new_empty((n,) + x.shape[1:])
    for rank, part in enumerate(parts):
        out[rank::world_size] = part[:len(range(rank, n, world_size))]
    return out


def knn_evaluate(backbone, bank_loader, query_loader, device, num_classes=None, ks=KNN_KS,
                 t=KNN_TEMPERATURE):
    """{k: top-1 in percent} of the weighted kNN classifier: the bank is bank_loader's whole
    dataset (gathered from all ranks), each rank scores its query shard, counts are summed.
    Under a process group both loaders must use ShardSampler (see make_eval_loader)."""
    bank, bank_labels = extract_features(backbone, bank_loader, device, gather=True)
    queries, labels = extract_features(backbone, query_loader, device)
    if num_classes is None:
        num_classes = int(bank_labels.max()) + 1
    counts = torch.tensor([int((knn_predict(queries, bank, bank_labels, num_classes, k, t)
                                == labels).sum()) for k in ks] + [len(labels)], device=device)
    _, world_size = distributed.world_info()
    if world_size > 1:
        dist.all_reduce(counts)
    counts = counts.tolist()
    return {k: 100.0 * c / max(counts[-1], 1) for k, c in zip(ks, counts[:-1])}


def knn_main(info, args):
    stats_log = open_stats_log(args, info)
    pretrained = load_backbone_state(args.pretrained, args.arch, args.cifar_stem)
    backbone, _ = pretrain.build_backbone(args.arch, args.cifar_stem)
    backbone.load_state_dict(pretrained)
    backbone.to(info.device)
    bank_set, val_set = build_datasets(args, val_transform(args.crop_size))
    if len(bank_set) < info.world_size:
        raise InputError(f'{len(bank_set)} training images are too few for {info.world_size} '
                         f'processes')
    if info.is_main:
        print_provenance(args, info, len(bank_set), len(val_set))
    per_rank = max(1, args.batch_size // info.world_size)
    start_time = time.time()
    top1 = knn_evaluate(backbone, make_eval_loader(bank_set, per_rank, args.workers, info),
                        make_eval_loader(val_set, per_rank, args.workers, info), info.device,
                        len(bank_set.classes), args.knn_k, args.knn_temperature)
    stats_log.write(dict(knn_top1=top1, temperature=args.knn_temperature,
                         bank_size=len(bank_set), val_size=len(val_set),
                         train_percent=args.train_percent, time=int(time.time() - start_time)), 0)
    stats_log.close()
    return top1


if __name__ == '__main__':
    main()
