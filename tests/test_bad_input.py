"""Bad input to main.py, evaluate.py, hubconf.py and pack.py, as one table.

Every case builds its input in a fresh tmp_path and runs one tool on it. A bad input must give a
non-zero exit and exactly one line of error output (argparse usage blocks, tracebacks and
warnings all count as extra lines; only pack.py's progress lines may precede an error found after
packing began) containing the given words and a reason, and leave every file that existed
before byte-identical: checkpoints, weights, packed files, images. The one exception is
stats.txt, to which a run appends its command line when it starts (as the reference does): its
previous content must stay in place and nothing but that one line may be added. A legitimate
input (greyscale, CMYK, PNG images; a full checkpoint where a backbone is accepted) must give a
correct result instead. hubconf.py entries raise an exception rather than exit: it must be an
InputError with a one-line message.

Most cases run in-process (main.main(argv) & co.) for speed; those marked 'subprocess' run the
script as a user does, to check the real exit status and that stderr is exactly one line.
"""
import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import sys
import urllib.request
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Optional, Sequence

import numpy as np
import pytest
import torch
from PIL import Image

import backbones
import evaluate
import main
import pack
from conftest import ROOT, make_image_folder

CLASSES = ('n01440764', 'n01443537')  # ImageNet-style names, so SimCLR-format subset lists apply
SCRIPTS = {'main': main, 'evaluate': evaluate, 'pack': pack}
# Categories Python does not show by default: anything else a user would see as an extra line.
HIDDEN_WARNINGS = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)


# ---------------------------------------------------------------------------------------------
# Shared inputs: a tiny ImageFolder and main.py's outputs on it, made once for the module
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope='module', autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine, spinning threads make the tiny runs
    5-10x slower. Restored for the other test modules."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def pre(tmp_path_factory, one_thread):
    """The base dataset and one main.py run on it: resnet18.pth, checkpoint.pth, stats.txt
    (--arch resnet18 --cifar-stem --projector 32-32, one epoch). Cases copy what they change."""
    root = tmp_path_factory.mktemp('bad_input_base')
    data = make_image_folder(root / 'data', classes=CLASSES, per_class=6, val_per_class=2, size=32)
    ckdir = root / 'ck'
    main.main(main_args(SimpleNamespace(data=data, ck=ckdir)))
    return SimpleNamespace(root=root, data=data, ckdir=ckdir, backbone=ckdir / 'resnet18.pth',
                           checkpoint=ckdir / 'checkpoint.pth', stats=ckdir / 'stats.txt')


def main_args(t, *extra, data=None):
    """main.py's tiny CPU settings (one epoch of 3 steps); later flags in `extra` win."""
    return [str(data or t.data), '--arch', 'resnet18', '--cifar-stem', '--crop-size', '16',
            '--projector', '32-32', '--batch-size', '4', '--epochs', '1', '--workers', '0',
            '--device', 'cpu', '--checkpoint-dir', str(t.ck), '--print-freq', '1',
            '--warmup-epochs', '1', *extra]


def eval_args(t, *extra, pretrained=None, data=None, arch=('--arch', 'resnet18', '--cifar-stem')):
    return [str(data or t.data), str(pretrained or t.pre.backbone), *arch, '--crop-size', '16',
            '--batch-size', '4', '--epochs', '1', '--workers', '0', '--device', 'cpu',
            '--print-freq', '1', '--checkpoint-dir', str(t.ck), *extra]


def pack_args(t, *extra, source=None, out=None):
    return [str(source or t.data), str(out or t.tmp / 'out.h5'), '--workers', '0', *extra]


# ---------------------------------------------------------------------------------------------
# Ways to break (or legitimately vary) the input
# ---------------------------------------------------------------------------------------------

def image(t, name='n01440764_0.JPEG', split='train'):
    return t.data / split / name.split('_')[0] / name


def truncate(path, keep=300):
    path.write_bytes(path.read_bytes()[:keep])


def mkdir(path):
    path.mkdir(parents=True)
    return path


def put(path, content):
    """Write bytes/str to path, or copy a file there (a Path)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, Path):
        shutil.copyfile(content, path)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


def save(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)
    return path


def copy_run(t):
    """A checkpoint dir holding main.py's checkpoint.pth and stats.txt from the shared run."""
    put(t.ck / 'checkpoint.pth', t.pre.checkpoint)
    put(t.ck / 'stats.txt', t.pre.stats)


def mid_epoch_run(t):
    """The shared run's checkpoint as if it had stopped after step 1 of epoch 0."""
    copy_run(t)
    ckpt = load(t.ck / 'checkpoint.pth')
    ckpt.update(epoch=0, step_in_epoch=1)
    save(t.ck / 'checkpoint.pth', ckpt)


# Legitimate images ImageNet also holds: greyscale and CMYK JPEGs, PNGs (RGBA, palette), plus a
# greyscale-with-alpha PNG and a .jpg in lower case.
LEGIT_MODES = (('L', 'JPEG'), ('CMYK', 'JPEG'), ('RGBA', 'png'), ('P', 'png'), ('LA', 'png'),
               ('RGB', 'jpg'))


def add_legit_images(t, splits=('train', 'val')):
    """Two images of each LEGIT_MODES kind per split, one in each class; returns their count."""
    rng = np.random.default_rng(7)
    count = 0
    for split in splits:
        for m, (mode, ext) in enumerate(LEGIT_MODES):
            for c, cls in enumerate(CLASSES):
                shape = (20 + 4 * m, 28) + ((len(mode),) if len(mode) > 1 else ())
                pixels = rng.integers(0, 256, shape, dtype=np.uint8)
                img = Image.fromarray(pixels[..., 0] if mode == 'P' else pixels,
                                      'L' if mode == 'P' else mode)
                if mode == 'P':
                    img = img.convert('RGB').convert('P', palette=Image.Palette.ADAPTIVE)
                img.save(t.data / split / cls / f'{cls}_{500 + 10 * m + c}.{ext}')
                count += 1
    return count


def truncated_pack(t, path):
    pytest.importorskip('tables')
    pack.main(pack_args(t, out=path))
    truncate(path, keep=path.stat().st_size // 2)


def foreign_hdf5(path):
    tables = pytest.importorskip('tables')
    with tables.open_file(str(path), 'w') as h5:
        h5.create_array('/', 'x', np.arange(5))
    return path


# ---------------------------------------------------------------------------------------------
# Checks of legitimate results
# ---------------------------------------------------------------------------------------------

def load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def check_trained(t, images):
    """main.py finished one epoch over `images` images: checkpoint, backbone, finite losses."""
    ckpt = load(t.ck / 'checkpoint.pth')
    assert ckpt['epoch'] == 1 and ckpt['step_in_epoch'] == 0
    net, _ = backbones.build_backbone('resnet18', cifar_stem=True)
    net.load_state_dict(load(t.ck / 'resnet18.pth'))  # strict
    lines = (t.ck / 'stats.txt').read_text().splitlines()
    stats = [json.loads(line) for line in lines if line.startswith('{')]
    assert [s['step'] for s in stats] == list(range(math.ceil(images / 4)))
    assert all(math.isfinite(s['loss']) for s in stats)


def check_main_legit(t, result):
    check_trained(t, 12 + t.added)


def check_knn_legit(t, result):
    record = json.loads((t.ck / 'stats.txt').read_text().splitlines()[-1])
    assert set(record['knn_top1']) == {'20', '200'}
    assert all(0 <= v <= 100 for v in record['knn_top1'].values())
    assert record['bank_size'] == 12 + t.added // 2 and record['val_size'] == 4 + t.added // 2


def check_hub_backbone(t, net):
    expected = load(t.pre.backbone)
    state = net.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], v) for k, v in expected.items())
    assert net.conv1.kernel_size == (3, 3)  # the cifar stem, read from the checkpoint's args


def check_pack_legit(t, result):
    import torchvision
    from data import PackedImageFolder
    for split in ('train', 'val'):
        folder = torchvision.datasets.ImageFolder(t.data / split)
        packed = PackedImageFolder(t.tmp / 'out.h5', split)
        assert [Path(p).relative_to(t.data / split).as_posix() for p, _ in folder.samples] == \
            [p.split(f':{split}/', 1)[1] for p, _ in packed.samples]
        assert packed.targets == folder.targets
        for i in range(len(packed)):
            img, _ = packed[i]
            assert img.mode == 'RGB'
            assert img.size == folder[i][0].size
        packed.close()
    assert len(PackedImageFolder(t.tmp / 'out.h5', 'train')) == 12 + t.added // 2


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    tool: str  # 'main', 'evaluate', 'pack' (exit code) or 'hub' (exception)
    argv: Callable  # t -> argv list; for 'hub', t -> dict(entry=..., **kwargs)
    code: Optional[int]  # the expected exit status (non-zero); None: the input is legitimate
    words: Sequence[str] = ()  # all of them in the one error line
    setup: Optional[Callable] = None  # t -> None: build the broken input under t.tmp
    check: Optional[Callable] = None  # (t, result) -> None, for a legitimate input
    via: str = 'in-process'  # or 'subprocess': the script as a user runs it
    # Progress lines the tool may print on stderr before the error line, when the bad input is
    # only met after the work began (a regular expression); all other lines count.
    progress: Optional[str] = None

    def param(self, xfail=None):
        marks = [pytest.mark.xfail(strict=True, reason=xfail)] if xfail else []
        return pytest.param(self, id=f'{self.tool}-{self.id}', marks=marks)


# pack.py's per-split start and progress lines (stderr), e.g. 'train: 12 images in 2 classes from
# DIR/train' and 'train: 5/12 images (41.7%), ...'.
PACK_PROGRESS = r'(train|val): \d+(/\d+)? images '
CASES = [
    # ---- main.py: the dataset ----
    Case('missing-dir', 'main', lambda t: main_args(t, data=t.tmp / 'nowhere'), 1,
         ['nowhere', 'does not exist']).param(),
    Case('dir-without-train', 'main', lambda t: main_args(t, data=t.tmp / 'empty'), 1,
         ['train', 'not found'], setup=lambda t: mkdir(t.tmp / 'empty')).param(),
    Case('no-class-folders', 'main', lambda t: main_args(t, data=t.tmp / 'flat'), 1,
         ['class folder'], setup=lambda t: put(t.tmp / 'flat' / 'train' / 'a.JPEG',
                                               image(t).read_bytes())).param(),
    Case('empty-class-folder', 'main', main_args, 1, ['n09999999'],
         setup=lambda t: mkdir(t.data / 'train' / 'n09999999')).param(),
    Case('truncated-jpeg', 'main', main_args, 1, ['cannot read image', 'n01440764_0.JPEG'],
         setup=lambda t: truncate(image(t))).param(),
    Case('truncated-jpeg-fast-augment', 'main', lambda t: main_args(t, '--fast-augment'), 1,
         ['cannot read image', 'n01443537_5.JPEG'],
         setup=lambda t: truncate(image(t, 'n01443537_5.JPEG'))).param(),
    Case('text-file-named-jpeg', 'main', main_args, 1, ['cannot read image', 'n01440764_3.JPEG'],
         setup=lambda t: put(image(t, 'n01440764_3.JPEG'), 'plain text, not a JPEG')).param(),
    Case('empty-jpeg', 'main', main_args, 1, ['cannot read image', 'n01443537_2.JPEG'],
         setup=lambda t: put(image(t, 'n01443537_2.JPEG'), b'')).param(),
    Case('symlink-loop-in-class-folder', 'main', main_args, 1, ['n01440764/again', 'loop'],
         setup=lambda t: os.symlink('..', t.data / 'train' / 'n01440764' / 'again')).param(),
    Case('symlink-to-own-class-folder', 'main', main_args, 1, ['n01440764/self', 'loop'],
         setup=lambda t: os.symlink('.', t.data / 'train' / 'n01440764' / 'self')).param(),
    Case('two-class-folders-one-target', 'main', main_args, 1, ['same folder', 'count twice'],
         setup=lambda t: os.symlink('n01440764', t.data / 'train' / 'n01440765')).param(),
    Case('float-tiff', 'main', main_args, 1, ['cannot read image', 'n01440764_7.tif',
                                              'floating-point'],
         setup=lambda t: (image(t).unlink(), Image.fromarray(np.ones((20, 20), np.float32))
                          .save(image(t, 'n01440764_7.tif')))).param(),
    Case('missing-packed-file', 'main', lambda t: main_args(t, data=t.tmp / 'data.h5'), 1,
         ['data.h5', 'does not exist']).param(),
    Case('packed-file-not-hdf5', 'main', lambda t: main_args(t, data=t.tmp / 'data.h5'), 1,
         ['data.h5'], setup=lambda t: put(t.tmp / 'data.h5', 'not an HDF5 file'))
    .param(),
    Case('truncated-pack', 'main', lambda t: main_args(t, data=t.tmp / 'cut.h5'), 1,
         ['cut.h5', 'truncated', 'of its'],
         setup=lambda t: truncated_pack(t, t.tmp / 'cut.h5')).param(),
    Case('legit-grey-cmyk-png', 'main', main_args, None, check=check_main_legit,
         setup=lambda t: setattr(t, 'added', add_legit_images(t, ['train']))).param(),
    Case('legit-grey-cmyk-png-fast-augment', 'main', lambda t: main_args(t, '--fast-augment'),
         None, check=check_main_legit,
         setup=lambda t: setattr(t, 'added', add_legit_images(t, ['train']))).param(),
    # ---- main.py: malformed flags (argparse's exit status 2) ----
    Case('projector-not-numbers', 'main', lambda t: main_args(t, '--projector', '8192-abc'), 2,
         ['--projector', '8192-abc']).param(),
    Case('projector-zero-width', 'main', lambda t: main_args(t, '--projector', '32-0'), 2,
         ['--projector', '32-0']).param(),
    Case('learning-rate-with-weights-rate', 'main',
         lambda t: main_args(t, '--learning-rate', '0.2', '--learning-rate-weights', '0.2'), 2,
         ['--learning-rate', '--learning-rate-weights']).param(),
    Case('epochs-0', 'main', lambda t: main_args(t, '--epochs', '0'), 2,
         ['--epochs', '0']).param(),
    Case('checkpoint-every-soon', 'main', lambda t: main_args(t, '--checkpoint-every', 'soon'), 2,
         ['--checkpoint-every', 'soon']).param(),
    Case('crop-size-4', 'main', lambda t: main_args(t, '--crop-size', '4'), 2,
         ['--crop-size', '4']).param(),
    Case('unknown-flag', 'main', lambda t: main_args(t, '--learning_rate', '0.2'), 2,
         ['unrecognized arguments', '--learning_rate']).param(),
    Case('no-dir-no-demo', 'main', lambda t: main_args(t)[1:], 2, ['DIR']).param(),
    # every float flag refuses what float() accepts but no run can use: nan, inf, out of range
    *[Case(f'{flag[2:]}-{value}', 'main', lambda t, f=flag, v=value: main_args(t, f, v), 2,
           [flag, value]).param()
      for flag in ('--learning-rate-weights', '--learning-rate-biases', '--learning-rate',
                   '--scale-loss', '--weight-decay', '--lambd')
      for value in ('nan', 'inf', '-1')],
    Case('scale-loss-0', 'main', lambda t: main_args(t, '--scale-loss', '0'), 2,
         ['--scale-loss', '0']).param(),
    Case('rollback-lr-factor-nan', 'main', lambda t: main_args(t, '--rollback-lr-factor', 'nan'),
         2, ['--rollback-lr-factor', 'nan']).param(),
    Case('checkpoint-every-inf', 'main', lambda t: main_args(t, '--checkpoint-every', 'inf'), 2,
         ['--checkpoint-every', 'inf']).param(),
    # ---- main.py: the checkpoint directory ----
    Case('checkpoint-of-other-projector', 'main', lambda t: main_args(t, '--projector', '64-64'),
         1, ['checkpoint.pth', '--projector', '32-32', '64-64'], setup=copy_run,
         via='subprocess').param(),
    Case('checkpoint-of-other-arch', 'main', lambda t: main_args(t, '--arch', 'resnet34'), 1,
         ['checkpoint.pth', '--arch', 'resnet18', 'resnet34'], setup=copy_run).param(),
    Case('checkpoint-of-other-lr-flags', 'main', lambda t: main_args(t, '--learning-rate', '0.2'),
         1, ['checkpoint.pth', 'parameter group', '--learning-rate'], setup=copy_run).param(),
    # an epoch that cannot train
    Case('drop-last-batch-larger-than-dataset', 'main',
         lambda t: main_args(t, '--drop-last', '--batch-size', '16'), 1,
         ['--batch-size 16', '--drop-last', 'no step']).param(),
    Case('batch-size-1', 'main', lambda t: main_args(t, '--batch-size', '1'), 1,
         ['--batch-size 1', 'BatchNorm']).param(),
    # a checkpoint whose data order or classes this run does not have
    Case('checkpoint-with-other-class-count', 'main', lambda t: main_args(t, '--epochs', '2'), 1,
         ['checkpoint.pth', 'online probe', '2 classes', 'now has 3'],
         setup=lambda t: (copy_run(t), [put(image(t, f'n09999999_{i}.JPEG'), image(t))
                                        for i in range(2)])).param(),
    *[Case(f'mid-epoch-checkpoint-{name}', 'main', lambda t, x=extra: main_args(t, *x), 1,
           ['checkpoint.pth', 'step 1 of epoch 0', *words], setup=lambda t, c=change: (
               mid_epoch_run(t), c(t))).param()
      for name, extra, change, words in (
          ('other-batch-size', ['--batch-size', '8'], lambda t: None, ['--batch-size 4 then, 8']),
          ('more-images', [], lambda t: [put(image(t, f'n01440764_9{i}.JPEG'), image(t))
                                         for i in range(2)], ['training images 12 then, 14']),
          ('drop-last', ['--drop-last'], lambda t: None, ['--drop-last False then, True']),
          ('other-epochs', ['--epochs', '3'], lambda t: None, ['--epochs 1 then, 3']),
          ('other-seed', ['--seed', '1'], lambda t: None, ['--seed 0 then, 1']))],
    Case('garbage-checkpoint', 'main', main_args, 1, ['cannot read checkpoint', 'checkpoint.pth'],
         setup=lambda t: put(t.ck / 'checkpoint.pth', b'\x00\x01 garbage, not a checkpoint'))
    .param(),
    Case('empty-checkpoint', 'main', main_args, 1, ['cannot read checkpoint', 'checkpoint.pth'],
         setup=lambda t: put(t.ck / 'checkpoint.pth', b'')).param(),
    Case('backbone-file-as-checkpoint', 'main', main_args, 1,
         ['checkpoint.pth', 'not a main.py checkpoint'],
         setup=lambda t: put(t.ck / 'checkpoint.pth', t.pre.backbone)).param(),
    Case('checkpoint-dir-is-a-file', 'main',
         lambda t: main_args(t, '--checkpoint-dir', str(t.tmp / 'ckfile')), 1, ['ckfile'],
         setup=lambda t: put(t.tmp / 'ckfile', 'a file, not a directory')).param(),

    # ---- evaluate.py ----
    Case('missing-pretrained', 'evaluate', lambda t: eval_args(t, pretrained=t.tmp / 'nothing.pth'),
         1, ['nothing.pth', 'does not exist']).param(),
    Case('pretrained-random-dict', 'evaluate', lambda t: eval_args(t, pretrained=t.tmp / 'rnd.pth'),
         1, ['rnd.pth', 'missing: bn1.bias', 'unexpected: foo.weight'], via='subprocess',
         setup=lambda t: save(t.tmp / 'rnd.pth', {'foo.weight': torch.zeros(3)})).param(),
    Case('resnet18-file-for-resnet50', 'evaluate',  # no checkpoint.pth beside it: no record
         lambda t: eval_args(t, pretrained=t.tmp / 'resnet18.pth', arch=('--arch', 'resnet50')),
         1, ['resnet18.pth', 'resnet50', 'missing:', 'layer1.0.bn3'],
         setup=lambda t: shutil.copy(t.pre.backbone, t.tmp / 'resnet18.pth')).param(),
    Case('flag-contradicts-record', 'evaluate', lambda t: eval_args(t, arch=('--arch', 'resnet50')),
         1, ['resnet18.pth', 'pretrained with --arch resnet18 --cifar-stem', 'recorded in',
             'checkpoint.pth', 'this run has --arch resnet50']).param(),
    Case('checkpoint-of-other-arch', 'evaluate',
         lambda t: eval_args(t, pretrained=t.pre.checkpoint, arch=('--arch', 'resnet50')), 1,
         ['checkpoint.pth', 'pretrained with --arch resnet18 --cifar-stem']).param(),
    Case('pretrained-is-a-tensor', 'evaluate', lambda t: eval_args(t, pretrained=t.tmp / 't.pth'),
         1, ['t.pth', 'Tensor'], setup=lambda t: save(t.tmp / 't.pth', torch.zeros(3))).param(),
    Case('pretrained-is-text', 'evaluate', lambda t: eval_args(t, pretrained=t.tmp / 'w.pth'), 1,
         ['w.pth', 'cannot read checkpoint'],
         setup=lambda t: put(t.tmp / 'w.pth', 'not a checkpoint')).param(),
    Case('missing-val', 'evaluate', eval_args, 1, ['val', 'not found'],
         setup=lambda t: shutil.rmtree(t.data / 'val')).param(),
    Case('val-class-not-in-train', 'evaluate', eval_args, 1, ['n09999999', 'missing from the'],
         setup=lambda t: put(t.data / 'val' / 'n09999999' / 'n09999999_1.JPEG',
                             image(t).read_bytes())).param(),
    Case('train-files-missing-images', 'evaluate',
         lambda t: eval_args(t, '--train-percent', '1', '--train-files', str(t.tmp / '1pct.txt')),
         1, ['2 of the 3 images', 'n01440764/n01440764_99.JPEG', 'n01443537/n01443537_98.JPEG'],
         via='subprocess', setup=lambda t: put(
             t.tmp / '1pct.txt', 'n01440764_0.JPEG\nn01440764_99.JPEG\nn01443537_98.JPEG\n'))
    .param(),
    Case('train-files-with-percent-100', 'evaluate',
         lambda t: eval_args(t, '--train-files', str(t.tmp / '1pct.txt')), 2,
         ['--train-files', '--train-percent 1 or 10'],
         setup=lambda t: put(t.tmp / '1pct.txt', 'n01440764_0.JPEG\n')).param(),
    Case('train-files-not-a-list', 'evaluate',
         lambda t: eval_args(t, '--train-percent', '10', '--train-files', str(t.tmp / 'x.txt')), 1,
         ['x.txt', 'not a subset list'],
         setup=lambda t: put(t.tmp / 'x.txt', '<html>404 not found</html>\n')).param(),
    Case('train-files-nonexistent', 'evaluate',
         lambda t: eval_args(t, '--train-percent', '1', '--train-files', str(t.tmp / 'no.txt')), 1,
         ['--train-files', 'no.txt', 'does not exist']).param(),
    *[Case(f'{flag[2:]}-{value}', 'evaluate', lambda t, f=flag, v=value: eval_args(t, f'{f}={v}'), 2,
           [flag, value]).param()
      for flag in ('--lr-backbone', '--lr-classifier', '--weight-decay', '--knn-temperature')
      for value in ('nan', '-inf', '-0.5')],
    Case('knn-temperature-0', 'evaluate', lambda t: eval_args(t, '--knn', '--knn-temperature', '0'),
         2, ['--knn-temperature', '0']).param(),
    Case('train-percent-5', 'evaluate', lambda t: eval_args(t, '--train-percent', '5'), 2,
         ['--train-percent', '5']).param(),
    Case('garbage-checkpoint', 'evaluate', eval_args, 1,
         ['cannot read checkpoint', 'checkpoint.pth'],
         setup=lambda t: put(t.ck / 'checkpoint.pth', b'PK\x03\x04 garbage')).param(),
    Case('loss-becomes-nan', 'evaluate', lambda t: eval_args(t, '--lr-classifier', '1e30'), 1,
         ['non-finite', 'epoch 0', 'unchanged']).param(),
    Case('main-checkpoint-in-checkpoint-dir', 'evaluate', eval_args, 1,
         ['holds a pretraining run', 'use another --checkpoint-dir'], setup=copy_run).param(),
    Case('legit-knn-on-full-checkpoint-grey-cmyk-png', 'evaluate',
         lambda t: eval_args(t, '--knn', pretrained=t.pre.checkpoint), None, check=check_knn_legit,
         setup=lambda t: setattr(t, 'added', add_legit_images(t))).param(),

    # ---- hubconf.py through torch.hub.load(ROOT, ..., source='local') ----
    Case('missing-local-path', 'hub',
         lambda t: dict(entry='resnet50', weights=str(t.tmp / 'no.pth')), 1,
         ['no.pth', 'No such file']).param(),
    Case('weights-is-a-directory', 'hub', lambda t: dict(entry='resnet50', weights=str(t.tmp)), 1,
         ['cannot read checkpoint']).param(),
    Case('text-file', 'hub', lambda t: dict(entry='resnet50', weights=str(t.tmp / 'w.pth')), 1,
         ['w.pth', 'cannot read checkpoint'],
         setup=lambda t: put(t.tmp / 'w.pth', 'not a state dict')).param(),
    Case('tensor-file', 'hub', lambda t: dict(entry='resnet50', weights=str(t.tmp / 't.pth')), 1,
         ['t.pth', 'Tensor'], setup=lambda t: save(t.tmp / 't.pth', torch.zeros(3))).param(),
    Case('resnet18-state-dict-for-resnet50', 'hub',  # no checkpoint.pth beside it: no record
         lambda t: dict(entry='resnet50', weights=str(t.tmp / 'resnet18.pth')), 1,
         ['resnet18.pth', 'missing:', 'layer1.0.bn3'],
         setup=lambda t: shutil.copy(t.pre.backbone, t.tmp / 'resnet18.pth')).param(),
    Case('recorded-resnet18-for-resnet50', 'hub',
         lambda t: dict(entry='resnet50', weights=str(t.pre.backbone)), 1,
         ['resnet18.pth', "arch='resnet18', cifar_stem=True", "the 'backbone' entry"]).param(),
    Case('backbone-with-wrong-arch', 'hub',
         lambda t: dict(entry='backbone', weights=str(t.tmp / 'resnet18.pth'), arch='resnet34',
                        cifar_stem=True), 1, ['resnet18.pth', 'resnet34', 'missing:'],
         setup=lambda t: shutil.copy(t.pre.backbone, t.tmp / 'resnet18.pth')).param(),
    Case('backbone-arch-contradicts-record', 'hub',
         lambda t: dict(entry='backbone', weights=str(t.pre.backbone), arch='resnet34'), 1,
         ["pretrained with arch='resnet18', cifar_stem=True", "this call has arch='resnet34'",
          'keyword arguments']).param(),
    Case('barlowtwins-from-backbone-file', 'hub',
         lambda t: dict(entry='barlowtwins', checkpoint=str(t.pre.backbone)), 1,
         ['resnet18.pth', 'not a full checkpoint']).param(),
    Case('legit-backbone-from-checkpoint', 'hub',
         lambda t: dict(entry='backbone', weights=str(t.pre.checkpoint)), None,
         check=check_hub_backbone).param(),

    # ---- pack.py ----
    Case('missing-source', 'pack', lambda t: pack_args(t, source=t.tmp / 'nowhere'), 1,
         ['nowhere', 'does not exist']).param(),
    Case('source-without-train', 'pack', lambda t: pack_args(t, source=t.tmp / 'src'), 1,
         ['train', 'not found'], setup=lambda t: mkdir(t.tmp / 'src' / 'val' / CLASSES[0])).param(),
    Case('empty-class-folder', 'pack', pack_args, 1, ['n09999999'],
         setup=lambda t: mkdir(t.data / 'val' / 'n09999999')).param(),
    Case('corrupt-image', 'pack', lambda t: pack_args(t, '--workers', '1'), 1,
         ['cannot read image', 'n01443537_4.JPEG', '--skip-bad'], progress=PACK_PROGRESS,
         setup=lambda t: truncate(image(t, 'n01443537_4.JPEG'))).param(),
    Case('text-file-named-jpeg', 'pack', pack_args, 1,
         ['cannot read image', 'n01440764_1.JPEG', '--skip-bad'], progress=PACK_PROGRESS,
         setup=lambda t: put(image(t, 'n01440764_1.JPEG', 'val'), 'not an image')).param(),
    Case('symlink-loop-in-class-folder', 'pack', pack_args, 1, ['n01443537/up', 'loop'],
         setup=lambda t: os.symlink('../..', t.data / 'val' / 'n01443537' / 'up')).param(),
    Case('file-name-not-utf8', 'pack', pack_args, 1, ['n01440764_', 'not valid UTF-8'],
         setup=lambda t: put(t.data / 'train' / 'n01440764' / os.fsdecode(b'n01440764_\xff.JPEG'),
                             image(t))).param(),
    Case('check-truncated-pack', 'pack', lambda t: ['--check', str(t.tmp / 'cut.h5')], 1,
         ['cut.h5', 'truncated'], setup=lambda t: truncated_pack(t, t.tmp / 'cut.h5')).param(),
    Case('output-in-missing-directory', 'pack', lambda t: pack_args(t, out=t.tmp / 'no' / 'o.h5'),
         1, ['o.h5', 'does not exist']).param(),
    Case('output-is-a-directory', 'pack', lambda t: pack_args(t, out=t.tmp / 'o.h5'), 1,
         ['o.h5', 'directory'], setup=lambda t: mkdir(t.tmp / 'o.h5')).param(),
    Case('output-is-a-text-file', 'pack', pack_args, 1, ['out.h5'],
         setup=lambda t: put(t.tmp / 'out.h5', 'my notes, not a pack'))
    .param(),
    Case('output-is-another-hdf5-file', 'pack', pack_args, 1, ['out.h5', 'not a file written by'],
         setup=lambda t: foreign_hdf5(t.tmp / 'out.h5'), via='subprocess').param(),
    Case('check-missing-file', 'pack', lambda t: ['--check', str(t.tmp / 'none.h5')], 1,
         ['none.h5', 'does not exist']).param(),
    Case('negative-workers', 'pack', lambda t: pack_args(t, '--workers', '-1'), 2,
         ['--workers']).param(),
    Case('commit-every-0', 'pack', lambda t: pack_args(t, '--commit-every', '0'), 2,
         ['--commit-every', '0']).param(),
    Case('no-output-file', 'pack', lambda t: [str(t.data)], 2,
         ['output FILE']).param(),
    Case('legit-grey-cmyk-png', 'pack', pack_args, None, check=check_pack_legit,
         setup=lambda t: setattr(t, 'added', add_legit_images(t))).param(),
]


def test_table_covers_every_tool_and_enough_cases():
    cases = [p.values[0] for p in CASES]
    assert len({c.id + c.tool for c in cases}) == len(cases) >= 20
    assert {c.tool for c in cases} == {'main', 'evaluate', 'hub', 'pack'}
    assert len([c for c in cases if c.via == 'subprocess']) >= 3


# ---------------------------------------------------------------------------------------------
# Running one case
# ---------------------------------------------------------------------------------------------

def shown(caught):
    """The warnings a user would see on stderr, as lines."""
    return [f'{w.category.__name__}: {w.message}' for w in caught
            if not issubclass(w.category, HIDDEN_WARNINGS)]


def run_in_process(tool, argv, capsys):
    """(exit status, error lines, result): stderr, a SystemExit message and warnings."""
    capsys.readouterr()
    result, code = None, 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        try:
            result = SCRIPTS[tool].main(argv)
        except SystemExit as e:
            code = e.code
    err = capsys.readouterr().err
    message = code if isinstance(code, str) else ''  # Python prints it: one more line
    status = 0 if code is None else 1 if isinstance(code, str) else code
    lines = [line for line in (err + '\n' + message).splitlines() if line.strip()]
    return status, lines + shown(caught), result


def run_subprocess(tool, argv, t):
    proc = subprocess.run([sys.executable, str(ROOT / f'{tool}.py'), *map(str, argv)],
                          cwd=t.tmp, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, CUDA_VISIBLE_DEVICES='', OMP_NUM_THREADS='1',
                                   TORCH_HOME=str(t.tmp / 'torch_home')))
    return proc.returncode, proc.stderr.splitlines(), None  # every line counts, blank ones too


def run_hub(kwargs):
    """(1 and the message's lines, or 0 and the model) for a torch.hub.load of the entry."""
    kwargs = dict(kwargs)
    entry = kwargs.pop('entry')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        try:
            model = torch.hub.load(str(ROOT), entry, source='local', **kwargs)
        except Exception as e:  # noqa: BLE001 - which exception it is, is checked below
            lines = str(e).splitlines() or ['']
            return 1, [f'{type(e).__name__}: {lines[0]}'] + lines[1:] + shown(caught), None
    return 0, shown(caught), model


def snapshot(root):
    return {p: p.read_bytes() for p in sorted(root.rglob('*')) if p.is_file()}


def file_stats(root):
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob('*') if p.is_file()}


def assert_unchanged(before, tool, argv):
    """Every file there before is byte-identical; stats.txt may only gain the command line."""
    for path, old in before.items():
        assert path.exists(), f'{path} was removed'
        new = path.read_bytes()
        if path.name == 'stats.txt' and tool in ('main', 'evaluate') and new != old:
            assert new.startswith(old), f'{path}: earlier lines changed'
            added = new[len(old):].decode().splitlines()
            command = ' '.join(map(str, argv))
            assert len(added) == 1 and added[0].split(' ', 1)[0].endswith(f'{tool}.py') \
                and added[0].endswith(command), f'{path}: more than the command line added: {added}'
        else:
            assert new == old, f'{path} changed'


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError('the network was used')
    monkeypatch.setattr(urllib.request, 'urlopen', refuse)
    monkeypatch.setattr(torch.hub, 'download_url_to_file', refuse)


@pytest.mark.parametrize('case', CASES)
def test_bad_input(case, pre, tmp_path, monkeypatch, capsys, no_network):
    if case.tool == 'pack' or 'packed' in case.id:  # PyTables: needed for packed files only
        pytest.importorskip('tables')
    monkeypatch.chdir(tmp_path)  # default checkpoint dirs, if any, land here
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))
    t = SimpleNamespace(tmp=tmp_path, data=tmp_path / 'data', ck=tmp_path / 'ck', pre=pre,
                        added=0)
    shutil.copytree(pre.data, t.data)
    if case.setup is not None:
        case.setup(t)
    argv = case.argv(t)
    before, shared = snapshot(tmp_path), file_stats(pre.root)

    if case.tool == 'hub':
        status, lines, result = run_hub(argv)
    elif case.via == 'subprocess':
        status, lines, result = run_subprocess(case.tool, argv, t)
    else:
        status, lines, result = run_in_process(case.tool, argv, capsys)

    assert file_stats(pre.root) == shared, 'a shared input file changed'
    if case.code is None:  # a legitimate input: success, and a correct result
        assert status == 0, lines
        case.check(t, result)
        return
    assert status == case.code, (status, lines)
    while case.progress and len(lines) > 1 and re.match(case.progress, lines[0]):
        lines = lines[1:]
    assert len(lines) == 1 and lines[0].strip(), lines
    line = lines[0]
    prefix = 'InputError: ' if case.tool == 'hub' else f'{case.tool}.py: error'
    assert line.startswith(prefix), line
    # The line says what is wrong: no empty reason after a colon, no traceback debris.
    assert not line.rstrip().endswith(':'), f'no reason given: {line}'
    assert not re.search(r'traceback|back trace', line, re.IGNORECASE), line
    missing = [w for w in case.words if w not in line]
    assert not missing, f'{missing} not in: {line}'
    assert_unchanged(before, case.tool, argv)
    if case.tool in ('main', 'evaluate'):  # a failed run writes no weights
        assert not [p for p in tmp_path.rglob('*.pth') if p not in before]
