"""Input is checked before the expensive work starts, and the same way in every reader of the
same kind of input: labels of both dataset readers of prepare_data.py, packed files in main.py,
evaluate.py and pack.py --check, the flags bench_learning.py hands on to main.py."""
import pickle

import numpy as np
import pytest

import bench_learning
import evaluate
import main
import pack
import prepare_data
from conftest import make_image_folder
from faultcheck import pre  # noqa: F401 - fixtures
from faultcheck import assert_one_error_line, eval_argv, main_argv, run
from test_prepare_data import fake_cifar, fake_fashion_mnist, write_idx


@pytest.mark.parametrize('dataset, label', [('cifar10', -1), ('cifar10', 10),
                                            ('cifar100', 100), ('fashion-mnist', 12)])
def test_both_dataset_readers_refuse_a_label_outside_the_classes(dataset, label, tmp_path,
                                                                 capsys):
    raw = tmp_path / 'raw'
    if dataset == 'fashion-mnist':
        fake_fashion_mnist(raw, compress=False)
        labels = np.arange(23, dtype=np.uint8) % 10
        labels[3] = label
        write_idx(raw / prepare_data.FASHION_FILES['train'][1], labels, compress=False)
    else:
        batches = fake_cifar(raw, dataset)
        name, key = ('data_batch_1', b'labels') if dataset == 'cifar10' else ('train',
                                                                              b'fine_labels')
        batches[name][key][2] = label
        (raw / prepare_data.CIFAR_FOLDERS[dataset] / name).write_bytes(
            pickle.dumps(batches[name]))
    status, lines, _ = run(prepare_data, [dataset, str(tmp_path / 'out'), '--from', str(raw)],
                           capsys)
    assert_one_error_line(status, lines, f'label {label} is not a', 'class (0 to',
                          prog='prepare_data.py')
    assert sorted(p.name for p in tmp_path.iterdir()) == ['raw']  # nothing filed anywhere


def test_size_is_refused_where_it_would_be_ignored(tmp_path, capsys):
    status, lines, _ = run(prepare_data, ['cifar10', str(tmp_path / 'out'), '--from',
                                          str(tmp_path), '--size', '64'], capsys)
    assert status == 2
    assert_one_error_line(status, lines, '--size', 'cifar10 keeps its 32 px')


@pytest.fixture
def damaged_pack(tmp_path):
    """A pack of a tiny folder whose train labels name a class it does not have."""
    tables = pytest.importorskip('tables')
    data = make_image_folder(tmp_path / 'data', per_class=3, val_per_class=1, size=16)
    packed = tmp_path / 'data.h5'
    pack.main([str(data), str(packed), '--workers', '0'])
    with tables.open_file(str(packed), 'a') as h5:
        h5.root.train.labels[1] = 7
    return packed


def test_every_reader_of_a_pack_checks_its_labels_alike(damaged_pack, tmp_path, capsys):
    words = [f'{damaged_pack}:train is inconsistent', 'labels out of the class range']
    for module, argv in ((main, main_argv(damaged_pack, tmp_path / 'ck')),
                         (evaluate, [str(damaged_pack), 'resnet50.pth', '--knn',
                                     '--checkpoint-dir', str(tmp_path / 'knn')]),
                         (pack, ['--check', str(damaged_pack), '--workers', '0'])):
        status, lines, _ = run(module, argv, capsys)
        assert_one_error_line(status, lines, *words)
        assert not (tmp_path / 'ck').exists() and not (tmp_path / 'knn').exists()


def test_pack_checks_its_output_before_listing_the_source(tmp_path, capsys):
    source = make_image_folder(tmp_path / 'data', per_class=1, val_per_class=1, size=16)
    (source / 'val' / 'class_a' / 'class_a_0.JPEG').unlink()  # listing val would fail
    status, lines, _ = run(pack, [str(source), str(tmp_path / 'no' / 'out.h5'), '--workers',
                                  '0'], capsys)
    assert_one_error_line(status, lines, 'out.h5', f'directory {tmp_path / "no"} does not exist',
                          prog='pack.py')


def test_train_files_that_is_a_folder(pre, tmp_path, capsys):
    status, lines, _ = run(evaluate, eval_argv(pre, tmp_path / 'ck', '--train-percent', 1,
                                               '--train-files', tmp_path), capsys)
    assert_one_error_line(status, lines, f'--train-files {tmp_path} is not a file',
                          prog='evaluate.py')


@pytest.mark.parametrize('flags, words', [
    ('--checkpoint-dir elsewhere', ['--checkpoint-dir is set by bench_learning.py']),
    ('--seed=3', ['--seed is set by bench_learning.py']),
    ('--projector "512-512', ['--main-flags', 'No closing quotation']),
])
def test_bench_learning_checks_main_flags_before_preparing_data(flags, words, tmp_path, capsys):
    work = tmp_path / 'work'
    status, lines, _ = run(bench_learning, ['--work-dir', str(work), f'--main-flags={flags}'],
                           capsys)
    assert_one_error_line(status, lines, *words, prog='bench_learning.py')
    assert not work.exists()  # nothing prepared, nothing trained


def test_bench_learning_checks_the_backbone_before_preparing_data(tmp_path, capsys):
    work = tmp_path / 'work'
    status, lines, _ = run(bench_learning, ['--work-dir', str(work), '--pretrained',
                                            str(tmp_path / 'none.pth')], capsys)
    assert_one_error_line(status, lines, 'none.pth', prog='bench_learning.py')
    assert not work.exists()
