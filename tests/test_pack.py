"""pack.py and PackedImageFolder: a packed HDF5 file reads back exactly as the ImageFolder it came
from, an interrupted pack resumes to the same file, bad input is a one-line error, and main.py /
evaluate.py run on the packed file as on the folder (CPU)."""
import json
import os
import pickle
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

tables = pytest.importorskip('tables')

import evaluate  # noqa: E402
import main  # noqa: E402
import pack  # noqa: E402
from conftest import ROOT, make_image_folder  # noqa: E402
from cli import InputError  # noqa: E402
from data import PackedImageFolder, image_folder  # noqa: E402

CLASSES = ('n01440764', 'n01443537')  # ImageNet-style names, so SimCLR-format subset lists apply
ARRAYS = ('data', 'offsets', 'labels', 'names', 'classes')


def make_tree(root):
    """The tiny ImageFolder plus what ImageNet also has: a PNG, a greyscale JPEG, an image in a
    subfolder of its class, and a file that is not an image (ImageFolder ignores it)."""
    make_image_folder(root, classes=CLASSES)
    rng = np.random.default_rng(1)
    a, b = root / 'train' / CLASSES[0], root / 'train' / CLASSES[1]
    Image.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)).save(a / 'n01440764_90.png')
    Image.fromarray(rng.integers(0, 256, (40, 20), dtype=np.uint8)).save(b / 'n01443537_91.JPEG')
    (a / 'extra').mkdir()
    Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(a / 'extra' / 'x.jpg')
    (b / 'notes.txt').write_text('not an image')
    return root


def run_pack(*args):
    """pack.py as a user runs it: a subprocess."""
    return subprocess.run([sys.executable, str(ROOT / 'pack.py'), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def contents(path):
    """Every array of every split, and the split attributes, of a packed file."""
    out = {}
    with tables.open_file(str(path)) as h5:
        for group in h5.iter_nodes('/', 'Group'):
            for name in ARRAYS:
                out[group._v_name, name] = group._f_get_child(name).read()
            out[group._v_name, 'attrs'] = {k: group._v_attrs[k] for k in
                                           ('complete', 'packed', 'scanned', 'skipped', 'source')}
    return out


def assert_same_contents(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if key[1] == 'attrs':
            assert a[key] == b[key], key
        else:
            np.testing.assert_array_equal(a[key], b[key], err_msg=str(key))


@pytest.fixture(scope='module')
def packed(tmp_path_factory):
    """The tree, and its clean pack written with two reading processes."""
    root = tmp_path_factory.mktemp('packed')
    tree = make_tree(root / 'data')
    h5 = root / 'data.h5'
    pack.main([str(tree), str(h5), '--workers', '2'])
    return tree, h5


# ---------------------------------------------------------------------------------------------
# Reading back
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('split', ['train', 'val'])
def test_pack_reads_back_exactly_as_the_image_folder(packed, split):
    tree, h5 = packed
    folder = torchvision.datasets.ImageFolder(tree / split)
    packed_set = image_folder(h5, split=split)
    assert isinstance(packed_set, PackedImageFolder)
    assert packed_set.classes == folder.classes == list(CLASSES)
    assert packed_set.class_to_idx == folder.class_to_idx
    assert packed_set.targets == folder.targets
    assert len(packed_set) == len(folder) == (15 if split == 'train' else 4)
    for (path, label), (packed_path, packed_label) in zip(folder.samples, packed_set.samples):
        assert packed_label == label
        assert packed_path == f'{h5}:{split}/{os.path.relpath(path, tree / split)}'
        assert os.path.basename(packed_path) == os.path.basename(path)
    with tables.open_file(str(h5)) as f:
        group = f.get_node(f'/{split}')
        offsets = group.offsets.read()
        for i, (path, _) in enumerate(folder.samples):  # stored bytes: the files, unchanged
            with open(path, 'rb') as original:
                assert group.data.read(offsets[i], offsets[i + 1]).tobytes() == original.read()
    for i in range(len(folder)):  # decoded pixels, and the label, through __getitem__
        image, label = packed_set[i]
        expected, expected_label = folder[i]
        assert image.mode == 'RGB' and label == expected_label
        np.testing.assert_array_equal(np.asarray(image), np.asarray(expected.convert('RGB')))


def test_each_dataloader_worker_opens_its_own_handle_and_batches_match(packed):
    tree, h5 = packed
    to_tensor = torchvision.transforms.Compose([torchvision.transforms.Resize((16, 16)),
                                                torchvision.transforms.ToTensor()])
    packed_set = image_folder(h5, to_tensor)
    packed_set[0]  # a handle open in this process must neither be pickled nor used by workers
    assert packed_set._h5 is not None
    clone = pickle.loads(pickle.dumps(packed_set))
    assert clone._h5 is None and clone.samples == packed_set.samples

    def batches(dataset, workers):
        loader = torch.utils.data.DataLoader(dataset, batch_size=5, num_workers=workers,
                                             multiprocessing_context='fork' if workers else None)
        return list(loader)
    folder_set = image_folder(tree, to_tensor)
    folder_batches = batches(folder_set, 0)
    packed_batches = batches(HandleOwner(packed_set), 2)
    assert len(packed_batches) == len(folder_batches) == 3
    for (x, y), (px, py, owner, worker) in zip(folder_batches, packed_batches):
        torch.testing.assert_close(px, x, rtol=0, atol=0)
        assert torch.equal(py, y)
        assert torch.equal(owner, worker) and os.getpid() not in worker.tolist()
    packed_set.close()


class HandleOwner(torch.utils.data.Dataset):
    """Each sample with the pid of the process that opened the file handle it was read with."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        image, label = self.dataset[index]
        return image, label, self.dataset._pid, os.getpid()


def test_replaced_samples_are_found_by_name(packed):
    """Callers subset and relabel `samples` as they do an ImageFolder's (evaluate.py)."""
    tree, h5 = packed
    packed_set = image_folder(h5)
    chosen = [packed_set.samples[i] for i in (9, 2, 14)]
    packed_set.samples = [(str(os.path.normpath(p)), 1 - t) for p, t in chosen]
    for k, (path, target) in enumerate(chosen):
        image, label = packed_set[k]
        np.testing.assert_array_equal(
            np.asarray(image), np.asarray(Image.open(tree / 'train' / path.split(':train/')[1])
                                          .convert('RGB')))
        assert label == 1 - target
    packed_set.samples = [(f'{h5}:train/n01440764/not_there.JPEG', 0)]
    with pytest.raises(InputError, match=r'not_there.JPEG is not an image of'):
        packed_set[0]


def test_check_passes_then_names_a_damaged_image(packed, tmp_path, capsys):
    _, h5 = packed
    pack.main(['--check', str(h5), '--workers', '0'])
    assert capsys.readouterr().err.splitlines()[-1] == f'{h5}: OK'

    damaged = tmp_path / 'damaged.h5'
    damaged.write_bytes(h5.read_bytes())
    with tables.open_file(str(damaged), 'a') as f:
        group = f.root.train
        begin, end = group.offsets[3], group.offsets[4]
        group.data[begin + 2:end] = np.zeros(end - begin - 2, np.uint8)  # keeps the JPEG marker
        name = group.names[3].decode()
    with pytest.raises(SystemExit) as exit_info:
        pack.main(['--check', str(damaged), '--workers', '0'])
    assert str(exit_info.value).startswith(f'pack.py: error: 1 stored image(s) do not decode; '
                                           f'first: cannot read image {damaged}:train/{name}: ')
    with pytest.raises(InputError, match=f'^cannot read image {damaged}:train/{name}: '):
        image_folder(damaged)[3]


def test_image_folder_refuses_a_missing_split_an_unfinished_pack_or_another_file(packed,
                                                                                 tmp_path):
    tree, h5 = packed
    with pytest.raises(InputError, match=r"has no split 'test' \(splits in it: train, val\)"):
        image_folder(h5, split='test')
    with pytest.raises(InputError, match=r'^packed file .*missing.h5 does not exist$'):
        image_folder(tmp_path / 'missing.h5')
    other = tmp_path / 'other.hdf5'
    with tables.open_file(str(other), 'w') as f:
        f.create_array('/', 'x', np.zeros(3))
    with pytest.raises(InputError, match=r'other.hdf5 is not a file written by pack.py$'):
        image_folder(other)
    (tmp_path / 'junk.h5').write_bytes(b'not hdf5 at all')
    with pytest.raises(InputError,
                       match=r'junk.h5 is not an HDF5 file \(expected one written by pack.py\)$'):
        image_folder(tmp_path / 'junk.h5')
    unfinished = tmp_path / 'unfinished.h5'
    unfinished.write_bytes(h5.read_bytes())
    with tables.open_file(str(unfinished), 'a') as f:
        f.root.val._v_attrs.complete = False
    with pytest.raises(InputError, match=r"split 'val' is not finished .*rerun the pack.py"):
        image_folder(unfinished, split='val')


def test_without_pytables_only_packed_files_need_it(packed, monkeypatch):
    tree, h5 = packed
    monkeypatch.setitem(sys.modules, 'tables', None)  # as if not installed
    assert len(image_folder(tree)) == 15
    with pytest.raises(InputError, match=r'data.h5: packed datasets need PyTables '
                                         r'\(pip install tables\)$'):
        image_folder(h5)


# ---------------------------------------------------------------------------------------------
# Interruptions and bad input
# ---------------------------------------------------------------------------------------------

class Crash(Exception):
    pass


def test_interrupted_pack_drops_its_uncommitted_tail_and_resumes(packed, tmp_path, monkeypatch,
                                                                capsys):
    tree, clean = packed
    h5 = tmp_path / 'out.h5'
    append, calls = pack.append, []

    def crashing_append(*args):
        calls.append(1)
        if len(calls) == 8:
            raise Crash  # after 7 records: 6 committed (every 3), 1 appended past the commit
        return append(*args)
    monkeypatch.setattr(pack, 'append', crashing_append)
    with pytest.raises(Crash):
        pack.main([str(tree), str(h5), '--workers', '0', '--commit-every', '3'])
    with tables.open_file(str(h5)) as f:
        attrs = f.root.train._v_attrs
        assert (attrs.packed, attrs.scanned, bool(attrs.complete)) == (6, 6, False)
        assert f.root.train.labels.nrows == 7  # the uncommitted record reached the file
    with pytest.raises(InputError, match='is not finished'):
        image_folder(h5)

    monkeypatch.setattr(pack, 'append', append)
    capsys.readouterr()
    pack.main([str(tree), str(h5), '--workers', '0', '--commit-every', '3'])
    assert 'continuing after 6' in capsys.readouterr().err
    assert_same_contents(contents(h5), contents(clean))


SLOW_PACK = '''
import sys, time
sys.path.insert(0, {root!r})
import pack
append = pack.append
def slow_append(*args):
    end = append(*args)
    print('appended', flush=True)
    time.sleep(0.05)
    return end
pack.append = slow_append
pack.main(sys.argv[1:])
'''


def test_killed_pack_resumes_to_the_same_file(packed, tmp_path, capsys):
    tree, clean = packed
    h5, script = tmp_path / 'out.h5', tmp_path / 'slow_pack.py'
    script.write_text(SLOW_PACK.format(root=str(ROOT)))
    proc = subprocess.Popen([sys.executable, str(script), str(tree), str(h5), '--workers', '2',
                             '--commit-every', '5'], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        for _ in range(13):
            assert proc.stdout.readline() == 'appended\n'
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the packer and its reading processes, mid-write
        proc.wait()
        proc.stdout.close()
    with tables.open_file(str(h5)) as f:
        committed = int(f.root.train._v_attrs.packed)
    assert committed >= 10 and committed % 5 == 0

    capsys.readouterr()
    pack.main([str(tree), str(h5), '--workers', '2'])
    assert f'continuing after {committed}' in capsys.readouterr().err
    assert_same_contents(contents(h5), contents(clean))


def test_corrupt_image_stops_the_pack_naming_it_then_resumes_once_removed(tmp_path, capsys):
    tree = make_tree(tmp_path / 'data')
    bad = tree / 'train' / CLASSES[1] / 'n01443537_3.JPEG'
    bad.write_bytes(bad.read_bytes()[:300])  # truncated
    h5 = tmp_path / 'out.h5'
    result = run_pack(tree, h5, '--workers', '2')
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f'pack.py: error: cannot read image {bad}: ')
    assert '--skip-bad' in last and 'Traceback' not in result.stderr

    bad.unlink()  # the images packed before it are kept: the pack continues after them
    pack.main([str(tree), str(h5), '--workers', '0'])
    assert 'continuing after 11' in capsys.readouterr().err
    folder = torchvision.datasets.ImageFolder(tree / 'train')
    packed_set = image_folder(h5)
    assert [os.path.relpath(p, tree / 'train') for p, _ in folder.samples] == \
        [p.split(':train/')[1] for p, _ in packed_set.samples]


def test_skip_bad_leaves_unreadable_images_out_and_lists_them(tmp_path, capsys):
    tree = make_tree(tmp_path / 'data')
    bad = [tree / 'train' / CLASSES[0] / 'n01440764_2.JPEG',
           tree / 'val' / CLASSES[1] / 'n01443537_0.JPEG']
    bad[0].write_bytes(b'')
    bad[1].write_bytes(bad[1].read_bytes()[:200])
    h5 = tmp_path / 'out.h5'
    pack.main([str(tree), str(h5), '--workers', '0', '--skip-bad'])
    err = capsys.readouterr().err
    listed = err[err.index('skipped 2 unreadable image(s)'):].splitlines()
    assert listed[1:3] == [f'  train/{CLASSES[0]}/n01440764_2.JPEG',
                           f'  val/{CLASSES[1]}/n01443537_0.JPEG']
    with tables.open_file(str(h5)) as f:
        assert json.loads(f.root.train._v_attrs.skipped) == [f'train/{CLASSES[0]}/n01440764_2.JPEG']
    for split in ('train', 'val'):
        folder = torchvision.datasets.ImageFolder(tree / split)
        expected = [(os.path.relpath(p, tree / split), t) for p, t in folder.samples
                    if p not in map(str, bad)]
        assert [(p.split(f':{split}/')[1], t) for p, t in image_folder(h5, split=split).samples] \
            == expected


def test_bad_input_is_a_one_line_error(packed, tmp_path, capsys):
    tree, h5 = packed

    def error(*argv):
        with pytest.raises(SystemExit) as exit_info:
            pack.main([*map(str, argv), '--workers', '0'])
        message = str(exit_info.value)
        assert message.startswith('pack.py: error: ') and '\n' not in message, message
        return message
    assert error(tmp_path / 'nowhere', tmp_path / 'a.h5').endswith('nowhere does not exist')
    only_train = tmp_path / 'only_train'
    make_image_folder(only_train, per_class=1)
    (only_train / 'val').rename(only_train / 'validation')
    assert 'only_train/val not found: expected the ImageFolder layout' in \
        error(only_train, tmp_path / 'b.h5')
    assert not (tmp_path / 'b.h5').exists()  # nothing written before every split is listed
    (only_train / 'train' / 'empty_class').mkdir()
    assert 'Found no valid file for the classes empty_class' in \
        error(only_train, tmp_path / 'b.h5', '--splits', 'train')
    assert error(tree, tmp_path / 'no_dir' / 'c.h5').endswith(
        f'cannot write {tmp_path}/no_dir/c.h5: directory {tmp_path}/no_dir does not exist')
    not_a_pack = tmp_path / 'd.h5'
    not_a_pack.write_bytes(b'precious')
    assert 'is not an HDF5 file' in error(tree, not_a_pack)
    assert not_a_pack.read_bytes() == b'precious'

    # An existing pack from another tree, or of other classes, is never mixed with this one.
    copy = tmp_path / 'copy'
    make_tree(copy)
    assert 'was packed from' in error(copy, h5)
    renamed = tmp_path / 'renamed.h5'
    renamed.write_bytes(h5.read_bytes())
    with tables.open_file(str(renamed), 'a') as f:
        f.root.train._v_attrs.source = str((copy / 'train').resolve())
        f.root.val._v_attrs.source = str((copy / 'val').resolve())
    (copy / 'train' / CLASSES[1]).rename(copy / 'train' / 'n09999999')
    assert 'has other classes than' in error(copy, renamed)
    (copy / 'train' / 'n09999999').rename(copy / 'train' / CLASSES[1])
    (copy / 'train' / CLASSES[0] / 'n01440764_0.JPEG').unlink()
    assert 'holds other files than' in error(copy, renamed)
    capsys.readouterr()


# ---------------------------------------------------------------------------------------------
# main.py and evaluate.py on a packed file
# ---------------------------------------------------------------------------------------------

from test_main import assert_same_tensors as assert_same_weights, load_state as load  # noqa: E402


def pretrain_args(data, ckdir, workers):
    return [str(data), '--arch', 'resnet18', '--cifar-stem', '--crop-size', '16', '--projector',
            '32-32', '--batch-size', '4', '--epochs', '1', '--workers', str(workers), '--device',
            'cpu', '--checkpoint-dir', str(ckdir), '--print-freq', '1']


def test_main_trains_one_epoch_from_a_packed_file(packed, tmp_path):
    _, h5 = packed
    main.main(pretrain_args(h5, tmp_path / 'ck', workers=2))
    assert (tmp_path / 'ck' / 'resnet18.pth').is_file()
    assert str(h5) in (tmp_path / 'ck' / 'stats.txt').read_text().splitlines()[0]


def test_fast_augment_reads_the_packed_bytes_like_the_files(packed, tmp_path):
    tree, h5 = packed
    main.main(pretrain_args(tree, tmp_path / 'folder', workers=0) + ['--fast-augment'])
    main.main(pretrain_args(h5, tmp_path / 'packed', workers=0) + ['--fast-augment'])
    assert_same_weights(load(tmp_path / 'packed' / 'resnet18.pth'),
                        load(tmp_path / 'folder' / 'resnet18.pth'))


@pytest.fixture(scope='module')
def pretrained_both_ways(packed, tmp_path_factory):
    tree, h5 = packed
    root = tmp_path_factory.mktemp('pretrained')
    main.main(pretrain_args(tree, root / 'folder', workers=0))
    main.main(pretrain_args(h5, root / 'packed', workers=0))
    return root / 'folder', root / 'packed'


def test_main_on_the_packed_file_gives_bit_identical_weights(pretrained_both_ways):
    folder, packed_dir = pretrained_both_ways
    assert_same_weights(load(packed_dir / 'resnet18.pth'), load(folder / 'resnet18.pth'))


def test_evaluate_subset_selects_the_same_images_from_the_pack(packed, tmp_path):
    tree, h5 = packed
    listed = ['n01440764_0.JPEG', 'n01443537_5.JPEG', 'n01440764_3.JPEG', 'n01440764_90.png']
    list_file = tmp_path / '1percent.txt'
    list_file.write_text('\n'.join(listed) + '\n')

    def datasets(data):
        args = evaluate.parse_arguments([str(data), 'unused.pth', '--train-perc', '1',
                                         '--train-files', str(list_file)])
        return evaluate.build_datasets(args, None)
    (folder_train, folder_val), (packed_train, packed_val) = datasets(tree), datasets(h5)
    assert [os.path.basename(p) for p, _ in packed_train.samples] == listed
    assert packed_train.targets == folder_train.targets == [0, 1, 0, 0]
    assert packed_val.targets == folder_val.targets
    for i in range(len(listed)):
        np.testing.assert_array_equal(np.asarray(packed_train[i][0]),
                                      np.asarray(folder_train[i][0]))


def test_evaluate_on_the_packed_file_gives_bit_identical_classifier(pretrained_both_ways,
                                                                   packed, tmp_path):
    tree, h5 = packed
    backbone = pretrained_both_ways[0] / 'resnet18.pth'
    for data, ckdir in ((tree, tmp_path / 'folder'), (h5, tmp_path / 'packed')):
        evaluate.main([str(data), str(backbone), '--arch', 'resnet18', '--cifar-stem',
                       '--crop-size', '16', '--batch-size', '4', '--epochs', '1', '--workers', '0',
                       '--device', 'cpu', '--print-freq', '1', '--checkpoint-dir', str(ckdir)])
    folder_ck, packed_ck = (load(tmp_path / d / 'checkpoint.pth') for d in ('folder', 'packed'))
    assert_same_weights(packed_ck['model'], folder_ck['model'])
    assert packed_ck['best_acc'] == folder_ck['best_acc']
