"""The command line of every script: the one-line error, the parser that prints it, flag types,
commands quoted for pasting, and the one way text lists are read.

Bad input (a path, a file, a flag value) is an `InputError`; the scripts print its message as
one line and exit non-zero, and an OSError (USER_ERRORS) the same way (error_line).
`ArgumentParser` does the same for argparse's own errors, and the flag types below reject bad
values with a message naming the value.
"""
import argparse
import math
import os
import re
import shlex
from pathlib import Path


class InputError(Exception):
    """Bad input from the user (a path, a file, a flag): reported as one line, non-zero exit.

    A DataLoader worker's exception is re-raised in the main process as
    `InputError("Caught InputError in DataLoader worker ...\\n<traceback>\\nInputError: msg")`;
    the constructor keeps only the original message so the user still sees one line.
    """

    def __init__(self, message):
        marker = f'{type(self).__name__}: '
        if '\n' in message and marker in message:
            message = message.rsplit(marker, 1)[1].strip()
        super().__init__(message)


def error_line(error):
    """The one line a script prints for a user's error: an InputError's message, or for an
    OSError (a path too long, no permission, a full disk) the file and the reason. A DataLoader
    worker's error arrives with the worker's traceback in its message: its last line is kept."""
    if isinstance(error, OSError) and error.strerror:
        names = [str(n) for n in (error.filename, error.filename2) if n is not None]
        return f'{" -> ".join(names)}: {error.strerror}' if names else error.strerror
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


# What a script's entry point reports as one line (error_line) with a non-zero exit.
USER_ERRORS = (InputError, OSError)


def command_line(prog, argv):
    """The command as a shell takes it back: every word quoted where it needs to be (a space, a
    quote, a non-ASCII name), so that the line in stats.txt or a printed command can be pasted."""
    return shlex.join([prog, *map(str, argv)])


def read_lines(path, what='list'):
    """The entries of a text list, one per line: [(line number, text)]. Read the same way
    everywhere: UTF-8 with or without a byte-order mark, any line ending (\n, \r\n, \r),
    surrounding white space dropped, blank lines and lines starting with # left out."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise InputError(f'cannot read {what} {path}: {e.strerror or e}') from None
    if data.startswith((b'\xff\xfe', b'\xfe\xff')):
        raise InputError(f'{what} {path} is UTF-16 text; save it as UTF-8')
    if b'\0' in data:
        raise InputError(f'{what} {path} is not a text file (it holds NUL bytes)')
    try:
        text = data.decode('utf-8-sig')
    except UnicodeDecodeError as e:
        raise InputError(f'{what} {path} is not UTF-8 text (byte {e.start}); save it as '
                         f'UTF-8') from None
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if line and not line.startswith('#'):
            entries.append((number, line))
    return entries


REFERENCE_WORKERS = 8  # the reference's --workers default


def usable_cpus():
    """CPUs this process may run on (its affinity mask, e.g. a SLURM allocation)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_workers(prog):
    """The reference's 8 DataLoader workers, capped at the usable CPUs (PyTorch warns about
    every loader with more workers than that); says so once when it caps."""
    cpus = usable_cpus()
    if cpus >= REFERENCE_WORKERS:
        return REFERENCE_WORKERS
    if os.environ.get('RANK', os.environ.get('SLURM_PROCID', '0')) == '0':  # once per run
        print(f'{prog}: --workers {cpus}: the default {REFERENCE_WORKERS} capped at the {cpus} '
              f'CPU(s) this process may use', flush=True)
    return cpus


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with every option's default: "(default: X)" unless the help already says it;
    on/off switches show "off"."""

    def _get_help_string(self, action):
        text = action.help or ''
        if 'default' in text or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        if action.default is None:
            return text  # the help says what an unset flag means (a test checks every flag)
        default = 'off' if action.default is False else '%(default)s'
        return f'{text} (default: {default})'


class ArgumentParser(argparse.ArgumentParser):
    """One-line errors, and --help that shows every default."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault('formatter_class', DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        # One line, not argparse's usage block: the flag and the problem.
        self.exit(2, f'{self.prog}: error: {message} (see --help)\n')


def positive_int(text):
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f'expected a positive integer, got {text}')
    return value


def non_negative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f'expected an integer >= 0, got {text}')
    return value


def positive_ints(text):
    """'20,200' -> (20, 200): distinct positive integers, in the order given."""
    try:
        values = tuple(positive_int(v) for v in text.split(','))
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(f'expected positive integers joined by commas, '
                                         f'e.g. 20,200, got {text}') from None
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
        raise argparse.ArgumentTypeError(f'{", ".join(map(str, repeated))} given twice in {text}')
    return values


def setting_text(value):
    """A setting as a command line writes it: a list or tuple joined by commas (a checkpoint's
    JSON-like record turns tuples into lists), None as 'unset'."""
    if isinstance(value, (tuple, list)):
        return ','.join(f'{v:g}' if isinstance(v, float) else str(v) for v in value)
    return 'unset' if value is None else str(value)


def changed_settings(saved, now, names):
    """[(name, recorded value, this run's value)] of the settings in `names` that `saved` (a
    recorded args dict) holds with another value than `now` (a dict) has."""
    return [(k, saved[k], now[k]) for k in names
            if k in saved and setting_text(saved[k]) != setting_text(now[k])]


def changes_text(changed):
    """'--flag old then, new now; ...' (DIR for the dataset) of changed_settings()."""
    return '; '.join(f'{"DIR" if k == "data" else "--" + k.replace("_", "-")} '
                     f'{setting_text(old)} then, {setting_text(new)} now'
                     for k, old, new in changed)


def check_distinct(values, what):
    """An InputError naming the first of `values` (a list flag's, or files') given twice."""
    seen = set()
    for value in values:
        key = str(value)
        if key in seen:
            raise InputError(f'{what}: {value} given twice')
        seen.add(key)


SEED_RANGE = 2 ** 32  # numpy's and SeedSequence-derived seeds: every seed in range is its own run


def seed(text):
    """A --seed: an integer from 0 to 2^32 - 1. Larger or negative seeds are refused rather
    than folded into the range, where two different seeds would give the same run."""
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not 0 <= value < SEED_RANGE:
        raise argparse.ArgumentTypeError(f'expected an integer from 0 to {SEED_RANGE - 1}, '
                                         f'got {text!r}')
    return value


def finite_float(text, low=None, high=None, low_open=False):
    """A float flag's value: never nan or inf (float() accepts both), within [low, high] when
    given (low excluded when low_open)."""
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f'expected a finite number, got {text!r}')
    if low is not None and (value < low or (low_open and value == low)):
        raise argparse.ArgumentTypeError(f'expected a number {">" if low_open else ">="} {low:g}, '
                                         f'got {text!r}')
    if high is not None and value > high:
        raise argparse.ArgumentTypeError(f'expected a number <= {high:g}, got {text!r}')
    return value


def non_negative_float(text):
    return finite_float(text, low=0)


def positive_float(text):
    return finite_float(text, low=0, low_open=True)


def unit_fraction(text):
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not 0 < value < 1:
        raise argparse.ArgumentTypeError(f'expected a number between 0 and 1, got {text!r}')
    return value


def crop_scale(text):
    """A crop's area fraction in (0, 1]. At 1 no random crop of area 1 fits unless its aspect
    ratio is the image's, and torchvision falls back to the central crop of the image at its own
    aspect ratio clamped to 3/4-4/3: the whole image when the image's ratio is in that range."""
    return finite_float(text, low=0, high=1, low_open=True)


def probability_pair(text):
    """'P1,P2': one probability per view, each in [0, 1] (e.g. --blur-prob 1.0,0.1)."""
    try:
        values = tuple(float(v) for v in text.split(','))
    except ValueError:
        values = ()
    if len(values) != 2 or not all(0 <= v <= 1 for v in values):  # NaN fails the comparison
        raise argparse.ArgumentTypeError(f'expected two probabilities in [0, 1] joined by a '
                                         f'comma, one per view, e.g. 1.0,0.1; got {text!r}')
    return values


def parse_duration(text):
    """'30m', '2h', '45s', '1.5h' or plain seconds -> seconds (for --checkpoint-every)."""
    match = re.fullmatch(r'\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*', str(text))
    if not match:
        raise ValueError(f"expected a duration such as 30m, 2h or 900s, got '{text}'")
    value, unit = float(match.group(1)), match.group(2) or 's'
    return value * {'s': 1, 'm': 60, 'h': 3600, 'd': 86400}[unit]


def duration(text):
    try:
        return parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
