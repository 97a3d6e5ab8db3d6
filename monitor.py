"""Watching a run: the stats log, the progress display and the online linear probe.

Everything here is quiet on ranks other than 0, except the probe, which trains on every rank and
whose accuracy is a collective (every rank must ask for it at the same step).
"""
import json
import math
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from cli import InputError


class StatsLog:
    """stats.txt in the reference's format (the command line, then one JSON object per line),
    echoed to stdout, and optionally to TensorBoard. A no-op on ranks other than 0.

    The command line is printed at once, but the file gets it with the run's first line: a run
    that fails before logging anything (a refused resume, a bad setting) leaves the directory's
    log as it was."""

    def __init__(self, path, command, enabled, tensorboard_dir=None):
        self.file = self.tensorboard = None
        self.enabled = enabled
        if not enabled:
            return
        self.path, self.command, self.tensorboard_dir = path, command, tensorboard_dir
        if path.exists() and not path.is_file():
            raise InputError(f'cannot write {path}: it is not a file')
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter  # noqa: F401 - checked now
            except ImportError:
                raise InputError('--tensorboard needs the tensorboard package: '
                                 'pip install tensorboard') from None
        print(command, flush=True)

    def _open(self):
        if self.file is not None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(self.path, 'a', buffering=1)
        except OSError as e:
            raise InputError(f'cannot write {self.path}: {e.strerror or e}') from None
        self._append(self.command)
        if self.tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter
            self.tensorboard = SummaryWriter(str(self.tensorboard_dir))

    def write(self, stats, global_step):
        if not self.enabled:
            return
        self._open()
        line = json.dumps(stats)
        print(line, flush=True)
        self._append(line)
        if self.tensorboard is not None:
            for key, value in stats.items():
                if key not in ('epoch', 'step', 'time') and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(key, value, global_step)

    def note(self, text):
        """A plain-text line (not JSON, so readers of the stats skip it), also on stderr."""
        if not self.enabled:
            return
        self._open()
        print(text, file=sys.stderr, flush=True)
        self._append(text)

    def _append(self, line):
        try:
            print(line, file=self.file)
        except OSError as e:  # a full disk: stop with the reason rather than a traceback
            raise InputError(f'cannot write {self.path}: {e.strerror or e}') from None

    def close(self):
        if self.file is not None:
            try:
                self.file.close()
            except OSError:
                pass  # the line that did not fit was reported by _append already
        if self.tensorboard is not None:
            self.tensorboard.close()


def _duration(seconds):
    if not math.isfinite(seconds):
        return '?'
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    text = time.strftime('%H:%M:%S', time.gmtime(rest))
    return f'{days}d {text}' if days else text


class Progress:
    """Per-epoch progress: images/s, last logged loss, ETA for the epoch and for the run.

    On a terminal, one line redrawn in place; otherwise (SLURM logs, CI) a plain line every
    `interval` seconds and at each epoch end. Written to stderr; stdout keeps the reference's log.
    """

    def __init__(self, steps_per_epoch, epochs, images_per_step, enabled, stream=None,
                 interval=60.0):
        self.steps_per_epoch, self.epochs = steps_per_epoch, epochs
        self.images_per_step = images_per_step
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = enabled and hasattr(self.stream, 'isatty') and self.stream.isatty()
        self.interval = 0.5 if self.tty else interval
        self.loss = None

    def start_epoch(self, epoch):
        self.epoch, self.done, self.shown = epoch, 0, -1
        self.epoch_start = self.last_shown = time.time()

    def step(self, loss=None):
        self.done += 1
        if loss is not None:
            self.loss = loss
        if self.enabled and time.time() - self.last_shown >= self.interval:
            self._show()

    def end_epoch(self):
        if self.enabled and (self.tty or self.shown != self.done):  # no plain line twice
            self._show(final=True)

    def line(self):
        elapsed = max(time.time() - self.epoch_start, 1e-9)
        rate = self.done / elapsed  # steps per second
        left_epoch = self.steps_per_epoch - self.done
        left_run = left_epoch + (self.epochs - self.epoch - 1) * self.steps_per_epoch
        eta = (lambda steps: steps / rate) if rate > 0 else (lambda steps: float('inf'))
        width = 20
        filled = int(width * self.done / max(self.steps_per_epoch, 1))
        loss = f'{self.loss:.4g}' if self.loss is not None else '-'
        return (f'epoch {self.epoch + 1}/{self.epochs} [{"#" * filled}{"." * (width - filled)}] '
                f'{self.done}/{self.steps_per_epoch} {rate * self.images_per_step:.1f} img/s '
                f'loss {loss} ETA epoch {_duration(eta(left_epoch))} run {_duration(eta(left_run))}')

    def _show(self, final=False):
        self.last_shown, self.shown = time.time(), self.done
        if self.tty:
            self.stream.write('\r' + self.line() + ('\n' if final else ''))
        else:
            self.stream.write(self.line() + '\n')
        self.stream.flush()


class OnlineProbe:
    """A linear classifier on detached backbone features, trained alongside pretraining.

    The features are detached, and the probe has its own optimizer and its own backward pass,
    so the backbone's gradients are exactly those of a run without it. With several ranks the
    head is wrapped in its own DistributedDataParallel so that every rank keeps the same head.
    """

    def __init__(self, feature_dim, num_classes, device, lr=1e-3):
        # Standardising the features first makes one learning rate work at any feature scale.
        self.head = nn.Sequential(nn.BatchNorm1d(feature_dim, affine=False),
                                  nn.Linear(feature_dim, num_classes)).to(device)
        self.model = self.head
        if dist.is_initialized() and dist.get_world_size() > 1:
            self.model = nn.parallel.DistributedDataParallel(
                self.head, device_ids=[device.index] if device.type == 'cuda' else None)
        self.optimizer = torch.optim.Adam(self.head.parameters(), lr=lr)
        self.counts = torch.zeros(2, device=device)  # correct, seen: kept on the device

    def step(self, features, labels):
        with torch.autocast(features.device.type, enabled=False):
            logits = self.model(features.detach().float())
            loss = F.cross_entropy(logits, labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        with torch.no_grad():
            self.counts[0] += (logits.argmax(1) == labels).sum()
            self.counts[1] += labels.numel()

    def top1(self):
        """Top-1 (%) on the training batches since the last call, over all ranks; collective."""
        counts = self.counts.clone()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(counts)
        self.counts.zero_()
        correct, seen = counts.tolist()
        return 100.0 * correct / seen if seen else float('nan')

    def state_dict(self):
        return dict(head=self.head.state_dict(), optimizer=self.optimizer.state_dict())

    def load_state_dict(self, state):
        self.head.load_state_dict(state['head'])
        self.optimizer.load_state_dict(state['optimizer'])
