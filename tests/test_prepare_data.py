"""prepare_data.py: Fashion-MNIST idx files and CIFAR's python version into ImageFolder trees."""
import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import prepare_data
from data import image_folder

DEBIAN_FASHION_MNIST = Path('/usr/share/datasets/fashion-mnist')


def write_idx(path, array, compress=True):
    header = bytes([0, 0, 8, array.ndim]) + b''.join(n.to_bytes(4, 'big') for n in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(f'{path}.gz', 'wb') as f:
            f.write(payload)
    else:
        Path(path).write_bytes(payload)


def fake_fashion_mnist(folder, train=23, test=11, compress=True):
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    arrays = {}
    for split, n in (('train', train), ('val', test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = np.arange(n, dtype=np.uint8) % 10
        image_name, label_name = prepare_data.FASHION_FILES[split]
        write_idx(folder / image_name, images, compress)
        write_idx(folder / label_name, labels, compress)
        arrays[split] = images, labels
    return arrays


def fake_cifar(root, dataset):
    rng = np.random.default_rng(1)
    folder = root / prepare_data.CIFAR_FOLDERS[dataset]
    folder.mkdir(parents=True)
    if dataset == 'cifar10':
        files = {f'data_batch_{i}': 4 for i in range(1, 6)} | {'test_batch': 6}
        names = [b'c%d' % i for i in range(10)]
        label_key, meta = b'labels', ('batches.meta', {b'label_names': names})
    else:
        files = {'train': 12, 'test': 5}
        names = [b'fine_%d' % i for i in range(100)]
        label_key, meta = b'fine_labels', ('meta', {b'fine_label_names': names})
    batches = {}
    for name, n in files.items():
        batch = {b'data': rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 label_key: [int(x) for x in rng.integers(0, 10, n)]}
        (folder / name).write_bytes(pickle.dumps(batch))
        batches[name] = batch
    (folder / meta[0]).write_bytes(pickle.dumps(meta[1]))
    return batches


def test_fashion_mnist_from_idx_files(tmp_path):
    arrays = fake_fashion_mnist(tmp_path / 'raw')
    out = tmp_path / 'fmnist'
    prepare_data.main(['fashion-mnist', str(out), '--from', str(tmp_path / 'raw'), '--size', '28'])
    train = image_folder(out, split='train')
    val = image_folder(out, split='val')
    assert train.classes == sorted(prepare_data.FASHION_CLASSES)
    assert (len(train), len(val)) == (23, 11)
    images, labels = arrays['train']
    path = out / 'train' / prepare_data.FASHION_CLASSES[labels[7]] / '00007.png'
    written = np.asarray(Image.open(path))
    assert written.shape == (28, 28, 3)
    assert all(np.array_equal(written[..., c], images[7]) for c in range(3))  # grey in RGB


def test_fashion_mnist_resized_and_subset_per_class(tmp_path):
    fake_fashion_mnist(tmp_path / 'raw', train=40, test=20, compress=False)
    out = tmp_path / 'small'
    prepare_data.main(['fashion-mnist', str(out), '--from', str(tmp_path / 'raw'),
                       '--train-per-class', '2', '--val-per-class', '1'])
    train = image_folder(out, split='train')
    assert len(train) == 20 and len(image_folder(out, split='val')) == 10
    assert sorted(set(train.targets)) == list(range(10))
    assert all(train.targets.count(c) == 2 for c in range(10))
    assert Image.open(train.samples[0][0]).size == (32, 32)
    # the first two of each class in file order: labels cycle 0..9, so indices 0..19
    assert sorted(int(Path(p).stem) for p, _ in train.samples) == list(range(20))


@pytest.mark.parametrize('dataset', ['cifar10', 'cifar100'])
def test_cifar_python_version(tmp_path, dataset):
    batches = fake_cifar(tmp_path / 'raw', dataset)
    out = tmp_path / dataset
    prepare_data.main([dataset, str(out), '--from', str(tmp_path / 'raw')])
    train, val = image_folder(out, split='train'), image_folder(out, split='val')
    assert (len(train), len(val)) == ((20, 6) if dataset == 'cifar10' else (12, 5))
    first = batches['data_batch_1' if dataset == 'cifar10' else 'train']
    label_key = b'labels' if dataset == 'cifar10' else b'fine_labels'
    prefix = 'c' if dataset == 'cifar10' else 'fine_'
    path = out / 'train' / f'{prefix}{first[label_key][0]}' / '00000.png'
    expected = first[b'data'][0].reshape(3, 32, 32).transpose(1, 2, 0)
    assert np.array_equal(np.asarray(Image.open(path)), expected)


def test_bad_sources_are_one_line_errors_and_leave_nothing(tmp_path, capsys):
    raw = tmp_path / 'raw'
    fake_fashion_mnist(raw, compress=False)
    name = prepare_data.FASHION_FILES['train'][0]
    (raw / name).write_bytes((raw / name).read_bytes()[:-5])  # truncated
    cases = [(['fashion-mnist', str(tmp_path / 'a'), '--from', str(raw)],
              'is truncated or padded'),
             (['fashion-mnist', str(tmp_path / 'b'), '--from', str(tmp_path)],
              'has no train-images'),
             (['cifar10', str(tmp_path / 'c'), '--from', str(tmp_path)],
              'has no cifar-10-batches-py'),
             (['fashion-mnist', str(raw), '--from', str(raw)], 'already exists')]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            prepare_data.main(argv)
        assert message in str(exit_info.value) and '\n' not in str(exit_info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['raw']  # no partial output


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(),
                    reason='needs the Debian package dataset-fashion-mnist')
def test_real_fashion_mnist_from_the_debian_package(tmp_path):
    out = tmp_path / 'fmnist'
    prepare_data.main(['fashion-mnist', str(out), '--from', str(DEBIAN_FASHION_MNIST),
                       '--train-per-class', '3', '--val-per-class', '2'])
    train, val = image_folder(out, split='train'), image_folder(out, split='val')
    assert (len(train), len(val)) == (30, 20)
    assert train.classes == sorted(prepare_data.FASHION_CLASSES)
    pixels = np.asarray(Image.open(train.samples[0][0]))
    assert pixels.shape == (32, 32, 3) and pixels.std() > 10  # a real picture, not blank
