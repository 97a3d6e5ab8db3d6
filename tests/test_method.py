"""The method against an independent implementation of the reference formulas (REFERENCE.md).

Everything named `ref_*` below is written from the formulas, in float64, and shares no code with
main.py: the Barlow Twins loss, the projector forward, LARS and the learning-rate schedule.
"""
import argparse
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import main

EPS = 1e-5  # BatchNorm1d's default eps


# ---------------------------------------------------------------------------------------------
# Reference implementations
# ---------------------------------------------------------------------------------------------

def ref_standardise(z):
    """BatchNorm1d(affine=False) in training mode: per-dimension mean and biased variance."""
    z = z.double()
    mean = z.mean(dim=0)
    var = ((z - mean) ** 2).mean(dim=0)
    return (z - mean) / torch.sqrt(var + EPS)


def ref_terms(z1, z2, batch_size=None):
    """(sum_i (c_ii - 1)^2, sum_{i != j} c_ij^2) with c = bn(z1)^T bn(z2) / N."""
    n = batch_size or z1.shape[0]
    c = ref_standardise(z1).T @ ref_standardise(z2) / n  # (D, N) @ (N, D)
    d = c.shape[0]
    eye = torch.eye(d, dtype=torch.bool)
    on_diag = sum((c[i, i] - 1) ** 2 for i in range(d))
    off_diag = (c[~eye] ** 2).sum()
    return on_diag, off_diag


def ref_loss(z1, z2, lambd, batch_size=None, scale_loss=1.0):
    on_diag, off_diag = ref_terms(z1, z2, batch_size)
    return scale_loss * on_diag + scale_loss * lambd * off_diag


def ref_off_diagonal(x):
    n = x.shape[0]
    return torch.stack([x[i, j] for i in range(n) for j in range(n) if i != j])


def ref_schedule(step, steps_per_epoch, epochs, batch_size, warmup_epochs=10):
    base = batch_size / 256
    warmup = warmup_epochs * steps_per_epoch
    if step < warmup:
        return base * step / warmup
    q = 0.5 * (1 + math.cos(math.pi * (step - warmup) / (epochs * steps_per_epoch - warmup)))
    return base * q + 0.001 * base * (1 - q)


def is_1d(p):
    return p.dim() == 1


def never(p):
    return False


def ref_lars_step(params, grads, state, lr, weight_decay, skip_wd, skip_lars, momentum=0.9,
                  eta=0.001, clip_lr=False, ratios=None):
    """One LARS step on plain tensors; returns the new parameters, updates `state` (mu).
    clip_lr: solo-learn's lars_lr = min(lars_lr / lr, 1); `ratios` collects the unclipped ones."""
    new = []
    for i, (p, g) in enumerate(zip(params, grads)):
        if not skip_wd(p):
            g = g + weight_decay * p
        if not skip_lars(p):
            p_norm, g_norm = p.norm().item(), g.norm().item()
            ratio = eta * p_norm / g_norm if p_norm > 0 and g_norm > 0 else 1.0
            if ratios is not None:
                ratios.append(ratio / lr)
            if clip_lr:
                ratio = min(ratio / lr, 1.0)
            g = g * ratio
        state[i] = momentum * state[i] + g if i in state else g.clone()
        new.append(p - lr * state[i])
    return new


# ---------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------

def embeddings(n=24, d=8, seed=0, correlated=True):
    gen = torch.Generator().manual_seed(seed)
    z1 = torch.randn(n, d, generator=gen) * 3 + torch.randn(d, generator=gen) * 5
    noise = torch.randn(n, d, generator=gen)
    z2 = (z1 + noise) if correlated else noise * 2 - 1
    return z1, z2


def test_off_diagonal_is_row_major_off_diagonal_elements():
    x = torch.arange(36.0).view(6, 6)
    assert main.off_diagonal(x).tolist() == ref_off_diagonal(x).tolist()
    x = torch.randn(5, 5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(main.off_diagonal(x), ref_off_diagonal(x))
    with pytest.raises(AssertionError):
        main.off_diagonal(torch.zeros(3, 4))


@pytest.mark.parametrize('lambd', [0.0, 0.0051, 1.0])
@pytest.mark.parametrize('correlated', [True, False])
def test_loss_matches_reference_formula(lambd, correlated):
    # lambd 0 isolates the on-diagonal term; lambd 1 makes the off-diagonal term weigh as much.
    z1, z2 = embeddings(correlated=correlated)
    model = main.BarlowTwins(backbone=nn.Identity(), feature_dim=4, projector='8', lambd=lambd)
    loss = model.loss(z1, z2)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss.double(), ref_loss(z1, z2, lambd), rtol=1e-5, atol=1e-6)


def test_loss_default_lambd_is_0_0051():
    z1, z2 = embeddings()
    model = main.BarlowTwins(backbone=nn.Identity(), feature_dim=4, projector='8')
    on_diag, off_diag = ref_terms(z1, z2)
    torch.testing.assert_close(model.loss(z1, z2).double(), on_diag + 0.0051 * off_diag,
                               rtol=1e-5, atol=1e-6)


def test_loss_divides_by_the_nominal_batch_size():
    # `batch_size` is the nominal global batch (the reference divides by it even on a short
    # last batch); without it, c is divided by the actual batch.
    z1, z2 = embeddings(n=24)
    nominal = main.BarlowTwins(backbone=nn.Identity(), feature_dim=4, projector='8', lambd=0.3,
                               batch_size=32)
    actual = main.BarlowTwins(backbone=nn.Identity(), feature_dim=4, projector='8', lambd=0.3)
    torch.testing.assert_close(nominal.loss(z1, z2).double(), ref_loss(z1, z2, 0.3, batch_size=32),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(actual.loss(z1, z2).double(), ref_loss(z1, z2, 0.3, batch_size=24),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('lambd', [0.0, 0.0051, 1.0])
def test_scale_loss_multiplies_both_terms(lambd):
    z1, z2 = embeddings()
    model = main.BarlowTwins(backbone=nn.Identity(), feature_dim=4, projector='8', lambd=lambd,
                             scale_loss=0.024)
    torch.testing.assert_close(model.loss(z1, z2).double(),
                               ref_loss(z1, z2, lambd, scale_loss=0.024), rtol=1e-5, atol=1e-7)


def test_earlier_release_command_line_reaches_the_loss():
    # The seed README's command (projector shrunk): --scale-loss and --lambd from the CLI.
    args = main.parse_arguments(['/nonexistent', '--epochs', '1000', '--batch-size', '24',
                                 '--learning-rate', '0.2', '--lambd', '0.0051',
                                 '--projector', '8', '--scale-loss', '0.024'])
    model = main.BarlowTwins(args, backbone=nn.Identity(), feature_dim=8)
    z1, z2 = embeddings(n=24)
    torch.testing.assert_close(model.loss(z1, z2).double(),
                               ref_loss(z1, z2, 0.0051, batch_size=24, scale_loss=0.024),
                               rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize('correlated', [True, False])
def test_loss_invariant_to_per_dimension_affine_maps(correlated):
    z1, z2 = embeddings(n=32, d=8, correlated=correlated)
    gen = torch.Generator().manual_seed(2)
    model = main.BarlowTwins(backbone=nn.Identity(), feature_dim=4, projector='8', lambd=0.0051)
    base = model.loss(z1, z2)
    for _ in range(3):
        a1, a2 = (torch.rand(8, generator=gen) * 4 + 0.5 for _ in range(2))  # a > 0, per dim
        b1, b2 = (torch.randn(8, generator=gen) * 10 for _ in range(2))
        moved = model.loss(a1 * z1 + b1, a2 * z2 + b2)
        # Only the BatchNorm eps (1e-5 against variances >= ~2) breaks exact invariance.
        torch.testing.assert_close(moved, base, rtol=2e-5, atol=2e-5)
    # ...and the property is not vacuous: a non-affine change of z2 moves the loss.
    assert not torch.allclose(model.loss(z1, z2 ** 3), base, rtol=1e-2)


def ref_forward(model, x1, x2, lambd, batch_size):
    """Backbone Linear+Tanh, projector Linear(no bias)-BN-ReLU-Linear(no bias), from the formulas
    on float64 copies of the parameters (which get .grad)."""
    params = {k: v.detach().double().clone().requires_grad_() for k, v in
              model.named_parameters()}

    def embed(x):
        h = torch.tanh(F.linear(x.double(), params['backbone.0.weight'], params['backbone.0.bias']))
        h = h @ params['projector.0.weight'].T
        h = ref_standardise(h) * params['projector.1.weight'] + params['projector.1.bias']
        return torch.relu(h) @ params['projector.3.weight'].T

    return ref_loss(embed(x1), embed(x2), lambd, batch_size), params


@pytest.mark.parametrize('batch_size', [None, 10, 16])
def test_forward_with_custom_backbone_matches_reference(batch_size):
    torch.manual_seed(0)
    model = main.BarlowTwins(backbone=nn.Sequential(nn.Linear(5, 7), nn.Tanh()), feature_dim=7,
                             projector='16-16', lambd=0.2, batch_size=batch_size)
    # The reference state-dict layout (official checkpoints load into it).
    assert [k for k in model.state_dict() if not k.startswith('backbone.')] == [
        'projector.0.weight', 'projector.1.weight', 'projector.1.bias',
        'projector.1.running_mean', 'projector.1.running_var', 'projector.1.num_batches_tracked',
        'projector.3.weight', 'bn.running_mean', 'bn.running_var', 'bn.num_batches_tracked']
    assert model.projector[0].bias is None and model.projector[3].bias is None
    assert not model.bn.affine
    with torch.no_grad():  # BatchNorm affine parameters away from (1, 0), so they matter
        model.projector[1].weight.uniform_(0.5, 2.0)
        model.projector[1].bias.uniform_(-0.5, 0.5)
    x1, x2 = torch.randn(10, 5), torch.randn(10, 5)
    x2 = 0.7 * x1 + 0.3 * x2
    loss = model(x1, x2)
    expected, ref_params = ref_forward(model, x1, x2, 0.2, batch_size)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    # The gradient too: nothing in the loss is detached or computed outside autograd.
    loss.backward()
    expected.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad.double(), ref_params[name].grad, rtol=1e-4, atol=1e-6,
                                   msg=lambda m: f'{name}: {m}')


# ---------------------------------------------------------------------------------------------
# LARS
# ---------------------------------------------------------------------------------------------

def small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(12, 4)).double()


@pytest.fixture
def compiler():
    """A fresh torch.compile (no code compiled for earlier tests, which could use up its
    recompilation limit and leave a test running eagerly) and its counters."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    yield counters
    torch._dynamo.reset()


def lars_variant(name, request):
    """LARS keyword arguments of a loop/foreach/compiled parametrization."""
    if name == 'compiled':
        request.getfixturevalue('compiler')
    return dict(foreach=name == 'foreach', compiled=name == 'compiled')


def assert_compiled_once(counters):
    # fullgraph=True: a graph break would have raised; one graph, compiled, no eager fallback
    assert counters['stats']['unique_graphs'] == 1 and not counters['graph_break']


def run_lars(filters, ref_skips, steps=4, weight_decay=0.05, lrs=(0.5, 0.05), foreach=False,
             eta=0.001, clip_lr=False, ratios=None, compiled=False):
    """`steps` LARS steps on small_net with two groups (weights, 1-D) at different lr, and the
    same steps by ref_lars_step fed the same gradients; returns the LARS optimizer."""
    net = small_net()
    weights = [p for p in net.parameters() if p.dim() > 1]
    biases = [p for p in net.parameters() if p.dim() == 1]
    opt = main.LARS([{'params': weights, 'lr': lrs[0]}, {'params': biases, 'lr': lrs[1]}], lr=0,
                    weight_decay=weight_decay, weight_decay_filter=filters[0],
                    lars_adaptation_filter=filters[1], foreach=foreach, eta=eta,
                    clip_lr=clip_lr, compiled=compiled)
    ref = [[p.detach().clone() for p in weights], [p.detach().clone() for p in biases]]
    ref_state = [{}, {}]
    gen = torch.Generator().manual_seed(3)
    for step in range(steps):
        opt.zero_grad()
        x = torch.randn(6, 2, 4, 4, generator=gen, dtype=torch.float64)
        out = net(x)
        (out.pow(2).sum() + out.sum()).backward()
        grads = [[p.grad.clone() for p in weights], [p.grad.clone() for p in biases]]
        opt.step()
        for k in range(2):
            ref[k] = ref_lars_step(ref[k], grads[k], ref_state[k], lrs[k], weight_decay,
                                   *ref_skips, eta=eta, clip_lr=clip_lr, ratios=ratios)
            for got, want in zip((weights, biases)[k], ref[k]):
                torch.testing.assert_close(got.detach(), want, rtol=1e-12, atol=1e-14,
                                           msg=lambda m: f'step {step}, group {k}: {m}')
    return opt, (weights, biases), ref_state


@pytest.mark.parametrize('filters, ref_skips', [
    ((True, True), (is_1d, is_1d)),  # as build_model_and_optimizer
    ((main.exclude_bias_and_norm, main.exclude_bias_and_norm), (is_1d, is_1d)),  # earlier release
    ((False, False), (never, never)),
    ((None, None), (never, never)),
    ((False, True), (never, is_1d)),
    ((True, False), (is_1d, never)),
    ((lambda p: p.dim() == 4, lambda p: p.dim() == 2), (lambda p: p.dim() == 4,
                                                        lambda p: p.dim() == 2)),
], ids=['true', 'exclude_bias_and_norm', 'false', 'none', 'wd-all', 'lars-all', 'custom'])
@pytest.mark.parametrize('variant', ['loop', 'foreach'])
def test_lars_matches_reference_over_several_steps(filters, ref_skips, variant, request):
    check_lars_against_reference(filters, ref_skips, variant, request)


@pytest.mark.parametrize('filters, ref_skips', [
    ((True, True), (is_1d, is_1d)),
    ((lambda p: p.dim() == 4, lambda p: p.dim() == 2), (lambda p: p.dim() == 4,
                                                        lambda p: p.dim() == 2)),
], ids=['true', 'custom'])  # main.py's filters, and callable ones (a compile costs seconds)
def test_compiled_lars_matches_reference_over_several_steps(filters, ref_skips, request):
    check_lars_against_reference(filters, ref_skips, 'compiled', request)
    assert_compiled_once(request.getfixturevalue('compiler'))


def check_lars_against_reference(filters, ref_skips, variant, request):
    opt, (weights, biases), ref_state = run_lars(filters, ref_skips,
                                                 **lars_variant(variant, request))
    # A single buffer named mu per parameter, equal to the reference's momentum buffer.
    for k, group in enumerate((weights, biases)):
        for i, p in enumerate(group):
            assert list(opt.state[p]) == ['mu']
            torch.testing.assert_close(opt.state[p]['mu'], ref_state[k][i], rtol=1e-12, atol=1e-14)
    assert all(set(s) == {'mu'} for s in opt.state_dict()['state'].values())


@pytest.mark.parametrize('variant', ['loop', 'foreach', 'compiled'])
def test_lars_eta_and_clip_lr_match_solo_learns_formula(variant, request):
    # solo-learn's CIFAR recipe: eta 0.02 with clip_lr. All tensors are adapted, so that the
    # group at lr 0.05 has ratios on both sides of 1: some tensors clipped, some not.
    ratios = []
    run_lars((True, False), (is_1d, never), eta=0.02, clip_lr=True, ratios=ratios,
             **lars_variant(variant, request))
    assert min(ratios) < 1 < max(ratios)
    if variant == 'compiled':
        assert_compiled_once(request.getfixturevalue('compiler'))
    args = main.parse_arguments(['data', '--lars-eta', '0.02', '--lars-clip-lr'])
    assert (args.lars_eta, args.lars_clip_lr) == (0.02, True)
    defaults = main.parse_arguments(['data'])
    assert (defaults.lars_eta, defaults.lars_clip_lr) == (0.001, False)  # the reference's


def test_lars_1d_params_get_neither_weight_decay_nor_trust_ratio():
    net = small_net()
    weights = [p for p in net.parameters() if p.dim() > 1]
    biases = [p for p in net.parameters() if p.dim() == 1]
    opt = main.LARS([{'params': weights, 'lr': 0.5}, {'params': biases, 'lr': 0.05}], lr=0,
                    weight_decay=0.5, weight_decay_filter=True, lars_adaptation_filter=True)
    before = [p.detach().clone() for p in net.parameters()]
    net(torch.randn(6, 2, 4, 4, dtype=torch.float64)).pow(2).sum().backward()
    grads = [p.grad.clone() for p in net.parameters()]
    opt.step()
    for p, p0, g in zip(net.parameters(), before, grads):
        if p.dim() == 1:  # plain momentum SGD: first step is -lr * g, despite weight decay 0.5
            torch.testing.assert_close(p.detach(), p0 - 0.05 * g, rtol=1e-12, atol=1e-14)
        else:  # first step's length is lr * eta * ||p||, whatever ||g||
            step_norm = (p.detach() - p0).norm()
            torch.testing.assert_close(step_norm, 0.5 * 0.001 * p0.norm(), rtol=1e-10, atol=0)


@pytest.mark.parametrize('variant', ['loop', 'foreach', 'compiled'])
def test_lars_zero_norms_use_ratio_one(variant, request):
    p_zero = nn.Parameter(torch.zeros(3, 2, dtype=torch.float64))  # ||p|| = 0
    p_still = nn.Parameter(torch.ones(3, 2, dtype=torch.float64))  # ||g|| = 0 (no weight decay)
    opt = main.LARS([p_zero, p_still], lr=0.1, weight_decay=0, weight_decay_filter=True,
                    lars_adaptation_filter=True, **lars_variant(variant, request))
    g = torch.arange(6, dtype=torch.float64).view(3, 2)
    p_zero.grad, p_still.grad = g.clone(), torch.zeros(3, 2, dtype=torch.float64)
    opt.step()
    # ratio 1, not eta * 0 / ||g|| = 0: the zero tensor moves by -lr * g
    torch.testing.assert_close(p_zero.detach(), -0.1 * g, rtol=1e-12, atol=1e-14)
    # ratio 1, not eta * ||p|| / 0 = inf (0 * inf = nan): nothing moves, nothing is nan
    assert torch.equal(p_still.detach(), torch.ones(3, 2, dtype=torch.float64))
    assert torch.equal(opt.state[p_still]['mu'], torch.zeros(3, 2, dtype=torch.float64))


@pytest.mark.parametrize('variant', ['loop', 'foreach', 'compiled'])
def test_lars_ratio_that_would_overflow_is_one_on_the_fast_paths(variant, request):
    # float32: ||p|| = 1 and an update of norm 1e-42 (a denormal: what is left of a gradient
    # that vanished, e.g. behind a BatchNorm over two samples) give eta * ||p|| / ||u|| = 1e39,
    # beyond float32's 3.4e38: inf, and an inf step. --lars-foreach and --compile take ratio 1
    # instead: the update as is. The default loop keeps the reference's arithmetic, inf.
    p = nn.Parameter(torch.tensor([[1.0, 0.0]]))
    opt = main.LARS([p], lr=0.1, weight_decay=0, weight_decay_filter=True,
                    lars_adaptation_filter=True, **lars_variant(variant, request))
    p.grad = torch.tensor([[0.0, 1e-42]])
    assert float(1e-3 * p.detach().norm() / p.grad.norm()) == math.inf  # the overflow is real
    opt.step()
    if variant == 'loop':  # the reference's arithmetic, whatever it gives
        p0, g0 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1e-42]])
        one = torch.ones(())
        q = torch.where(torch.norm(p0) > 0., torch.where(
            torch.norm(g0) > 0, 1e-3 * torch.norm(p0) / torch.norm(g0), one), one)
        torch.testing.assert_close(p.detach(), p0 - 0.1 * g0 * q, rtol=0, atol=0,
                                   equal_nan=True)
        return
    assert torch.isfinite(p).all()
    torch.testing.assert_close(p.detach(), torch.tensor([[1.0, -1e-43]]), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Learning-rate schedule
# ---------------------------------------------------------------------------------------------

EPOCHS, L, BATCH = 100, 7, 512  # 7 steps per epoch
STEPS = {'start': 0, 'mid-warmup': 5 * L + 3, 'last-warmup': 10 * L - 1, 'end-of-warmup': 10 * L,
         'middle': (10 * L + EPOCHS * L) // 2, 'last': EPOCHS * L - 1}


def test_schedule_matches_reference_formula():
    base = BATCH / 256
    for name, step in STEPS.items():
        got = main.learning_rate_schedule(step, L, EPOCHS, BATCH)
        assert got == pytest.approx(ref_schedule(step, L, EPOCHS, BATCH), rel=1e-12, abs=0), name
    # Closed forms at the landmarks.
    assert main.learning_rate_schedule(0, L, EPOCHS, BATCH) == 0
    assert main.learning_rate_schedule(10 * L, L, EPOCHS, BATCH) == pytest.approx(base)
    assert main.learning_rate_schedule(STEPS['middle'], L, EPOCHS, BATCH) == \
        pytest.approx(base * 0.5005)  # q = 1/2
    # one step before the end of the cosine: just above the floor of base / 1000
    last = main.learning_rate_schedule(EPOCHS * L - 1, L, EPOCHS, BATCH)
    assert base * 0.001 < last < base * 0.00101


def lars_with_groups(n_groups):
    params = [nn.Parameter(torch.ones(2, 2)), nn.Parameter(torch.ones(2))]
    groups = [{'params': params}] if n_groups == 1 else [{'params': [p]} for p in params]
    return main.LARS(groups, lr=0, weight_decay=1e-6, weight_decay_filter=True,
                     lars_adaptation_filter=True)


@pytest.mark.parametrize('name', list(STEPS))
def test_adjust_learning_rate_two_groups_defaults(name):
    args = main.parse_arguments(['/nonexistent', '--epochs', str(EPOCHS), '--batch-size',
                                 str(BATCH)])
    optimizer = lars_with_groups(2)
    main.adjust_learning_rate(args, optimizer, range(L), STEPS[name])
    lr = ref_schedule(STEPS[name], L, EPOCHS, BATCH)
    assert optimizer.param_groups[0]['lr'] == pytest.approx(lr * 0.2, rel=1e-12, abs=0)
    assert optimizer.param_groups[1]['lr'] == pytest.approx(lr * 0.0048, rel=1e-12, abs=0)


def test_adjust_learning_rate_given_rates():
    args = argparse.Namespace(epochs=EPOCHS, batch_size=BATCH, learning_rate=None,
                              learning_rate_weights=0.3, learning_rate_biases=0.01)
    optimizer = lars_with_groups(2)
    step = STEPS['middle'] + 11
    main.adjust_learning_rate(args, optimizer, [None] * L, step)
    lr = ref_schedule(step, L, EPOCHS, BATCH)
    assert optimizer.param_groups[0]['lr'] == pytest.approx(lr * 0.3, rel=1e-12)
    assert optimizer.param_groups[1]['lr'] == pytest.approx(lr * 0.01, rel=1e-12)


@pytest.mark.parametrize('name', list(STEPS))
def test_adjust_learning_rate_earlier_release_single_group(name):
    args = main.parse_arguments(['/nonexistent', '--epochs', str(EPOCHS), '--batch-size',
                                 str(BATCH), '--learning-rate', '0.2', '--scale-loss', '0.024'])
    optimizer = lars_with_groups(1)
    main.adjust_learning_rate(args, optimizer, range(L), STEPS[name])
    assert len(optimizer.param_groups) == 1
    assert optimizer.param_groups[0]['lr'] == \
        pytest.approx(0.2 * ref_schedule(STEPS[name], L, EPOCHS, BATCH), rel=1e-12, abs=0)


class RecordAtenOps(TorchDispatchMode):
    """The aten operations dispatched inside the mode, with their arguments."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append((func, args))
        return func(*args, **(kwargs or {}))


def lars_step_ops(tensor_count):
    """The aten ops of one --lars-foreach step (after the first, which creates the buffers) of
    a model with `tensor_count` parameter tensors: half weights of mixed shapes (one in
    channels-last strides), half 1-D, in the two groups of build_model_and_optimizer."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(3, 2, 2, 2), (5, 4), (7, 3, 1, 1), (2, 9)]
    weights = [torch.randn(shapes[i % 4], generator=gen) for i in range(tensor_count // 2)]
    weights[0] = weights[0].contiguous(memory_format=torch.channels_last)
    biases = [torch.randn(i % 5 + 1, generator=gen) for i in range(tensor_count // 2)]
    params = [nn.Parameter(t) for t in weights + biases]
    opt = main.LARS([{'params': params[:len(weights)]}, {'params': params[len(weights):]}], lr=0.1,
                    weight_decay=1e-4, weight_decay_filter=True, lars_adaptation_filter=True,
                    foreach=True)
    for step in range(2):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).as_strided(p.shape, p.stride())
        if step == 0:
            opt.step()
    with RecordAtenOps() as mode:
        opt.step()
    return mode.calls


def test_lars_foreach_launches_a_fixed_number_of_shape_matched_multi_tensor_ops():
    # CUDA's multi-tensor kernels need paired lists of equal shapes and strides, each tensor
    # dense; a kernel per tensor is what --lars-foreach is there to avoid
    few, many = lars_step_ops(10), lars_step_ops(200)
    kernels = [[func for func, _ in calls if not func.is_view] for calls in (few, many)]
    assert kernels[0] == kernels[1]
    foreach_calls = [(func, args) for func, args in many if func.__name__.startswith('_foreach')]
    assert len(foreach_calls) >= 6
    for func, args in foreach_calls:
        lists = [a for a in args if isinstance(a, (list, tuple))]
        assert all(len(lst) == len(lists[0]) for lst in lists), func
        for tensors in zip(*lists):
            assert all(t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)
                       for t in tensors), func
            assert len({(t.shape, t.stride()) for t in tensors}) == 1, \
                (func, [(t.shape, t.stride()) for t in tensors])
