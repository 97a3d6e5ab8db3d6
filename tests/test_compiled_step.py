"""--fast's compiled step (compiled_step.py) on the CPU: one graph per region, static shapes, no
recompilation for an epoch's short last batch, the uncompiled run's losses, and the fixed-shape
augmentation drawing what the planned one draws.

Compiling costs minutes on two cores for a ResNet, so the training test swaps in a tiny backbone:
what is compiled around it (the augmentation, both views, projector and loss, LARS, the
shape-dependent eager fallback) is main.py's own. The two-process test in test_main.py compiles
the real ResNet-18."""
import pytest
import torch
from torch import nn

import augmentations as A
import main
from conftest import make_image_folder
from test_main import read_stats, tiny_args


def tiny_backbone(arch, cifar_stem=False, zero_init_residual=True):
    net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8),
                        nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False),
                        nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return net, 16


@pytest.fixture
def compiler(monkeypatch):
    """A fresh torch.compile that raises on any recompilation, and its counters."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    monkeypatch.setattr(torch._dynamo.config, 'error_on_recompile', True)
    yield counters
    torch._dynamo.reset()


def test_compiled_fast_runs_two_epochs_with_short_batches_without_recompiling(tmp_path,
                                                                             monkeypatch,
                                                                             compiler):
    data = make_image_folder(tmp_path / 'data', per_class=9)  # 18 images: batches 8, 8, 2
    monkeypatch.setattr(main, 'build_backbone', tiny_backbone)
    steps = []
    real = main.CompiledStep

    def recording(*args, **kwargs):
        steps.append(real(*args, **kwargs))
        return steps[-1]

    monkeypatch.setattr(main, 'CompiledStep', recording)
    # fp32, so that "equal" can be float tolerance: bf16 rounds differently in fused kernels
    common = ['--batch-size', '8', '--precision', 'fp32']
    main.main(tiny_args(data, tmp_path / 'compiled', '--fast', *common, epochs=2))
    # one graph per region (augmentation, forward with its backward, LARS), none broken, and
    # error_on_recompile would have raised at a second compilation of any of them
    assert compiler['stats']['unique_graphs'] == 3
    assert dict(compiler['graph_break']) == {}
    assert len(steps) == 1 and steps[0].eager_steps == 2  # each epoch's batch of 2, eagerly
    main.main(tiny_args(data, tmp_path / 'eager', '--precision', 'fp32', '--channels-last',
                        '--lars-foreach', '--fast-augment', '--batch-size', '8', epochs=2))
    _, compiled = read_stats(tmp_path / 'compiled')
    _, eager = read_stats(tmp_path / 'eager')
    assert [s['step'] for s in compiled] == [s['step'] for s in eager] == list(range(6))
    # the same views (the same parameters, drawn from the same generators), the same updates
    torch.testing.assert_close([s['loss'] for s in compiled], [s['loss'] for s in eager],
                               rtol=1e-4, atol=0)
    assert len({s['loss'] for s in compiled}) == 6  # the weights moved: a real comparison


@pytest.mark.parametrize('blur, solarize', [(1.0, 0.0), (0.1, 0.2), (0.5, 0.5)])
def test_fixed_shape_augmentation_equals_the_planned_one(blur, solarize):
    images = torch.randint(0, 256, (96, 3, 20, 20), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    augment = A.BatchAugment(blur, solarize)
    params = augment.sample_params(96, generator=torch.Generator().manual_seed(1))
    planned = augment(images, params=params)
    fixed = augment.augment_packed(images, augment.pack(params))
    blurred = params['blur']
    # every op but the blur computes the same values; the blur sums its taps in another order
    assert torch.equal(fixed[~blurred], planned[~blurred])
    torch.testing.assert_close(fixed[blurred], planned[blurred], rtol=0, atol=1e-5)
    assert 0 < int(params['jitter'].sum()) < 96 and int(params['grayscale'].sum()) > 0


def test_both_views_draw_the_same_parameters_packed_or_not():
    # main.views_to_device (planned) and CompiledStep.host_inputs (packed) draw from the same
    # step generator in the same order: compiled and uncompiled runs see the same views
    images = torch.randint(0, 256, (16, 3, 12, 12), dtype=torch.uint8)
    views = A.FastTwoViews()
    planned = views(images, images, generator=A.step_generator('cpu', 3, 7))
    packed = views.sample_packed(16, A.step_generator('cpu', 3, 7))
    fixed = views.augment_packed(images, images, packed)
    for a, b in zip(planned, fixed):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
