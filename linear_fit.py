"""A linear classifier fitted on frozen features: the fast linear probe.

The reference protocol (evaluate.py's default) trains the linear head for 100 epochs of
augmented crops, re-running the backbone on every image every epoch. Here the backbone runs once
per image (validation transform, no augmentation); the features are standardised with the
training set's mean and standard deviation, and a multinomial logistic regression

    min_W,b  mean_i CE(W x_i + b, y_i) + weight_decay / 2 * ||W||^2

is fitted by full-batch L-BFGS. Under a process group each rank keeps its own shard of the
features: the loss and the gradient are summed over the ranks at every evaluation, so every rank
takes the same steps and ends with the same classifier as one process on all the features.
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F

import distributed


def _all_reduce(tensor):
    if distributed.world_info()[1] > 1:
        dist.all_reduce(tensor)
    return tensor


def feature_statistics(features):
    """(mean, std) per dimension over the features of every rank; std is never 0."""
    count = _all_reduce(torch.tensor([float(len(features))], dtype=torch.float64,
                                     device=features.device))
    x = features.double()
    total = _all_reduce(x.sum(dim=0))
    mean = total / count
    squares = _all_reduce(((x - mean) ** 2).sum(dim=0))
    std = (squares / count).sqrt().clamp_min(1e-6)
    return mean.float(), std.float()


class LinearClassifier(torch.nn.Module):
    """Standardisation (fixed) followed by a linear layer: logits for raw features."""

    def __init__(self, mean, std, num_classes):
        super().__init__()
        self.register_buffer('mean', mean)
        self.register_buffer('std', std)
        self.linear = torch.nn.Linear(len(mean), num_classes, device=mean.device)
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)

    def forward(self, features):
        return self.linear((features - self.mean) / self.std)


def fit_linear(features, labels, num_classes, weight_decay=0.0, max_iter=500):
    """The classifier minimising the mean cross-entropy over every rank's (features, labels)
    plus weight_decay / 2 * ||W||^2 (the bias is not decayed), by full-batch L-BFGS from zero."""
    mean, std = feature_statistics(features)
    model = LinearClassifier(mean, std, num_classes)
    x = (features.float() - mean) / std  # standardised once, not per evaluation
    total = _all_reduce(torch.tensor([float(len(labels))], device=features.device))
    weight, bias = model.linear.weight, model.linear.bias
    optimizer = torch.optim.LBFGS([weight, bias], lr=1, max_iter=max_iter, history_size=20,
                                  tolerance_grad=1e-9, tolerance_change=1e-12,
                                  line_search_fn='strong_wolfe')

    def closure():
        optimizer.zero_grad()
        data_loss = F.cross_entropy(x @ weight.T + bias, labels, reduction='sum') / total
        data_loss.backward()
        # every rank's share of the loss and gradient, summed: the full-batch values
        loss = _all_reduce(data_loss.detach().clone())
        _all_reduce(weight.grad)
        _all_reduce(bias.grad)
        weight.grad.add_(weight.detach(), alpha=weight_decay)
        return loss + weight_decay / 2 * weight.detach().pow(2).sum()

    optimizer.step(closure)
    return model


@torch.no_grad()
def top_k_accuracy(model, features, labels, ks=(1, 5)):
    """{k: top-k accuracy in percent} over every rank's (features, labels)."""
    logits = model(features.float())
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = top == labels[:, None]
    counts = torch.tensor([float(hits[:, :k].any(dim=1).sum()) for k in ks] + [float(len(labels))],
                          device=features.device)
    counts = _all_reduce(counts).tolist()
    return {k: 100.0 * c / max(counts[-1], 1) for k, c in zip(ks, counts[:-1])}
