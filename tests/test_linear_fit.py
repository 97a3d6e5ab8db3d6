"""The fast linear probe's classifier: exact on separable labels, optimal by its own gradient
conditions, and the same on two processes as on one."""
import json

import numpy as np
import torch
import linear_fit
import ranks


def separable(n=300, d=12, classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) * 3 + 1  # not standardised: the fit must standardise
    v = torch.randn(d, classes, generator=g)
    return x, (x @ v).argmax(dim=1)


def test_a_linearly_separable_labelling_is_recovered_exactly():
    x, y = separable()
    model = linear_fit.fit_linear(x, y, 5)
    assert torch.equal(model(x).argmax(dim=1), y)
    assert linear_fit.top_k_accuracy(model, x, y, ks=(1,)) == {1: 100.0}


def test_the_fit_satisfies_the_optimality_conditions():
    # Non-separable labels and a weight decay: a unique optimum, where the gradient of the mean
    # cross-entropy plus weight_decay/2 ||W||^2 vanishes. Checked in float64 numpy, independently.
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 6)) * [1, 2, 3, 4, 5, 6]
    y = rng.integers(0, 3, 200)
    wd = 0.05
    model = linear_fit.fit_linear(torch.tensor(x, dtype=torch.float32), torch.tensor(y), 3,
                                  weight_decay=wd)
    z = (x - x.mean(0)) / x.std(0)
    w = model.linear.weight.detach().double().numpy()
    b = model.linear.bias.detach().double().numpy()
    logits = z @ w.T + b
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    residual = p - np.eye(3)[y]  # d CE / d logits, per sample
    grad_w = residual.T @ z / len(y) + wd * w
    grad_b = residual.mean(0)
    assert np.abs(grad_w).max() < 1e-4 and np.abs(grad_b).max() < 1e-4
    assert np.abs(w).max() > 0.05  # it moved from the zero start


def test_top_k_accuracy_counts_by_hand():
    model = linear_fit.LinearClassifier(torch.zeros(3), torch.ones(3), 3)
    with torch.no_grad():
        model.linear.weight.copy_(torch.eye(3))
    x = torch.tensor([[3., 2, 1], [1, 3, 2], [2, 1, 3], [3, 2, 1]])
    y = torch.tensor([0, 2, 1, 2])  # top-1: right, wrong, wrong, wrong; top-2: +sample 1 only
    assert linear_fit.top_k_accuracy(model, x, y, ks=(1, 2, 3)) == {1: 25.0, 2: 50.0, 3: 100.0}


def _sharded_fit(rank, port, out_dir):
    with ranks.group(rank, port):
        x, y = separable(n=101, seed=3)
        y = (y + (torch.arange(101) % 7 == 0)) % 5  # some noise: a finite optimum with decay
        model = linear_fit.fit_linear(x[rank::2], y[rank::2], 5, weight_decay=0.01)
        acc = linear_fit.top_k_accuracy(model, x[rank::2], y[rank::2])
    (out_dir / f'rank{rank}.json').write_text(json.dumps(
        [model.linear.weight.tolist(), model.linear.bias.tolist(), acc]))


def test_two_processes_fit_what_one_process_fits(tmp_path):
    ranks.spawn(_sharded_fit, (ranks.free_port(), tmp_path))
    x, y = separable(n=101, seed=3)
    y = (y + (torch.arange(101) % 7 == 0)) % 5
    single = linear_fit.fit_linear(x, y, 5, weight_decay=0.01)
    expected_acc = linear_fit.top_k_accuracy(single, x, y)
    fits = [json.loads((tmp_path / f'rank{r}.json').read_text()) for r in range(2)]
    assert fits[0] == fits[1]  # every rank holds the same classifier
    weight, bias, acc = fits[0]
    # the same optimum, reached through float32 sums taken in another order
    assert torch.allclose(torch.tensor(weight), single.linear.weight, atol=1e-3)
    assert torch.allclose(torch.tensor(bias), single.linear.bias, atol=1e-3)
    assert acc == {str(k): v for k, v in expected_acc.items()}  # JSON keys are strings
