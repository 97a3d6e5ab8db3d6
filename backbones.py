"""Backbones: the torchvision ResNets main.py pretrains, and their weights from any accepted file.

A pretrained file may be a backbone state dict (<arch>.pth from main.py, the released
resnet50.pth), a torchvision-style state dict (fc.* ignored) or a full checkpoint.pth of main.py,
evaluate.py or the original code; the keys are checked strictly against the backbone.
"""
from pathlib import Path

import torch
import torchvision
from torch import nn

from checkpoints import load_checkpoint_file, match_state_dict, strip_module_prefix
from cli import InputError

ARCHS = ('resnet18', 'resnet34', 'resnet50', 'resnet101', 'resnet152', 'wide_resnet50_2',
         'wide_resnet101_2', 'resnext50_32x4d', 'resnext101_32x8d', 'resnext101_64x4d')
SETTING_KEYS = ('arch', 'cifar_stem', 'crop_size')  # what evaluate.py must repeat of main.py's


def build_backbone(arch='resnet50', cifar_stem=False, zero_init_residual=True):
    """A torchvision ResNet without its classifier, and its feature width.

    zero_init_residual=True (the reference's start) zeroes the last BatchNorm weight of every
    residual branch, so the untrained network is nearly its stem plus shortcuts; False is
    torchvision's default initialisation."""
    if arch not in ARCHS:
        raise InputError(f'--arch {arch}: expected one of {", ".join(ARCHS)}')
    net = getattr(torchvision.models, arch)(zero_init_residual=zero_init_residual)
    if cifar_stem:
        # Small images: keep the full resolution into the first stage (as CIFAR ResNets do).
        net.conv1 = nn.Conv2d(3, net.conv1.out_channels, 3, 1, 1, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode='fan_out', nonlinearity='relu')
        net.maxpool = nn.Identity()
    feature_dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, feature_dim


def read_pretrained(path):
    """(candidate backbone state dict without fc.*, the saved main.py args or {}) from any
    accepted format: a backbone or torchvision-style state dict, or a full checkpoint whose
    'model' holds `[module.]backbone.*` keys (main.py, the original) or a torchvision layout
    (an evaluate.py checkpoint)."""
    obj = load_checkpoint_file(path)
    if not isinstance(obj, dict):
        raise InputError(f'{path} holds a {type(obj).__name__}, not a state dict or checkpoint')
    saved = obj.get('args') if isinstance(obj.get('args'), dict) else {}
    state = obj['model'] if isinstance(obj.get('model'), dict) else obj
    state = strip_module_prefix(state)
    backbone = {k[len('backbone.'):]: v for k, v in state.items() if k.startswith('backbone.')}
    state = backbone or state
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise InputError(f'{path} is neither a state dict nor a checkpoint with "model": '
                         f'non-tensor entries {", ".join(map(str, not_tensors[:5]))}')
    return {k: v for k, v in state.items() if not k.startswith('fc.')}, saved


def recorded_settings(path, saved=None):
    """({arch, cifar_stem, crop_size} as main.py recorded them for the pretrained file at `path`,
    the file that records them, or None).

    A checkpoint.pth records its arguments; an <arch>.pth backbone file holds the bare state
    dict (as the reference's resnet50.pth does, so it loads anywhere), and its settings are read
    from the checkpoint.pth that main.py wrote beside it, when that one is of the same arch.
    """
    path = Path(path)
    if saved is None:
        _, saved = read_pretrained(path)
    source = path
    if not saved:
        saved, source = _settings_beside(path), path.parent / 'checkpoint.pth'
    settings = {k: saved[k] for k in SETTING_KEYS if k in saved}
    return settings, (source if settings else None)


def _settings_beside(path):
    beside = path.parent / 'checkpoint.pth'
    if beside.resolve() == path.resolve() or not beside.is_file():
        return {}
    try:  # mmap: only the arguments are read, not the (possibly gigabytes of) tensors
        ckpt = torch.load(beside, map_location='cpu', weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - unreadable or foreign: it records nothing usable
        return {}
    saved = ckpt.get('args') if isinstance(ckpt, dict) else None
    if not isinstance(saved, dict) or saved.get('arch') != path.stem:
        return {}  # another run's checkpoint, or the file was renamed
    return saved


def describe_settings(settings, keywords=False):
    """`--arch resnet18 --cifar-stem --crop-size 32`, or with keywords=True the torch.hub
    keyword arguments `arch='resnet18', cifar_stem=True` (crop_size is no model setting)."""
    if keywords:
        return ', '.join(f'{k}={settings[k]!r}' for k in ('arch', 'cifar_stem') if k in settings)
    parts = []
    for key in SETTING_KEYS:
        value = settings.get(key)
        if key == 'cifar_stem':
            parts += ['--cifar-stem'] if value else []
        elif value is not None:
            parts.append(f'--{key.replace("_", "-")} {value}')
    return ' '.join(parts)


def load_backbone_state(path, arch='resnet50', cifar_stem=False):
    """The state dict for build_backbone(arch, cifar_stem), checked strictly: besides
    the ignored classifier (fc.*), any missing, unexpected or reshaped key is an InputError
    naming the keys."""
    state, saved = read_pretrained(path)
    return check_backbone_state(state, saved, path, arch, cifar_stem)


def check_backbone_state(state, saved, path, arch, cifar_stem, keywords=False):
    """load_backbone_state's check, on read_pretrained's result. Errors name the settings as
    command-line flags, or as torch.hub keyword arguments with keywords=True."""
    wanted = dict(arch=arch, cifar_stem=cifar_stem)
    recorded = {k: saved[k] for k in ('arch', 'cifar_stem') if k in saved}
    if any(wanted[k] != (bool(v) if k == 'cifar_stem' else v) for k, v in recorded.items()):
        same, this = ('pass the same keyword arguments', 'this call has') if keywords else \
            ('pass the same flags', 'this run has')
        raise InputError(f'{path} was pretrained with '
                         f'{describe_settings(dict(wanted, **saved), keywords)}, {this} '
                         f'{describe_settings(wanted, keywords)}; {same}')
    net, _ = build_backbone(arch, cifar_stem)
    what = f'{path} (for {describe_settings(wanted, keywords)})'
    return match_state_dict(state, net, what)
