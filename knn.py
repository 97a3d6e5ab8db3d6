"""Weighted k-nearest-neighbour evaluation of frozen features (evaluate.py --knn, main.py
--knn-every): features of a bank and of queries, sharded over the ranks, votes weighted by
exp(cosine similarity / T) as in Wu et al. 2018 and DINO.
"""
import math
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

import distributed
from augmentations import val_transform
from cli import InputError
from data import (SeededSamples, ShardSampler, align_classes, image_folder, is_pack_path,
                  make_eval_loader)

KNN_KS = (20, 200)
KNN_TEMPERATURE = 0.07


def knn_predict(features, bank, bank_labels, num_classes, k=20, t=KNN_TEMPERATURE,
                chunk_size=256):
    """Class predictions (Q,) of the weighted kNN classifier (Wu et al. 2018, as DINO reports).

    features (Q, D) and bank (N, D): similarity is the cosine (rows are L2-normalised here when
    they are not already); the k most similar bank rows (k capped at N) vote for their label
    with weight exp(similarity / t); the prediction is the class with the largest total.
    Memory: chunk_size x N similarities at a time (256 x 1.28M floats = 1.3 GB for ImageNet).
    """
    k = min(k, bank.shape[0])
    if not ((bank.norm(dim=1) - 1).abs() <= 1e-3).all():
        bank = F.normalize(bank, dim=1)
    predictions = [torch.empty(0, dtype=torch.long, device=features.device)]
    for chunk in features.split(chunk_size):
        similarity = F.normalize(chunk, dim=1) @ bank.T  # (q, D) @ (D, N) -> (q, N)
        top_similarity, top_index = similarity.topk(k, dim=1)  # (q, k)
        weights = (top_similarity / t).exp()
        scores = torch.zeros(len(chunk), num_classes, dtype=weights.dtype, device=weights.device)
        scores.scatter_add_(1, bank_labels[top_index], weights)  # (q, num_classes)
        predictions.append(scores.argmax(dim=1))
    return torch.cat(predictions)


@torch.no_grad()
def extract_features(backbone, loader, device, gather=False):
    """L2-normalised features and labels of this rank's shard, in eval mode; with gather=True,
    of the whole dataset on every rank (the loader must use a ShardSampler then)."""
    backbone.eval()
    features, labels = [], []
    for images, target in loader:
        features.append(F.normalize(backbone(images.to(device, non_blocking=True)).float(), dim=1))
        labels.append(target.to(device, non_blocking=True))
    if not features:  # fewer images than processes
        if gather:
            raise InputError(f'{len(loader.dataset)} images are too few for '
                             f'{distributed.world_info()[1]} processes')
        return torch.empty(0, 0, device=device), torch.empty(0, dtype=torch.long, device=device)
    features, labels = torch.cat(features), torch.cat(labels)
    if gather:
        features = gather_shards(features, loader)
        labels = gather_shards(labels, loader)
    return features, labels


def gather_shards(x, loader):
    """Reassemble per-rank ShardSampler shards (rank r holds rows r, r + W, ...) in order."""
    _, world_size = distributed.world_info()
    if world_size == 1:
        return x
    if not isinstance(loader.sampler, ShardSampler):
        raise ValueError('extract_features(gather=True) needs a loader with a ShardSampler')
    n = loader.sampler.length
    padded = x.new_zeros((math.ceil(n / world_size),) + x.shape[1:])
    padded[:len(x)] = x
    parts = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(parts, padded)
    out = x.new_empty((n,) + x.shape[1:])
    for rank, part in enumerate(parts):
        out[rank::world_size] = part[:len(range(rank, n, world_size))]
    return out


def knn_evaluate(backbone, bank_loader, query_loader, device, num_classes=None, ks=KNN_KS,
                 t=KNN_TEMPERATURE):
    """{k: top-1 in percent} of the weighted kNN classifier: the bank is bank_loader's whole
    dataset (gathered from all ranks), each rank scores its query shard, counts are summed.
    Under a process group both loaders must use ShardSampler (see make_eval_loader)."""
    bank, bank_labels = extract_features(backbone, bank_loader, device, gather=True)
    queries, labels = extract_features(backbone, query_loader, device)
    if num_classes is None:
        num_classes = int(bank_labels.max()) + 1
    counts = torch.tensor([int((knn_predict(queries, bank, bank_labels, num_classes, k, t)
                                == labels).sum()) for k in ks] + [len(labels)], device=device)
    _, world_size = distributed.world_info()
    if world_size > 1:
        dist.all_reduce(counts)
    counts = counts.tolist()
    return {k: 100.0 * c / max(counts[-1], 1) for k, c in zip(ks, counts[:-1])}


def build_monitor_loaders(args, info):
    """(bank, query) loaders for the kNN monitor, sharded over the ranks without padding."""
    if not args.knn_every:
        return None
    transform = val_transform(args.crop_size)
    bank = image_folder(args.data, transform)
    queries = None
    if is_pack_path(args.data):
        try:
            queries = image_folder(args.data, transform, 'val')
        except InputError:
            pass  # a pack without a val split
    elif (Path(args.data) / 'val').is_dir():  # a broken val folder is an error, not a fallback
        queries = image_folder(args.data, transform, 'val')
    if queries is not None:
        align_classes(queries, bank)
    else:  # hold out every 10th image (a fixed, class-balanced-enough slice) as queries
        held_out = list(range(0, len(bank), 10))
        kept = sorted(set(range(len(bank))) - set(held_out))
        bank, queries = (torch.utils.data.Subset(bank, kept), torch.utils.data.Subset(bank, held_out))
    if args.bad_images == 'skip':  # the training loader's policy holds for these images too
        bank, queries = (SeededSamples(bank, args.seed, skip_bad=True),
                         SeededSamples(queries, args.seed, skip_bad=True))
    per_device = args.batch_size // info.world_size
    return (make_eval_loader(bank, per_device, args.workers, info),
            make_eval_loader(queries, per_device, args.workers, info))
