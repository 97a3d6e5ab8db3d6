"""Every text list the project reads is read the same way (cli.read_lines): UTF-8 with or
without a byte-order mark, any line ending, surrounding blanks, blank lines and # comments;
an entry listed twice counts once and is said (subset lists) or is refused (flag lists)."""
import json

import pytest

import bench
import cli
import evaluate
import pack
import plot
from faultcheck import one_thread, pre  # noqa: F401 - fixtures
from faultcheck import assert_one_error_line, eval_argv, run


MESSY = ('\ufeff# the images of a small subset\r\n'
         'n01440764_0.JPEG\r\n'
         '\r\n'
         '  n01443537_5.JPEG  \r\n'
         'n01440764_0.JPEG\r\n'  # again
         'n01440764_3.JPEG')  # no line end at the end


def test_read_lines_normalises_every_list_alike(tmp_path):
    path = tmp_path / 'list.txt'
    path.write_bytes(MESSY.encode('utf-8'))
    assert cli.read_lines(path) == [(2, 'n01440764_0.JPEG'), (4, 'n01443537_5.JPEG'),
                                    (5, 'n01440764_0.JPEG'), (6, 'n01440764_3.JPEG')]
    path.write_bytes(b'a\rb\r')  # old Mac line ends
    assert cli.read_lines(path) == [(1, 'a'), (2, 'b')]


@pytest.mark.parametrize('content, words', [
    ('n01440764_0.JPEG\n'.encode('utf-16'), ['UTF-16', 'save it as UTF-8']),
    (b'n01440764_0.JPEG\n\xff\xfe\x00oops', ['not a text file']),
    (b'n01440764_\xe9.JPEG\n', ['not UTF-8 text']),
], ids=['utf-16', 'binary', 'latin-1'])
def test_lists_that_are_not_utf8_text_are_one_line_errors(content, words, pre, tmp_path, capsys):
    listed = tmp_path / '1pct.txt'
    listed.write_bytes(content)
    status, lines, _ = run(evaluate, eval_argv(pre, tmp_path / 'ck', '--train-percent', 1,
                                               '--train-files', listed), capsys)
    assert_one_error_line(status, lines, str(listed), *words, prog='evaluate.py')
    assert not (tmp_path / 'ck').exists()


def test_a_messy_subset_list_selects_each_listed_image_once(pre, tmp_path, capsys):
    listed = tmp_path / '1pct.txt'
    listed.write_bytes(MESSY.encode('utf-8'))
    ckdir = tmp_path / 'knn'
    status, _, out = run(evaluate, eval_argv(pre, ckdir, '--knn', '--train-percent', 1,
                                             '--train-files', listed), capsys)
    assert status == 0
    assert f'subset list {listed}: 3 images, SimCLR lines (1 line(s) repeat an image listed ' \
           f'before: each image counts once)' in out
    assert '3 of 12 train images (25%, --train-percent 1 list)' in out
    record = json.loads((ckdir / 'stats.txt').read_text().splitlines()[-1])
    assert record['bank_size'] == 3


def test_a_subset_list_of_comments_only_lists_no_image(pre, tmp_path, capsys):
    listed = tmp_path / '1pct.txt'
    listed.write_text('# nothing yet\n\n')
    status, lines, _ = run(evaluate, eval_argv(pre, tmp_path / 'ck', '--train-percent', 1,
                                               '--train-files', listed), capsys)
    assert_one_error_line(status, lines, str(listed), 'it lists no image')


def test_stats_logs_with_a_byte_order_mark_and_crlf_plot(tmp_path):
    pytest.importorskip('matplotlib')
    log = tmp_path / 'stats.txt'
    records = [dict(epoch=0, step=s, lr_weights=0.1, lr_biases=0.01, loss=9.0 - s, time=s)
               for s in range(3)]
    log.write_bytes(('\ufeffmain.py data\r\n' + ''.join(json.dumps(r) + '\r\n'
                                                         for r in records)).encode())
    assert [r['step'] for r in plot.read_stats(log)] == [0, 1, 2]
    assert plot.read_stats(log)[0]['_command'] == 'main.py data'


def test_bench_summary_reads_its_logs_as_lists(tmp_path, capsys):
    log = tmp_path / 'bench.log'
    result = dict(kind='step', setting='reference', rate=12.5, memory=1.0)
    log.write_bytes(('\ufeff' + json.dumps(result) + '\r\n\r\n').encode())
    assert bench.main(['--summary', str(log)]) is None
    assert '| step | reference | 12.5 |' in capsys.readouterr().out
    log.write_text(json.dumps(result) + '\n{"kind": "step", "setting": \n')
    status, lines, _ = run(bench, ['--summary', str(log)], capsys)
    assert_one_error_line(status, lines, f'{log}:2', 'not a JSON result line', prog='bench.py')


@pytest.mark.parametrize('module, argv, words', [
    (evaluate, ['data', 'r.pth', '--knn', '--knn-k', '20,200,20'], ['--knn-k', '20 given twice']),
    (pack, ['data', 'out.h5', '--splits', 'train', 'val', 'train'], ['--splits', 'train twice']),
])
def test_flag_lists_naming_an_entry_twice_are_refused(module, argv, words, tmp_path, capsys,
                                                       monkeypatch):
    monkeypatch.chdir(tmp_path)
    status, lines, _ = run(module, argv, capsys)
    assert status == 2
    assert_one_error_line(status, lines, *words)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize('module, argv, words', [
    (bench, ['--settings', 'reference', 'fast', 'reference'], ['--settings', 'reference given twice']),
    (bench, ['--summary', 'a.jsonl', 'a.jsonl'], ['--summary', 'a.jsonl given twice']),
    (plot, ['a.txt', 'b.txt', 'a.txt'], ['stats file', 'a.txt given twice']),
])
def test_lists_of_settings_or_files_naming_one_twice_are_refused(module, argv, words, tmp_path,
                                                                 capsys, monkeypatch):
    # found before anything is measured, read or written
    monkeypatch.chdir(tmp_path)
    status, lines, _ = run(module, argv, capsys)
    assert_one_error_line(status, lines, *words)
    assert list(tmp_path.iterdir()) == []
