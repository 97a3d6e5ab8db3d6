"""Does pretraining learn useful features? Fashion-MNIST on a CPU budget, against the baselines.

    python bench_learning.py                  # prepare the data, pretrain (CPU_RECIPE), table
    python bench_learning.py --epochs 2       # a shorter pretraining, same table
    python bench_learning.py --pretrained checkpoint/resnet18.pth   # only evaluate a backbone

The data: the first 500 training and 200 test images of each Fashion-MNIST class, as 32 px
PNGs (prepare_data.py; offline from /usr/share/datasets/fashion-mnist, Debian's package
dataset-fashion-mnist, else downloaded through torchvision). The pretraining: `python main.py`
with CPU_RECIPE below and --knn-every 1, so stats.txt holds the kNN curve against minutes.

Then, on the same held-out images, one row per set of features: the pretrained backbone, the
same network never trained in both random initialisations (torchvision's default, and the
zero-residual one main.py starts from: nearly a stem plus shortcuts), and the raw pixels.
Each row has the weighted kNN top-1 (k = 20 and 200, the bank being the training images; as
evaluate.py --knn) and the fast linear probe's top-1 (as evaluate.py --fast-linear). Features
are computed once per backbone under the validation transform, no augmentation.
"""
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

import bench
import plot
import prepare_data
from augmentations import val_transform
from backbones import build_backbone, load_backbone_state, recorded_settings
from cli import (USER_ERRORS, ArgumentParser, InputError, command_line, error_line,
                 non_negative_float, positive_int, seed)
from data import image_folder
from knn import knn_predict
from linear_fit import fit_linear, top_k_accuracy

FASHION_MNIST_LOCAL = Path('/usr/share/datasets/fashion-mnist')

# The documented CPU recipe: the reference's loss and LARS (base rates 0.2 / 0.0048 x batch/256,
# lambd 0.0051) with a 5 times larger trust coefficient (--lars-eta 0.005; the reference's 0.001
# is tuned for 1000 ImageNet epochs and hardly moves the weights in a CPU hour), crops of at
# least 30% of the image (Fashion-MNIST's garments fill the frame; 8% crops show a patch of
# cloth) and no blur (its 23-px kernel wipes out a 32-px image). ResNet-18 with the ImageNet
# stem: the CIFAR stem costs 6.5 times as much per 32-px image on a 2-core CPU.
CPU_RECIPE = ['--arch', 'resnet18', '--crop-size', '32', '--projector', '512-512-512',
              '--batch-size', '128', '--epochs', '30', '--warmup-epochs', '2', '--drop-last',
              '--lars-eta', '0.005', '--min-scale', '0.3', '--blur-prob', '0,0']


def get_arguments():
    parser = ArgumentParser(description=__doc__.split('\n')[0], prog='bench_learning.py')
    parser.add_argument('--data', type=Path, default=None, metavar='DIR',
                        help='an ImageFolder DIR (DIR/train, DIR/val) instead of the prepared '
                             'Fashion-MNIST subset')
    parser.add_argument('--work-dir', type=Path, default=Path('./bench_learning'), metavar='DIR',
                        help='where the prepared data and the pretraining run go')
    parser.add_argument('--train-per-class', type=positive_int, default=500, metavar='N',
                        help='Fashion-MNIST training images per class')
    parser.add_argument('--val-per-class', type=positive_int, default=200, metavar='N',
                        help='Fashion-MNIST test images per class, the held-out queries')
    parser.add_argument('--epochs', type=positive_int, default=None, metavar='N',
                        help="pretraining epochs (default: CPU_RECIPE's 30)")
    parser.add_argument('--main-flags', default='', metavar='FLAGS',
                        help='more main.py flags, after CPU_RECIPE\'s (later flags win), e.g. '
                             '--main-flags="--cifar-stem --projector 2048-2048-2048"')
    parser.add_argument('--pretrained', type=Path, default=None, metavar='FILE',
                        help='evaluate this backbone (main.py\'s ARCH.pth or checkpoint.pth) '
                             'instead of pretraining one')
    parser.add_argument('--probe-weight-decay', type=non_negative_float, default=1e-3,
                        metavar='W', help='L2 weight of the fast linear probe (evaluate.py '
                                          '--fast-linear --weight-decay)')
    parser.add_argument('--seed', type=seed, default=0,
                        help='seed of the random initialisations (main.py --seed of the run)')
    return parser


def prepare(args):
    """The Fashion-MNIST ImageFolder under --work-dir, written once."""
    out = args.work_dir / f'fashion-mnist-{args.train_per_class}-{args.val_per_class}'
    if not (out / 'train').is_dir():
        source = ['--from', str(FASHION_MNIST_LOCAL)] if FASHION_MNIST_LOCAL.is_dir() else \
            ['--download-dir', str(args.work_dir / 'downloads')]
        prepare_data.main(['fashion-mnist', str(out), *source, '--train-per-class',
                           str(args.train_per_class), '--val-per-class', str(args.val_per_class)])
    return out


# main.py flags that bench_learning.py sets itself: --main-flags may not give them
OWN_MAIN_FLAGS = ('--knn-every', '--seed', '--checkpoint-dir')


def main_flags(args):
    """--main-flags split as a shell splits them (quotes kept together); flags that this
    script sets itself are refused rather than silently overridden."""
    try:
        words = shlex.split(args.main_flags)
    except ValueError as e:
        raise InputError(f'--main-flags {args.main_flags!r}: {e}') from None
    own = [w for w in words if w.split('=', 1)[0] in OWN_MAIN_FLAGS]
    if own:
        raise InputError(f'--main-flags {args.main_flags!r}: {own[0].split("=", 1)[0]} is set '
                         f'by bench_learning.py ({", ".join(OWN_MAIN_FLAGS)}: use --seed and '
                         f'--work-dir)')
    return words


def check_inputs(args):
    """Everything the command was given, before data is prepared or anything is trained."""
    main_flags(args)
    if args.data is not None:
        for split in ('train', 'val'):
            image_folder(args.data, split=split)
    if args.pretrained is not None:
        recorded = recorded_settings(args.pretrained)[0]
        load_backbone_state(args.pretrained, recorded.get('arch', 'resnet18'),
                            recorded.get('cifar_stem', False))


def pretrain(args, data):
    """Run main.py in --work-dir/pretrain; returns the backbone file. A rerun continues the run
    there (main.py resumes it, or says that it is complete)."""
    run_dir = args.work_dir / 'pretrain'
    flags = list(CPU_RECIPE) + (['--epochs', str(args.epochs)] if args.epochs else []) \
        + main_flags(args)
    command = [sys.executable, str(Path(__file__).with_name('main.py')), str(data), *flags,
               '--knn-every', '1', '--seed', str(args.seed), '--checkpoint-dir', str(run_dir)]
    if (run_dir / 'checkpoint.pth').is_file():
        print(f'bench_learning.py: {run_dir} holds a pretraining run: main.py continues it',
              flush=True)
    print('# ' + shlex.join(command[1:]), flush=True)
    result = subprocess.run(command)
    if result.returncode != 0:
        raise InputError(f'main.py failed (exit status {result.returncode}); see its output above')
    settings, _ = recorded_settings(run_dir / 'checkpoint.pth')
    return run_dir / f'{settings["arch"]}.pth'


def read_stats(path):
    """The JSON records of the stats.txt beside a backbone file ([] when there is none)."""
    try:
        return plot.read_stats(path)
    except InputError:
        return []


def load_split(data, split, crop_size):
    dataset = image_folder(data, val_transform(crop_size), split)
    loader = torch.utils.data.DataLoader(dataset, batch_size=256, num_workers=2)
    images, labels = zip(*loader)
    return torch.cat(images), torch.cat(labels), len(dataset.classes)


@torch.no_grad()
def backbone_features(net, images):
    net.eval()
    return torch.cat([net(images[i:i + 256]) for i in range(0, len(images), 256)])


def knn_top1(train, val, k, num_classes):
    """Weighted kNN top-1 in percent (cosine similarity, as evaluate.py --knn)."""
    (bank, bank_labels), (queries, labels) = train, val
    predicted = knn_predict(queries, bank, bank_labels, num_classes, k=k)
    return 100.0 * float((predicted == labels).float().mean())


def scores(train, val, num_classes, weight_decay):
    """(kNN k=20, kNN k=200, fast linear top-1) of one set of features."""
    classifier = fit_linear(train[0], train[1], num_classes, weight_decay)
    linear = top_k_accuracy(classifier, *val, ks=(1,))[1]
    return knn_top1(train, val, 20, num_classes), knn_top1(train, val, 200, num_classes), linear


def random_backbone(arch, cifar_stem, zero_init_residual, seed):
    torch.manual_seed(seed)
    net, _ = build_backbone(arch, cifar_stem, zero_init_residual=zero_init_residual)
    return net


def load_average():
    return '/'.join(f'{x:.1f}' for x in os.getloadavg())


def main(argv=None):
    args = get_arguments().parse_args(argv)
    print(f'# {command_line("bench_learning.py", sys.argv[1:] if argv is None else argv)}')
    print(f'# {bench.describe(torch.device("cpu"))}; load average {load_average()} at the start', flush=True)
    try:
        check_inputs(args)
        data = args.data if args.data is not None else prepare(args)
        weights = args.pretrained if args.pretrained is not None else pretrain(args, data)
        stats = read_stats(weights.parent / 'stats.txt')
        times = [r['time'] for r in stats if 'time' in r]
        pretrain_minutes = max(times) / 60 if times else None
        settings, _ = recorded_settings(weights)
        arch, cifar_stem = settings.get('arch', 'resnet18'), settings.get('cifar_stem', False)
        crop_size = settings.get('crop_size', 32)
        start = time.time()
        train_images, train_labels, num_classes = load_split(data, 'train', crop_size)
        val_images, val_labels, _ = load_split(data, 'val', crop_size)
        pretrained, _ = build_backbone(arch, cifar_stem)
        pretrained.load_state_dict(load_backbone_state(weights, arch, cifar_stem))
        candidates = [
            (f'pretrained ({weights})', pretrained),
            ('random init, torchvision default', random_backbone(arch, cifar_stem, False,
                                                                 args.seed)),
            ('random init, zero residual (main.py\'s start)',
             random_backbone(arch, cifar_stem, True, args.seed)),
            ('raw pixels', None)]
        rows = []
        for name, net in candidates:
            if net is None:
                train, val = train_images.flatten(1), val_images.flatten(1)
            else:
                train, val = backbone_features(net, train_images), backbone_features(net, val_images)
            rows.append((name, *scores((train, train_labels), (val, val_labels), num_classes,
                                       args.probe_weight_decay)))
    except USER_ERRORS as e:
        sys.exit(f'bench_learning.py: error: {error_line(e)}')
    print_report(args, data, rows, stats, pretrain_minutes, len(train_labels), len(val_labels),
                 time.time() - start)
    return rows


def print_report(args, data, rows, stats, pretrain_minutes, train_count, val_count, eval_seconds):
    took = f', pretraining {pretrain_minutes:.1f} min' if pretrain_minutes is not None else ''
    print(f'\n## {data}: {train_count} training images (kNN bank, probe training set), '
          f'{val_count} held-out{took}; evaluation {eval_seconds:.0f} s; load average '
          f'{load_average()} at the end\n')
    print('| features | kNN top-1 k=20 | kNN top-1 k=200 | fast linear top-1 |')
    print('|---|---|---|---|')
    for name, *values in rows:
        print(f'| {name} | ' + ' | '.join(f'{v:.1f}' for v in values) + ' |')
    best_random = [max(a, b) for a, b in zip(rows[1][1:], rows[2][1:])]
    gains = [p - r for p, r in zip(rows[0][1:], best_random)]
    print(f'\npretrained minus the better random initialisation: kNN k=20 {gains[0]:+.1f}, '
          f'k=200 {gains[1]:+.1f}, fast linear {gains[2]:+.1f} points')
    curve = [r for r in stats if 'knn_top1_k20' in r]
    if curve:
        print(f'\n| epoch | minutes of pretraining | kNN top-1 k=20 | minus the better random '
              f'init ({best_random[0]:.1f}) |')
        print('|---|---|---|---|')
        for r in curve:
            print(f"| {r['epoch'] + 1} | {r['time'] / 60:.1f} | {r['knn_top1_k20']:.1f} | "
                  f"{r['knn_top1_k20'] - best_random[0]:+.1f} |")


if __name__ == '__main__':
    main()
