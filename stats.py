"""Reading stats.txt back: the runs it holds and the kind of run that wrote each.

A stats.txt is the command line of a run followed by that run's JSON lines; a resumed or
repeated run appends its own command line and lines. Five kinds of run write one:

    pretraining        main.py              {epoch, step, lr_weights, lr_biases, loss, ...}
    linear probe       evaluate.py          {epoch, step, lr_classifier, ...}, {epoch, acc1, ...}
    fine-tuning        evaluate.py --weights finetune     (the same lines)
    kNN                evaluate.py --knn    {knn_top1: {k: top-1}, ...}
    fast linear probe  evaluate.py --fast-linear          {fast_linear: {acc1, acc5}, ...}

plot.py draws each run in its kind's column; main.py and evaluate.py refuse a checkpoint
directory whose log holds another kind of run (preemption.check_directory_kind). No torch here,
so that plot.py starts quickly.
"""
import dataclasses
import json
import math
import shlex
from pathlib import Path

from cli import InputError, read_lines

KINDS = ('pretraining', 'linear probe', 'fine-tuning', 'kNN', 'fast linear probe')
# The command that writes each kind, for messages.
KIND_COMMANDS = {'pretraining': 'main.py', 'linear probe': 'evaluate.py --weights freeze',
                 'fine-tuning': 'evaluate.py --weights finetune', 'kNN': 'evaluate.py --knn',
                 'fast linear probe': 'evaluate.py --fast-linear'}
# Keys only one kind of run logs.
PRETRAINING_KEYS = ('lr_weights', 'lr_biases', 'online_acc1', 'knn_top1_k20', 'knn_top1_k200')
EVALUATION_KEYS = ('lr_classifier', 'lr_backbone', 'acc1', 'best_acc1')


@dataclasses.dataclass
class Run:
    """One command line of a stats.txt and the JSON records after it."""
    command: str
    records: list
    line: int  # where the command line is (0: the records came before any command line)

    @property
    def kind(self):
        return kind_of(self.records, self.command)


def read_runs(path, strict=True):
    """The runs of a stats.txt, in order. Text lines that are neither a command line nor JSON
    (e.g. main.py's rollback notes) are skipped; a JSON line that is not an object of numbers,
    strings and such objects is an InputError naming the line, or with strict=False skipped
    (what a crash may leave at the end of a file, NUL bytes say, must not stop a resume)."""
    runs = [Run('', [], 0)]
    for number, line in read_lines(path, 'stats file') if strict else lenient_lines(path):
        if line.startswith('{'):
            try:
                record = json.loads(line)
                check_record(record, path, number)
            except json.JSONDecodeError as e:
                if strict:
                    raise InputError(f'{path}:{number}: not a JSON stats line ({e.msg})') \
                        from None
                continue
            except InputError:
                if strict:
                    raise
                continue
            runs[-1].records.append(record)
        elif is_command_line(line):
            runs.append(Run(line, [], number))
    return [run for run in runs if run.records or run.line]


def lenient_lines(path):
    """read_lines, but whatever the bytes: undecodable ones replaced, NUL bytes dropped."""
    try:
        text = Path(path).read_bytes().decode('utf-8-sig', 'replace').replace('\0', '')
    except OSError as e:
        raise InputError(f'cannot read stats file {path}: {e.strerror or e}') from None
    return [(number, line.strip()) for number, line in enumerate(text.splitlines(), 1)
            if line.strip() and not line.strip().startswith('#')]


def check_record(record, path, number):
    if not isinstance(record, dict):
        raise InputError(f'{path}:{number}: a stats line is a JSON object')
    for key in ('epoch', 'step'):
        value = record.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 0):
            raise InputError(f'{path}:{number}: "{key}" is {value!r}, not a count')
    for key in ('knn_top1', 'fast_linear'):
        value = record.get(key)
        if value is not None and not (isinstance(value, dict) and all(
                is_number(v) for v in value.values())):
            raise InputError(f'{path}:{number}: "{key}" is not an object of numbers')
    if isinstance(record.get('knn_top1'), dict):
        bad = [k for k in record['knn_top1'] if not (k.isdigit() and int(k) > 0)]
        if bad:
            raise InputError(f'{path}:{number}: "knn_top1" has {bad[0]!r} for a k')


def is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_finite(value):
    return is_number(value) and math.isfinite(value)


def kind_of(records, command=''):
    """The kind of run (one of KINDS) that wrote `records` after `command`; None when neither
    tells (a command line of another program, with no records)."""
    if any(isinstance(r.get('knn_top1'), dict) for r in records):
        return 'kNN'
    if any(isinstance(r.get('fast_linear'), dict) for r in records):
        return 'fast linear probe'
    if any(k in r for r in records for k in PRETRAINING_KEYS) or \
            any(k.startswith('demo_') for r in records for k in r):
        return 'pretraining'
    words = command_words(command)
    script = Path(words[0]).name if words else ''
    evaluation = any(k in r for r in records for k in EVALUATION_KEYS)
    if not evaluation:
        if script == 'main.py':
            return 'pretraining'
        if script != 'evaluate.py':
            return None
        if '--knn' in words:
            return 'kNN'
        if '--fast-linear' in words:
            return 'fast linear probe'
    finetune = flag_value(words, '--weights') == 'finetune' or \
        any(is_number(r.get('lr_backbone')) and r['lr_backbone'] > 0 for r in records)
    return 'fine-tuning' if finetune else 'linear probe'


def is_command_line(line):
    """A line that starts a run: a command whose first word (quoted as a shell quotes it when
    the path holds a space or a non-ASCII name) is a .py script."""
    words = command_words(line)
    return bool(words) and words[0].endswith('.py')


def command_words(command):
    try:
        return shlex.split(command)
    except ValueError:  # a line written before commands were quoted, with a stray quote
        return command.split()


def flag_value(words, flag):
    """The value of `flag` in a command's words ('--flag V' or '--flag=V'), else None."""
    for i, word in enumerate(words):
        if word == flag and i + 1 < len(words):
            return words[i + 1]
        if word.startswith(flag + '='):
            return word[len(flag) + 1:]
    return None


def kinds_in_log(path):
    """{kind: where it is seen} of every run in the stats.txt at `path` (none if it is missing)."""
    if not Path(path).is_file():
        return {}
    kinds = {}
    for run in read_runs(path, strict=False):
        if run.kind is not None:
            kinds.setdefault(run.kind, f'{path}, line {run.line or 1}')
    return kinds
