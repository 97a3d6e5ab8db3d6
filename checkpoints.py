"""Checkpoint files: atomic writes, reading every version's checkpoints, matching state-dict keys.

Used by main.py (checkpoint.pth, <arch>.pth), evaluate.py (its checkpoint.pth, pretrained files)
and hubconf.py. Every failure is an `InputError` naming the file.
"""
import os
import pickle
import types
from pathlib import Path

import torch

from cli import InputError


def checkpoint_args(args):
    # Plain types only, so checkpoints load with torch.load(weights_only=True).
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


def save_atomic(obj, path):
    """torch.save to a temporary file, fsync, then rename over `path`.

    A kill or a full disk during the write leaves the previous file untouched.
    """
    path = Path(path)
    tmp = path.with_name(f'.{path.name}.tmp-{os.getpid()}')
    try:
        with open(tmp, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except Exception as e:  # noqa: BLE001 - torch.save reports a full disk as RuntimeError
        reason = write_failure(e, path.parent)  # before the unlink frees the space again
        tmp.unlink(missing_ok=True)
        raise InputError(f'cannot write {path}: {reason}; the previous file, if any, is '
                         f'unchanged') from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_failure(error, directory):
    """Why a write into `directory` failed, in a few words. torch.save's C++ writer reports a
    full disk as `RuntimeError: [enforce fail at inline_container.cc:...] unexpected pos ...`,
    which says nothing to a user: the file system's free space tells."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    try:
        stats = os.statvfs(directory)
        free = stats.f_bavail * stats.f_frsize
    except OSError:
        free = None
    if free is not None and free < 1 << 20:
        return f'No space left on device ({free // 1024} KiB free)'
    return _reason(error)


def remove_temporaries(directory):
    # Left by writes that a kill cut short; safe to delete while this run holds the lock.
    for path in directory.glob('.*.pth.tmp-*'):
        path.unlink(missing_ok=True)


def exclude_bias_and_norm(p):
    """The earlier release's LARS filter; its checkpoints pickle a reference to it."""
    return p.ndim == 1


class _CompatUnpickler(pickle.Unpickler):
    # The earlier release ran as `python main.py`, so its optimizer state refers to
    # `__main__.exclude_bias_and_norm`; map that (and `main.`) to the function above.
    def find_class(self, module, name):
        if name == 'exclude_bias_and_norm' and module in ('__main__', 'main'):
            return exclude_bias_and_norm
        return super().find_class(module, name)


_compat_pickle = types.ModuleType('compat_pickle')
_compat_pickle.__dict__.update({k: getattr(pickle, k) for k in dir(pickle) if not k.startswith('__')})
_compat_pickle.Unpickler = _CompatUnpickler


def load_checkpoint_file(path):
    """torch.load with one-line errors; accepts the original's checkpoints too."""
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError:
        pass  # a pickled function (earlier release): retry with the full unpickler below
    except (OSError, RuntimeError, EOFError, ValueError) as e:
        raise InputError(f'cannot read checkpoint {path}: {_reason(e)}') from None
    try:
        return torch.load(path, map_location='cpu', weights_only=False,
                          pickle_module=_compat_pickle)
    except Exception as e:
        raise InputError(f'cannot read checkpoint {path}: {_reason(e)}') from None


def checkpoint_kind(path):
    """The kind of run (a stats.KINDS name) that wrote the checkpoint.pth at `path`: main.py's
    'pretraining', or evaluate.py's 'linear probe' / 'fine-tuning'; None when the file cannot
    be read this way (the earlier release's pickles a function: resume() reads it)."""
    try:  # mmap: only the small entries are read
        ckpt = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - unreadable: the script that resumes from it says why
        return None
    if not isinstance(ckpt, dict) or 'model' not in ckpt:
        return None
    if 'best_acc' not in ckpt:
        return 'pretraining'
    saved = ckpt.get('args')
    weights = saved.get('weights') if isinstance(saved, dict) else None
    if weights is None:  # the reference's: one parameter group unless fine-tuned
        weights = 'finetune' if len(ckpt.get('optimizer', {}).get('param_groups', [])) == 2 \
            else 'freeze'
    return 'fine-tuning' if weights == 'finetune' else 'linear probe'


def _reason(error):
    # First line of the message; EOFError from an empty or cut-off file has none.
    text = str(error).strip().split('\n')[0]
    return text or ('the file is empty or truncated' if isinstance(error, EOFError)
                    else type(error).__name__)


def strip_module_prefix(state):
    """State-dict keys without DistributedDataParallel's `module.` prefix."""
    return {(k[len('module.'):] if k.startswith('module.') else k): v for k, v in state.items()}


def match_state_dict(state, model, what):
    """`state` with keys renamed to `model`'s ('module.' prefix added or removed); any other
    difference in keys or shapes is an InputError naming them."""
    expected = model.state_dict()
    want_prefix = next(iter(expected)).startswith('module.')
    renamed = {('module.' + k) if want_prefix else k: v
               for k, v in strip_module_prefix(state).items()}
    missing = sorted(set(expected) - set(renamed))
    unexpected = sorted(set(renamed) - set(expected))
    wrong_shape = sorted(k for k in set(expected) & set(renamed)
                         if tuple(expected[k].shape) != tuple(renamed[k].shape))
    problems = []
    for label, keys in (('missing', missing), ('unexpected', unexpected),
                        ('different shape', wrong_shape)):
        if keys:
            shown = ', '.join(keys[:5]) + (f' (+{len(keys) - 5} more)' if len(keys) > 5 else '')
            problems.append(f'{label}: {shown}')
    if problems:
        raise InputError(f'{what} does not match this configuration; {"; ".join(problems)}')
    return renamed
