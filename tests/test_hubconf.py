"""hubconf.py through torch.hub.load(<local clone>, ..., source='local'), offline."""
import json
import re
import shutil
import sys
import types
import urllib.error
import urllib.request

import pytest
import torch
import torchvision

import backbones
import evaluate
import hubconf
import main
from cli import InputError
from conftest import ROOT, make_image_folder
from test_evaluate import pretrained_outputs


def hub_load(entry, *args, **kwargs):
    return torch.hub.load(str(ROOT), entry, *args, source='local', **kwargs)


def load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def assert_loaded(model, state):
    """Every tensor of `state` is in model, equal; only fc may be left over."""
    model_state = model.state_dict()
    assert set(model_state) - set(state) <= {'fc.weight', 'fc.bias'}
    for k, v in state.items():
        assert torch.equal(model_state[k], v), k


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError('the network was used')
    for module, name in ((torch.hub, 'download_url_to_file'), (torch.hub, 'urlopen'),
                         (urllib.request, 'urlopen')):
        monkeypatch.setattr(module, name, refuse)


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))
    return tmp_path / 'torch_home'


@pytest.fixture(scope='module')
def resnet50_file(tmp_path_factory):
    """A resnet50.pth as main.py exports it, with random values unlike any initialisation."""
    net, _ = backbones.build_backbone('resnet50')
    gen = torch.Generator().manual_seed(0)
    state = {k: (torch.randn(v.shape, generator=gen) if v.is_floating_point() else v + 7)
             for k, v in net.state_dict().items()}
    path = tmp_path_factory.mktemp('weights') / 'resnet50.pth'
    torch.save(state, path)
    return path


@pytest.fixture(scope='module')
def pre(tmp_path_factory):
    """main.py's resnet18.pth and checkpoint.pth on a tiny ImageFolder (shared with
    test_evaluate.py: made once per session)."""
    return pretrained_outputs(tmp_path_factory)


def test_declares_dependencies_and_the_released_url():
    assert hubconf.dependencies == ['torch', 'torchvision']
    assert hubconf.RELEASED_URL == ('https://dl.fbaipublicfiles.com/barlowtwins/'
                                    'ep1000_bs2048_lrw0.2_lrb0.0048_lambd0.0051/resnet50.pth')


def test_hub_load_local_without_weights(no_network):
    model = hub_load('resnet50', pretrained=False)
    assert isinstance(model, torchvision.models.ResNet)
    assert model.fc.out_features == 1000 and model.layer4[2].conv3.out_channels == 2048
    assert hub_load('resnet50', pretrained=False, num_classes=10).fc.out_features == 10


def test_weights_from_a_local_file(resnet50_file, no_network):
    model = hub_load('resnet50', weights=str(resnet50_file))
    assert_loaded(model, load(resnet50_file))


def test_weights_from_a_file_url_are_cached(resnet50_file, torch_home, monkeypatch):
    model = hub_load('resnet50', weights=resnet50_file.as_uri(), progress=False)
    assert_loaded(model, load(resnet50_file))
    cached = list((torch_home / 'hub' / 'checkpoints').iterdir())
    assert len(cached) == 1 and cached[0].name.endswith('_resnet50.pth')
    assert cached[0].read_bytes() == resnet50_file.read_bytes()
    # not under the released file's cache name, which it would otherwise shadow
    assert not (torch_home / 'hub' / 'checkpoints' / 'resnet50.pth').exists()

    def refuse(*args, **kwargs):
        raise AssertionError('the network was used')
    monkeypatch.setattr(torch.hub, 'download_url_to_file', refuse)
    assert_loaded(hub_load('resnet50', weights=resnet50_file.as_uri()), load(resnet50_file))


def test_released_weights_from_a_populated_cache_offline(resnet50_file, torch_home, no_network):
    checkpoints = torch_home / 'hub' / 'checkpoints'
    checkpoints.mkdir(parents=True)
    (checkpoints / 'resnet50.pth').symlink_to(resnet50_file)  # as the original hubconf cached it
    model = hub_load('resnet50')  # pretrained=True: the released weights
    assert_loaded(model, load(resnet50_file))


def test_released_weights_offline_without_cache_is_a_clear_error(torch_home, monkeypatch):
    def unreachable(*args, **kwargs):
        raise urllib.error.URLError('Temporary failure in name resolution')
    monkeypatch.setattr(torch.hub, 'urlopen', unreachable)
    cached = torch_home / 'hub' / 'checkpoints' / 'resnet50.pth'
    with pytest.raises(InputError) as error:
        hub_load('resnet50')
    message = str(error.value)
    assert hubconf.RELEASED_URL in message and 'name resolution' in message
    assert str(cached) in message
    assert list(cached.parent.iterdir()) == []  # nothing half-written is left to be trusted


def test_wrong_files_raise_naming_keys(pre, tmp_path, no_network):
    alone = tmp_path / 'resnet18.pth'  # a resnet18 backbone with no checkpoint.pth beside it
    shutil.copy(pre.backbone, alone)
    with pytest.raises(InputError, match=r'missing: layer1\.0\.bn3\.bias'):
        hub_load('resnet50', weights=str(alone))
    torch.save({'foo.weight': torch.zeros(3)}, tmp_path / 'random.pth')
    with pytest.raises(InputError, match=r'missing: bn1\.bias.*unexpected: foo\.weight'):
        hub_load('resnet50', weights=str(tmp_path / 'random.pth'))
    # Errors name the keyword arguments of the entries, not main.py's flags.
    for weights in (pre.checkpoint, pre.backbone):  # recorded in it, or in checkpoint.pth beside
        with pytest.raises(InputError, match="pretrained with arch='resnet18', cifar_stem=True, "
                                             "not as a ResNet-50: load it with the 'backbone'"):
            hub_load('resnet50', weights=str(weights))
    with pytest.raises(InputError, match="pretrained with arch='resnet18', cifar_stem=True, this "
                                         "call has arch='resnet50', cifar_stem=True; pass the "
                                         "same keyword arguments"):
        hub_load('backbone', weights=str(pre.backbone), arch='resnet50')
    with pytest.raises(InputError, match=r"^arch='resnet5': expected one of resnet18, "):
        hub_load('backbone', weights=str(pre.backbone), arch='resnet5')


def test_backbone_entry_loads_own_files(pre, no_network):
    expected = load(pre.backbone)
    net = hub_load('backbone', weights=str(pre.backbone), arch='resnet18', cifar_stem=True)
    assert net.state_dict().keys() == expected.keys()
    assert_loaded(net, expected)
    net = hub_load('backbone', weights=str(pre.checkpoint))  # arch and stem from its saved args
    assert_loaded(net, expected)
    assert net.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 512)
    net = hub_load('backbone', weights=str(pre.backbone))  # from checkpoint.pth beside it
    assert_loaded(net, expected)


def test_backbone_entry_without_a_record_assumes_resnet50(pre, tmp_path, no_network):
    alone = tmp_path / 'resnet18.pth'
    shutil.copy(pre.backbone, alone)
    with pytest.raises(InputError, match=r"for arch='resnet50', cifar_stem=False\) does not "
                                         r"match.*missing"):
        hub_load('backbone', weights=str(alone))
    other_run = tmp_path / 'checkpoint.pth'  # beside it, but of another arch: not its record
    torch.save({'args': {'arch': 'resnet50', 'cifar_stem': False}, 'model': {}}, other_run)
    with pytest.raises(InputError, match=r"for arch='resnet50', cifar_stem=False\)"):
        hub_load('backbone', weights=str(alone))
    net = hub_load('backbone', weights=str(alone), arch='resnet18', cifar_stem=True)
    assert_loaded(net, load(pre.backbone))


def test_barlowtwins_entry_loads_the_full_model(pre, tmp_path, no_network):
    ckpt = load(pre.checkpoint)
    expected = {k[len('module.'):]: v for k, v in ckpt['model'].items()}
    model = hub_load('barlowtwins', checkpoint=str(pre.checkpoint))
    assert isinstance(model, main.BarlowTwins)
    assert model.state_dict().keys() == expected.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())
    assert [m.out_features for m in model.projector if isinstance(m, torch.nn.Linear)] == [32, 32]
    assert model.lambd == 0.0051
    loss = model(torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32))
    assert torch.isfinite(loss)

    # the original's layout: no saved arguments, so the architecture is given
    torch.save(dict(epoch=1, model=ckpt['model'], optimizer=ckpt['optimizer']),
               tmp_path / 'original.pth')
    model = hub_load('barlowtwins', checkpoint=str(tmp_path / 'original.pth'), arch='resnet18',
                     cifar_stem=True)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())
    with pytest.raises(InputError, match='is not a full checkpoint'):
        hub_load('barlowtwins', checkpoint=str(pre.backbone))


def test_user_modules_with_our_names_do_not_shadow_ours(resnet50_file, monkeypatch, no_network):
    # A user's project with its own main.py / data.py already imported, and our modules not yet.
    for name in ('main', 'data', 'evaluate', 'distributed'):
        monkeypatch.delitem(sys.modules, name)
    users_main = types.ModuleType('main')
    users_main.__file__ = '/elsewhere/main.py'
    users_data = types.ModuleType('data')
    users_data.__file__ = '/elsewhere/data.py'
    monkeypatch.setitem(sys.modules, 'main', users_main)
    monkeypatch.setitem(sys.modules, 'data', users_data)
    model = hub_load('resnet50', weights=str(resnet50_file))
    assert_loaded(model, load(resnet50_file))
    assert sys.modules['main'] is users_main and sys.modules['data'] is users_data


# ---------------------------------------------------------------------------------------------
# The classifier entry: evaluate.py's trained network, or its fast linear probe folded into fc
# ---------------------------------------------------------------------------------------------

EVAL_CLASSES = ('n01440764', 'n01443537', 'n01484850', 'n01491361', 'n01494475', 'n01496331')


@pytest.fixture(scope='module')
def evaluations(pre, tmp_path_factory):
    """evaluate.py's linear probe, fine-tuning and fast linear probe of the pretrained backbone
    on a 6-class ImageFolder (4 training and 3 validation images per class): {mode: (checkpoint
    file, the validation top-1/top-5 logged in stats.txt)}, and the data."""
    root = tmp_path_factory.mktemp('classifier')
    data = make_image_folder(root / 'data', classes=EVAL_CLASSES, per_class=4, val_per_class=3)
    common = [str(data), str(pre.backbone), '--batch-size', '4', '--workers', '0', '--device',
              'cpu']
    runs = {'freeze': ['--epochs', '2'],
            'finetune': ['--epochs', '2', '--weights', 'finetune', '--lr-backbone', '0.05'],
            'fast-linear': ['--fast-linear', '--weight-decay', '0.01']}
    found = {}
    for mode, extra in runs.items():
        ckdir = root / mode
        evaluate.main(common + extra + ['--checkpoint-dir', str(ckdir)])
        logged = [json.loads(line) for line in (ckdir / 'stats.txt').read_text().splitlines()
                  if line.startswith('{')]
        if mode == 'fast-linear':
            found[mode] = ckdir / 'linear.pth', logged[-1]['fast_linear']
        else:  # the last epoch's validation: the weights checkpoint.pth holds
            last = [s for s in logged if 'acc1' in s][-1]
            found[mode] = ckdir / 'checkpoint.pth', dict(acc1=last['acc1'], acc5=last['acc5'])
    return data, found


def hub_accuracy(net, data):
    """Top-1/top-5 of the hub classifier on data/val, scored by class name as a user would:
    net.classes names the outputs, the folder names the truth."""
    val = torchvision.datasets.ImageFolder(data / 'val', net.transform)
    with torch.no_grad():
        logits = net(torch.stack([image for image, _ in val]))
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices.tolist()
    named = [[net.classes[i] for i in row] for row in top]
    truth = [val.classes[t] for t in val.targets]
    return dict(acc1=100.0 * sum(n[0] == t for n, t in zip(named, truth)) / len(truth),
                acc5=100.0 * sum(t in n for n, t in zip(named, truth)) / len(truth))


@pytest.mark.parametrize('mode', ['freeze', 'finetune', 'fast-linear'])
def test_classifier_scores_what_evaluate_logged(evaluations, mode, no_network):
    data, found = evaluations
    checkpoint, logged = found[mode]
    net = hub_load('classifier', checkpoint=str(checkpoint))
    assert isinstance(net, torchvision.models.ResNet) and not net.training
    assert net.classes == list(EVAL_CLASSES) and net.fc.out_features == len(EVAL_CLASSES)
    assert net.fc.in_features == 512  # the recorded resnet18, with its 32-px crop:
    assert net.transform.transforms[1].size == (32, 32)
    assert hub_accuracy(net, data) == logged


def test_fast_linear_fold_gives_the_probes_logits(evaluations, pre, no_network):
    # fc(x) equals linear((x - mean) / std) on the backbone's features, to float rounding
    _, found = evaluations
    saved = load(found['fast-linear'][0])
    net = hub_load('classifier', checkpoint=str(found['fast-linear'][0]))
    images = torch.randn(5, 3, 32, 32)
    head, net.fc = net.fc, torch.nn.Identity()
    with torch.no_grad():
        features = net(images)
        expected = ((features - saved['mean']) / saved['std']) @ saved['linear.weight'].T \
            + saved['linear.bias']
        assert torch.allclose(head(features), expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(features, hub_load('backbone', weights=str(pre.backbone)).eval()(images))


def test_fast_linear_backbone_moved_is_found_with_weights(evaluations, pre, tmp_path,
                                                          no_network):
    _, found = evaluations
    saved = load(found['fast-linear'][0])
    saved['args']['pretrained'] = str(tmp_path / 'gone' / 'resnet18.pth')
    torch.save(saved, tmp_path / 'linear.pth')
    with pytest.raises(InputError, match=r"linear\.pth was fitted on the backbone .*gone/"
                                         r"resnet18\.pth \(its args\['pretrained'\] names\), "
                                         r"which is not a file here; pass weights=PATH"):
        hub_load('classifier', checkpoint=str(tmp_path / 'linear.pth'))
    moved = tmp_path / 'resnet18.pth'  # alone: no checkpoint.pth beside it records its arch
    shutil.copy(pre.backbone, moved)
    net = hub_load('classifier', checkpoint=str(tmp_path / 'linear.pth'), weights=str(moved))
    reference = hub_load('classifier', checkpoint=str(found['fast-linear'][0]))
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(net(images), reference(images))
    # the same path, rewritten with other weights (a pretraining run continued there)
    other = {k: (v + 0.01 if v.is_floating_point() else v) for k, v in load(moved).items()}
    torch.save(other, moved)
    with pytest.raises(InputError, match=r"resnet18\.pth is not the backbone .*linear\.pth was "
                                         r"fitted on: its weights differ"):
        hub_load('classifier', checkpoint=str(tmp_path / 'linear.pth'), weights=str(moved))


def test_classifier_from_the_original_evaluate_checkpoint(evaluations, tmp_path, no_network):
    # The original evaluate.py saves {epoch, best_acc, model, optimizer}: no arguments, no class
    # names, so the architecture is given and the classes are unknown.
    _, found = evaluations
    ours = load(found['freeze'][0])
    original = tmp_path / 'checkpoint.pth'
    torch.save({k: ours[k] for k in ('epoch', 'best_acc', 'model', 'optimizer')}, original)
    with pytest.raises(InputError, match=r"for arch='resnet50', cifar_stem=False\) does not "
                                         r"match this configuration; missing: "):
        hub_load('classifier', checkpoint=str(original))
    net = hub_load('classifier', checkpoint=str(original), arch='resnet18', cifar_stem=True)
    assert net.classes is None and net.transform.transforms[1].size == (224, 224)
    reference = hub_load('classifier', checkpoint=str(found['freeze'][0]))
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(net(images), reference(images))


def test_classifier_refuses_wrong_files_naming_them(evaluations, pre, tmp_path, no_network):
    _, found = evaluations
    probe, linear = (load(found[m][0]) for m in ('freeze', 'fast-linear'))

    def refused(obj, pattern, **kwargs):
        path = tmp_path / 'wrong.pth'
        torch.save(obj, path)
        with pytest.raises(InputError) as error:
            hub_load('classifier', checkpoint=str(path), **kwargs)
        message = str(error.value)
        assert '\n' not in message and str(path) in message
        assert re.search(pattern, message), message

    refused(load(pre.checkpoint), r'pretraining checkpoint of main\.py .*"barlowtwins"')
    refused(load(pre.backbone), r'neither a checkpoint\.pth of evaluate\.py .*nor a linear\.pth')
    extra = dict(probe, model=dict(probe['model'], **{'module.fc.extra': torch.zeros(1)}))
    refused(extra, r'exactly fc\.weight and fc\.bias, found fc\.bias, fc\.extra, fc\.weight')
    extra = dict(probe, model=dict(probe['model'], **{'module.layer9.weight': torch.zeros(1)}))
    refused(extra, r'unexpected: layer9\.weight')
    refused(dict(probe, classes=['only_one']), r'"classes" should list 6 class names')
    refused(probe, r"pretrained with arch='resnet18', cifar_stem=True, this call has "
                   r"arch='resnet34', cifar_stem=True; pass the same keyword", arch='resnet34')
    refused(probe, r"names a backbone for a linear\.pth.*drop weights=", weights=str(pre.backbone))
    refused({k: v for k, v in linear.items() if k != 'std'},
            r'not a linear\.pth .*missing: std; unexpected: none')
    refused(dict(linear, extra=1), r'missing: none; unexpected: extra')
    refused(dict(linear, mean=linear['mean'][:7]), r'mean has shape \(7,\), expected \(512,\)')
    refused(linear, r"fitted with arch='resnet18', cifar_stem=True, this call has "
                    r"arch='resnet18', cifar_stem=False", cifar_stem=False)
