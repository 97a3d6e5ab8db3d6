"""torch.hub entries.

    model = torch.hub.load('/path/to/clone', 'resnet50', source='local')     # released weights
    model = torch.hub.load('/path/to/clone', 'resnet50', source='local',
                           weights='/path/to/resnet50.pth')                  # offline, a file
    net = torch.hub.load('/path/to/clone', 'backbone', source='local',
                         weights='checkpoint/demo/resnet18.pth')   # settings as main.py recorded
    model = torch.hub.load('/path/to/clone', 'barlowtwins', source='local',
                           checkpoint='checkpoint/checkpoint.pth')          # + projector
    net = torch.hub.load('/path/to/clone', 'classifier', source='local',
                         checkpoint='checkpoint/lincls/checkpoint.pth')     # evaluate.py's
    label = net.classes[net(net.transform(image)[None]).argmax()]           # a PIL image

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


def classifier(checkpoint, weights=None, arch=None, cifar_stem=None, progress=True):
    """The whole classifier that evaluate.py trained, in eval mode: a torchvision ResNet whose
    `fc` is the trained linear layer, so that net(images) gives one logit per class.

    checkpoint: evaluate.py's checkpoint.pth (linear probe or fine-tuning; the whole network,
    the original code's too), or the linear.pth of `evaluate.py --fast-linear`, whose
    standardisation and linear layer are folded into `fc` on the backbone it was fitted on:
    `weights`, by default the file its arguments name (args['pretrained']), refused when its
    weights differ from the fingerprint linear.pth recorded (args['pretrained_digest']).
    arch / cifar_stem default to what evaluate.py recorded (else resnet50, ImageNet stem).

    net.classes: the class names in the order of the outputs, or None when the checkpoint does
    not record them (the original code's). net.transform: evaluate.py's validation transform
    at the recorded crop size (resize, centre crop, ImageNet normalisation), for PIL images.
    """
    checkpoints, cli = _repo_module('checkpoints'), _repo_module('cli')
    path = _local_file(checkpoint, progress)
    saved = checkpoints.load_checkpoint_file(path)
    if isinstance(saved, dict) and isinstance(saved.get('model'), dict):
        if weights is not None:
            raise cli.InputError(f'weights={str(weights)!r} names a backbone for a linear.pth, '
                                 f'but {checkpoint} holds the whole network: drop weights=')
        net, settings = _trained_network(saved, path, arch, cifar_stem)
    elif isinstance(saved, dict) and any(k in saved for k in _LINEAR_TENSORS):
        net, settings = _folded_linear_classifier(saved, path, weights, arch, cifar_stem,
                                                  progress)
    else:
        raise cli.InputError(f'{checkpoint} is neither a checkpoint.pth of evaluate.py (with '
                             f'"model") nor a linear.pth of evaluate.py --fast-linear (with '
                             f'"linear.weight"); for a pretrained backbone use the "backbone" '
                             f'or "resnet50" entry')
    net.classes = _class_names(saved.get('classes'), net.fc.out_features, path)
    net.transform = _repo_module('augmentations').val_transform(settings.get('crop_size', 224))
    return net.eval()


# What linear.pth of evaluate.py --fast-linear holds: the classifier's tensors, plus the class
# names of its outputs and evaluate.py's arguments.
_LINEAR_TENSORS = ('linear.bias', 'linear.weight', 'mean', 'std')
_LINEAR_EXTRAS = ('args', 'classes')


def _trained_network(ckpt, path, arch, cifar_stem):
    """(the ResNet with its trained fc, evaluate.py's recorded arguments) from a checkpoint.pth
    of evaluate.py, whose model is the whole network under DDP's `module.` prefix."""
    backbones, checkpoints, cli = (_repo_module(n) for n in ('backbones', 'checkpoints', 'cli'))
    state = checkpoints.strip_module_prefix(ckpt['model'])
    if any(k.startswith(('backbone.', 'projector.')) for k in state):
        raise cli.InputError(f'{path} is a pretraining checkpoint of main.py (backbone and '
                             f'projector), not a classifier: train one with evaluate.py, or '
                             f'load it with the "barlowtwins" or "backbone" entry')
    not_tensors = [str(k) for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise cli.InputError(f'{path}: "model" holds non-tensor entries '
                             f'{", ".join(not_tensors[:5])}; expected a state dict')
    saved = ckpt.get('args') if isinstance(ckpt.get('args'), dict) else {}
    arch = _checked_arch(arch or saved.get('arch', 'resnet50'))
    cifar_stem = bool(saved.get('cifar_stem', False) if cifar_stem is None else cifar_stem)
    head = {k: v for k, v in state.items() if k.startswith('fc.')}
    if sorted(head) != ['fc.bias', 'fc.weight']:
        raise cli.InputError(f'{path}: expected the classifier as exactly fc.weight and fc.bias, '
                             f'found {", ".join(sorted(head)) or "no fc.* keys"}')
    body = {k: v for k, v in state.items() if not k.startswith('fc.')}
    body = backbones.check_backbone_state(body, saved, path, arch, cifar_stem, keywords=True)
    net, feature_dim = backbones.build_backbone(arch, cifar_stem)
    net.fc = _linear_layer(head['fc.weight'], head['fc.bias'], feature_dim, path, 'fc')
    net.load_state_dict(dict(body, **head))
    return net, saved


def _folded_linear_classifier(saved, path, weights, arch, cifar_stem, progress):
    """(the backbone with fc = the fast linear probe, its recorded arguments): linear.pth's
    linear((x - mean) / std) is the affine map x -> (W / std) x + b - (W / std) mean."""
    backbones, cli = _repo_module('backbones'), _repo_module('cli')
    missing = [k for k in _LINEAR_TENSORS if k not in saved]
    unexpected = sorted(str(k) for k in saved if k not in _LINEAR_TENSORS + _LINEAR_EXTRAS)
    if missing or unexpected:
        raise cli.InputError(f'{path} is not a linear.pth of evaluate.py --fast-linear (expected '
                             f'{", ".join(_LINEAR_TENSORS)}, classes, args); missing: '
                             f'{", ".join(missing) or "none"}; unexpected: '
                             f'{", ".join(unexpected) or "none"}')
    args = saved.get('args') if isinstance(saved.get('args'), dict) else {}
    source = weights if weights is not None else args.get('pretrained')
    if source is None:
        raise cli.InputError(f'{path} does not name the backbone it was fitted on '
                             f'(args[\'pretrained\']): pass weights=PATH')
    backbone_path = _local_file(source, progress)
    if not backbone_path.is_file():
        told = 'weights=' if weights is not None else 'its args[\'pretrained\'] names'
        raise cli.InputError(f'{path} was fitted on the backbone {source} ({told}), which is not '
                             f'a file here; pass weights=PATH to that backbone file')
    arch = _checked_arch(arch or args.get('arch', 'resnet50'))
    cifar_stem = bool(args.get('cifar_stem', False) if cifar_stem is None else cifar_stem)
    fitted = {k: args[k] for k in ('arch', 'cifar_stem') if k in args}
    if fitted and (fitted.get('arch', arch), bool(fitted.get('cifar_stem', cifar_stem))) != \
            (arch, cifar_stem):
        raise cli.InputError(f'{path} was fitted with '
                             f'{backbones.describe_settings(fitted, keywords=True)}, this call '
                             f'has arch={arch!r}, cifar_stem={cifar_stem!r}; pass the same '
                             f'keyword arguments')
    state, pretrained = backbones.read_pretrained(backbone_path)
    settings, _ = backbones.recorded_settings(backbone_path, pretrained)
    state = backbones.check_backbone_state(state, dict(pretrained, **settings), source, arch,
                                           cifar_stem, keywords=True)
    # A backbone file is often rewritten in place (a pretraining run continued): a linear
    # layer on other weights than its own would classify at random, so the fingerprint that
    # evaluate.py recorded of the weights it fitted on must match.
    fitted_on = args.get('pretrained_digest')
    if fitted_on is not None and _repo_module('evaluate').pretrained_digest(state) != fitted_on:
        raise cli.InputError(f'{source} is not the backbone {path} was fitted on: its weights '
                             f'differ from those recorded there (args[\'pretrained_digest\']); '
                             f'pass weights=PATH to the file it was fitted on')
    net, feature_dim = backbones.build_backbone(arch, cifar_stem)
    net.load_state_dict(state)
    weight, bias, mean, std = (saved[k] for k in ('linear.weight', 'linear.bias', 'mean', 'std'))
    _linear_layer(weight, bias, feature_dim, path, 'linear')  # checks the shapes
    for name, tensor in (('mean', mean), ('std', std)):
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != (feature_dim,):
            raise cli.InputError(f'{path}: {name} has shape '
                                 f'{tuple(getattr(tensor, "shape", ()))}, expected '
                                 f'({feature_dim},) for {arch}')
    if not bool((std > 0).all()):
        raise cli.InputError(f'{path}: std has entries <= 0; it cannot standardise features')
    # In float64, so that folding adds no rounding but the final one to float32.
    folded = weight.double() / std.double()  # (C, D): column d divided by std[d]
    net.fc = _linear_layer(folded.float(), (bias.double() - folded @ mean.double()).float(),
                           feature_dim, path, 'linear')
    return net, args


def _linear_layer(weight, bias, feature_dim, path, name):
    """nn.Linear(feature_dim, C) holding weight (C, feature_dim) and bias (C,), checked."""
    if not isinstance(weight, torch.Tensor) or not isinstance(bias, torch.Tensor) or \
            weight.ndim != 2 or tuple(bias.shape) != (weight.shape[0],) or \
            weight.shape[1] != feature_dim:
        shapes = [tuple(getattr(t, 'shape', ())) for t in (weight, bias)]
        raise _repo_module('cli').InputError(
            f'{path}: {name}.weight and {name}.bias have shapes {shapes[0]} and {shapes[1]}, '
            f'expected (classes, {feature_dim}) and (classes,) for these features')
    layer = torch.nn.Linear(feature_dim, weight.shape[0])
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    return layer


def _class_names(classes, count, path):
    """The recorded class names (one per output), or None when the file records none."""
    if classes is None:
        return None
    if not isinstance(classes, (list, tuple)) or len(classes) != count or \
            not all(isinstance(c, str) for c in classes):
        raise _repo_module('cli').InputError(
            f'{path}: "classes" should list {count} class names, one per output; it holds '
            f'{type(classes).__name__} of {len(classes) if hasattr(classes, "__len__") else "?"}')
    return list(classes)


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

