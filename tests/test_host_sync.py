"""The training step never makes the host wait for the device, except at logging steps.

On a GPU, reading back a value the device computed (`.item()`, a tensor's truth value,
`nonzero`, boolean-mask indexing, a copy to the host) blocks the host until the device has
caught up, and the host can no longer queue work ahead. Tensors on PyTorch's 'meta' device
have shapes and no values, and every such read fails on them: a training step that completes
with the model, the augmentation's device half, the optimizer and the probe on 'meta' asks the
device for nothing.

Two stand-ins make 'meta' usable as the training device: torch.autocast refuses 'meta' (an
autocast region is no read-back), and DistributedDataParallel needs a real process group (its
gradient all-reduce is queued on the device and returns nothing to the host).
"""
import contextlib

import pytest
import torch
from torch import nn

import augmentations as A
import distributed
import main
from test_main import tiny_args

META = torch.device('meta')


@pytest.fixture
def meta_ok(monkeypatch):
    real_autocast = torch.autocast

    def autocast(device_type, *args, **kwargs):
        if device_type == 'meta':
            return contextlib.nullcontext()
        return real_autocast(device_type, *args, **kwargs)

    class WithoutDDP(nn.Module):
        def __init__(self, module, device_ids=None):
            super().__init__()
            self.module = module

        def forward(self, *args, **kwargs):
            return self.module(*args, **kwargs)

    monkeypatch.setattr(torch, 'autocast', autocast)
    monkeypatch.setattr(nn.parallel, 'DistributedDataParallel', WithoutDDP)


@pytest.mark.parametrize('read_back', [
    lambda x: x.sum().item(),
    lambda x: bool(x.sum() > 0),
    lambda x: x.nonzero(),
    lambda x: x[x > 0],
    lambda x: x.cpu(),
    lambda x: x.tolist(),
])
def test_meta_tensors_refuse_every_read_back(read_back):
    # what makes the tests below able to fail
    with pytest.raises((RuntimeError, NotImplementedError)):
        read_back(torch.ones(8, device=META))


def test_augmentation_device_half_plans_on_the_host(meta_ok):
    images = torch.empty(64, 3, 24, 24, dtype=torch.uint8, device=META)
    views = A.FastTwoViews().to(META)(images, images, generator=A.step_generator('cpu', 0, 7))
    assert [(v.shape, v.dtype, v.device) for v in views] == \
        [((64, 3, 24, 24), torch.float32, META)] * 2
    # parameters that live on the device would have to be read back: refused
    params = A.BatchAugment(1.0, 0.0).sample_params(64)
    with pytest.raises((RuntimeError, NotImplementedError)):
        A.BatchAugment(1.0, 0.0).to(META)(images, params={k: v.to(META)
                                                           for k, v in params.items()})


@pytest.mark.parametrize('flags', [
    (),  # the original's settings (its fp16 gradient scaler, CUDA only, does read back)
    ('--fast-augment', '--precision', 'bf16', '--channels-last', '--lars-foreach'),
    ('--fast',),
], ids=['reference', 'fast-without-compile', 'fast'])
def test_training_steps_read_nothing_back_between_logging_steps(tiny_imagefolder, tmp_path,
                                                               monkeypatch, meta_ok, flags):
    # --fast: the compiled step's Python (prefetching, the fixed-shape augmentation, the
    # compiled LARS's arithmetic) run as written, uncompiled: torch.compile has no 'meta'
    # kernels, and inside a fullgraph graph a read-back would fail to compile anyway
    monkeypatch.setattr(torch, 'compile', lambda fn, **kwargs: fn)
    args = main.parse_arguments(tiny_args(tiny_imagefolder, tmp_path / 'ck', *flags,
                                          '--print-freq', '1000', epochs=1))
    info = distributed.DistInfo(rank=0, local_rank=0, world_size=1, device=META)
    run, _, _ = main.build_run(info, args)
    assert run.probe is not None and (run.augment is not None) == bool(flags)
    calls = []
    # the two places that read back on purpose: every --print-freq steps, and at the epoch's end
    monkeypatch.setattr(main, 'log_step', lambda run, epoch, step, *_: calls.append(('log', step)))
    monkeypatch.setattr(main, 'stop_if_non_finite', lambda *_: calls.append(('end of epoch',)))
    steps = []
    set_learning_rates = main.set_learning_rates
    monkeypatch.setattr(main, 'set_learning_rates',
                        lambda args, optimizer, step, *rest: steps.append(step) or
                        set_learning_rates(args, optimizer, step, *rest))
    try:
        main.train_one_epoch(run, 0)
    finally:
        run.log.close()
        run.stop.close()
    assert steps == [0, 1, 2]  # 12 images, batch 4
    if '--fast' in flags:
        assert run.compiled_step is not None and run.optimizer.compiled
    assert calls == [('log', 0), ('end of epoch',)]
    momentum = [run.optimizer.state[p]['mu'] for p in run.model.parameters()]
    assert len(momentum) == len(list(run.model.parameters()))
    assert all(m.device == META for m in momentum)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
def test_augmentation_on_cuda_matches_the_cpu_without_synchronising():
    # the pinned copy and the float64 round trip of the plan, on a real GPU
    images = torch.randint(0, 256, (32, 3, 40, 40), dtype=torch.uint8)
    params = A.BatchAugment(0.5, 0.2).sample_params(
        32, generator=torch.Generator().manual_seed(0))
    expected = A.BatchAugment(0.5, 0.2)(images, params=params)
    augment, on_device = A.BatchAugment(0.5, 0.2).cuda(), images.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('error')
    try:
        views = augment(on_device, params=params)
    finally:
        torch.cuda.set_sync_debug_mode('default')
    # (the blur's convolutions may run in TF32 on the GPU: about 1e-3 of a value)
    torch.testing.assert_close(views.cpu(), expected, atol=1e-2, rtol=0)
