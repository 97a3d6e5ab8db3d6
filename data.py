"""Datasets on disk: the ImageFolder layout, packed HDF5 files (pack.py), checked image loading,
and the built-in demo dataset; which samples each rank sees (samplers) and their seeds.

Everything here turns bad input into an `InputError` whose message is one line naming the path.
"""
import atexit
import colorsys
import io
import itertools
import math
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import weakref
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
import torch
import torch.multiprocessing as mp
import torch.utils.data.distributed
import torchvision

from cli import InputError

DECODE_ERRORS = (OSError, ValueError, Image.DecompressionBombError, SyntaxError)


SIXTEEN_BIT_MODES = ('I;16', 'I;16L', 'I;16B', 'I;16N')


def to_rgb(img):
    """An 8-bit RGB copy of a decoded PIL image, whatever its mode.

    PIL's convert('RGB') clips 16-bit pixels to 255 (a 16-bit PNG or TIFF turns white), and
    32-bit integer or float pixels have no range it could scale from; a palette image with
    transparency goes through RGBA (the same colours, without PIL's warning). Raises ValueError
    for what has no defined 8-bit meaning.
    """
    if img.mode == 'RGB':
        return img
    if img.mode in SIXTEEN_BIT_MODES or (img.mode == 'I' and img.format == 'PNG'):
        # 16-bit samples (a PNG's may open as 32-bit 'I'): 0..65535 -> 0..255, rounded
        pixels = np.asarray(img, dtype=np.uint32)
        return Image.fromarray(((pixels * 255 + 32767) // 65535).astype(np.uint8), 'L') \
            .convert('RGB')
    if img.mode in ('I', 'F'):
        kind = 'floating-point' if img.mode == 'F' else '32-bit integer'
        raise ValueError(f'{kind} pixels (PIL mode {img.mode}) have no defined 8-bit range; '
                         f'convert the file to 8-bit RGB')
    if img.mode == 'P' and 'transparency' in img.info:
        img = img.convert('RGBA')
    return img.convert('RGB')


def load_rgb(path):
    """Open an image as RGB; any decoding problem names the file."""
    try:
        with open(path, 'rb') as f:
            img = Image.open(f)
            img.load()  # the full decode, so truncation shows up here
            return to_rgb(img)
    except DECODE_ERRORS as e:
        raise InputError(f'cannot read image {path}: {e}') from None


def decode_rgb(data, name):
    """`load_rgb` for an encoded image held in memory (bytes); a problem names `name`."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        return to_rgb(img)
    except DECODE_ERRORS as e:
        raise InputError(f'cannot read image {name}: {e}') from None


def image_folder(root, transform=None, split='train', loader=None):
    """torchvision ImageFolder over root/split with checked loading and one-line errors.

    A file named *.h5 or *.hdf5 (written by pack.py) stands in for the folder: the same samples,
    labels and class names, read from the packed file (`PackedImageFolder`). `loader(source,
    name)` turns a path or encoded bytes into what `transform` takes (default: an RGB PIL image
    with `load_rgb`'s checks).
    """
    if is_pack_path(root):
        return PackedImageFolder(root, split, transform, loader=loader)
    root = Path(root)
    if not root.is_dir():
        raise InputError(f'data directory {root} does not exist')
    folder = root / split
    if not folder.is_dir():
        raise InputError(f'{folder} not found: expected the ImageFolder layout '
                         f'{root}/{split}/<class>/<image>')
    check_folder_links(folder)
    try:
        return torchvision.datasets.ImageFolder(folder, transform, loader=loader or load_rgb)
    except FileNotFoundError as e:
        # "Couldn't find any class folder" / "Found no valid file for the classes ..."
        raise InputError(f'{folder}: {e}'.replace('\n', ' ')) from None


def check_folder_links(folder):
    """Refuse symbolic links that would list images more than once: torchvision follows links
    to folders, so a link to a folder that contains it repeats its images until the path is too
    long (16 images became 336), and two paths to one folder count its images twice."""
    reached = {os.path.realpath(folder): Path(folder)}
    pending = [Path(folder)]
    while pending:
        current = pending.pop()
        here = os.path.realpath(current)
        try:
            entries = [e for e in os.scandir(current) if e.is_dir()]
        except OSError as e:
            raise InputError(f'cannot list {current}: {e.strerror or e}') from None
        for entry in entries:
            path, real = Path(entry.path), os.path.realpath(entry.path)
            if entry.is_symlink() and (here + os.sep).startswith(real + os.sep):
                raise InputError(f'{path} links to {real}, a folder that contains it: a loop '
                                 f'that would list the same images again and again; remove it')
            if real in reached:
                raise InputError(f'{path} and {reached[real]} are the same folder ({real}): its '
                                 f'images would count twice; remove one of them')
            reached[real] = path
            pending.append(path)


# Packed datasets: one HDF5 file (PyTables) written by pack.py, one group per split (/train,
# /val), each holding
#   data     uint8 EArray, the original encoded image files concatenated (bytes unchanged)
#   offsets  int64 EArray, N + 1 entries: image i is data[offsets[i]:offsets[i + 1]]
#   labels   int64 EArray, N entries: class index, numbered as torchvision ImageFolder does
#   names    string EArray, N entries: '<class>/<file>' (UTF-8), in ImageFolder order
#   classes  string Array: the class folder names, sorted as ImageFolder sorts them
# and attributes `complete` (True once the split is finished), `packed` (N), `scanned` (files of
# the source listing done, packed or skipped), `skipped` (JSON list of names left out with
# --skip-bad) and `source` (the folder packed). PyTables is imported only where a pack is used.
PACK_SUFFIXES = ('.h5', '.hdf5')
PACK_FORMAT = 'pack.py ImageFolder'  # the root attribute `format` of every file pack.py writes
PACK_VERSION = 1


def is_pack_path(root):
    root = Path(root)
    return root.suffix.lower() in PACK_SUFFIXES and not root.is_dir()


def import_tables(path):
    try:
        import tables
    except ImportError:
        raise InputError(f'{path}: packed datasets need PyTables (pip install tables)') from None
    return tables


def hdf5_reason(error):
    """What an HDF5 error says, in a few words. Its first line is only 'HDF5 error back trace';
    the innermost frame of the trace, its last indented line, names the cause."""
    text = str(error)
    frames = [line.strip() for line in text.split('End of HDF5 error back trace')[0].splitlines()
              if line.startswith('    ')]
    cause = frames[-1] if frames else text.strip().splitlines()[-1].strip() if text.strip() \
        else type(error).__name__
    if 'unable to lock file' in cause:  # HDF5's own lock: one writer, or readers, at a time
        return 'another process has it open (another pack.py writing it?); wait for it to finish'
    truncated = re.search(r'truncated file: eof = (\d+).*stored_eof = (\d+)', cause)
    if truncated:
        return (f'the file is truncated ({truncated.group(1)} of its {truncated.group(2)} bytes '
                f'are there; copy it again, or rerun pack.py)')
    return cause


def open_pack(path, mode='r', **params):
    """A pack.py file opened with PyTables; a missing file or any other file is an InputError."""
    tables = import_tables(path)
    if not Path(path).is_file():
        raise InputError(f'packed file {path} does not exist')
    if Path(path).stat().st_size and not tables.is_hdf5_file(str(path)):
        raise InputError(f'{path} is not an HDF5 file (expected one written by pack.py)')
    try:
        h5 = tables.open_file(str(path), mode, **params)
    except (OSError, tables.HDF5ExtError, ValueError) as e:
        raise InputError(f'cannot open packed file {path}: {hdf5_reason(e)}') from None
    if getattr(h5.root._v_attrs, 'format', None) != PACK_FORMAT:
        h5.close()
        raise InputError(f'{path} is not a file written by pack.py')
    return h5


def pack_split_group(h5, path, split):
    """The group of a finished split; a missing or unfinished one is an InputError."""
    if f'/{split}' not in h5:
        present = ', '.join(sorted(g._v_name for g in h5.iter_nodes('/', 'Group'))) or 'none'
        raise InputError(f"{path} has no split '{split}' (splits in it: {present})")
    group = h5.get_node(f'/{split}')
    missing = [name for name in ('data', 'offsets', 'labels', 'names', 'classes')
               if name not in group]
    if not getattr(group._v_attrs, 'complete', False) or missing:
        packed = getattr(group._v_attrs, 'packed', 0)
        raise InputError(f"{path}: split '{split}' is not finished ({packed} images so far"
                         + (f'; no {", ".join(missing)} yet' if missing else '')
                         + '); rerun the pack.py command to complete it')
    return group


def read_strings(array):
    return [s.decode('utf-8') for s in array.read()]


def split_problems(names, offsets, labels, num_classes, data_rows, packed):
    """What is inconsistent between a split's arrays (`names` their count), as a list of
    phrases: every reader of a pack checks this, and pack.py --check too."""
    n = len(labels)
    problems = []
    if not (len(offsets) == n + 1 and names == n == packed):
        problems.append(f'{n} labels, {names} names, {len(offsets)} offsets')
    elif offsets[0] != 0 or np.any(np.diff(offsets) <= 0) or offsets[-1] != data_rows:
        problems.append('offsets do not cut the data into non-empty images')
    if n and (labels.min() < 0 or labels.max() >= num_classes):
        problems.append('labels out of the class range')
    return problems


def check_split_arrays(h5, path, split):
    """A finished split whose arrays agree with each other; returns its image count."""
    group = pack_split_group(h5, path, split)
    try:
        read_strings(group.names), read_strings(group.classes)
    except UnicodeDecodeError:
        raise InputError(f'{path}:{split} is inconsistent: names that are not UTF-8') from None
    offsets, labels = group.offsets.read(), group.labels.read()
    problems = split_problems(group.names.nrows, offsets, labels, group.classes.nrows,
                              group.data.nrows, group._v_attrs.packed)
    if problems:
        raise InputError(f'{path}:{split} is inconsistent: {"; ".join(problems)}')
    return len(labels)


class PackedImageFolder(torch.utils.data.Dataset):
    """One split of a pack.py file, with torchvision ImageFolder's interface and samples.

    `samples` holds (`FILE.h5:split/<class>/<file>`, label) in ImageFolder order, so
    `Path(p).name` is the file name and `Path(p).relative_to(root)` is `<class>/<file>`; callers
    may replace `samples` (a subset, relabelled classes) as they do an ImageFolder's, and the image
    is found by that name. Images are decoded by PIL from the stored bytes with `load_rgb`'s
    checks. The file is opened on first use in each process (each DataLoader worker gets its own
    handle; an HDF5 handle must not cross a fork), and the dataset pickles without one.
    """

    def __init__(self, path, split='train', transform=None, target_transform=None, loader=None):
        self.file, self.split = Path(path), split
        self.loader = loader or decode_rgb
        self.root = f'{self.file}:{split}'
        self.transform, self.target_transform = transform, target_transform
        with open_pack(self.file) as h5:
            group = pack_split_group(h5, self.file, split)
            self._names = group.names.read()  # (N,) bytes: compact, and quick to pickle
            self._offsets = group.offsets.read()  # (N + 1,)
            labels = group.labels.read()
            # checked as pack.py --check does: a damaged file must not give wrong labels
            problems = split_problems(len(self._names), self._offsets, labels,
                                      group.classes.nrows, group.data.nrows,
                                      group._v_attrs.packed)
            try:
                self.classes = read_strings(group.classes)
                names = [n.decode('utf-8') for n in self._names]
            except UnicodeDecodeError:
                problems.append('names that are not UTF-8')
        if problems:
            raise InputError(f'{self.file}:{split} is inconsistent: {"; ".join(problems)}; '
                             f'check it with pack.py --check, or pack it again')
        labels = labels.tolist()
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples = self.imgs = [(f'{self.root}/{n}', t) for n, t in zip(names, labels)]
        self.targets = labels
        self._lookup = None  # name -> record, built when a sample is not at its packed index
        self._pid = self._h5 = self._data = self._closer = None

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, target = self.samples[index]
        record = self._record(index, path)
        tables = import_tables(self.file)
        try:
            data = self._data_array().read(self._offsets[record], self._offsets[record + 1])
        except (OSError, tables.HDF5ExtError) as e:
            raise InputError(f'cannot read image {path}: {hdf5_reason(e)}') from None
        sample = self.loader(data.tobytes(), path)
        if self.transform is not None:
            sample = self.transform(sample)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return sample, target

    def _record(self, index, path):
        prefix = self.root + '/'
        try:
            name = path[len(prefix):] if path.startswith(prefix) else \
                Path(path).relative_to(self.root).as_posix()
        except ValueError:
            raise InputError(f'{path} is not an image of {self.root}') from None
        if index < len(self._names) and self._names[index] == name.encode('utf-8'):
            return index  # samples in the packed order: no lookup table needed
        if self._lookup is None:
            self._lookup = {n.decode('utf-8'): i for i, n in enumerate(self._names)}
        if name not in self._lookup:
            raise InputError(f'{path} is not an image of {self.root}')
        return self._lookup[name]

    def _data_array(self):
        if self._pid != os.getpid():
            # A chunk cache only costs a copy here (each image is read once per epoch): without
            # one, HDF5 reads exactly the image's bytes.
            self._h5 = open_pack(self.file, chunk_cache_size=0)
            self._data = self._h5.get_node(f'/{self.split}/data')
            self._pid = os.getpid()
            # Closed when the dataset goes, or at exit: atexit runs this before the handler
            # that PyTables registered on import, which would warn of an open file.
            self._closer = weakref.finalize(self, self._h5.close)
            atexit.register(self._closer)
        return self._data

    def close(self):
        if self._h5 is not None and self._pid == os.getpid():
            self._closer()
            atexit.unregister(self._closer)
        self._pid = self._h5 = self._data = self._closer = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state.update(_pid=None, _h5=None, _data=None, _closer=None)
        return state

    def __repr__(self):
        return f'PackedImageFolder({self.root}, {len(self)} images, {len(self.classes)} classes)'


# The demo dataset: small synthetic photographs of shapes, in the ImageNet layout. The classes
# differ only in the shape. Position, size and rotation are drawn anew for every image, and so
# is a colour jitter (the range of the training views' own) that moves one fixed pair of colours,
# shape and background: within a class images differ in colour as much as Barlow Twins' colour
# augmentation teaches it to ignore, and no more. (Fully random colours were tried: Barlow Twins
# then encodes the colour, which its hue jitter of +-0.1 cannot make it ignore, and learns no
# shape in the demo's minutes; BENCHMARKS.md, "The demo's settings".) No background clutter: on
# a few hundred images Barlow Twins encodes whatever tells images apart through the
# augmentations, and clutter would win.
DEMO_SHAPES = ('disc', 'ring', 'square', 'triangle', 'cross', 'star', 'hexagon', 'crescent')


def _demo_colours(rng):
    """(shape colour, background colour) for one image: one light and one dark colour of a
    fixed pair, both moved by the same random colour jitter as the training views' (brightness
    and contrast 0.6-1.4, saturation 0.8-1.2, hue +-0.1): within a class images differ in what
    the augmentations teach invariance to, and in position, size and rotation."""
    base = ((235, 170, 60), (30, 50, 110))  # amber on dark blue
    brightness, contrast = rng.uniform(0.6, 1.4), rng.uniform(0.6, 1.4)
    saturation, hue = rng.uniform(0.8, 1.2), rng.uniform(-0.1, 0.1)
    mean_luma = sum(0.299 * r + 0.587 * g + 0.114 * b for r, g, b in base) / 2
    colours = []
    for r, g, b in base:
        h, s, v = colorsys.rgb_to_hsv(r / 255, g / 255, b / 255)
        r, g, b = colorsys.hsv_to_rgb((h + hue) % 1.0, min(1.0, s * saturation), v)
        r, g, b = (min(255.0, max(0.0, brightness * 255 * c)) for c in (r, g, b))
        r, g, b = (min(255.0, max(0.0, contrast * c + (1 - contrast) * mean_luma))
                   for c in (r, g, b))
        colours.append((int(r), int(g), int(b)))
    return colours


def _demo_image(rng, shape, size):
    colour, background = _demo_colours(rng)
    img = Image.new('RGB', (size, size), background)
    draw = ImageDraw.Draw(img)
    r = rng.randint(size // 4, int(size * 0.45))
    cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
    turn = rng.uniform(0, 360)
    if shape == 'disc':
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == 'ring':
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=colour, width=max(2, r // 3))
    elif shape in ('square', 'triangle', 'hexagon'):
        sides = dict(square=4, triangle=3, hexagon=6)[shape]
        draw.regular_polygon((cx, cy, r), sides, rotation=turn, fill=colour)
    elif shape == 'star':  # five points, inner radius 0.4 r
        corners = [(cx + radius * math.cos(angle), cy + radius * math.sin(angle))
                   for k in range(10)
                   for radius, angle in [(r if k % 2 == 0 else 0.4 * r,
                                          math.radians(turn) + math.pi * k / 5)]]
        draw.polygon(corners, fill=colour)
    elif shape == 'cross':  # four arms of width 2r/3
        arm, corners = r / 3, []
        for k in range(4):
            a = math.radians(turn) + math.pi / 2 * k
            for along, across in ((r, -arm), (r, arm), (arm, arm)):
                corners.append((cx + along * math.cos(a) - across * math.sin(a),
                                cy + along * math.sin(a) + across * math.cos(a)))
        draw.polygon(corners, fill=colour)
    else:  # crescent: a disc with an offset disc of the background cut out
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        a = math.radians(turn)
        ox, oy = cx + 0.5 * r * math.cos(a), cy + 0.5 * r * math.sin(a)
        draw.ellipse([ox - 0.85 * r, oy - 0.85 * r, ox + 0.85 * r, oy + 0.85 * r],
                     fill=background)
    return img


# Written beside train/ and val/: what generated them. A folder with another version's mark, or
# the first demo's (which wrote none; its classes were warm_* and cool_*), is generated again.
DEMO_MARK = 'demo_dataset.txt'
DEMO_VERSION = 'demo dataset 2: 8 shapes, one fixed pair of colours jittered per image\n'


def _is_earlier_demo(root):
    mark = root / DEMO_MARK
    if mark.is_file():
        return mark.read_text() != DEMO_VERSION
    classes = [p.name for p in (root / 'train').iterdir() if p.is_dir()]
    return bool(classes) and all(c.startswith(('warm_', 'cool_')) for c in classes)


def make_demo_dataset(root, per_class=40, val_per_class=30, size=64, seed=0):
    """Write the demo ImageFolder (root/train, root/val) unless it is already complete: a
    folder holding this version's demo, or data of the user's own, is used as it is.

    Written to a temporary folder and moved into place, so an interrupted write never leaves a
    half dataset that a later run would take for a complete one.
    """
    root = Path(root)
    if (root / 'train').is_dir() and (root / 'val').is_dir() and not _is_earlier_demo(root):
        return root
    rng = random.Random(seed)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix='.demo-', dir=root.parent))
    try:
        for split, count in (('train', per_class), ('val', val_per_class)):
            for cls in DEMO_SHAPES:
                (tmp / split / cls).mkdir(parents=True)
                for i in range(count):
                    img = _demo_image(rng, cls, size)
                    img.save(tmp / split / cls / f'{cls}_{i:04d}.JPEG', quality=90)
        (tmp / DEMO_MARK).write_text(DEMO_VERSION)
        root.mkdir(parents=True, exist_ok=True)
        for split in ('train', 'val'):
            if (root / split).exists():  # an earlier version's: out of the way, then removed
                os.replace(root / split, tmp / f'earlier-{split}')
            os.replace(tmp / split, root / split)
        os.replace(tmp / DEMO_MARK, root / DEMO_MARK)
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
    resume: the remaining batches are exactly those an uninterrupted epoch would have had) and
    end it after `epoch_samples` (default: all `num_samples` of this rank)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.start = 0
        self.epoch_samples = self.num_samples

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.start, self.epoch_samples)

    def __len__(self):
        return max(0, self.epoch_samples - self.start)


def ignore_stop_signals(worker_id=None):
    """DataLoader worker_init_fn: SIGTERM and SIGINT go to the whole process group (scancel,
    SLURM time limits, Ctrl-C); only the main process acts on them (it stops at the next step
    and checkpoints), so a worker must not die of them first."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def seed_everything(seed, epoch=None, rank=0):
    # Reseeding at every epoch start makes each epoch's data order and augmentations a function
    # of (seed, epoch, rank) alone, so a run resumed from an epoch checkpoint repeats exactly.
    words = [seed & 0xFFFFFFFF] + ([] if epoch is None else [epoch, rank])
    state = np.random.SeedSequence(words).generate_state(2)
    random.seed(int(state[0]))
    np.random.seed(int(state[1]))
    torch.manual_seed(int(state[0]) << 32 | int(state[1]))


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
        pin_memory=info.device.type == 'cuda', worker_init_fn=ignore_stop_signals,
        sampler=ShardSampler(len(dataset), info.rank, info.world_size))
