"""Small-image datasets written in the ImageFolder layout that main.py and evaluate.py read.

    python prepare_data.py cifar10 ./cifar10                  # downloads through torchvision
    python prepare_data.py cifar100 ./cifar100
    python prepare_data.py fashion-mnist ./fashion-mnist      # downloads through torchvision
    python prepare_data.py fashion-mnist ./fashion-mnist --from /usr/share/datasets/fashion-mnist
        # offline, from the idx files of Debian's package dataset-fashion-mnist
    python prepare_data.py fashion-mnist ./fmnist-small --train-per-class 500 --val-per-class 200

Writes OUT/train/<class>/<index>.png (the training split) and OUT/val/<class>/<index>.png (the
test split), RGB. Fashion-MNIST's 28 px grey images are resized to --size (32 by default, the size
the CIFAR recipes use) and repeated over the three channels. `--from DIR` reads local files
instead of downloading: the idx files (`train-images-idx3-ubyte[.gz]` ...) for Fashion-MNIST, the
extracted python version (`DIR/cifar-10-batches-py`, `DIR/cifar-100-python`) for CIFAR. The
folder is written next to OUT and renamed into place when complete, so an interrupted run leaves
nothing that looks like a dataset.
"""
import gzip
import os
import pickle
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
import torchvision

from cli import (USER_ERRORS, ArgumentParser, InputError, command_line, error_line,
                 non_negative_int, positive_int)

DATASETS = ('cifar10', 'cifar100', 'fashion-mnist')
# Fashion-MNIST's labels 0-9; '/' cannot be in a folder name.
FASHION_CLASSES = ('T-shirt_top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt',
                   'Sneaker', 'Bag', 'Ankle_boot')
FASHION_FILES = {'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
                 'val': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte')}
CIFAR_FOLDERS = {'cifar10': 'cifar-10-batches-py', 'cifar100': 'cifar-100-python'}
TORCHVISION_CLASSES = {'cifar10': torchvision.datasets.CIFAR10,
                       'cifar100': torchvision.datasets.CIFAR100,
                       'fashion-mnist': torchvision.datasets.FashionMNIST}


def get_arguments():
    parser = ArgumentParser(description='Write a small-image dataset as an ImageFolder tree',
                            prog='prepare_data.py')
    parser.add_argument('dataset', choices=DATASETS, help='which dataset')
    parser.add_argument('out', type=Path, metavar='OUT',
                        help='folder to create: OUT/train/<class>/*.png and OUT/val/<class>/*.png')
    parser.add_argument('--from', dest='source', type=Path, default=None, metavar='DIR',
                        help='read local files instead of downloading (default: download through '
                             'torchvision into --download-dir)')
    parser.add_argument('--download-dir', type=Path, default=Path('./downloads'), metavar='DIR',
                        help='where torchvision keeps the downloaded archives (default: '
                             './downloads)')
    parser.add_argument('--train-per-class', type=non_negative_int, default=0, metavar='N',
                        help='keep the first N training images of each class (default 0: all)')
    parser.add_argument('--val-per-class', type=non_negative_int, default=0, metavar='N',
                        help='keep the first N test images of each class (default 0: all)')
    parser.add_argument('--size', type=positive_int, default=None, metavar='PX',
                        help='side of the written Fashion-MNIST images (default 32, the size '
                             'the CIFAR recipes use; CIFAR keeps its own 32 px)')
    return parser


def main(argv=None):
    parser = get_arguments()
    args = parser.parse_args(argv)
    if args.size is not None and args.dataset != 'fashion-mnist':
        parser.error(f'--size resizes Fashion-MNIST; {args.dataset} keeps its 32 px images')
    args.size = args.size or 32
    try:
        if args.out.exists():
            raise InputError(f'{args.out} already exists; remove it or choose another OUT')
        source = args.source if args.source is not None else download(args.dataset,
                                                                      args.download_dir)
        counts = write_dataset(args, source)
    except USER_ERRORS as e:
        sys.exit(f'prepare_data.py: error: {error_line(e)}')
    except KeyboardInterrupt:
        sys.exit(f'prepare_data.py: interrupted; {args.out} was not written')
    train = command_line('python', ['main.py', args.out, '--arch', 'resnet18', '--cifar-stem',
                                    '--crop-size', '32'])
    print(f'prepare_data.py: wrote {args.out} ({args.dataset}: '
          + ', '.join(f'{split} {n} images' for split, n in counts.items())
          + f'); train on it with: {train}', flush=True)


def download(dataset, root):
    """torchvision's download (checksummed); returns the folder the readers below read."""
    cls = TORCHVISION_CLASSES[dataset]
    try:
        for train in (True, False):
            cls(str(root), train=train, download=True)
    except (OSError, RuntimeError) as e:
        hint = ' or --from /usr/share/datasets/fashion-mnist (Debian package ' \
               'dataset-fashion-mnist)' if dataset == 'fashion-mnist' else ''
        raise InputError(f'cannot download {dataset} into {root} ({e}); offline, pass --from '
                         f'DIR with local files{hint}') from None
    return Path(root) / 'FashionMNIST' / 'raw' if dataset == 'fashion-mnist' else Path(root)


def write_dataset(args, source):
    """Read both splits, then write them to a temporary folder renamed to args.out at the end."""
    read = read_fashion_mnist if args.dataset == 'fashion-mnist' else read_cifar
    splits = {split: read(source, split, args.dataset) for split in ('train', 'val')}
    limits = {'train': args.train_per_class, 'val': args.val_per_class}
    # the folders above OUT that this run creates go again if it fails
    created = [d for d in (args.out.parent, *args.out.parent.parents) if not d.exists()]
    work = None
    try:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f'.{args.out.name}.tmp-', dir=args.out.parent))
        counts = {}
        for split, (images, labels, classes) in splits.items():
            keep = first_per_class(labels, len(classes), limits[split])
            counts[split] = len(keep)
            for index in keep:
                folder = work / split / classes[labels[index]]
                folder.mkdir(parents=True, exist_ok=True)
                to_rgb(images[index], args.size).save(folder / f'{index:05d}.png')
        os.replace(work, args.out)
        created = []
    except OSError as e:
        raise InputError(f'cannot write {args.out}: {e.strerror or e}') from None
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
        for folder in created:  # deepest first
            try:
                folder.rmdir()
            except OSError:
                break
    return counts


def first_per_class(labels, num_classes, limit):
    """Indices of the first `limit` images of every class (all when limit is 0), in file order."""
    if not limit:
        return list(range(len(labels)))
    taken = [0] * num_classes
    keep = []
    for index, label in enumerate(labels):
        if taken[label] < limit:
            taken[label] += 1
            keep.append(index)
    return keep


def to_rgb(pixels, size):
    """(H, W) grey or (H, W, 3) uint8 -> an RGB PIL image; grey images resized to `size`."""
    if pixels.ndim == 2:
        img = Image.fromarray(pixels, mode='L')
        if img.size != (size, size):
            img = img.resize((size, size), Image.BICUBIC)
        return img.convert('RGB')
    return Image.fromarray(pixels, mode='RGB')


def read_fashion_mnist(folder, split, dataset=None):
    """(images (N, 28, 28) uint8, labels (N,), class names) from the idx files in `folder`."""
    image_name, label_name = FASHION_FILES[split]
    images = read_idx(find_file(folder, image_name), expected_dims=3)
    labels = read_idx(find_file(folder, label_name), expected_dims=1)
    if len(images) != len(labels):
        raise InputError(f'{folder}: {len(images)} {split} images but {len(labels)} labels')
    labels = labels.astype(np.int64)
    check_labels(labels, FASHION_CLASSES, f'{folder}/{label_name}', 'Fashion-MNIST')
    return images, labels, FASHION_CLASSES


def check_labels(labels, classes, where, dataset):
    """Every label names one of the classes: both readers check this alike, so that a damaged
    file never files an image under a wrong class (a negative label would index from the end)."""
    bad = labels[(labels < 0) | (labels >= len(classes))]
    if bad.size:
        raise InputError(f'{where}: label {int(bad[0])} is not a {dataset} class (0 to '
                         f'{len(classes) - 1}; {bad.size} such label(s))')


def find_file(folder, name):
    for candidate in (Path(folder) / name, Path(folder) / f'{name}.gz'):
        if candidate.is_file():
            return candidate
    raise InputError(f'{folder} has no {name} or {name}.gz (expected the Fashion-MNIST idx files)')


def read_idx(path, expected_dims):
    """An idx file (the MNIST format: magic 0x0000 0x08 <dims>, big-endian sizes, uint8 data)."""
    opener = gzip.open if path.suffix == '.gz' else open
    try:
        with opener(path, 'rb') as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise InputError(f'cannot read {path}: {e}') from None
    if len(data) < 4 or data[:3] != b'\x00\x00\x08' or data[3] != expected_dims:
        raise InputError(f'{path} is not an idx file of {expected_dims}-dimensional uint8 data')
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], 'big') for i in range(expected_dims))
    body = data[4 + 4 * expected_dims:]
    if len(body) != int(np.prod(shape)):
        raise InputError(f'{path} is truncated or padded: {len(body)} bytes of data for shape '
                         f'{shape}')
    return np.frombuffer(body, dtype=np.uint8).reshape(shape)


def read_cifar(root, split, dataset):
    """(images (N, 32, 32, 3) uint8, labels (N,), class names) from CIFAR's python version."""
    folder = Path(root) / CIFAR_FOLDERS[dataset]
    if not folder.is_dir():
        raise InputError(f'{root} has no {CIFAR_FOLDERS[dataset]}/ (the extracted python version '
                         f'of {dataset})')
    if dataset == 'cifar10':
        names = [f'data_batch_{i}' for i in range(1, 6)] if split == 'train' else ['test_batch']
        meta, label_key, class_key = 'batches.meta', b'labels', b'label_names'
    else:
        names = ['train'] if split == 'train' else ['test']
        meta, label_key, class_key = 'meta', b'fine_labels', b'fine_label_names'
    batches = [unpickle(folder / name) for name in names]
    try:
        images = np.concatenate([np.asarray(b[b'data'], dtype=np.uint8) for b in batches])
        labels = np.concatenate([np.asarray(b[label_key], dtype=np.int64) for b in batches])
        classes = tuple(c.decode() for c in unpickle(folder / meta)[class_key])
        images = images.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # (N, 3072) -> NHWC
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        raise InputError(f'{folder}: not the python version of {dataset} ({e})') from None
    if len(images) != len(labels):
        raise InputError(f'{folder}: {len(images)} {split} images but {len(labels)} labels')
    check_labels(labels, classes, f'{folder} ({split})', dataset)
    return images, labels, classes


def unpickle(path):
    try:
        with open(path, 'rb') as f:
            return pickle.load(f, encoding='bytes')
    except (OSError, EOFError, pickle.UnpicklingError, ValueError) as e:
        raise InputError(f'cannot read {path}: {e}') from None


if __name__ == '__main__':
    main()
