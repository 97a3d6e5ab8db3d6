"""The fast augmentation path: the reference's two views, split between workers and the device.
(The reference's own `Transform` is in main.py; the evaluation transforms are at the end.)

The reference (`main.Transform`) runs everything in PIL inside the DataLoader workers. Here the
workers only decode and crop, to uint8; the colour work runs batched on the training device:

    workers  CropTransform: RandomResizedCrop (bicubic) + horizontal flip per view -> uint8
             (JPEGs are decoded at 1/2, 1/4 or 1/8 size when both crops stay >= crop_size)
    device   BatchAugment: ColorJitter p=0.8 (random order per sample) -> grayscale p=0.2
             -> Gaussian blur p (view 1: 1.0, view 2: 0.1) -> solarize p (0.0 / 0.2) -> Normalize

Every probability, range and the order of the ops are the reference's; parameters are drawn per
sample. Wiring (main.py):

    folder = ImageFolder(root / 'train', transform=CropTransform(crop), loader=open_for_crop)
    augment = FastTwoViews().to(device)                                  # once
    y1, y2 = augment(y1.to(device, non_blocking=True), y2.to(device, non_blocking=True),
                     generator=step_generator('cpu', seed, step, rank))  # each step

The colour parameters are drawn on the host and every choice of samples is planned there, so
the device half never makes the host wait for the device (no synchronisation per step). For
torch.compile (--compile) the same parameters are packed into one (N, K) tensor
(`FastTwoViews.sample_packed`) and `augment_packed` applies every op to every sample, keeping
its result where the sample's mask says: shapes that depend on the batch alone, the same values
(the blur's taps summed in another order: within 1e-6).

Deviations from the PIL reference (tests/test_augmentations.py measures each): the colour ops
run on float32 with torchvision's tensor formulas and PIL's 601-2 luma weights, without uint8
rounding between ops (PIL's blend truncates, so the reference is ~0.45 level darker per
brightness/contrast/saturation op; PIL's hue works on uint8 HSV, a few levels apart); the blur
is PIL's three-box approximation without its per-pass rounding (<= 3 levels); the bicubic
resize is torch's antialiased uint8 one, PIL's filter with different rounding (<= 3 levels);
a JPEG decoded at reduced size is shrunk by libjpeg's DCT scaling first, its crop box rounded
to whole reduced pixels.
"""
import io

import numpy as np
from PIL import Image
import torch
import torch.nn.functional as F
import torchvision
import torchvision.transforms as transforms
from torch import nn

from cli import InputError
from data import DECODE_ERRORS, to_rgb

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
SOLARIZE_THRESHOLD = 128 / 255  # PIL ImageOps.solarize(threshold=128): x >= 128 -> 255 - x
SIGMA_RANGE = (0.1, 2.0)  # the reference's GaussianBlur: sigma = random.random() * 1.9 + 0.1
BLUR_PASSES, BOX_RADIUS = 3, 2  # PIL's box passes per axis, and their reach for sigma <= 2
JITTER_OPS = ('brightness', 'contrast', 'saturation', 'hue')  # torchvision's fn_idx numbering


# ---------------------------------------------------------------------------------------------
# Worker side: decode (at reduced size when the crops allow it) and crop, to uint8
# ---------------------------------------------------------------------------------------------

def open_for_crop(source, name=None):
    """A lazily decoded PIL image from a path or encoded bytes (`ImageFolder`'s `loader`).

    Decoding is left to `CropTransform`, which first asks libjpeg for a reduced size when both
    crops allow it. `name` (default: the path) is what errors report; it rides on the image.
    """
    if isinstance(source, (bytes, bytearray, memoryview, np.ndarray)):
        fp, name = io.BytesIO(bytes(source)), name or '<bytes>'
    else:
        fp, name = source, name or str(source)
    try:
        img = Image.open(fp)
    except DECODE_ERRORS as e:
        raise InputError(f'cannot read image {name}: {e}') from None
    img.source_name = name
    return img


def draft_scale(params, crop_size):
    """The largest JPEG reduction (8, 4, 2 or 1) that leaves every crop's short side >=
    crop_size pixels, so the bicubic resize still only shrinks (or keeps) the crops."""
    short = min(min(h, w) for _, _, h, w, _ in params)
    for scale in (8, 4, 2):
        if short >= scale * crop_size:
            return scale
    return 1


def crop_views(img, params, crop_size, draft=True):
    """((view1, view2), scale): uint8 (3, crop_size, crop_size) crops of a PIL image.

    `params` holds one (i, j, h, w, flip) per view in full-resolution coordinates
    (`RandomResizedCrop.get_params` order). A JPEG not yet decoded is decoded at 1/scale size
    (`draft_scale`) and the crop boxes are scaled to it, rounded to whole pixels. Resizing is
    torch's uint8 bicubic with antialiasing, which follows PIL's BICUBIC resize (within one
    level) at a quarter of its cost.
    """
    name = getattr(img, 'source_name', None) or getattr(img, 'filename', None) or '<image>'
    width = img.size[0]
    scale = draft_scale(params, crop_size) if draft else 1
    if scale > 1:
        got = img.draft('RGB', (img.size[0] // scale, img.size[1] // scale))
        scale = width / got[1][2] if got else 1  # None: not a JPEG, or already decoded
    try:
        img.load()
        rgb = to_rgb(img)
        pixels = torch.from_numpy(np.array(rgb))  # (H, W, 3)
    except DECODE_ERRORS as e:
        img.close()  # PIL leaves a file opened by path open when decoding fails
        raise InputError(f'cannot read image {name}: {e}') from None
    pixels = pixels.permute(2, 0, 1).unsqueeze(0)  # (1, 3, H, W), channels-last in memory
    views = []
    for i, j, h, w, flip in params:
        if scale != 1:
            top, left = round(i / scale), round(j / scale)
            h, w = max(1, round((i + h) / scale) - top), max(1, round((j + w) / scale) - left)
            i, j = top, left
        views.append(resized_crop(pixels, (i, j, h, w, flip), crop_size))
    return tuple(views), scale


def resized_crop(pixels, view, crop_size):
    """uint8 (1, 3, H, W) -> uint8 (3, crop, crop): crop (i, j, h, w), bicubic resize with
    antialiasing (PIL's BICUBIC), then the horizontal flip if `flip`."""
    i, j, h, w, flip = view
    region = pixels[:, :, i:i + h, j:j + w]
    if region.device.type == 'cpu':
        out = F.interpolate(region, size=(crop_size, crop_size), mode='bicubic', antialias=True)
    else:  # CUDA has the antialiased bicubic for floats only
        out = F.interpolate(region.float(), size=(crop_size, crop_size), mode='bicubic',
                            antialias=True).round_().clamp_(0, 255).to(torch.uint8)
    return (out[0].flip(-1) if flip else out[0]).contiguous()


class CropTransform:
    """Worker half of the fast path: PIL image -> (view1, view2), uint8 (3, crop, crop) each.

    Each view gets its own RandomResizedCrop (scale 0.08-1 unless given, ratio 3/4-4/3,
    torchvision's sampling and centre-crop fallback) and its own flip (p=0.5), from the global
    torch RNG, so `data.SeededSamples` makes every sample reproducible. Give it lazily opened images
    (`ImageFolder(..., loader=open_for_crop)`) so JPEGs can be decoded at reduced size; an
    already decoded image works too, at full-size decoding cost.
    """

    def __init__(self, crop_size=224, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), draft=True):
        self.crop_size, self.scale, self.ratio, self.draft = crop_size, scale, ratio, draft

    def sample_params(self, img):
        """Two (i, j, h, w, flip), drawn as the reference draws crop then flip for a view."""
        params = []
        for _ in range(2):
            i, j, h, w = transforms.RandomResizedCrop.get_params(img, self.scale, self.ratio)
            params.append((i, j, h, w, bool(torch.rand(1) < 0.5)))
        return params

    def __call__(self, img):
        return crop_views(img, self.sample_params(img), self.crop_size, self.draft)[0]

    def __repr__(self):
        return f'CropTransform(crop_size={self.crop_size}, draft={self.draft})'


def decode_and_crop(source, crop_size=224, name=None, draft=True):
    """(view1, view2) uint8 crops of an image file or its encoded bytes, as CropTransform."""
    return CropTransform(crop_size, draft=draft)(open_for_crop(source, name))


# ---------------------------------------------------------------------------------------------
# Device side: colour jitter, grayscale, blur, solarize, normalise on a uint8 batch
# ---------------------------------------------------------------------------------------------
# Each op takes x (M, 3, H, W) float in [0, 1] and per-sample factors (M,), and computes what
# torchvision.transforms.functional computes on one float image with that factor.

def _per_sample(f):
    return f.view(-1, 1, 1, 1)


def _blend(img1, img2, ratio):
    ratio = _per_sample(ratio)
    return (ratio * img1 + (1.0 - ratio) * img2).clamp(0, 1.0)


def rgb_to_grayscale(x):
    """(M, 3, H, W) -> (M, 1, H, W), ITU-R 601-2 luma: PIL's weights (the reference converts
    with PIL), where torchvision's tensor version has 0.2989 for red."""
    r, g, b = x.unbind(dim=-3)
    return (0.299 * r + 0.587 * g + 0.114 * b).unsqueeze(dim=-3)


def _grayscale3(x):
    return rgb_to_grayscale(x).repeat(1, 3, 1, 1)  # RandomGrayscale keeps three channels


def adjust_brightness(x, factor):
    return (_per_sample(factor) * x).clamp(0, 1.0)  # _blend with black: the same values


def adjust_contrast(x, factor):
    mean = torch.mean(rgb_to_grayscale(x), dim=(-3, -2, -1), keepdim=True)  # (M, 1, 1, 1)
    return _blend(x, mean, factor)


def adjust_saturation(x, factor):
    return _blend(x, rgb_to_grayscale(x), factor)


def _rgb2hsv(x):
    # torchvision's _rgb2hsv (after Pillow's Convert.c), unchanged.
    r, g, b = x.unbind(dim=-3)
    maxc, minc = x.max(dim=-3).values, x.min(dim=-3).values
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    cr_divisor = torch.where(eqc, ones, cr)
    rc, gc, bc = (maxc - r) / cr_divisor, (maxc - g) / cr_divisor, (maxc - b) / cr_divisor
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    return h, s, maxc


def _hsv2rgb(h, s, v):
    # torchvision's _hsv2rgb; its one-hot einsum over the six hue sectors becomes selections.
    i = torch.floor(h * 6.0)
    f = (h * 6.0) - i
    i = i.to(dtype=torch.int32) % 6
    p = torch.clamp(v * (1.0 - s), 0.0, 1.0)
    q = torch.clamp(v * (1.0 - s * f), 0.0, 1.0)
    t = torch.clamp(v * (1.0 - s * (1.0 - f)), 0.0, 1.0)
    # sector:  0  1  2  3  4  5
    r = torch.where((i == 0) | (i == 5), v, torch.where(i == 1, q, torch.where(i == 4, t, p)))
    g = torch.where((i == 1) | (i == 2), v, torch.where(i == 0, t, torch.where(i == 3, q, p)))
    b = torch.where((i == 3) | (i == 4), v, torch.where(i == 2, t, torch.where(i == 5, q, p)))
    return torch.stack((r, g, b), dim=-3)


def adjust_hue(x, factor):
    h, s, v = _rgb2hsv(x)
    h = (h + factor.view(-1, 1, 1)) % 1.0
    return _hsv2rgb(h, s, v)


def pil_box_kernel(sigma):
    """(M, 5) float64 weights of one pass of PIL's GaussianBlur(radius=sigma), one row per sigma.

    PIL approximates a Gaussian by three passes, per direction, of an "extended box"
    (Gwosdek et al. 2011) of fractional radius r = l + a: weight 1 / (2r + 1) on |k| <= l and
    the remainder split over |k| = l + 1. The three passes have variance sigma^2 exactly (a
    sampled Gaussian has not, below sigma = 0.5). For sigma <= 2, l <= 1: 5 taps per pass.
    """
    # On the host: a handful of numbers, and the range check below must not wait for a device.
    sigma2 = sigma.to('cpu', torch.float64).view(-1, 1) ** 2 / BLUR_PASSES  # (M, 1), per pass
    big = torch.sqrt(12.0 * sigma2 + 1.0)
    l = torch.floor((big - 1.0) / 2.0)
    a = (2 * l + 1) * (l * (l + 1) - 3 * sigma2) / (6 * (sigma2 - (l + 1) ** 2))
    inner = 1.0 / (2 * (l + a) + 1)  # weight of the 2l + 1 central taps
    outer = (1.0 - (2 * l + 1) * inner) / 2  # weight of the two taps at +-(l + 1)
    if bool((l > BOX_RADIUS - 1).any()):
        raise ValueError(f'sigma {float(sigma.max()):.3g} needs wider box passes')
    distance = torch.arange(-BOX_RADIUS, BOX_RADIUS + 1).abs().view(1, -1)
    return torch.where(distance <= l, inner, torch.where(distance == l + 1, outer, 0.0))


def gaussian_blur(x, sigma):
    """PIL's GaussianBlur(radius=sigma), one sigma per sample, on float (M, C, H, W): three
    box passes (`pil_box_kernel`) along each axis, each extending the border with the edge
    pixel as PIL does. Only PIL's rounding to uint8 after each pass is missing."""
    return _box_blur(x, pil_box_kernel(sigma).to(x.device, x.dtype))


def _box_blur(x, box):
    """`gaussian_blur` with the (M, 5) pass weights already computed (on x's device)."""
    m, c, height, width = x.shape
    box = box.to(x.dtype).repeat_interleave(c, dim=0)  # (M*C, 5)
    y = x.reshape(1, m * c, height, width)  # one group per (sample, channel)
    for pad, weight in (((BOX_RADIUS, BOX_RADIUS, 0, 0), box.view(m * c, 1, 1, -1)),
                        ((0, 0, BOX_RADIUS, BOX_RADIUS), box.view(m * c, 1, -1, 1))):
        for _ in range(BLUR_PASSES):
            y = F.conv2d(F.pad(y, pad, mode='replicate'), weight, groups=m * c)
    return y.view(m, c, height, width)


def _box_blur_shifted(x, box):
    """`_box_blur` as weighted sums of shifted copies: elementwise work that a compiler fuses
    into a few kernels, each sample with its own (M, 5) pass weights (on x's device)."""
    taps = [box[:, k].to(x.dtype).view(-1, 1, 1, 1) for k in range(box.shape[1])]
    for pad, dim in (((BOX_RADIUS, BOX_RADIUS, 0, 0), -1), ((0, 0, BOX_RADIUS, BOX_RADIUS), -2)):
        size = x.shape[dim]
        for _ in range(BLUR_PASSES):
            padded = F.pad(x, pad, mode='replicate')  # the edge pixel repeated, as PIL
            x = sum(w * padded.narrow(dim, k, size) for k, w in enumerate(taps))
    return x


def solarize(x):
    return torch.where(x >= SOLARIZE_THRESHOLD, 1.0 - x, x)


def _apply_where(x, index, count, op, *factors):
    """x with op(x[k], factors[k]) for the `count` samples listed in `index` (on x's device;
    `count` known on the host, so nothing here waits for the device)."""
    if count == 0:
        return x
    if count == x.shape[0]:  # index is then 0..N-1, in order
        return op(x, *factors)
    return x.index_copy_(0, index, op(x.index_select(0, index), *factors))


def _to_device_at_once(host_tensors, device):
    """Several small host tensors on `device` through one asynchronous copy (pinned memory on
    CUDA, so the host never waits for the device); every value is exact in float64."""
    sizes = [t.numel() for t in host_tensors]
    flat = torch.cat([t.reshape(-1).to(torch.float64) for t in host_tensors])
    if device.type == 'cuda':
        flat = flat.pin_memory()
    flat = flat.to(device, non_blocking=True)
    return [part.view(t.shape).to(t.dtype) for part, t in zip(flat.split(sizes), host_tensors)]


class BatchAugment(nn.Module):
    """Device half of one view: uint8 (N, 3, H, W) -> normalised float32 (N, 3, H, W).

    ColorJitter(0.4, 0.4, 0.2, 0.1) with p=0.8, its four ops in a random order per sample ->
    RandomGrayscale(0.2) -> Gaussian blur (p=blur_prob, sigma ~ U(0.1, 2)) -> solarize
    (p=solarize_prob) -> Normalize(mean, std): the reference's order and probabilities, each
    sample with its own parameters (drawn from `generator`, or the device's default one).
    """

    def __init__(self, blur_prob, solarize_prob, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                 jitter_prob=0.8, grayscale_prob=0.2):
        super().__init__()
        self.blur_prob, self.solarize_prob = blur_prob, solarize_prob
        self.jitter_prob, self.grayscale_prob = jitter_prob, grayscale_prob
        # (low, high) of each jitter factor, as ColorJitter(brightness=0.4, contrast=0.4,
        # saturation=0.2, hue=0.1) derives them.
        self.ranges = dict(brightness=(0.6, 1.4), contrast=(0.6, 1.4), saturation=(0.8, 1.2),
                           hue=(-0.1, 0.1))
        self.register_buffer('mean', torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer('std', torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def sample_params(self, n, device=None, generator=None):
        """Per-sample parameters: a dict of (n,) tensors ((n, 4) for `order`)."""
        device = device if device is not None or generator is None else generator.device

        def uniform(low, high, size=(n,)):
            return torch.rand(size, generator=generator, device=device) * (high - low) + low

        params = dict(jitter=uniform(0, 1) < self.jitter_prob,
                      order=uniform(0, 1, (n, 4)).argsort(dim=1))  # uniform over the 24
        params.update({op: uniform(*self.ranges[op]) for op in JITTER_OPS})
        params.update(grayscale=uniform(0, 1) < self.grayscale_prob,
                      blur=uniform(0, 1) < self.blur_prob,
                      sigma=uniform(*SIGMA_RANGE),
                      solarize=uniform(0, 1) < self.solarize_prob)
        return params

    @torch.no_grad()
    def forward(self, images, generator=None, params=None, return_params=False):
        """Augmented views of `images`. The parameters are drawn from `generator` (default:
        the global CPU generator) unless given; drawn on, or given from, the host, they let
        every selection of samples be planned there, so the device never has to report back
        (no host synchronisation). Parameters that live on a GPU are copied to the host first,
        which waits for it."""
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f'expected a uint8 (N, 3, H, W) batch, got {images.dtype} '
                             f'{tuple(images.shape)}')
        if params is None:
            params = self.sample_params(images.shape[0], 'cpu' if generator is None else None,
                                        generator)
        # float32 also when called inside the model's autocast region
        with torch.autocast(images.device.type, enabled=False):
            x = self._augment(images, params)
        return (x, params) if return_params else x

    def _plan(self, params):
        """On the host: [(op, index, count, factors)] in the reference's order, each op with
        the samples that have it, their factors, and (for the blur) the box weights."""
        host = {name: value.cpu() for name, value in params.items()}
        ops = dict(brightness=adjust_brightness, contrast=adjust_contrast,
                   saturation=adjust_saturation, hue=adjust_hue)
        plan = []

        def add(op, mask, *factors):
            index = mask.nonzero().squeeze(1)
            plan.append((op, index, index.numel(), [f.index_select(0, index) for f in factors]))

        for position in range(4):  # 16 masked ops, each on the samples that have it there
            for k, name in enumerate(JITTER_OPS):
                add(ops[name], host['jitter'] & (host['order'][:, position] == k), host[name])
        add(_grayscale3, host['grayscale'])
        add(_box_blur, host['blur'], pil_box_kernel(host['sigma']).float())
        add(solarize, host['solarize'])
        return plan

    # --- fixed shapes (the compiled step): every op on every sample, selected by masks ---

    # columns of pack(): one row per sample, all float32 (masks 0/1, order 0-3, factors, the
    # blur's box weights: identity weights for samples without blur)
    PACKED = ('jitter', 'order0', 'order1', 'order2', 'order3', *JITTER_OPS, 'grayscale',
              *(f'box{k}' for k in range(2 * BOX_RADIUS + 1)), 'solarize')

    def pack(self, params):
        """(N, len(PACKED)) float32 on the host: the parameters of `augment_packed`, for one
        copy to the device. Every value is exact in float32 (factors are drawn in float32)."""
        host = {name: value.cpu() for name, value in params.items()}
        identity = torch.zeros(1, 2 * BOX_RADIUS + 1)
        identity[0, BOX_RADIUS] = 1.0  # convolving with it returns each pixel exactly
        box = torch.where(host['blur'].view(-1, 1), pil_box_kernel(host['sigma']).float(),
                          identity)
        columns = [host['jitter'].float().view(-1, 1), host['order'].float(),
                   *(host[name].float().view(-1, 1) for name in JITTER_OPS),
                   host['grayscale'].float().view(-1, 1), box,
                   host['solarize'].float().view(-1, 1)]
        return torch.cat(columns, dim=1)

    def augment_packed(self, images, packed):
        """uint8 (N, 3, H, W) and pack()'s (N, K) on the same device -> normalised float32.

        The same ops, parameters and order as forward(), with shapes that depend on nothing
        but the batch's: each op is computed for every sample and kept where the sample's mask
        says so (torch.where), so that torch.compile sees one static graph. Where forward()
        applies an op to a sample, the values are the same up to float rounding."""
        column = {name: packed[:, k] for k, name in enumerate(self.PACKED)}
        jitter = column['jitter'] > 0.5
        x = images.to(torch.float32) / 255
        for position in range(4):
            op = column[f'order{position}']
            chosen = [jitter & (op == k) for k in range(4)]  # brightness, contrast, sat., hue
            # brightness, contrast and saturation are all blends of x with another image:
            # black (brightness: factor * x + 0), the grey mean, the grey image
            gray = rgb_to_grayscale(x)
            mean = torch.mean(gray, dim=(-3, -2, -1), keepdim=True)
            other = torch.where(_per_sample(chosen[1]), mean,
                                torch.where(_per_sample(chosen[2]), gray, 0.0))
            factor = torch.where(chosen[0], column['brightness'],
                                 torch.where(chosen[1], column['contrast'],
                                             column['saturation']))
            blended = _blend(x, other, factor)
            x = torch.where(_per_sample(chosen[0] | chosen[1] | chosen[2]), blended, x)
            x = torch.where(_per_sample(chosen[3]), adjust_hue(x, column['hue']), x)
        x = torch.where(_per_sample(column['grayscale'] > 0.5), _grayscale3(x), x)
        first_box = self.PACKED.index('box0')
        x = _box_blur_shifted(x, packed[:, first_box:first_box + 2 * BOX_RADIUS + 1])
        x = torch.where(_per_sample(column['solarize'] > 0.5), solarize(x), x)
        return (x - self.mean) / self.std

    def _augment(self, images, params):
        plan = self._plan(params)
        tensors = [t for _, index, _, factors in plan for t in (index, *factors)]
        on_device = iter(_to_device_at_once(tensors, images.device))
        x = images.to(torch.float32).div_(255)  # keeps a channels-last layout
        for op, _, count, factors in plan:
            index = next(on_device)
            x = _apply_where(x, index, count, op, *[next(on_device) for _ in factors])
        return x.sub_(self.mean.to(x.device)).div_(self.std.to(x.device))


class FastTwoViews(nn.Module):
    """The reference's two asymmetric views on the device: (y1, y2) uint8 -> normalised float.

    By default view 1: blur p=1.0, solarize p=0.0; view 2: blur p=0.1, solarize p=0.2 (`blur`
    and `solarize` hold the two views' probabilities, as main.py's --blur-prob/--solarize-prob).
    """

    def __init__(self, blur=(1.0, 0.1), solarize=(0.0, 0.2), mean=IMAGENET_MEAN,
                 std=IMAGENET_STD):
        super().__init__()
        self.view1 = BatchAugment(blur[0], solarize[0], mean=mean, std=std)
        self.view2 = BatchAugment(blur[1], solarize[1], mean=mean, std=std)

    def forward(self, y1, y2, generator=None):
        return self.view1(y1, generator), self.view2(y2, generator)

    def sample_packed(self, n, generator=None):
        """(2, n, K) float32 on the host: both views' parameters for augment_packed, drawn
        from `generator` in forward()'s order, so that both paths make the same views."""
        return torch.stack([view.pack(view.sample_params(n, 'cpu' if generator is None else None,
                                                         generator))
                            for view in (self.view1, self.view2)])

    def augment_packed(self, y1, y2, packed):
        """forward() at fixed shapes, for torch.compile (BatchAugment.augment_packed)."""
        return self.view1.augment_packed(y1, packed[0]), self.view2.augment_packed(y2, packed[1])


def step_generator(device, seed, step, rank=0):
    """A generator for one training step's device augmentations, a function of (seed, global
    step, rank) only: a run resumed mid-epoch draws exactly the parameters it would have.
    Training draws on a 'cpu' one (see BatchAugment.forward)."""
    state = np.random.SeedSequence([seed & 0xFFFFFFFF, step, rank]).generate_state(2)
    generator = torch.Generator(device=device)
    generator.manual_seed(int(state[0]) << 32 | int(state[1]))
    return generator


# ---------------------------------------------------------------------------------------------
# Optional GPU path: nvjpeg decoding and cropping on the device (the workers only read bytes)
# ---------------------------------------------------------------------------------------------

def decode_and_crop_batch(encoded, crop_size=224, device='cuda'):
    """(v1, v2) uint8 (N, 3, crop, crop) on `device` from a list of encoded JPEGs (bytes).

    torchvision's decode_jpeg (nvjpeg on CUDA) decodes the batch where it is; crops and flips
    are drawn as CropTransform draws them (global torch RNG), one image at a time (the sizes
    differ). An image decode_jpeg refuses (CMYK, a PNG named .JPEG) is decoded by PIL.
    Experimental: a loader that yields bytes is needed to use it, and only its CPU run is tested.
    """
    data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in encoded]
    try:
        images = torchvision.io.decode_jpeg(data, mode=torchvision.io.ImageReadMode.RGB,
                                            device=device)
    except RuntimeError:
        images = [_decode_one(d, device) for d in data]
    crop = CropTransform(crop_size)
    views = ([], [])
    for img in images:
        for out, view in zip(views, crop.sample_params(img)):
            out.append(resized_crop(img.unsqueeze(0), view, crop_size))
    return torch.stack(views[0]), torch.stack(views[1])


def _decode_one(data, device):
    try:
        return torchvision.io.decode_jpeg(data, mode=torchvision.io.ImageReadMode.RGB,
                                          device=device)
    except RuntimeError:
        img = to_rgb(open_for_crop(data.numpy()))
        return torch.from_numpy(np.array(img)).permute(2, 0, 1).to(device)


# ---------------------------------------------------------------------------------------------
# Evaluation transforms (evaluate.py, the kNN monitor), as the reference's evaluate.py
# ---------------------------------------------------------------------------------------------

def train_transform(crop_size=224):
    return transforms.Compose([
        transforms.RandomResizedCrop(crop_size),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
    ])


def val_transform(crop_size=224):
    return transforms.Compose([
        transforms.Resize(round(crop_size * 256 / 224)),  # 256 for 224
        transforms.CenterCrop(crop_size),
        transforms.ToTensor(),
        transforms.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
    ])
