"""Learning on real images: pretraining on Fashion-MNIST lowers the loss, and bench_learning.py
evaluates what its rows say."""
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision

import bench_learning
import main
import prepare_data
from backbones import build_backbone
from conftest import ROOT, make_image_folder

DEBIAN_FASHION_MNIST = Path('/usr/share/datasets/fashion-mnist')


def independent_views_loss(dim, batch, lambd=0.0051):
    """The README's "independent noise in the two views" line: D (1 + 1/N) + lambd D (D-1) / N."""
    return dim * (1 + 1 / batch) + lambd * dim * (dim - 1) / batch


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(),
                    reason='needs Fashion-MNIST from the Debian package dataset-fashion-mnist '
                           '(apt-get install dataset-fashion-mnist; .ci/run installs it as root)')
def test_pretraining_on_fashion_mnist_lowers_the_loss_clearly(tmp_path):
    data = tmp_path / 'fashion-mnist'
    prepare_data.main(['fashion-mnist', str(data), '--from', str(DEBIAN_FASHION_MNIST),
                       '--train-per-class', '32', '--val-per-class', '2'])
    batch, dim, epochs = 64, 256, 12
    # 16-px crops of the 32-px images: in the full suite this test took 91-93 s at 16 px and
    # 95-112 s at 32 px (a step's cost is mostly layers 3-4's weight gradients), and the loss
    # falls further in the same steps
    main.main([str(data), '--arch', 'resnet18', '--crop-size', '16', '--projector',
               f'{dim}-{dim}-{dim}', '--batch-size', str(batch), '--epochs', str(epochs),
               '--warmup-epochs', '1', '--drop-last', '--blur-prob', '0,0', '--workers', '1',
               '--device', 'cpu', '--print-freq', '1', '--no-online-probe',
               '--checkpoint-dir', str(tmp_path / 'run')])
    records = [json.loads(line) for line in (tmp_path / 'run' / 'stats.txt').read_text()
               .splitlines() if line.startswith('{')]
    losses = [r['loss'] for r in records if 'loss' in r]
    steps_per_epoch = 320 // batch
    assert len(losses) == epochs * steps_per_epoch
    start, last_epoch = losses[0], losses[-steps_per_epoch:]
    independent = independent_views_loss(dim, batch)
    print(f'loss: first step {start:.1f}, last epoch {min(last_epoch):.1f}-{max(last_epoch):.1f}'
          f', independent views {independent:.1f}')
    # measured (torch 2.14.1): 237 at the first step, at most 175 (mean 158) in the last epoch,
    # independent views 265. The mean of the last epoch a fifth below the start, and every one
    # of its steps below the start and a quarter below the independent line: no lucky batch
    assert sum(last_epoch) / len(last_epoch) < 0.8 * start
    assert max(last_epoch) < 0.9 * start
    assert max(last_epoch) < 0.75 * independent


# ---------------------------------------------------------------------------------------------
# bench_learning.py: each row is what it says
# ---------------------------------------------------------------------------------------------

def brute_force_weighted_knn(bank, bank_labels, queries, k, num_classes, t=0.07):
    """One query at a time with Python loops: cosine similarities, the k largest, their
    exp(s / t) votes."""
    predictions = []
    for q in queries:
        sims = [float(F.cosine_similarity(q, b, dim=0)) for b in bank]
        order = sorted(range(len(sims)), key=lambda i: -sims[i])[:k]
        votes = [0.0] * num_classes
        for i in order:
            votes[int(bank_labels[i])] += math.exp(sims[i] / t)
        predictions.append(max(range(num_classes), key=votes.__getitem__))
    return torch.tensor(predictions)


def test_bench_learning_rows_are_the_backbones_and_pixels_they_name(tmp_path, capsys):
    # 18 training images: k = 20 and k = 200 both take the whole bank
    data = make_image_folder(tmp_path / 'data', classes=('a', 'b', 'c'), per_class=6,
                             val_per_class=4, size=16)
    # "pretrained" = torchvision's default initialisation drawn from the same seed: its row
    # must equal the default random-initialisation row, and differ from the zero-residual one
    torch.manual_seed(3)
    net, _ = build_backbone('resnet18', False, zero_init_residual=False)
    weights = tmp_path / 'net.pth'
    torch.save(net.state_dict(), weights)
    rows = bench_learning.main(['--data', str(data), '--pretrained', str(weights), '--seed', '3',
                                '--work-dir', str(tmp_path / 'work')])
    names = [r[0] for r in rows]
    assert names[0].startswith('pretrained') and names[3] == 'raw pixels'
    assert rows[0][1:] == rows[1][1:]
    blocks = [m for m in build_backbone('resnet18', False, zero_init_residual=True)[0].modules()
              if isinstance(m, torchvision.models.resnet.BasicBlock)]
    assert blocks and all(float(b.bn2.weight.detach().abs().max()) == 0 for b in blocks)
    assert all(float(b.bn2.weight.detach().abs().min()) == 1 for b in net.modules()
               if isinstance(b, torchvision.models.resnet.BasicBlock))
    # the raw-pixel kNN, recomputed by brute force
    train, train_labels, classes = bench_learning.load_split(data, 'train', 32)
    val, val_labels, _ = bench_learning.load_split(data, 'val', 32)
    predicted = brute_force_weighted_knn(train.flatten(1), train_labels, val.flatten(1), 20,
                                         classes)
    expected = 100.0 * float((predicted == val_labels).float().mean())
    assert rows[3][1] == pytest.approx(expected) and rows[3][2] == pytest.approx(expected)
    out = capsys.readouterr().out
    assert '| raw pixels |' in out and 'pretrained minus the better random initialisation' in out


def test_bench_learning_refuses_a_pretraining_folder_that_holds_another_run(tmp_path, capfd):
    # a rerun continues its own pretraining run (main.py resumes it); another kind of run in
    # the folder is refused by main.py before anything is trained, and said
    data = make_image_folder(tmp_path / 'data', per_class=2, val_per_class=1, size=16)
    run_dir = tmp_path / 'work' / 'pretrain'
    run_dir.mkdir(parents=True)
    (run_dir / 'stats.txt').write_text(f"'{ROOT / 'evaluate.py'}' /data /x/resnet18.pth --knn\n"
                                       '{"knn_top1": {"20": 50.0}}\n')
    with pytest.raises(SystemExit, match='main.py failed'):
        bench_learning.main(['--data', str(data), '--work-dir', str(tmp_path / 'work')])
    err = capfd.readouterr().err
    assert f'{run_dir} holds a kNN run' in err and 'Traceback' not in err, err
    assert not (run_dir / 'checkpoint.pth').exists()
