"""evaluate.py: linear probe / fine-tuning end to end, subsets, pretrained formats, kNN (CPU)."""
import io
import json
import math
import os
import pickle
import subprocess
import sys
import types
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn
from torch.utils.data import TensorDataset

import backbones
import cli
import checkpoints
import data
import distributed
import evaluate
import knn
import main
import ranks
from conftest import ROOT, SHARED_SUBSETS, make_image_folder
from cli import InputError

TRAIN_KEYS = {'epoch', 'step', 'lr_backbone', 'lr_classifier', 'loss', 'time'}
# the reference's epoch line, plus the epoch's mean training loss and its learning rates
EPOCH_KEYS = {'epoch', 'acc1', 'acc5', 'best_acc1', 'best_acc5', 'train_loss', 'lr_classifier',
              'lr_backbone'}
CLASSES = ('n01440764', 'n01443537')  # ImageNet-style names, so SimCLR-format lists apply


def pretrained_outputs(tmp_path_factory):
    """A tiny ImageFolder (2 classes, 6 train + 2 val images each) and main.py's outputs on it
    (resnet18.pth, checkpoint.pth), made once per test session (test_hubconf uses them too)."""
    root = tmp_path_factory.getbasetemp() / 'pretrained'
    data, ckdir = root / 'data', root / 'ck'
    if not (ckdir / 'resnet18.pth').is_file():
        make_image_folder(data, classes=CLASSES)
        main.main([str(data), '--arch', 'resnet18', '--cifar-stem', '--crop-size', '32',
                   '--projector', '32-32', '--batch-size', '4', '--epochs', '1', '--workers',
                   '0', '--device', 'cpu', '--checkpoint-dir', str(ckdir), '--print-freq', '1'])
    return types.SimpleNamespace(data=data, ckdir=ckdir, backbone=ckdir / 'resnet18.pth',
                                 checkpoint=ckdir / 'checkpoint.pth')


@pytest.fixture(scope='module')
def pre(tmp_path_factory):
    return pretrained_outputs(tmp_path_factory)


def eval_args(pre, ckdir, *extra, epochs=2, pretrained=None):
    ck = [] if ckdir is None else ['--checkpoint-dir', str(ckdir)]
    return [str(pre.data), str(pretrained or pre.backbone), '--arch', 'resnet18', '--cifar-stem',
            '--crop-size', '32', '--batch-size', '4', '--epochs', str(epochs), '--workers', '0',
            '--device', 'cpu', '--print-freq', '1', *ck, *extra]


def read_stats(ckdir):
    lines = (ckdir / 'stats.txt').read_text().splitlines()
    stats = [json.loads(line) for line in lines if line.startswith('{')]
    return (lines, [s for s in stats if 'step' in s], [s for s in stats if 'acc1' in s])


def load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def backbone_of(ckpt):
    return {k[len('module.'):]: v for k, v in ckpt['model'].items()
            if not k.startswith('module.fc.')}


# ---------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------

def test_freeze_keeps_backbone_bit_identical_logs_and_resumes(pre, tmp_path):
    ckdir = tmp_path / 'lincls'
    evaluate.main(eval_args(pre, ckdir, epochs=2))

    lines, steps, epochs = read_stats(ckdir)
    assert lines[0].startswith('evaluate.py ') and '--cifar-stem' in lines[0]
    assert all(set(s) == TRAIN_KEYS for s in steps) and all(set(s) == EPOCH_KEYS for s in epochs)
    assert [s['step'] for s in steps] == list(range(6))  # 12 images / batch 4, two epochs
    assert [s['lr_backbone'] for s in steps] == [0] * 6
    # cosine annealing over 2 epochs, stepped per epoch: 0.3, then 0.3 * (1 + cos(pi / 2)) / 2
    assert [s['lr_classifier'] for s in steps] == pytest.approx([0.3] * 3 + [0.15] * 3)
    assert [e['epoch'] for e in epochs] == [0, 1]
    for i, e in enumerate(epochs):
        assert e['acc1'] * 4 / 100 == pytest.approx(round(e['acc1'] * 4 / 100))  # 4 val images
        assert e['acc5'] == 100.0  # two classes: top-5 always holds the answer
        assert e['best_acc1'] == max(x['acc1'] for x in epochs[:i + 1])

    ckpt = load(ckdir / 'checkpoint.pth')
    assert {'epoch', 'best_acc', 'model', 'optimizer', 'scheduler'} <= set(ckpt)
    assert ckpt['epoch'] == 2 and ckpt['model']['module.fc.weight'].shape == (2, 512)
    pretrained = load(pre.backbone)
    trained = backbone_of(ckpt)
    assert trained.keys() == pretrained.keys()
    for k in pretrained:  # weights and BatchNorm running statistics, bit for bit
        assert torch.equal(trained[k], pretrained[k]), k

    evaluate.main(eval_args(pre, ckdir, epochs=3))  # resumes at epoch 2
    lines, steps, epochs = read_stats(ckdir)
    assert [s['step'] for s in steps] == list(range(9))
    assert [e['epoch'] for e in epochs] == [0, 1, 2]
    assert epochs[2]['best_acc1'] == max(e['acc1'] for e in epochs)
    assert load(ckdir / 'checkpoint.pth')['epoch'] == 3


def test_finetune_changes_backbone_in_its_own_default_dir(pre, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    evaluate.main(eval_args(pre, None, '--weights', 'finetune', '--lr-backbone', '0.05',
                            epochs=1))
    ckdir = tmp_path / 'checkpoint' / 'finetune'
    _, steps, epochs = read_stats(ckdir)
    assert steps[0]['lr_backbone'] == 0.05 and len(epochs) == 1
    pretrained = load(pre.backbone)
    trained = backbone_of(load(ckdir / 'checkpoint.pth'))
    assert not torch.equal(trained['conv1.weight'], pretrained['conv1.weight'])
    assert not torch.equal(trained['bn1.running_mean'], pretrained['bn1.running_mean'])
    assert not (tmp_path / 'checkpoint' / 'lincls').exists()


@pytest.mark.parametrize('flags, expected', [
    ([], 'checkpoint/lincls'),
    (['--train-perc', '10'], 'checkpoint/lincls_10pct'),
    (['--weights', 'finetune'], 'checkpoint/finetune'),
    (['--weights', 'finetune', '--train-perc', '1'], 'checkpoint/semisup_1pct'),
    (['--weights', 'finetune', '--train-percent', '10'], 'checkpoint/semisup_10pct'),
    (['--knn'], 'checkpoint/knn'),
])
def test_default_checkpoint_dirs_differ_per_mode(flags, expected):
    args = evaluate.parse_arguments(['data', 'resnet50.pth', *flags])
    assert args.checkpoint_dir.as_posix() == expected


def test_reference_defaults(monkeypatch):
    monkeypatch.setattr(cli, 'usable_cpus', lambda: 64)
    args = evaluate.parse_arguments(['data', 'resnet50.pth'])
    assert (args.weights, args.train_percent, args.workers, args.epochs, args.batch_size,
            args.lr_backbone, args.lr_classifier, args.weight_decay, args.print_freq) \
        == ('freeze', 100, 8, 100, 256, 0.0, 0.3, 1e-6, 100)
    assert (args.knn_k, args.knn_temperature, args.arch, args.crop_size) \
        == ((20, 200), 0.07, 'resnet50', 224)


def test_resume_refuses_another_kind_of_run(pre, tmp_path, capsys):
    ckdir = tmp_path / 'ck'
    ckdir.mkdir()
    checkpoints.save_atomic(dict(epoch=1, best_acc=dict(top1=0, top5=0), model={}, optimizer={},
                          scheduler={}, args=dict(weights='freeze', train_percent=100)),
                     ckdir / 'checkpoint.pth')
    with pytest.raises(SystemExit) as exit_info:  # before any process starts: one line
        evaluate.main(eval_args(pre, ckdir, '--weights', 'finetune'))
    err = str(exit_info.value.code)
    assert err.startswith('evaluate.py: error:') and '\n' not in err
    assert '--weights freeze' in err and 'use another --checkpoint-dir' in err

    # a pretraining directory's checkpoint.pth is not taken for a linear probe's
    (tmp_path / 'pre').mkdir()
    checkpoints.save_atomic(load(pre.checkpoint), tmp_path / 'pre' / 'checkpoint.pth')
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(eval_args(pre, tmp_path / 'pre'))
    assert 'holds a pretraining run (main.py' in str(exit_info.value.code)


# ---------------------------------------------------------------------------------------------
# Subsets
# ---------------------------------------------------------------------------------------------

def test_subset_list_selects_exactly_the_listed_images(pre, tmp_path):
    listed = ['n01440764_0.JPEG', 'n01443537_5.JPEG', 'n01440764_3.JPEG']
    list_file = tmp_path / '1percent.txt'
    list_file.write_text('\n'.join(listed) + '\n')
    args = evaluate.parse_arguments(eval_args(pre, tmp_path / 'ck', '--train-perc', '1',
                                              '--train-files', str(list_file)))
    train_set, val_set = evaluate.build_datasets(args, None)
    assert [(p, t) for p, t in train_set.samples] == [
        (str(pre.data / 'train' / name.split('_')[0] / name), CLASSES.index(name.split('_')[0]))
        for name in listed]
    assert train_set.targets == [0, 1, 0] and len(val_set) == 4

    ckdir = tmp_path / 'ck'
    evaluate.main(eval_args(pre, ckdir, '--train-perc', '1', '--train-files', str(list_file),
                            '--batch-size', '1', epochs=1))
    _, steps, _ = read_stats(ckdir)
    assert [s['step'] for s in steps] == [0, 1, 2]  # 3 images at batch 1, not 12


def test_subset_list_naming_missing_images_fails_listing_them(pre, tmp_path, capsys):
    list_file = tmp_path / 'list.txt'
    list_file.write_text('n01440764_0.JPEG\nn01440764_99.JPEG\nn09999999_1.JPEG\n')
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(eval_args(pre, tmp_path / 'ck', '--train-perc', '10',
                                '--train-files', str(list_file)))
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert '\n' not in err and '2 of the 3 images' in err
    assert 'n01440764/n01440764_99.JPEG' in err and 'n09999999/n09999999_1.JPEG' in err
    assert not (tmp_path / 'ck' / 'checkpoint.pth').exists()


class FakeNetwork:
    def __init__(self, body=None):
        self.body, self.urls = body, []

    def __call__(self, url, timeout=None):
        self.urls.append(url)
        if self.body is None:
            raise urllib.error.URLError('no network')
        return io.BytesIO(self.body)


def test_subset_list_downloaded_once_then_cached(tmp_path, monkeypatch):
    net = FakeNetwork(b'n01440764_10026.JPEG\nn01443537_2.JPEG\n')
    monkeypatch.setattr(urllib.request, 'urlopen', net)
    path = evaluate.subset_list_file(1, None, tmp_path / 'cache')
    assert path == tmp_path / 'cache' / '1percent.txt'
    assert evaluate.read_subset_list(path) == ['n01440764_10026.JPEG', 'n01443537_2.JPEG']
    assert net.urls == ['https://raw.githubusercontent.com/google-research/simclr/master/'
                        'imagenet_subsets/1percent.txt']
    assert evaluate.subset_list_file(1, None, tmp_path / 'cache') == path
    assert len(net.urls) == 1  # the cache is used
    assert sorted(p.name for p in (tmp_path / 'cache').iterdir()) == ['1percent.txt']

    # an error page instead of the list is refused and not cached
    monkeypatch.setattr(urllib.request, 'urlopen', FakeNetwork(b'<html>Rate limited</html>'))
    with pytest.raises(InputError, match='--train-files'):
        evaluate.subset_list_file(10, None, tmp_path / 'cache')
    assert not (tmp_path / 'cache' / '10percent.txt').exists()


def test_subset_list_offline_without_cache_says_what_to_do(pre, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(urllib.request, 'urlopen', FakeNetwork())
    cache = tmp_path / 'cache'
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(eval_args(pre, tmp_path / 'ck', '--train-perc', '10',
                                '--subset-cache-dir', str(cache)))
    err = str(exit_info.value.code)
    assert err.startswith('evaluate.py: error:') and 'no network' in err
    assert '--train-files' in err and str(cache / '10percent.txt') in err


def test_subset_flags_are_checked(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate.parse_arguments(['data', 'x.pth', '--train-files', 'list.txt'])
    assert exit_info.value.code == 2
    assert '--train-percent 1 or 10' in capsys.readouterr().err
    bad = tmp_path / 'bad.txt'
    bad.write_text('train/n01440764/n01440764_1.JPEG\n')
    with pytest.raises(InputError, match='first bad line'):
        evaluate.read_subset_list(bad)


@pytest.mark.skipif(not SHARED_SUBSETS.is_dir(), reason='shared subset lists not present')
@pytest.mark.parametrize('percent, count', [(1, 12811), (10, 128116)])
def test_real_simclr_lists_parse(percent, count):
    names = evaluate.read_subset_list(SHARED_SUBSETS / f'{percent}percent.txt')
    assert len(names) == count and len(set(names)) == count
    classes = {name.split('_')[0] for name in names}
    assert len(classes) == 1000 and all(c.startswith('n') and len(c) == 9 for c in classes)


# ---------------------------------------------------------------------------------------------
# Pretrained files
# ---------------------------------------------------------------------------------------------

def exclude_bias_and_norm(p):  # pickled as __main__.exclude_bias_and_norm, as the original did
    return p.ndim == 1


def save_original_checkpoint(path, model_state, monkeypatch):
    """A checkpoint.pth as the earlier release wrote it: DDP keys, a pickled LARS filter."""
    exclude_bias_and_norm.__module__ = '__main__'
    monkeypatch.setattr(sys.modules['__main__'], 'exclude_bias_and_norm', exclude_bias_and_norm,
                        raising=False)
    optimizer = {'state': {}, 'param_groups': [{'params': [0], 'lr': 0.2,
                                                'weight_decay_filter': exclude_bias_and_norm,
                                                'lars_adaptation_filter': exclude_bias_and_norm}]}
    torch.save(dict(epoch=1000, model=model_state, optimizer=optimizer), path)
    monkeypatch.delattr(sys.modules['__main__'], 'exclude_bias_and_norm')


def test_each_pretrained_format_loads(pre, tmp_path, monkeypatch):
    reference = load(pre.backbone)
    files = {'backbone': pre.backbone, 'main.py checkpoint': pre.checkpoint}
    full = load(pre.checkpoint)['model']
    files['original checkpoint'] = tmp_path / 'original.pth'
    save_original_checkpoint(files['original checkpoint'], full, monkeypatch)
    with pytest.raises(pickle.UnpicklingError):  # the pickled function needs main.py's loader
        load(files['original checkpoint'])
    files['torchvision-style with fc'] = tmp_path / 'tv.pth'
    with_fc = dict(reference, **{'fc.weight': torch.randn(1000, 512), 'fc.bias': torch.randn(1000)})
    torch.save(with_fc, files['torchvision-style with fc'])
    files['DDP backbone'] = tmp_path / 'ddp.pth'
    torch.save({f'module.{k}': v for k, v in reference.items()}, files['DDP backbone'])
    for what, path in files.items():
        state = backbones.load_backbone_state(path, 'resnet18', cifar_stem=True)
        assert state.keys() == reference.keys(), what
        assert all(torch.equal(state[k], reference[k]) for k in reference), what

    tv = torchvision.models.resnet18().state_dict()  # a real torchvision checkpoint
    torch.save(tv, tmp_path / 'resnet18-tv.pth')
    state = backbones.load_backbone_state(tmp_path / 'resnet18-tv.pth', 'resnet18', False)
    assert state.keys() == {k for k in tv if not k.startswith('fc.')}


def test_wrong_pretrained_files_fail_naming_keys(pre, tmp_path):
    with pytest.raises(InputError, match=r'missing: .*layer1\.0\.bn3\.bias'):
        backbones.load_backbone_state(pre.backbone, 'resnet50')  # a resnet18 file
    torch.save({'foo.weight': torch.zeros(3)}, tmp_path / 'random.pth')
    with pytest.raises(InputError, match=r'missing: bn1\.bias.*unexpected: foo\.weight'):
        backbones.load_backbone_state(tmp_path / 'random.pth', 'resnet18', True)
    one_short = load(pre.backbone)
    del one_short['layer2.0.bn1.running_var']
    torch.save(one_short, tmp_path / 'short.pth')
    with pytest.raises(InputError, match=r'missing: layer2\.0\.bn1\.running_var$'):
        backbones.load_backbone_state(tmp_path / 'short.pth', 'resnet18', True)
    with pytest.raises(InputError, match='pretrained with --arch resnet18 --cifar-stem'):
        backbones.load_backbone_state(pre.checkpoint, 'resnet50')
    torch.save({'epoch': 3}, tmp_path / 'meta.pth')
    with pytest.raises(InputError, match='non-tensor entries epoch'):
        backbones.load_backbone_state(tmp_path / 'meta.pth', 'resnet18', True)
    (tmp_path / 'text.pth').write_text('not a checkpoint')
    with pytest.raises(InputError, match='cannot read checkpoint .*text.pth'):
        backbones.load_backbone_state(tmp_path / 'text.pth', 'resnet18', True)


def test_cli_bad_pretrained_file_is_one_line_error(pre, tmp_path):
    torch.save({'foo.weight': torch.zeros(3)}, tmp_path / 'bad.pth')
    proc = subprocess.run([sys.executable, str(ROOT / 'evaluate.py'), str(pre.data),
                           str(tmp_path / 'bad.pth'), '--arch', 'resnet18', '--device', 'cpu'],
                          capture_output=True, text=True, cwd=tmp_path,
                          env=dict(os.environ, CUDA_VISIBLE_DEVICES=''))
    assert proc.returncode != 0
    err = proc.stderr.strip()
    assert err.startswith('evaluate.py: error:') and '\n' not in err
    assert 'missing: bn1.bias' in err and 'unexpected: foo.weight' in err
    assert not (tmp_path / 'checkpoint').exists()


# ---------------------------------------------------------------------------------------------
# kNN
# ---------------------------------------------------------------------------------------------

def unit(*angles_deg):
    a = torch.tensor(angles_deg, dtype=torch.float64) * math.pi / 180
    return torch.stack([a.cos(), a.sin()], dim=1)


def test_knn_weighted_vote_known_answers():
    # One class-0 neighbour almost on the query, two class-1 neighbours further away.
    bank = unit(0, 37, -37, 180)
    labels = torch.tensor([0, 1, 1, 0])
    query = unit(1)
    # cos 1deg ~ 1.0 vs cos 36/38deg ~ 0.8: exp(1/0.07) = 1.6e6 > 2 exp(0.8/0.07) = 1.9e5
    assert knn.knn_predict(query, bank, labels, 2, k=3, t=0.07).tolist() == [0]
    # with a flat temperature the weights are nearly equal: the majority (class 1) wins
    assert knn.knn_predict(query, bank, labels, 2, k=3, t=100.0).tolist() == [1]
    # k=1 is the nearest neighbour; k beyond the bank size is capped (all 4 vote)
    assert knn.knn_predict(unit(179), bank, labels, 2, k=1).tolist() == [0]
    three_ones = torch.tensor([0, 1, 1, 1])
    assert knn.knn_predict(unit(1), bank, three_ones, 2, k=200, t=100.0).tolist() == [1]
    # cosine similarity: the scale of features and bank rows does not matter; chunking neither
    queries = unit(1, 40, -30, 170, 90)
    expected = knn.knn_predict(queries, bank, labels, 2, k=3)
    assert expected.tolist() == [0, 1, 1, 0, 1]
    assert torch.equal(knn.knn_predict(queries * 7, bank * 3, labels, 2, k=3,
                                            chunk_size=2), expected)


def test_fast_linear_probe_logs_what_its_saved_classifier_scores(pre, tmp_path):
    ckdir = tmp_path / 'fast_linear'
    evaluate.main(eval_args(pre, ckdir, '--fast-linear', '--weight-decay', '0.01',
                            pretrained=pre.checkpoint))
    lines = (ckdir / 'stats.txt').read_text().splitlines()
    assert lines[0].startswith('evaluate.py ') and len(lines) == 2
    stats = json.loads(lines[1])
    assert (stats['train_size'], stats['val_size'], stats['weight_decay']) == (12, 4, 0.01)
    # The arithmetic again, by hand: the backbone's features of the 4 validation images (the
    # validation transform: resize 37, centre crop 32), standardised with the saved statistics,
    # times the saved weights; the logged top-1 is the share of right answers.
    state = load(ckdir / 'linear.pth')
    assert set(state) == {'mean', 'std', 'linear.weight', 'linear.bias', 'classes', 'args'}
    assert state['classes'] == sorted(p.name for p in (pre.data / 'train').iterdir())
    assert state['args']['pretrained'] == str(pre.checkpoint)
    assert state['linear.weight'].shape == (2, 512) and torch.isfinite(state['linear.weight']).all()
    net, _ = backbones.build_backbone('resnet18', cifar_stem=True)
    net.load_state_dict(load(pre.backbone))
    net.eval()
    val = torchvision.datasets.ImageFolder(pre.data / 'val', evaluate.val_transform(32))
    with torch.no_grad():
        x = torch.stack([img for img, _ in val])
        logits = ((net(x) - state['mean']) / state['std']) @ state['linear.weight'].T \
            + state['linear.bias']
    right = (logits.argmax(dim=1) == torch.tensor(val.targets)).sum().item()
    assert stats['fast_linear'] == {'acc1': 100.0 * right / 4, 'acc5': 100.0}


def test_fast_linear_probe_refuses_other_modes(pre, tmp_path, capsys):
    for extra in (['--knn'], ['--weights', 'finetune']):
        with pytest.raises(SystemExit) as exit_info:
            evaluate.main(eval_args(pre, tmp_path / 'x', '--fast-linear', *extra))
        assert exit_info.value.code == 2
        assert '--fast-linear fits a classifier on frozen features' in capsys.readouterr().err
    assert evaluate.default_checkpoint_dir('freeze', 1, fast_linear=True) == \
        Path('./checkpoint/fast_linear_1pct/')


def toy_knn_sets():
    bank = unit(0, 10, -10, 90, 100, 80).float()
    bank_labels = torch.tensor([0, 0, 0, 1, 1, 1])
    queries = unit(5, -5, 85, 95, 20).float()
    query_labels = torch.tensor([0, 0, 1, 0, 1])  # 4th and 5th are on the other class's side
    return TensorDataset(bank, bank_labels), TensorDataset(queries, query_labels)


def test_knn_evaluate_known_accuracy():
    bank_set, query_set = toy_knn_sets()
    info = distributed.DistInfo(0, 0, 1, torch.device('cpu'))
    top1 = knn.knn_evaluate(nn.Identity(), data.make_eval_loader(bank_set, 4, 0, info),
                                 data.make_eval_loader(query_set, 2, 0, info),
                                 torch.device('cpu'), ks=(1, 3))
    assert top1 == {1: 60.0, 3: 60.0}


def test_knn_cli_logs_top1_per_k(pre, tmp_path):
    ckdir = tmp_path / 'knn'
    evaluate.main(eval_args(pre, ckdir, '--knn', pretrained=pre.checkpoint))
    lines = (ckdir / 'stats.txt').read_text().splitlines()
    assert lines[0].startswith('evaluate.py ') and len(lines) == 2
    stats = json.loads(lines[1])
    assert set(stats['knn_top1']) == {'20', '200'} and stats['temperature'] == 0.07
    assert (stats['bank_size'], stats['val_size']) == (12, 4)
    assert all(v in (0.0, 25.0, 50.0, 75.0, 100.0) for v in stats['knn_top1'].values())


# ---------------------------------------------------------------------------------------------
# Validation over several processes
# ---------------------------------------------------------------------------------------------

def toy_logits():
    """7 samples over 6 classes; the target's rank in the logits is known."""
    ranks = [0, 0, 1, 4, 5, 0, 2]  # top-1 right for 3 of 7, top-5 for 6 of 7
    logits, targets = torch.zeros(7, 6), torch.tensor([3, 1, 4, 0, 2, 5, 1])
    for i, (rank, target) in enumerate(zip(ranks, targets.tolist())):
        order = [c for c in range(6) if c != target]
        order.insert(rank, target)
        logits[i, order] = torch.arange(6, 0, -1, dtype=torch.float)
    return TensorDataset(logits, targets)


def _sharded_worker(rank, port, out_dir):
    with ranks.group(rank, port):
        info = distributed.DistInfo(rank, rank, 2, torch.device('cpu'))
        acc = evaluate.validate(nn.Identity(), data.make_eval_loader(toy_logits(), 2, 0, info),
                                info.device)
        bank_set, query_set = toy_knn_sets()
        top1 = knn.knn_evaluate(nn.Identity(), data.make_eval_loader(bank_set, 2, 0, info),
                                data.make_eval_loader(query_set, 2, 0, info), info.device,
                                ks=(1, 3))
        bank_set, query_set = random_knn_sets()
        many_k = knn.knn_evaluate(nn.Identity(), data.make_eval_loader(bank_set, 8, 0, info),
                                  data.make_eval_loader(query_set, 8, 0, info), info.device,
                                  ks=RANDOM_KS, chunk_size=4)
    (out_dir / f'rank{rank}.json').write_text(json.dumps([acc, top1, many_k]))


RANDOM_KS = (1, 5, 20, 200)  # 200 is more than the bank: capped


def random_knn_sets():
    """A deterministic bank of 51 rows (26 and 25 per rank on two) and 19 queries, 5 classes."""
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 8, generator=gen)
    bank_labels = torch.arange(51) % 5
    query_labels = torch.arange(19) * 3 % 5
    bank = centres[bank_labels] + 1.5 * torch.randn(51, 8, generator=gen)
    queries = centres[query_labels] + 1.5 * torch.randn(19, 8, generator=gen)
    return TensorDataset(bank, bank_labels), TensorDataset(queries, query_labels)


def single_process_top1(bank_set, query_set, ks):
    bank, bank_labels = bank_set.tensors
    queries, labels = query_set.tensors
    return {str(k): 100.0 * int((knn.knn_predict(queries, bank, bank_labels, 5, k=k) == labels)
                                 .sum()) / len(labels) for k in ks}


def test_validation_on_all_ranks_counts_every_image_once(tmp_path):
    shards = [list(data.ShardSampler(7, r, 3)) for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(7))  # no padding, no repeats
    single = evaluate.validate(nn.Identity(), torch.utils.data.DataLoader(toy_logits(),
                                                                          batch_size=3), 'cpu')
    assert single == pytest.approx((300 / 7, 600 / 7))

    ranks.spawn(_sharded_worker, (ranks.free_port(), tmp_path))
    # the bank sharded over two ranks (each rank's k nearest merged) gives the same answers
    expected = single_process_top1(*random_knn_sets(), RANDOM_KS)
    assert len(set(expected.values())) > 1  # the ks disagree: a wrong merge would show
    for rank in range(2):
        acc, knn_top1, many_k = json.loads((tmp_path / f'rank{rank}.json').read_text())
        assert acc == pytest.approx([300 / 7, 600 / 7])  # 7 images, not 8 as with padding
        assert knn_top1 == {'1': 60.0, '3': 60.0}
        assert many_k == expected
