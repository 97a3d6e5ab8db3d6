"""Backbones: the torchvision ResNets main.py pretrains, and their weights from any accepted file.

A pretrained file may be a backbone state dict (<arch>.pth from main.py, the released
resnet50.pth), a torchvision-style state dict (fc.* ignored) or a full checkpoint.pth of main.py,
evaluate.py or the original code; the keys are checked strictly against the backbone.
"""
import torch
import torchvision
from torch import nn

from checkpoints import load_checkpoint_file, match_state_dict, strip_module_prefix
from cli import InputError

ARCHS = ('resnet18', 'resnet34', 'resnet50', 'resnet101', 'resnet152', 'wide_resnet50_2',
         'wide_resnet101_2', 'resnext50_32x4d', 'resnext101_32x8d', 'resnext101_64x4d')


def build_backbone(arch='resnet50', cifar_stem=False):
    """A torchvision ResNet without its classifier, and its feature width."""
    if arch not in ARCHS:
        raise InputError(f'--arch {arch}: expected one of {", ".join(ARCHS)}')
    net = getattr(torchvision.models, arch)(zero_init_residual=True)
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


def load_backbone_state(path, arch='resnet50', cifar_stem=False):
    """The state dict for build_backbone(arch, cifar_stem), checked strictly: besides
    the ignored classifier (fc.*), any missing, unexpected or reshaped key is an InputError
    naming the keys."""
    state, saved = read_pretrained(path)
    return check_backbone_state(state, saved, path, arch, cifar_stem)


def check_backbone_state(state, saved, path, arch, cifar_stem):
    """load_backbone_state's check, on read_pretrained's result."""
    if saved.get('arch', arch) != arch or bool(saved.get('cifar_stem', cifar_stem)) != cifar_stem:
        flags = f'--arch {saved.get("arch", arch)}' + (' --cifar-stem' if saved.get(
            'cifar_stem', cifar_stem) else '')
        raise InputError(f'{path} was pretrained with {flags}; pass the same flags')
    net, _ = build_backbone(arch, cifar_stem)
    what = f'{path} (for --arch {arch}{" --cifar-stem" if cifar_stem else ""})'
    return match_state_dict(state, net, what)
