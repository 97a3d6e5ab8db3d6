"""torch.hub entries.

    model = torch.hub.load('/path/to/clone', 'resnet50', source='local')     # released weights
    model = torch.hub.load('/path/to/clone', 'resnet50', source='local',
                           weights='/path/to/resnet50.pth')                  # offline, a file
    net = torch.hub.load('/path/to/clone', 'backbone', source='local',
                         weights='checkpoint/demo/resnet18.pth')   # settings as main.py recorded
    model = torch.hub.load('/path/to/clone', 'barlowtwins', source='local',
                           checkpoint='checkpoint/checkpoint.pth')          # + projector

URLs are downloaded once and cached under <torch.hub.get_dir()>/checkpoints (TORCH_HOME
moves it); a cached file is used without touching the network. The released weights are cached
as `resnet50.pth`, the name the original hubconf used, so its cache is reused offline. Every load
checks the keys: a wrong file is an error naming them, never a model with random weights.
"""
# Modules only (not callables): torch.hub.list() shows every public callable as an entry.
import hashlib
import importlib
import pathlib
import re
import sys
import urllib.parse

import torch
import torchvision

dependencies = ['torch', 'torchvision']

RELEASED_URL = ('https://dl.fbaipublicfiles.com/barlowtwins/'
                'ep1000_bs2048_lrw0.2_lrb0.0048_lambd0.0051/resnet50.pth')

_HERE = pathlib.Path(__file__).resolve().parent
# Every module of this repository (main.py imports monitor, preemption, augmentations...): any
# of them could be shadowed by a user's module of the same name.
_REPO_MODULES = tuple(sorted(p.stem for p in _HERE.glob('*.py') if p.stem != 'hubconf'))


def resnet50(pretrained=True, progress=True, weights=None, **kwargs):
    """torchvision ResNet-50 with Barlow Twins weights (73.5% top-1 linear probe on ImageNet).

    weights: a local path or a URL (http(s)://, file://) to load instead of the released file;
    given, it is loaded whatever `pretrained` says. Accepted files: a backbone state dict, a
    torchvision-style one, or a full checkpoint.pth from main.py or the original code.
    kwargs go to torchvision.models.resnet50. `fc` is the default 1000-way Linear layer with
    random weights (the pretrained model has no classifier): train it (evaluate.py) or replace it.
    """
    model = torchvision.models.resnet50(**kwargs)
    source = weights if weights is not None else (RELEASED_URL if pretrained else None)
    if source is None:
        return model
    backbones = _repo_module('backbones')
    path = _local_file(source, progress)
    state, saved = backbones.read_pretrained(path)
    recorded, _ = backbones.recorded_settings(path, saved)
    if recorded.get('arch', 'resnet50') != 'resnet50' or recorded.get('cifar_stem'):
        raise _repo_module('cli').InputError(
            f'{source} was pretrained with {backbones.describe_settings(recorded, keywords=True)},'
            f' not as a ResNet-50: load it with the \'backbone\' entry, torch.hub.load(REPO, '
            f'\'backbone\', source=\'local\', weights={str(source)!r})')
    state = backbones.check_backbone_state(state, saved, path, 'resnet50', False, keywords=True)
    result = model.load_state_dict(state, strict=False)
    if sorted(result.missing_keys) != ['fc.bias', 'fc.weight'] or result.unexpected_keys:
        raise _repo_module('cli').InputError(
            f'{source}: expected exactly fc.weight and fc.bias to stay untrained; missing '
            f'{result.missing_keys}, unexpected {result.unexpected_keys}')
    return model


def backbone(weights, arch=None, cifar_stem=None, progress=True):
    """The backbone as main.py builds it (torchvision ResNet, fc = Identity) with one's own
    weights: <arch>.pth or checkpoint.pth from main.py, or any file resnet50() accepts.

    arch / cifar_stem default to what main.py recorded: in a checkpoint.pth itself, and for an
    <arch>.pth in the checkpoint.pth beside it; else resnet50 with the ImageNet stem.
    """
    backbones = _repo_module('backbones')
    path = _local_file(weights, progress)
    state, saved = backbones.read_pretrained(path)
    recorded, _ = backbones.recorded_settings(path, saved)
    arch = arch or recorded.get('arch', 'resnet50')
    cifar_stem = bool(recorded.get('cifar_stem', False) if cifar_stem is None else cifar_stem)
    net, _ = backbones.build_backbone(_checked_arch(arch), cifar_stem)
    net.load_state_dict(backbones.check_backbone_state(state, dict(saved, **recorded), path, arch,
                                                       cifar_stem, keywords=True))
    return net


def barlowtwins(checkpoint, arch=None, cifar_stem=None, progress=True):
    """The full pretrained model (main.BarlowTwins: backbone, projector, bn) from a checkpoint.pth
    of main.py or of the original code. Projector sizes come from the weights; arch, cifar_stem,
    lambd and scale_loss from the checkpoint's saved arguments when present (else resnet50,
    ImageNet stem, 0.0051, 1)."""
    main, checkpoints = _repo_module('main'), _repo_module('checkpoints')
    backbones, cli = _repo_module('backbones'), _repo_module('cli')
    path = _local_file(checkpoint, progress)
    ckpt = checkpoints.load_checkpoint_file(path)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get('model'), dict):
        raise cli.InputError(f'{checkpoint} is not a full checkpoint.pth (no "model" entry); '
                              f'for a backbone file use the "backbone" entry')
    state = checkpoints.strip_module_prefix(ckpt['model'])
    saved = ckpt.get('args') if isinstance(ckpt.get('args'), dict) else {}
    arch = arch or saved.get('arch', 'resnet50')
    cifar_stem = bool(saved.get('cifar_stem', False) if cifar_stem is None else cifar_stem)
    linear = sorted((int(k.split('.')[1]), v.shape[0]) for k, v in state.items()
                    if re.fullmatch(r'projector\.\d+\.weight', k) and v.ndim == 2)
    if not linear:
        raise cli.InputError(f'{checkpoint} has no projector weights (projector.<i>.weight)')
    net, feature_dim = backbones.build_backbone(_checked_arch(arch), cifar_stem)
    model = main.BarlowTwins(backbone=net, feature_dim=feature_dim,
                             projector='-'.join(str(size) for _, size in linear),
                             lambd=saved.get('lambd', 0.0051),
                             scale_loss=saved.get('scale_loss', 1.0))
    model.load_state_dict(checkpoints.match_state_dict(state, model, str(checkpoint)))
    return model


def _checked_arch(arch):
    archs = _repo_module('backbones').ARCHS
    if arch not in archs:
        raise _repo_module('cli').InputError(f'arch={arch!r}: expected one of {", ".join(archs)}')
    return arch


def _local_file(source, progress=True):
    """A local path for `source`: itself, or for a URL the torch.hub cache file, downloaded
    (with a progress bar) only when it is not there yet."""
    text = str(source)
    if not re.match(r'^[a-zA-Z][a-zA-Z0-9+.-]*://', text):
        return pathlib.Path(text).expanduser()
    name = pathlib.Path(urllib.parse.urlparse(text).path).name or 'weights.pth'
    if text != RELEASED_URL:
        # Other URLs get a name of their own, so that e.g. file:///x/resnet50.pth never takes
        # the released file's place in the cache.
        name = f'{hashlib.sha256(text.encode()).hexdigest()[:8]}_{name}'
    cached = pathlib.Path(torch.hub.get_dir()) / 'checkpoints' / name
    if cached.is_file():
        return cached
    cached.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.write(f'Downloading: "{text}" to {cached}\n')
    try:
        torch.hub.download_url_to_file(text, str(cached), None, progress=progress)
    except (OSError, ValueError) as e:
        raise _repo_module('cli').InputError(
            f'cannot download {text}: {getattr(e, "reason", None) or e}; offline, pass a local '
            f'file (weights=PATH) or place the file at {cached}') from None
    return cached


def _repo_module(name):
    """This repository's module `name`, imported from this file's directory.

    torch.hub puts the repository on sys.path, but a module of the same name already imported
    from elsewhere (a user's own main.py or data.py) would shadow ours: set such modules aside
    while ours are imported, then put them back (ours keep their references to each other).
    """
    module = sys.modules.get(name)
    if module is not None and _is_ours(module):
        return module
    aside = {n: sys.modules.pop(n) for n in _REPO_MODULES
             if n in sys.modules and not _is_ours(sys.modules[n])}
    sys.path.insert(0, str(_HERE))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(_HERE))
        sys.modules.update(aside)


def _is_ours(module):
    file = getattr(module, '__file__', None)
    return bool(file) and pathlib.Path(file).resolve().parent == _HERE

