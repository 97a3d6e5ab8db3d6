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
from data import SeededSamples, align_classes, image_folder, is_pack_path, make_eval_loader

KNN_KS = (20, 200)
KNN_TEMPERATURE = 0.07


QUERY_CHUNK = 256  # queries scored at a time: QUERY_CHUNK x bank-shard similarities in memory


def knn_predict(features, bank, bank_labels, num_classes, k=20, t=KNN_TEMPERATURE,
                chunk_size=QUERY_CHUNK):
    """Class predictions (Q,) of the weighted kNN classifier (Wu et al. 2018, as DINO reports),
    in one process.

    features (Q, D) and bank (N, D): similarity is the cosine (rows are L2-normalised here when
    they are not already); the k most similar bank rows (k capped at N) vote for their label
    with weight exp(similarity / t); the prediction is the class with the largest total.
    Memory: chunk_size x N similarities at a time.
    """
    k = min(k, bank.shape[0])
    if not ((bank.norm(dim=1) - 1).abs() <= 1e-3).all():
        bank = F.normalize(bank, dim=1)
    predictions = [torch.empty(0, dtype=torch.long, device=features.device)]
    for chunk in features.split(chunk_size):
        similarity, labels = nearest(F.normalize(chunk, dim=1), bank, bank_labels, k)
        predictions.append(vote(similarity, labels, num_classes, t))
    return torch.cat(predictions)


def nearest(queries, bank, bank_labels, k):
    """The k most similar bank rows of each query: similarities (q, k) in fp32, best first, and
    their labels; padded with -inf (which votes nothing) where the bank has fewer than k rows."""
    similarity = queries.to(bank.dtype) @ bank.T  # (q, D) @ (D, n) -> (q, n), in the bank's dtype
    top_similarity, top_index = similarity.topk(min(k, bank.shape[0]), dim=1)
    top_similarity, top_labels = top_similarity.float(), bank_labels[top_index]
    missing = k - top_similarity.shape[1]
    if missing > 0:
        top_similarity = F.pad(top_similarity, (0, missing), value=-math.inf)
        top_labels = F.pad(top_labels, (0, missing))
    return top_similarity, top_labels


def vote(similarity, labels, num_classes, t=KNN_TEMPERATURE):
    """Predicted class (q,) from the neighbours' similarities and labels (q, k)."""
    weights = (similarity.float() / t).exp()  # fp32: exp(1 / 0.07) = 1.6e6 overflows fp16
    scores = torch.zeros(len(weights), num_classes, dtype=weights.dtype, device=weights.device)
    scores.scatter_add_(1, labels, weights)  # (q, num_classes)
    return scores.argmax(dim=1)


@torch.no_grad()
def extract_features(backbone, loader, device, dtype=torch.float32, normalize=True):
    """L2-normalised (unless normalize=False) features, in `dtype`, cast batch by batch, and
    labels of this rank's shard, in eval mode. The rows are written into one buffer: the shard
    is held once."""
    backbone.eval()
    rows = len(loader.sampler)
    features, labels, filled = None, torch.empty(rows, dtype=torch.long, device=device), 0
    for images, target in loader:
        batch = backbone(images.to(device, non_blocking=True)).float()
        if normalize:
            batch = F.normalize(batch, dim=1)
        if features is None:
            features = torch.empty(rows, batch.shape[1], dtype=dtype, device=device)
        features[filled:filled + len(batch)] = batch
        labels[filled:filled + len(batch)] = target.to(device, non_blocking=True)
        filled += len(batch)
    if features is None:  # fewer images than processes
        return torch.empty(0, 0, dtype=dtype, device=device), labels[:0]
    return features[:filled], labels[:filled]


def compute_dtype(device):
    """The autocast dtype where an autocast region is active (the kNN monitor's), else fp32."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return torch.float32


def knn_evaluate(backbone, bank_loader, query_loader, device, num_classes=None, ks=KNN_KS,
                 t=KNN_TEMPERATURE, chunk_size=QUERY_CHUNK):
    """{k: top-1 in percent} of the weighted kNN classifier with bank_loader's whole dataset as
    the bank. Under a process group both loaders must shard (ShardSampler, make_eval_loader).

    The bank stays sharded: each rank holds its shard once, in the compute dtype. Every rank's
    queries are broadcast chunk by chunk; each rank finds the chunk's k nearest rows in its
    shard, the (similarity, label) lists are all-gathered and merged, and the queries' owner
    scores them. Memory per rank: the shard, its own queries, and per chunk chunk_size x shard
    similarities plus world_size x chunk_size x k neighbours (see bench.py --knn-memory).
    """
    dtype = compute_dtype(device)
    bank, bank_labels = extract_features(backbone, bank_loader, device, dtype)
    queries, labels = extract_features(backbone, query_loader, device, dtype)
    rank, world_size = distributed.world_info()
    sizes = gather_sizes([len(bank), len(queries)], device)  # (world_size, 2)
    if int(sizes[:, 0].min()) == 0:
        raise InputError(f'{int(sizes[:, 0].sum())} bank images are too few for {world_size} '
                         f'processes')
    if num_classes is None:
        num_classes = global_max(bank_labels) + 1
    k = min(max(ks), int(sizes[:, 0].sum()))
    counts = torch.zeros(len(ks) + 1, dtype=torch.long, device=device)
    with torch.autocast(device.type, enabled=False):  # the bank is cast already, once
        for owner, start, chunk in broadcast_query_chunks(queries, sizes[:, 1].tolist(),
                                                          bank.shape[1], chunk_size):
            similarity, neighbour_labels = merge_over_ranks(
                *nearest(chunk, bank, bank_labels, k), k)
            if owner == rank:
                counts += count_correct(similarity, neighbour_labels,
                                        labels[start:start + len(chunk)], num_classes, ks, t)
    if world_size > 1:
        dist.all_reduce(counts)
    counts = counts.tolist()
    return {k: 100.0 * c / max(counts[-1], 1) for k, c in zip(ks, counts[:-1])}


def count_correct(similarity, neighbour_labels, labels, num_classes, ks, t):
    """(len(ks) + 1,) counts: right predictions for each k, then the number of queries."""
    right = [(vote(similarity[:, :k], neighbour_labels[:, :k], num_classes, t) == labels).sum()
             for k in ks]
    return torch.stack(right + [torch.tensor(len(labels), device=labels.device)])


def gather_sizes(values, device):
    """(world_size, len(values)) table of every rank's `values`."""
    mine = torch.tensor([values], dtype=torch.long, device=device)
    _, world_size = distributed.world_info()
    if world_size == 1:
        return mine
    parts = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(parts, mine)
    return torch.cat(parts)


def global_max(x):
    top = x.max().reshape(1) if len(x) else torch.zeros(1, dtype=x.dtype, device=x.device)
    if distributed.world_info()[1] > 1:
        dist.all_reduce(top, op=dist.ReduceOp.MAX)
    return int(top)


def broadcast_query_chunks(queries, counts, dim, chunk_size):
    """(owner rank, first row, chunk) for every chunk of every rank's queries, on every rank."""
    rank, world_size = distributed.world_info()
    for owner, count in enumerate(counts):
        for start in range(0, count, chunk_size):
            if owner == rank:
                chunk = queries[start:start + chunk_size].contiguous()
            else:
                chunk = queries.new_empty((min(chunk_size, count - start), dim))
            if world_size > 1:
                dist.broadcast(chunk, src=owner)
            yield owner, start, chunk


def merge_over_ranks(similarity, labels, k):
    """Every rank's k nearest (q, k) lists merged into the k nearest over the whole bank."""
    _, world_size = distributed.world_info()
    if world_size == 1:
        return similarity, labels
    similarities = [torch.empty_like(similarity) for _ in range(world_size)]
    all_labels = [torch.empty_like(labels) for _ in range(world_size)]
    dist.all_gather(similarities, similarity)
    dist.all_gather(all_labels, labels)
    top_similarity, top_index = torch.cat(similarities, dim=1).topk(k, dim=1)  # (q, W k) -> (q, k)
    return top_similarity, torch.cat(all_labels, dim=1).gather(1, top_index)


def peak_bytes_per_rank(bank_size, dim, world_size, query_count, dtype_bytes,
                        k=max(KNN_KS), chunk_size=QUERY_CHUNK):
    """Bytes one rank of knn_evaluate holds at its peak (while scoring a chunk), from the
    shapes above; the backbone's activations for one batch come on top."""
    shard, own_queries = math.ceil(bank_size / world_size), math.ceil(query_count / world_size)
    held = shard * (dim * dtype_bytes + 8) + own_queries * (dim * dtype_bytes + 8)
    chunk = chunk_size * dim * dtype_bytes  # the broadcast queries
    similarity = chunk_size * shard * dtype_bytes  # (chunk, shard) in the bank's dtype
    neighbours = chunk_size * k * (dtype_bytes + 8 + 4 + 8)  # topk, then fp32 and labels
    merged = 2 * world_size * chunk_size * k * (4 + 8)  # all-gathered lists, concatenated
    return held + chunk + similarity + neighbours + merged


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
