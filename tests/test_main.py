"""End-to-end runs of main.py on a tiny generated ImageFolder (CPU, deterministic)."""
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torchvision

import cli
import distributed
import main
import ranks
from conftest import ROOT, SimulatedKill

STATS_KEYS = {'epoch', 'step', 'lr_weights', 'lr_biases', 'loss', 'time'}  # the reference's


def tiny_args(data, ckdir, *extra, epochs=2, workers=0):
    return [str(data), '--arch', 'resnet18', '--cifar-stem', '--crop-size', '16',
            '--projector', '32-32', '--batch-size', '4', '--epochs', str(epochs),
            '--workers', str(workers), '--device', 'cpu', '--checkpoint-dir', str(ckdir),
            '--print-freq', '1', '--warmup-epochs', '1', *extra]


def read_stats(ckdir):
    lines = (ckdir / 'stats.txt').read_text().splitlines()
    return lines, [json.loads(line) for line in lines if line.startswith('{')]


def load_state(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def assert_same_tensors(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_run_writes_reference_artefacts(tiny_imagefolder, tmp_path):
    ckdir = tmp_path / 'ck'
    main.main(tiny_args(tiny_imagefolder, ckdir))

    lines, stats = read_stats(ckdir)
    assert lines[0].startswith('main.py ') and '--projector 32-32' in lines[0]
    assert len(stats) == 6  # 12 images / batch 4 = 3 steps per epoch, print-freq 1, 2 epochs
    assert all(set(s) == STATS_KEYS | {'online_acc1'} for s in stats)
    assert [s['step'] for s in stats] == list(range(6))
    assert [s['epoch'] for s in stats] == [0, 0, 0, 1, 1, 1]
    assert stats[0]['lr_weights'] == 0.0  # warmup starts at zero
    # warmup of one epoch (3 steps): step 1 is at 1/3 of the peak 0.2 * 4/256
    assert stats[1]['lr_weights'] == pytest.approx(0.2 * 4 / 256 / 3)
    assert stats[1]['lr_biases'] == pytest.approx(0.0048 * 4 / 256 / 3)

    ckpt = load_state(ckdir / 'checkpoint.pth')
    assert {'epoch', 'model', 'optimizer', 'scaler', 'args'} <= set(ckpt)
    assert ckpt['epoch'] == 2
    assert all(k.startswith('module.') for k in ckpt['model'])
    assert {'module.backbone.conv1.weight', 'module.projector.0.weight',
            'module.projector.1.running_mean', 'module.projector.3.weight',
            'module.bn.running_var'} <= set(ckpt['model'])
    assert len(ckpt['optimizer']['param_groups']) == 2
    assert all(set(s) == {'mu'} for s in ckpt['optimizer']['state'].values())

    backbone = load_state(ckdir / 'resnet18.pth')
    net = torchvision.models.resnet18()
    net.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    result = net.load_state_dict(backbone, strict=False)
    assert sorted(result.missing_keys) == ['fc.bias', 'fc.weight']
    assert result.unexpected_keys == []


def test_resnet50_export_loads_into_torchvision(tmp_path):
    from conftest import make_image_folder
    data = make_image_folder(tmp_path / 'data', per_class=2, size=32)
    ckdir = tmp_path / 'ck'
    main.main([str(data), '--crop-size', '32', '--projector', '16-16', '--batch-size', '4',
               '--epochs', '1', '--workers', '0', '--device', 'cpu',
               '--checkpoint-dir', str(ckdir)])
    result = torchvision.models.resnet50().load_state_dict(load_state(ckdir / 'resnet50.pth'),
                                                           strict=False)
    assert sorted(result.missing_keys) == ['fc.bias', 'fc.weight']
    assert result.unexpected_keys == []


def crash_at_step(monkeypatch, crash_step):
    real = main.set_learning_rates

    def set_rates(args, optimizer, step, steps_per_epoch):
        if step == crash_step:
            raise SimulatedKill
        return real(args, optimizer, step, steps_per_epoch)
    monkeypatch.setattr(main, 'set_learning_rates', set_rates)


def test_interrupted_run_resumes_to_identical_weights(tiny_imagefolder, tmp_path, monkeypatch):
    straight, broken = tmp_path / 'straight', tmp_path / 'broken'
    main.main(tiny_args(tiny_imagefolder, straight, epochs=3, workers=1))

    with monkeypatch.context() as m:
        crash_at_step(m, 4)  # in the middle of the second epoch
        with pytest.raises(SimulatedKill):
            main.main(tiny_args(tiny_imagefolder, broken, epochs=3, workers=1))
    assert load_state(broken / 'checkpoint.pth')['epoch'] == 1
    assert not (broken / 'resnet18.pth').exists()

    main.main(tiny_args(tiny_imagefolder, broken, epochs=3, workers=1))
    _, stats = read_stats(broken)
    assert [s['step'] for s in stats] == [0, 1, 2, 3, 3, 4, 5, 6, 7, 8]  # epoch 1 ran again
    assert_same_tensors(load_state(straight / 'resnet18.pth'), load_state(broken / 'resnet18.pth'))
    a, b = load_state(straight / 'checkpoint.pth'), load_state(broken / 'checkpoint.pth')
    assert_same_tensors(a['model'], b['model'])
    for k in a['optimizer']['state']:
        assert torch.equal(a['optimizer']['state'][k]['mu'], b['optimizer']['state'][k]['mu'])


def to_original_format(path, earlier_release, monkeypatch):
    """Rewrite our checkpoint as the reference code saves it: {epoch, model, optimizer} only;
    the earlier release pickled its filter function from `__main__`."""
    ckpt = load_state(path)
    ckpt = {k: ckpt[k] for k in ('epoch', 'model', 'optimizer')}
    if earlier_release:
        def exclude_bias_and_norm(p):
            return p.ndim == 1
        exclude_bias_and_norm.__module__ = '__main__'
        exclude_bias_and_norm.__qualname__ = 'exclude_bias_and_norm'
        monkeypatch.setattr(sys.modules['__main__'], 'exclude_bias_and_norm',
                            exclude_bias_and_norm, raising=False)
        for g in ckpt['optimizer']['param_groups']:
            g['weight_decay_filter'] = g['lars_adaptation_filter'] = exclude_bias_and_norm
    torch.save(ckpt, path)
    if earlier_release:
        monkeypatch.delattr(sys.modules['__main__'], 'exclude_bias_and_norm')
        with pytest.raises(Exception):  # needs the compatibility unpickler
            torch.load(path, weights_only=True)


@pytest.mark.parametrize('earlier_release', [False, True], ids=['current', 'earlier-release'])
def test_original_checkpoint_resumes(tiny_imagefolder, tmp_path, monkeypatch, earlier_release):
    flags = ['--learning-rate', '0.2', '--scale-loss', '0.024'] if earlier_release else []
    straight, resumed = tmp_path / 'straight', tmp_path / 'resumed'
    main.main(tiny_args(tiny_imagefolder, straight, *flags))
    with monkeypatch.context() as m:
        crash_at_step(m, 3)
        with pytest.raises(SimulatedKill):
            main.main(tiny_args(tiny_imagefolder, resumed, *flags))
    to_original_format(resumed / 'checkpoint.pth', earlier_release, monkeypatch)

    main.main(tiny_args(tiny_imagefolder, resumed, *flags))
    # The original's checkpoint has no scaler state; fp32 on CPU does not use one, so the
    # resumed run must match exactly.
    assert_same_tensors(load_state(straight / 'resnet18.pth'), load_state(resumed / 'resnet18.pth'))
    groups = load_state(resumed / 'checkpoint.pth')['optimizer']['param_groups']
    assert len(groups) == (1 if earlier_release else 2)


def test_earlier_release_flags_use_one_rate(tiny_imagefolder, tmp_path):
    ckdir = tmp_path / 'ck'
    main.main(tiny_args(tiny_imagefolder, ckdir, '--learning-rate', '0.3', '--scale-loss', '0.5',
                        epochs=1))
    _, stats = read_stats(ckdir)
    assert stats[1]['lr_weights'] == stats[1]['lr_biases'] == pytest.approx(0.3 * 4 / 256 / 3)
    # scale-loss multiplies the loss: the first step (same seed, no update yet) halves
    main.main(tiny_args(tiny_imagefolder, tmp_path / 'unscaled', '--learning-rate', '0.3',
                        epochs=1))
    _, unscaled = read_stats(tmp_path / 'unscaled')
    assert stats[0]['loss'] == pytest.approx(0.5 * unscaled[0]['loss'], rel=1e-5)


def test_non_finite_loss_stops_and_keeps_checkpoint(tiny_imagefolder, tmp_path, capsys):
    ckdir = tmp_path / 'ck'
    main.main(tiny_args(tiny_imagefolder, ckdir, epochs=1))
    before = (ckdir / 'checkpoint.pth').read_bytes()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main.main(tiny_args(tiny_imagefolder, ckdir, '--learning-rate-weights', '1e30',
                            '--learning-rate-biases', '1e30', '--warmup-epochs', '0', epochs=3))
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'non-finite loss at step' in err[0]
    assert (ckdir / 'checkpoint.pth').read_bytes() == before


def test_legitimate_image_modes_train(tmp_path):
    from PIL import Image
    import numpy as np
    rng = np.random.default_rng(0)
    for cls, mode, ext in (('grey', 'L', 'JPEG'), ('cmyk', 'CMYK', 'jpg'), ('png', 'RGBA', 'png')):
        folder = tmp_path / 'data' / 'train' / cls
        folder.mkdir(parents=True)
        for i in range(2):
            channels = len(mode)
            pixels = rng.integers(0, 256, (24, 24, channels) if channels > 1 else (24, 24),
                                  dtype=np.uint8)
            Image.fromarray(pixels, mode).save(folder / f'{cls}_{i}.{ext}')
    main.main(tiny_args(tmp_path / 'data', tmp_path / 'ck', epochs=1))
    assert (tmp_path / 'ck' / 'resnet18.pth').is_file()


def _corrupt(data, name, payload):
    path = data / 'train' / 'class_a' / name
    path.write_bytes(payload)
    return path


BAD_INPUT = [
    # (id, how to break the input, extra flags, exit code, words the one-line error must contain)
    ('missing-dir', lambda d, t: t / 'nowhere', [], 1, ['nowhere', 'does not exist']),
    ('no-train', lambda d, t: (t / 'empty').mkdir() or t / 'empty', [], 1, ['train', 'not found']),
    ('empty-class', lambda d, t: (d / 'train' / 'class_c').mkdir() or d, [], 1, ['class_c']),
    ('truncated-jpeg', lambda d, t: _corrupt(d, 'class_a_0.JPEG',
                                             (d / 'train/class_a/class_a_1.JPEG').read_bytes()[:300])
     and d, [], 1, ['class_a_0.JPEG']),
    ('not-an-image', lambda d, t: _corrupt(d, 'class_a_0.JPEG', b'plain text, not a JPEG') and d,
     [], 1, ['class_a_0.JPEG', 'cannot read image']),
    ('bad-projector', None, ['--projector', '8192-abc'], 2, ['--projector', '8192-abc']),
    ('mixed-lr-flags', None, ['--learning-rate', '0.2', '--learning-rate-weights', '0.2'], 2,
     ['--learning-rate', '--learning-rate-weights']),
    ('two-grad-modes', None, ['--exact-gradient', '--reference-world-size', '16'], 2,
     ['--exact-gradient', '--reference-world-size']),
    ('negative-epochs', None, ['--epochs', '-1'], 2, ['--epochs']),
    ('no-gpu', None, ['--device', 'cuda'], 1, ['--device cuda', 'no CUDA GPU']),
]


@pytest.mark.parametrize('case', BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
def test_bad_input_one_line_error(case, tiny_imagefolder, tmp_path, capsys):
    _, breaker, flags, code, words = case
    data = breaker(tiny_imagefolder, tmp_path) if breaker else tiny_imagefolder
    with pytest.raises(SystemExit) as exit_info:
        main.main(tiny_args(data, tmp_path / 'ck', *flags, epochs=1))
    message = exit_info.value.code if isinstance(exit_info.value.code, str) else ''
    err_lines = [line for line in (capsys.readouterr().err + message).splitlines() if line.strip()]
    assert len(err_lines) == 1, err_lines
    assert all(w in err_lines[0] for w in words), err_lines[0]
    returned = exit_info.value.code
    assert (1 if isinstance(returned, str) else returned) == code


@pytest.mark.parametrize('setup', ['other-projector', 'garbage-file'])
def test_bad_checkpoint_is_reported_and_kept(setup, tiny_imagefolder, tmp_path, capsys):
    ckdir = tmp_path / 'ck'
    if setup == 'other-projector':
        main.main(tiny_args(tiny_imagefolder, ckdir, epochs=1))
    else:
        ckdir.mkdir()
        (ckdir / 'checkpoint.pth').write_bytes(b'\x00 not a checkpoint')
    before = (ckdir / 'checkpoint.pth').read_bytes()
    capsys.readouterr()
    args = tiny_args(tiny_imagefolder, ckdir, epochs=2)
    args[args.index('--projector') + 1] = '64-64'
    with pytest.raises(SystemExit) as exit_info:
        main.main(args)
    assert exit_info.value.code == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1
    assert ('projector' in err[0]) if setup == 'other-projector' else ('cannot read' in err[0])
    assert (ckdir / 'checkpoint.pth').read_bytes() == before


def test_batch_size_must_divide_world_size(tiny_imagefolder, tmp_path):
    args = main.parse_arguments(tiny_args(tiny_imagefolder, tmp_path / 'ck'))
    info = distributed.DistInfo(rank=0, local_rank=0, world_size=3, device=torch.device('cpu'))
    with pytest.raises(cli.InputError, match='--batch-size 4 is not divisible by the world size 3'):
        main.train(info, args)


def test_cli_error_is_one_line_and_nonzero(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / 'main.py'), str(tmp_path / 'missing'),
                           '--device', 'cpu'], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode != 0
    assert proc.stderr.strip().count('\n') == 0 and 'does not exist' in proc.stderr


def test_no_gpu_says_so_in_one_plain_line_and_uses_cpu(capsys):
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # a Python warning would show its source line too
        assert distributed.choose_device_type('auto') == 'cpu'
    err = capsys.readouterr().err
    assert err.startswith('note: no CUDA GPU found') and err.count('\n') == 1
    assert distributed.choose_device_type('cpu') == 'cpu'
    assert capsys.readouterr().err == ''  # asked for explicitly: nothing to say


def _two_process_worker(rank, port, argv):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE='2',
                      MASTER_ADDR='localhost', MASTER_PORT=str(port))
    torch.set_num_threads(1)
    main.main(argv)


def test_two_cpu_processes_train(tiny_imagefolder, tmp_path):
    ckdir = tmp_path / 'ck'
    ranks.spawn(_two_process_worker,
                (ranks.free_port(), tiny_args(tiny_imagefolder, ckdir, '--exact-gradient')))
    lines, stats = read_stats(ckdir)
    assert lines.count(lines[0]) == 1  # only rank 0 logs
    # 12 images over 2 ranks with 2 per rank: 3 steps per epoch, as with one process
    assert [s['step'] for s in stats] == list(range(6))
    assert load_state(ckdir / 'checkpoint.pth')['epoch'] == 2


def test_fast_settings_train_and_keep_the_checkpoint_layout(tiny_imagefolder, tmp_path):
    reference, fast = tmp_path / 'reference', tmp_path / 'fast'
    main.main(tiny_args(tiny_imagefolder, reference, epochs=1))
    # --fast without compiling (a CPU compile of ResNet-18 takes minutes): bf16, channels-last,
    # multi-tensor LARS
    main.main(tiny_args(tiny_imagefolder, fast, '--precision', 'bf16', '--channels-last',
                        '--lars-foreach', epochs=1))
    a, b = load_state(reference / 'checkpoint.pth'), load_state(fast / 'checkpoint.pth')
    assert a['model'].keys() == b['model'].keys()
    _, stats = read_stats(fast)
    assert all(torch.isfinite(torch.tensor(s['loss'])) for s in stats)
    assert b['args']['precision'] == 'bf16'


FAST_WITHOUT_COMPILE = ('--precision', 'bf16', '--channels-last', '--lars-foreach',
                        '--fast-augment')


def assert_compiled_trains_like_plain(plain_dir, compiled_dir):
    """Three steps, the first step's loss equal up to bf16 rounding, finite losses, the same
    checkpoint keys."""
    _, plain = read_stats(plain_dir)
    _, compiled = read_stats(compiled_dir)
    assert [s['step'] for s in compiled] == [0, 1, 2]
    assert compiled[0]['loss'] == pytest.approx(plain[0]['loss'], rel=0.02)
    assert all(torch.isfinite(torch.tensor(s['loss'])) for s in compiled)
    assert load_state(compiled_dir / 'checkpoint.pth')['model'].keys() == \
        load_state(plain_dir / 'checkpoint.pth')['model'].keys()


@pytest.mark.slow  # about a minute of compiling; tests/test_compiled_step.py covers one process
def test_fast_with_compile_trains_like_without_on_two_processes(tiny_imagefolder, tmp_path):
    # --fast on two processes compiles the model inside DistributedDataParallel (minutes of CPU
    # compiling, cold): backbone, projector and loss, global BatchNorm's and the loss's
    # collectives traced by the compiler. The first step runs before any update, so its loss is
    # the uncompiled model's (same two processes, same views) up to bf16 rounding; no graph
    # break (dynamo's own counters), a graph for the model (and the augmentation, and LARS)
    ranks.spawn(_two_process_worker, (ranks.free_port(), tiny_args(
        tiny_imagefolder, tmp_path / 'plain', *FAST_WITHOUT_COMPILE, epochs=1)))
    ranks.spawn(_two_process_worker_counting_graph_breaks,
                (ranks.free_port(), tiny_args(tiny_imagefolder, tmp_path / 'two', '--fast',
                                              epochs=1), tmp_path))
    assert_compiled_trains_like_plain(tmp_path / 'plain', tmp_path / 'two')
    for rank in range(2):
        counts = json.loads((tmp_path / f'dynamo{rank}.json').read_text())
        print(f'rank {rank}: dynamo graph breaks {counts["graph_break"]}, '
              f'{counts["unique_graphs"]} graphs')
        assert counts['graph_break'] == {} and counts['unique_graphs'] >= 2


@pytest.mark.slow  # another cold compile; tests/test_compiled_step.py covers the compiled step
def test_fast_with_compile_trains_like_without_in_one_process(tiny_imagefolder, tmp_path):
    main.main(tiny_args(tiny_imagefolder, tmp_path / 'plain', *FAST_WITHOUT_COMPILE, epochs=1))
    main.main(tiny_args(tiny_imagefolder, tmp_path / 'compiled', '--fast', epochs=1))
    assert_compiled_trains_like_plain(tmp_path / 'plain', tmp_path / 'compiled')


def _two_process_worker_counting_graph_breaks(rank, port, argv, out_dir):
    from torch._dynamo.utils import counters
    _two_process_worker(rank, port, argv)
    (out_dir / f'dynamo{rank}.json').write_text(json.dumps(dict(
        graph_break=dict(counters['graph_break']),
        unique_graphs=counters['stats']['unique_graphs'])))


def test_compile_on_several_gpus_uses_the_traceable_global_batchnorm(tiny_imagefolder,
                                                                    tmp_path, monkeypatch):
    # nn.SyncBatchNorm breaks torch.compile's graph at every layer; on CPU every multi-process
    # run uses GlobalBatchNorm anyway, so what is checked here is the choice main.py asks for
    chosen = []
    convert = distributed.convert_global_batchnorm
    monkeypatch.setattr(distributed, 'convert_global_batchnorm',
                        lambda module, traceable=False: chosen.append(traceable) or
                        convert(module, traceable))
    monkeypatch.setattr(torch.nn.parallel, 'DistributedDataParallel',
                        lambda module, device_ids=None: module)  # no process group needed
    for flags, world_size in (((), 2), (('--compile',), 1), (('--compile',), 2)):
        args = main.parse_arguments(tiny_args(tiny_imagefolder, tmp_path / 'ck', *flags))
        info = distributed.DistInfo(rank=0, local_rank=0, world_size=world_size,
                                    device=torch.device('cpu'))
        main.build_model_and_optimizer(args, info)
    assert chosen == [False, False, True]


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
def test_traceable_batchnorm_replaces_syncbatchnorm_on_cuda():
    def bn_types(**kwargs):
        module = distributed.convert_global_batchnorm(main.BarlowTwins(
            backbone=torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)),
            feature_dim=4, projector='8-8').cuda(), **kwargs)
        return {type(m).__name__ for m in module.modules() if 'Norm' in type(m).__name__}
    assert bn_types() == {'SyncBatchNorm'}
    assert bn_types(traceable=True) == {'GlobalBatchNorm'}


def test_compiled_model_keeps_parameter_names(tiny_imagefolder, tmp_path):
    args = main.parse_arguments(tiny_args(tiny_imagefolder, tmp_path / 'ck', '--fast'))
    assert (args.precision, args.channels_last, args.compile, args.lars_foreach,
            args.fast_augment) == \
        ('bf16', True, True, True, True)
    info = distributed.DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device('cpu'))
    distributed._init_process_group(0, 0, 1, 'cpu')
    try:
        compiled, optimizer = main.build_model_and_optimizer(args, info)
        args.compile = False
        plain, _ = main.build_model_and_optimizer(args, info)
    finally:
        distributed.cleanup()
    assert compiled.state_dict().keys() == plain.state_dict().keys()
    assert optimizer.foreach


def test_fast_augment_trains_and_resumes_mid_epoch_exactly(tiny_imagefolder, tmp_path,
                                                          monkeypatch):
    straight, broken = tmp_path / 'straight', tmp_path / 'broken'
    main.main(tiny_args(tiny_imagefolder, straight, '--fast-augment', epochs=2))
    with monkeypatch.context() as m:
        crash_at_step(m, 4)
        with pytest.raises(SimulatedKill):
            main.main(tiny_args(tiny_imagefolder, broken, '--fast-augment', '--checkpoint-every',
                                '0s', epochs=2))
    assert load_state(broken / 'checkpoint.pth')['step_in_epoch'] == 1
    main.main(tiny_args(tiny_imagefolder, broken, '--fast-augment', epochs=2, workers=2))
    assert_same_tensors(load_state(straight / 'resnet18.pth'), load_state(broken / 'resnet18.pth'))
    # the fast path draws other random numbers than the PIL path: a different run
    main.main(tiny_args(tiny_imagefolder, tmp_path / 'pil', epochs=2))
    pil = load_state(tmp_path / 'pil' / 'resnet18.pth')
    assert not torch.equal(pil['conv1.weight'], load_state(straight / 'resnet18.pth')['conv1.weight'])


def test_demo_ends_with_the_knn_gain_over_the_untrained_network(tiny_imagefolder, tmp_path,
                                                                capsys):
    ckdir = tmp_path / 'demo'
    main.main(tiny_args(tiny_imagefolder, ckdir, '--demo', epochs=1))
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith('demo: ')]
    assert len(lines) == 4
    assert 'on the 4 held-out demo images (chance 50%)' in lines[0]
    assert [line.split('%  ', 1)[1] for line in lines[1:]] == [
        'after training', 'the same network before training',
        "torchvision's default random initialisation"]
    _, stats = read_stats(ckdir)
    gain = [s for s in stats if 'demo_knn_top1_trained' in s]
    assert len(gain) == 1
    keys = ('demo_knn_top1_trained', 'demo_knn_top1_untrained', 'demo_knn_top1_default_init')
    for key, line in zip(keys, lines[1:]):
        assert gain[0][key] in (0.0, 25.0, 50.0, 75.0, 100.0)  # 4 held-out images
        assert line.split()[1] == f'{gain[0][key]:.1f}%'
    # tests/readme_figures.py reads the README's demo figures from these lines
    import readme_figures
    for key, figure in zip(keys, [f for f in readme_figures.FIGURES if 'demo: kNN' in f]):
        assert readme_figures.FIGURES[figure](out, 0.0) == gain[0][key]


def test_the_demos_untrained_network_is_the_runs_initial_backbone():
    # report_demo_gain rebuilds the run's starting point from the seed: the backbone is the first
    # thing build_run draws after seed_everything(args.seed).
    args = main.parse_arguments(['data', '--arch', 'resnet18', '--cifar-stem', '--seed', '3',
                                 '--projector', '32-32'])
    main.seed_everything(args.seed)
    initial = main.BarlowTwins(args).backbone.state_dict()
    main.seed_everything(args.seed)
    rebuilt, _ = main.build_backbone('resnet18', cifar_stem=True)
    assert all(torch.equal(initial[k], v) for k, v in rebuilt.state_dict().items())
