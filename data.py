"""Datasets on disk: the ImageFolder layout, checked image loading, and the built-in demo dataset.

Everything here turns bad input into an `InputError` whose message is one line naming the path.
"""
import colorsys
import itertools
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
import torch
import torch.multiprocessing as mp
import torch.utils.data.distributed
import torchvision


class InputError(Exception):
    """Bad input from the user (a path, a file, a flag): reported as one line, non-zero exit.

    A DataLoader worker's exception is re-raised in the main process as
    `InputError("Caught InputError in DataLoader worker ...\\n<traceback>\\nInputError: msg")`;
    the constructor keeps only the original message so the user still sees one line.
    """

    def __init__(self, message):
        marker = f'{type(self).__name__}: '
        if '\n' in message and marker in message:
            message = message.rsplit(marker, 1)[1].strip()
        super().__init__(message)


def load_rgb(path):
    """Open an image as RGB; any decoding problem names the file."""
    try:
        with open(path, 'rb') as f:
            img = Image.open(f)
            return img.convert('RGB')  # forces the full decode, so truncation shows up here
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as e:
        raise InputError(f'cannot read image {path}: {e}') from None


def image_folder(root, transform=None, split='train'):
    """torchvision ImageFolder over root/split with checked loading and one-line errors."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f'data directory {root} does not exist')
    folder = root / split
    if not folder.is_dir():
        raise InputError(f'{folder} not found: expected the ImageFolder layout '
                         f'{root}/{split}/<class>/<image>')
    try:
        return torchvision.datasets.ImageFolder(folder, transform, loader=load_rgb)
    except FileNotFoundError as e:
        # "Couldn't find any class folder" / "Found no valid file for the classes ..."
        raise InputError(f'{folder}: {e}'.replace('\n', ' ')) from None


# The demo dataset: small synthetic photographs of coloured shapes on textured backgrounds, in the
# ImageNet layout. Classes differ by shape and colour family, so the features a run learns can be
# probed; every image is different (position, size, rotation, shade, background).
DEMO_SHAPES = ('disc', 'square', 'triangle', 'cross', 'ring')
DEMO_PALETTES = ('warm', 'cool')


def _demo_colour(rng, palette):
    # Warm: reds to yellows; cool: greens to violets. Saturated, varied brightness.
    hue = rng.uniform(0.0, 0.16) if palette == 'warm' else rng.uniform(0.40, 0.78)
    r, g, b = colorsys.hsv_to_rgb(hue, rng.uniform(0.6, 1.0), rng.uniform(0.55, 1.0))
    return int(r * 255), int(g * 255), int(b * 255)


def _demo_image(rng, shape, palette, size):
    bg = tuple(rng.randint(0, 255) for _ in range(3))
    img = Image.new('RGB', (size, size), bg)
    draw = ImageDraw.Draw(img)
    for _ in range(6):  # background clutter, so the shape is not trivially the only signal
        x, y = rng.randint(0, size), rng.randint(0, size)
        r = rng.randint(2, size // 6)
        draw.rectangle([x - r, y - r, x + r, y + r],
                       fill=tuple(rng.randint(0, 255) for _ in range(3)))
    img = img.filter(ImageFilter.GaussianBlur(1.5))
    draw = ImageDraw.Draw(img)
    colour = _demo_colour(rng, palette)
    r = rng.randint(size // 5, size // 3)
    cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
    if shape == 'disc':
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == 'square':
        draw.regular_polygon((cx, cy, r), 4, rotation=rng.uniform(0, 90), fill=colour)
    elif shape == 'triangle':
        draw.regular_polygon((cx, cy, r), 3, rotation=rng.uniform(0, 120), fill=colour)
    elif shape == 'cross':
        w = max(2, r // 3)
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=colour)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=colour)
    else:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=colour, width=max(2, r // 3))
    return img


def make_demo_dataset(root, per_class=40, val_per_class=10, size=64, seed=0):
    """Write the demo ImageFolder (root/train, root/val) unless it is already complete.

    Written to a temporary folder and moved into place, so an interrupted write never leaves a
    half dataset that a later run would take for a complete one.
    """
    root = Path(root)
    if (root / 'train').is_dir() and (root / 'val').is_dir():
        return root
    rng = random.Random(seed)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix='.demo-', dir=root.parent))
    try:
        for split, count in (('train', per_class), ('val', val_per_class)):
            for palette in DEMO_PALETTES:
                for shape in DEMO_SHAPES:
                    cls = f'{palette}_{shape}'
                    (tmp / split / cls).mkdir(parents=True)
                    for i in range(count):
                        img = _demo_image(rng, shape, palette, size)
                        img.save(tmp / split / cls / f'{cls}_{i:04d}.JPEG', quality=90)
        root.mkdir(parents=True, exist_ok=True)
        for split in ('train', 'val'):
            os.replace(tmp / split, root / split)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


class SeededSamples(torch.utils.data.Dataset):
    """A dataset whose every sample is augmented from its own seed (seed, epoch, index).

    Augmentations then depend neither on the number of DataLoader workers nor on which samples
    came before, so a run resumed in the middle of an epoch sees exactly the views it would have
    seen. With `skip_bad`, an unreadable image is replaced by the next readable one (and counted)
    instead of stopping the run.
    """

    def __init__(self, dataset, seed, skip_bad=False):
        self.dataset, self.seed, self.skip_bad = dataset, seed, skip_bad
        self.epoch = 0
        self.skipped = mp.Value('l', 0)  # shared with the DataLoader's worker processes

    def __len__(self):
        return len(self.dataset)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def _seed(self, index):
        state = np.random.SeedSequence([self.seed & 0xFFFFFFFF, self.epoch, index]).generate_state(2)
        random.seed(int(state[0]))
        torch.manual_seed(int(state[0]) << 32 | int(state[1]))

    def __getitem__(self, index):
        for attempt in range(len(self.dataset)):
            candidate = (index + attempt) % len(self.dataset)
            self._seed(candidate)
            try:
                return self.dataset[candidate]
            except InputError as e:
                if not self.skip_bad:
                    raise
                with self.skipped.get_lock():
                    self.skipped.value += 1
                print(f'skipping: {e}', file=sys.stderr, flush=True)
        raise InputError('no readable image in the dataset')

    def take_skipped(self):
        """Images skipped since the last call (in this process and its workers)."""
        with self.skipped.get_lock():
            count, self.skipped.value = self.skipped.value, 0
        return count


class EpochSampler(torch.utils.data.distributed.DistributedSampler):
    """DistributedSampler that can start an epoch after its first `start` samples (mid-epoch
    resume: the remaining batches are exactly those an uninterrupted epoch would have had)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.start = 0

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.start, None)

    def __len__(self):
        return self.num_samples - self.start
