"""Two gloo processes on the CPU against one process on the concatenated batch.

Every rank is started the way torchrun starts it (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE,
LOCAL_RANK in the environment) and enters through `distributed.launch(..., device='cpu')`. One spawn
runs every scenario; each rank writes its results to a file that the tests below compare with a
single process (plain BatchNorm, no process group) on the whole global batch.
"""
import argparse
import os

import pytest
import torch
from torch import nn

import distributed
import main
import ranks

WORLD = 2
N = 8  # global batch, N // WORLD per rank
FEATURES = 6
MODES = {  # name -> the gradient flags of main.py, and the expected multiple of the full gradient
    'default': (dict(exact_gradient=False, reference_world_size=None), 1 / WORLD),
    'exact': (dict(exact_gradient=True, reference_world_size=None), 1.0),
    'reference16': (dict(exact_gradient=False, reference_world_size=16), 1 / 16),
}
LRS = (0.5, 0.05)  # one LARS step: weights, 1-D parameters
BN_CASES = {  # name -> (layer, per-rank sample counts, input shape after the batch dimension)
    'bn2d': (lambda: nn.BatchNorm2d(5), (4, 4), (5, 3, 3)),
    'bn1d-no-affine': (lambda: nn.BatchNorm1d(7, affine=False), (4, 4), (7,)),
    'bn2d-uneven-cumulative': (lambda: nn.BatchNorm2d(5, momentum=None), (3, 5), (5, 2, 2)),
}


def make_model():
    backbone = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, FEATURES, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(FEATURES),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return main.BarlowTwins(backbone=backbone, feature_dim=FEATURES, projector='32-32',
                            lambd=0.0051, batch_size=N)


def make_optimizer(model):
    # The groups and filters of main.build_model_and_optimizer (checked in the workers).
    optimizer = main.LARS([{'params': [p for p in model.parameters() if p.ndim != 1]},
                           {'params': [p for p in model.parameters() if p.ndim == 1]}],
                          lr=0, weight_decay=1e-6, weight_decay_filter=True,
                          lars_adaptation_filter=True)
    for group, lr in zip(optimizer.param_groups, LRS):
        group['lr'] = lr
    return optimizer


def train_step(model, module, y1, y2, factor):
    """One step as main.train_one_epoch takes it; `module` is the unwrapped model."""
    optimizer = make_optimizer(module)
    optimizer.zero_grad()
    loss = model.forward(y1, y2)
    (loss * factor).backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters()}
    buffers = {n: b.clone() for n, b in module.named_buffers()}
    optimizer.step()
    params = {n: p.detach().clone() for n, p in module.named_parameters()}
    return dict(loss=loss.detach().clone(), grads=grads, buffers=buffers, params=params)


def bn_step(layer, xs, ws):
    """Two training-mode forwards (statistics updated twice) and a backward of sum(y * w)."""
    xs = [x.clone().requires_grad_() for x in xs]
    ys = [layer(x) for x in xs]
    sum((y * w).sum() for y, w in zip(ys, ws)).backward()
    out = dict(ys=[y.detach() for y in ys], x_grads=[x.grad for x in xs],
               buffers={n: b.clone() for n, b in layer.named_buffers()})
    out.update({f'{n}.grad': p.grad.clone() for n, p in layer.named_parameters()})
    return out


# ---------------------------------------------------------------------------------------------
# What each rank runs
# ---------------------------------------------------------------------------------------------

def product_wrapping(info):
    """What main.build_model_and_optimizer builds (a small resnet18): the facts make_model and
    make_optimizer copy."""
    args = argparse.Namespace(arch='resnet18', cifar_stem=True, projector='32-32', batch_size=N,
                              lambd=0.0051, scale_loss=1.0, learning_rate=None,
                              weight_decay=1e-6)
    model, optimizer = main.build_model_and_optimizer(args, info)
    norms = [type(m) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    return dict(
        ddp=isinstance(model, nn.parallel.DistributedDataParallel),
        norm_types=sorted({t.__name__ for t in norms}),
        group_ndims=[sorted({p.ndim for p in g['params']}) for g in optimizer.param_groups],
        filters=[(g['weight_decay_filter'], g['lars_adaptation_filter'])
                 for g in optimizer.param_groups])


def rank_worker(info, setup_path, out_path):
    torch.set_num_threads(1)
    setup = torch.load(setup_path)
    results = dict(rank=info.rank, world_size=info.world_size, device=info.device.type,
                   wrapping=product_wrapping(info), modes={}, bn={})
    per_rank = N // info.world_size
    mine = slice(info.rank * per_rank, (info.rank + 1) * per_rank)
    for mode, (flags, _) in MODES.items():
        module = make_model()
        module.load_state_dict(setup['state'])
        module = distributed.convert_global_batchnorm(module)
        model = nn.parallel.DistributedDataParallel(module)
        factor = main.gradient_factor(argparse.Namespace(**flags), info.world_size)
        results['modes'][mode] = train_step(model, module, setup['y1'][mine], setup['y2'][mine],
                                            factor)
    for name, (make_layer, counts, _) in BN_CASES.items():
        layer = make_layer()
        layer.load_state_dict(setup['bn'][name]['state'])
        layer = distributed.convert_global_batchnorm(layer)
        results['bn'][name] = dict(type=type(layer).__name__)
        start = sum(counts[:info.rank])
        mine_bn = slice(start, start + counts[info.rank])
        xs, ws = setup['bn'][name]['xs'], setup['bn'][name]['ws']
        results['bn'][name].update(bn_step(layer, [x[mine_bn] for x in xs],
                                           [w[mine_bn] for w in ws]))
    torch.save(results, out_path)


def rank_entry(rank, port, setup_path, out_dir):
    """A child process, started as torchrun would start it."""
    os.environ.update(MASTER_ADDR='localhost', MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    distributed.launch(rank_worker, (setup_path, os.path.join(out_dir, f'rank{rank}.pt')),
                       device='cpu')


def run_ranks(setup_path, out_dir, timeout=600):
    ranks.spawn(rank_entry, (ranks.free_port(), str(setup_path), str(out_dir)), nprocs=WORLD,
                timeout=timeout)
    return [torch.load(out_dir / f'rank{r}.pt') for r in range(WORLD)]


# ---------------------------------------------------------------------------------------------
# Single-process references and the spawn, shared by the tests
# ---------------------------------------------------------------------------------------------

def make_setup():
    torch.manual_seed(0)
    model = make_model()
    with torch.no_grad():  # BatchNorm affine parameters away from (1, 0), so they matter
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    y1 = torch.randn(N, 3, 8, 8)
    y2 = 0.6 * y1 + 0.8 * torch.randn(N, 3, 8, 8)
    bn = {}
    for name, (make_layer, counts, shape) in BN_CASES.items():
        layer = make_layer()
        if layer.affine:
            with torch.no_grad():
                layer.weight.uniform_(0.5, 1.5)
                layer.bias.uniform_(-0.3, 0.3)
        n = sum(counts)
        bn[name] = dict(state=layer.state_dict(),
                        xs=[torch.randn(n, *shape) * 2 + 3, torch.randn(n, *shape) - 1],
                        ws=[torch.randn(n, *shape), torch.randn(n, *shape)])
    return dict(state=model.state_dict(), y1=y1, y2=y2, bn=bn)


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp('ranks')
    setup = make_setup()
    torch.save(setup, out_dir / 'setup.pt')
    ranks = run_ranks(out_dir / 'setup.pt', out_dir)

    model = make_model()
    model.load_state_dict(setup['state'])
    single = train_step(model, model, setup['y1'], setup['y2'], 1.0)
    single_bn = {}
    for name, (make_layer, _, _) in BN_CASES.items():
        layer = make_layer()
        layer.load_state_dict(setup['bn'][name]['state'])
        single_bn[name] = bn_step(layer, setup['bn'][name]['xs'], setup['bn'][name]['ws'])
    return dict(ranks=ranks, single=single, single_bn=single_bn)


def assert_close_dicts(got, want, scale=1.0, rtol=1e-4, what=''):
    assert got.keys() == want.keys()
    for k in want:
        expected = want[k] * scale if want[k].is_floating_point() else want[k]
        atol = 1e-5 * max(float(expected.abs().max()), 1e-3) if expected.is_floating_point() else 0
        torch.testing.assert_close(got[k], expected, rtol=rtol, atol=atol,
                                   msg=lambda m: f'{what}{k}: {m}')


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------

def test_ranks_start_through_the_torchrun_path(runs):
    for r, res in enumerate(runs['ranks']):
        assert (res['rank'], res['world_size'], res['device']) == (r, WORLD, 'cpu')
        # main.build_model_and_optimizer wraps as make_model/make_optimizer above do.
        assert res['wrapping'] == dict(ddp=True, norm_types=['GlobalBatchNorm'],
                                       group_ndims=[[2, 4], [1]],
                                       filters=[(True, True), (True, True)])


@pytest.mark.parametrize('mode', list(MODES))
def test_loss_on_each_rank_equals_single_process_loss(runs, mode):
    for res in runs['ranks']:
        torch.testing.assert_close(res['modes'][mode]['loss'], runs['single']['loss'],
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('mode', list(MODES))
def test_gradient_scale_of_each_mode(runs, mode):
    # default: full-batch gradient / world size (the reference); exact: the full-batch gradient;
    # reference16: as the reference at 16 processes, i.e. full-batch gradient / 16.
    _, multiple = MODES[mode]
    full = runs['single']['grads']
    assert any(float(g.abs().max()) > 1e-4 for g in full.values())  # not a vacuous comparison
    for r, res in enumerate(runs['ranks']):
        assert_close_dicts(res['modes'][mode]['grads'], full, scale=multiple,
                           what=f'rank {r}, {mode}: ')


def test_exact_gradient_step_equals_single_process_step(runs):
    # With the exact gradient, one LARS step lands where the single process lands.
    for r, res in enumerate(runs['ranks']):
        assert_close_dicts(res['modes']['exact']['params'], runs['single']['params'],
                           rtol=1e-5, what=f'rank {r}: ')


@pytest.mark.parametrize('mode', list(MODES))
def test_batchnorm_running_statistics_are_global(runs, mode):
    want = runs['single']['buffers']
    assert any('running_var' in k for k in want) and 'bn.running_mean' in want
    for r, res in enumerate(runs['ranks']):
        assert_close_dicts(res['modes'][mode]['buffers'], want, rtol=1e-5,
                           what=f'rank {r}, {mode}: ')


@pytest.mark.parametrize('case', list(BN_CASES))
def test_global_batchnorm_equals_batchnorm_on_concatenated_input(runs, case):
    _, counts, _ = BN_CASES[case]
    want = runs['single_bn'][case]
    param_grads = [k for k in want if k.endswith('.grad')]
    starts = [sum(counts[:r]) for r in range(WORLD)]
    for r, res in enumerate(runs['ranks']):
        got = res['bn'][case]
        assert got['type'] == 'GlobalBatchNorm'
        mine = slice(starts[r], starts[r] + counts[r])
        for i in range(2):
            torch.testing.assert_close(got['ys'][i], want['ys'][i][mine], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got['x_grads'][i], want['x_grads'][i][mine],
                                       rtol=1e-4, atol=1e-5)
        assert_close_dicts(got['buffers'], want['buffers'], rtol=1e-5, what=f'rank {r}: ')
    # Without DDP each rank holds its own samples' share of the parameter gradients.
    for k in param_grads:
        total = sum(res['bn'][case][k] for res in runs['ranks'])
        torch.testing.assert_close(total, want[k], rtol=1e-4, atol=1e-5)
