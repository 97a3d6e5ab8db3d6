"""bench.py runs both benchmarks end to end on tiny settings and prints its tables."""
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
