import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


class SimulatedKill(BaseException):
    """A process killed at this point: nothing after it runs. Not KeyboardInterrupt, which
    main.py's entry point turns into a one-line exit as a user's Ctrl+C."""
sys.path.insert(0, str(ROOT))
# Tests must not depend on the network or on a GPU being present.
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')

SHARED_SUBSETS = ROOT.parent / 'shared' / 'data' / 'imagenet_subsets'


def make_image_folder(root, classes=('class_a', 'class_b'), per_class=6, val_per_class=2,
                      size=40, seed=0):
    """A tiny ImageFolder (root/train, root/val) of random-noise JPEGs, distinct per class."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    root = Path(root)
    for split, count in (('train', per_class), ('val', val_per_class)):
        for c, cls in enumerate(classes):
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                pixels[..., c % 3] = 255 - pixels[..., c % 3] // 4  # a class-dependent colour cast
                Image.fromarray(pixels).save(folder / f'{cls}_{i}.JPEG', quality=90)
    return root


@pytest.fixture
def tiny_imagefolder(tmp_path):
    return make_image_folder(tmp_path / 'data')
