"""The compiled training step of --compile (and so of --fast): one graph per step region.

    step = CompiledStep(model, augment, torch.bfloat16, device, (64, 3, 224, 224),
                        torch.channels_last, seed=0, rank=0)
    for global_step, inputs, labels in step.prefetch(enumerate(loader)):
        loss, features = step(*inputs)        # then loss.backward() and LARS(compiled=True)

The step's regions, each one torch.compile graph at static shapes (fullgraph, dynamic=False):
  augment    the augmentation's device half (--fast-augment) at fixed shapes: every op on every
             sample, kept by masks; the views come out in the model's memory format
  forward    both views through backbone and projector in the autocast dtype, and the loss;
             backward is the same graph's compiled backward
  optimizer  LARS's update of every parameter (main.LARS(compiled=True))
A batch of another shape (an epoch's short last batch, without --drop-last) runs the same
functions eagerly (torch.compiler's force_eager stance): one eager step, no recompilation, and
the run keeps its static kernels. With several processes the model inside DDP is what is
compiled (DDP's hooks stay outside, and the graph is split at its gradient buckets).

On a GPU, each batch's copy to the device (views, labels, augmentation parameters) runs on a
side stream while the previous step computes; the step waits for its own copies only.
"""
import contextlib

import torch
from torch import nn

from augmentations import step_generator


class CompiledStep:
    """step(y1, y2[, packed]) -> (loss, representation of view 1), compiled region by region."""

    def __init__(self, model, augment, autocast_dtype, device, batch_shape, memory_format,
                 seed=0, rank=0):
        self.augment, self.device = augment, device
        self.batch_shape = tuple(batch_shape)
        self.seed, self.rank = seed, rank
        device_type = device.type

        def augment_views(y1, y2, packed=None):
            if augment is not None:  # uint8 crops in, normalised float views out
                y1, y2 = augment.augment_packed(y1, y2, packed)
            return y1.to(memory_format=memory_format), y2.to(memory_format=memory_format)

        def forward(y1, y2):
            with torch.autocast(device_type, dtype=autocast_dtype,
                                enabled=autocast_dtype is not None):
                return model(y1, y2, return_features=True)

        self.augment_views = torch.compile(augment_views, fullgraph=True, dynamic=False)
        if isinstance(model, nn.parallel.DistributedDataParallel):
            # torch.compile takes the model inside DDP, not DDP itself: compiled in place
            # (nn.Module.compile: parameter names unchanged), DDP's hooks stay outside, and the
            # compiler splits the graph at DDP's gradient buckets so that their all-reduces
            # overlap the backward pass
            model.module.compile(fullgraph=True, dynamic=False)
            self.forward = forward
        else:
            self.forward = torch.compile(forward, fullgraph=True, dynamic=False)
        self.eager_steps = 0  # steps at another shape than batch_shape

    def stance(self, batch):
        """The compiler's stance for a batch: compiled at batch_shape, eager otherwise (an
        epoch's short last batch: one eager step, no recompilation)."""
        if tuple(batch.shape) == self.batch_shape:
            return contextlib.nullcontext()
        self.eager_steps += 1
        return torch.compiler.set_stance('force_eager')

    def __call__(self, *inputs):
        with self.stance(inputs[0]):
            return self.forward(*self.augment_views(*inputs))

    def host_inputs(self, y1, y2, step):
        """What the step needs from the host: the views and, with the augmentation, its
        parameters for this global step (drawn as main.views_to_device draws them)."""
        if self.augment is None:
            return y1, y2
        generator = step_generator('cpu', self.seed, step, self.rank)
        packed = self.augment.sample_packed(y1.shape[0], generator)
        return y1, y2, packed.pin_memory() if self.device.type == 'cuda' else packed

    def prefetch(self, batches):
        """(step, inputs on the device, labels on the device) from (step, ((y1, y2), labels))."""
        loads = ((step, self._load((*self.host_inputs(y1, y2, step), labels)))
                 for step, ((y1, y2), labels) in batches)
        pending = None
        for loaded in loads:  # the next batch's copy is queued before this one is handed out
            if pending is not None:
                yield self._ready(*pending)
            pending = loaded
        if pending is not None:
            yield self._ready(*pending)

    def _load(self, tensors):
        if self.device.type != 'cuda':
            return [t.to(self.device) for t in tensors], None
        if not hasattr(self, 'stream'):
            self.stream = torch.cuda.Stream(self.device)
        stream = self.stream
        with torch.cuda.stream(stream):
            moved = [t.to(self.device, non_blocking=True) for t in tensors]
            copied = torch.cuda.Event()
            copied.record(stream)
        return moved, copied

    def _ready(self, step, loaded):
        moved, copied = loaded
        if copied is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(copied)  # this batch's copies only, not the next one's
            for t in moved:  # allocated on the side stream, used on this one
                t.record_stream(current)
        return step, moved[:-1], moved[-1]
