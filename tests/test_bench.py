"""bench.py runs both benchmarks end to end on tiny settings and prints its tables."""
import json
import re

import pytest

import bench
import knn


def table_rows(text, title):
    """The body rows of the first Markdown table after `title` (header and rule left out)."""
    lines = text.split(title, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith('|'))
    table = []
    for line in lines[start:]:
        if not line.startswith('|'):
            break
        table.append(line)
    return table[2:]


def test_training_step_table_compares_settings(capsys):
    bench.main(['--device', 'cpu', '--arch', 'resnet18', '--projector', '32-32', '--batch-size',
                '4', '--crop-size', '32', '--steps', '2', '--warmup', '1',
                '--settings', 'reference', 'fast-nocompile'])
    out = capsys.readouterr().out
    assert out.startswith('# bench.py --device cpu')
    rows = table_rows(out, 'Training step: resnet18, projector 32-32, batch 4 per device, 32 px')
    assert [r.split('|')[1].strip() for r in rows] == ['reference', 'fast-nocompile']
    rates = [float(r.split('|')[2]) for r in rows]
    ratios = [r.split('|')[3].strip() for r in rows]
    # The ratio is computed from the printed rates, so this holds exactly at any speed.
    assert all(rate > 0 for rate in rates) and ratios == ['1.00x', f'{rates[1] / rates[0]:.2f}x']
    assert [r.split('|')[5].strip() for r in rows] == ['fp32', 'bf16']


def test_input_pipeline_table_from_files_and_pack(tiny_imagefolder, capsys):
    bench.bench_data(str(tiny_imagefolder), 32)
    out = capsys.readouterr().out
    rows = table_rows(out, 'images per CPU-second of one worker process (1 thread)')
    assert [r.split('|')[1].strip() for r in rows] == ['JPEG files', 'pack.py file']
    for row in rows:
        reference, fast, ratio = (v.strip() for v in row.split('|')[2:5])
        assert float(reference) > 0 and float(fast) > 0
        assert ratio == f'{float(fast) / float(reference):.2f}x'
    assert re.search(r"device half, run on this CPU \(1 thread\): [\d.]+ images/s", out)


@pytest.mark.parametrize('value, shown', [(1342.7, '1343'), (13.427, '13.4'), (1.3427, '1.34'),
                                          (0.013427, '0.0134'), (0.0, '0.0')])
def test_rates_keep_three_significant_digits(value, shown):
    assert bench.rounded(value) == shown


def test_ratio_is_that_of_the_printed_values():
    assert bench.ratio(1.3449, 1.0) == f'{1.34 / 1.0:.2f}x'  # not 1.3449
    assert bench.ratio(2.0, 0.0) == '-'


def test_knn_memory_table_before_and_after_sharding(capsys):
    bench.main(['--knn-memory'])
    out = capsys.readouterr().out
    rows = table_rows(out, 'kNN evaluation: bank 1,281,167 x 2048, 50,000 queries, 8 ranks')
    assert [r.split('|')[1].strip() for r in rows] == ['fp32 (evaluate.py --knn)',
                                                       'fp16 (--knn-every under fp16)']
    for row, dtype_bytes in zip(rows, (4, 2)):
        before, after = (float(v) for v in row.split('|')[2:4])
        # gathered: at least the full fp32 bank twice (received parts and reassembled copy)
        assert before >= 2 * 1_281_167 * 2048 * 4 / 2**30
        assert after == round(knn.peak_bytes_per_rank(1_281_167, 2048, 8, 50_000, dtype_bytes)
                              / 2**30, 2)
        # sharded: about an eighth of the bank in the compute dtype, not the whole bank
        assert 1_281_167 * 2048 * dtype_bytes / 8 / 2**30 < after < 1.2 * (
            1_281_167 * 2048 * dtype_bytes / 8 / 2**30)


def test_end_to_end_runs_main_pys_loop_and_logs_every_epoch(tmp_path, capsys):
    # 10 generated JPEGs, batch 4: two full steps and a short one per epoch
    log = tmp_path / 'results.jsonl'
    bench.main(['--device', 'cpu', '--arch', 'resnet18', '--projector', '32-32', '--batch-size',
                '4', '--crop-size', '32', '--end-to-end', '--generate', '10', '--workers', '0',
                '--epochs', '2', '--skip-steps', '0', '--work-dir', str(tmp_path / 'work'),
                '--settings', 'reference', 'fast-nocompile', '--log', str(log)])
    out = capsys.readouterr().out
    rows = table_rows(out, 'End to end: main.py\'s loader (0 workers')
    assert [r.split('|')[1].strip() for r in rows] == ['reference', 'fast-nocompile']
    results = [json.loads(line) for line in log.read_text().splitlines()]
    epochs = [r for r in results if r['kind'] == 'end-to-end-epoch']
    assert [(r['setting'], r['epoch'], r['warmup'], r['images']) for r in epochs] == [
        ('reference', 0, True, 10), ('reference', 1, False, 10),
        ('fast-nocompile', 0, True, 10), ('fast-nocompile', 1, False, 10)]
    assert all(r['steady_images_per_s'] > 0 for r in epochs)
    # main.py's own log of each setting, as a run writes it
    assert (tmp_path / 'work' / 'e2e-reference' / 'stats.txt').read_text().startswith('main.py ')


def test_breakdown_groups_the_profiled_steps(capsys):
    bench.main(['--device', 'cpu', '--arch', 'resnet18', '--projector', '32-32', '--batch-size',
                '4', '--crop-size', '32', '--steps', '1', '--warmup', '1', '--settings',
                'fast-nocompile', '--breakdown', '1'])
    out = capsys.readouterr().out
    rows = table_rows(out, 'Kernel time per step (ms) from torch.profiler over 1 steps')
    values = [float(v) for v in rows[0].split('|')[2:-1]]
    groups = dict(zip(bench.KERNEL_GROUPS, values))
    assert all(v >= 0 for v in values)
    # on a CPU the operators stand for kernels: convolutions, the augmentation's device half
    # and LARS each took time of their own
    assert groups['convolutions'] > 0 and groups['augmentation'] > 0 and groups['optimizer'] > 0
    regions = table_rows(out, 'Device time per step and region (ms)')
    assert regions[0].split('|')[1].strip() == 'fast-nocompile'


@pytest.mark.parametrize('argv, words', [
    (['--projector', '8192-x'], '--projector'),
    (['--batch-size', '1'], '--batch-size 1'),
    (['--images', '/nonexistent/images'], '/nonexistent/images'),
    (['--end-to-end', '--settings', 'fast-ddp'], 'fast-ddp'),
])
def test_bad_input_stops_before_anything_is_measured(argv, words, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(['--device', 'cpu', *argv])
    message = exit_info.value.code  # what Python prints to stderr, exiting with status 1
    assert isinstance(message, str) and message.startswith('bench.py: error: ')
    assert words in message and len(message.splitlines()) == 1, message
    assert 'Training step' not in capsys.readouterr().out  # nothing was measured
