"""The fast augmentation path (augmentations.py) against the reference's PIL/torchvision ops.

Each op is compared with the library function the reference calls; the per-sample parameters
are compared with the reference's probabilities and ranges over many samples (4 standard errors).
"""
import io
import math
import random

import numpy as np
import pytest
import torch
import torchvision
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter, ImageOps

import augmentations as A
import main
from cli import InputError
from data import SeededSamples

MEAN = torch.tensor(A.IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(A.IMAGENET_STD).view(1, 3, 1, 1)


def smooth_image(width, height, seed=0):
    """A photograph-like RGB image: smooth colour fields, a few hard edges, mild noise."""
    rng = np.random.default_rng(seed)
    low = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    pixels = np.asarray(low.resize((width, height), Image.BICUBIC), dtype=np.float64)
    pixels[height // 4:height // 2, width // 3:width // 2] = (240, 30, 90)
    pixels += rng.normal(0, 4, pixels.shape)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def jpeg_bytes(img, quality=92):
    buffer = io.BytesIO()
    img.save(buffer, 'JPEG', quality=quality)
    return buffer.getvalue()


def to_uint8_tensor(img):
    pixels = torch.from_numpy(np.array(img))
    return pixels.permute(2, 0, 1) if pixels.dim() == 3 else pixels.unsqueeze(0)


def within_sampling_error(samples, p):
    """The fraction of True in `samples` is within 4 standard errors of p."""
    n = samples.numel()
    se = math.sqrt(max(p * (1 - p), 1e-12) / n)
    return abs(samples.float().mean().item() - p) <= 4 * se + 1e-12


# ---------------------------------------------------------------------------------------------
# Worker side
# ---------------------------------------------------------------------------------------------

def test_crop_transform_from_path_bytes_and_image_folder(tmp_path):
    folder = tmp_path / 'train' / 'cls'
    folder.mkdir(parents=True)
    smooth_image(120, 90).save(folder / 'a.JPEG', quality=90)
    crop = A.CropTransform(32)
    from_path = crop(A.open_for_crop(folder / 'a.JPEG'))
    from_bytes = A.decode_and_crop((folder / 'a.JPEG').read_bytes(), 32, name='a.JPEG')
    dataset = torchvision.datasets.ImageFolder(tmp_path / 'train', transform=crop,
                                               loader=A.open_for_crop)
    (in_folder, _), label = dataset[0]
    for views in (from_path, from_bytes, (in_folder, in_folder)):
        assert len(views) == 2
        for view in views:
            assert view.dtype == torch.uint8 and view.shape == (3, 32, 32)
            assert view.is_contiguous()
    assert not torch.equal(from_path[0], from_path[1])  # each view has its own crop
    assert label == 0


def test_view_is_the_reference_crop_and_flip():
    # The first view draws its crop and flip as the reference's first view does, so with the
    # same seed it is the reference's RandomResizedCrop(bicubic) + RandomHorizontalFlip output,
    # up to the resize's rounding (torch's uint8 bicubic vs PIL's).
    img = smooth_image(160, 120)
    data = jpeg_bytes(img)
    decoded = Image.open(io.BytesIO(data)).convert('RGB')
    reference = T.Compose([T.RandomResizedCrop(48, interpolation=Image.BICUBIC),
                           T.RandomHorizontalFlip(p=0.5)])
    flips = 0
    for seed in range(40):
        torch.manual_seed(seed)
        expected = to_uint8_tensor(reference(decoded)).float()
        torch.manual_seed(seed)
        params = A.CropTransform(48).sample_params(decoded)
        torch.manual_seed(seed)
        view1, _ = A.decode_and_crop(data, 48, draft=False)  # the reference decodes in full
        difference = (view1.float() - expected).abs()
        assert difference.max() <= 3 and difference.mean() <= 0.5, seed
        flips += params[0][4]
    assert 5 < flips < 35  # both flipped and unflipped views were compared


def test_draft_scale_keeps_both_crops_at_least_crop_size():
    views = [(0, 0, 900, 1000, False), (10, 20, 460, 500, True)]
    assert A.draft_scale(views, 224) == 2  # 460 / 2 >= 224, 460 / 4 < 224
    assert A.draft_scale([(0, 0, 1800, 1900, False)] * 2, 224) == 8
    assert A.draft_scale([(0, 0, 1800, 1900, False), (0, 0, 447, 1900, False)], 224) == 1
    assert A.draft_scale([(0, 0, 448, 448, False)] * 2, 224) == 2


def test_reduced_size_decoding_is_close_to_full_decoding():
    data = jpeg_bytes(smooth_image(1280, 960))
    crop = 96
    views = [(40, 60, 800, 900, False), (100, 0, 860, 1200, True)]  # short sides 800, 860
    full, full_scale = A.crop_views(A.open_for_crop(data), views, crop, draft=False)
    reduced, scale = A.crop_views(A.open_for_crop(data), views, crop)
    assert (full_scale, scale) == (1, 8)  # 800 / 8 = 100 >= 96
    for a, b in zip(full, reduced):
        difference = (a.float() - b.float()).abs()
        assert difference.mean() < 2.0, difference.mean()  # levels of 255
    # One crop too small for any reduction: the image is decoded at full size.
    views[1] = (0, 0, 150, 150, False)
    assert A.crop_views(A.open_for_crop(data), views, crop)[1] == 1


def test_unreadable_images_name_the_file(tmp_path):
    truncated = tmp_path / 'truncated.JPEG'
    truncated.write_bytes(jpeg_bytes(smooth_image(200, 150))[:600])
    with pytest.raises(InputError, match=f'cannot read image {truncated}'):
        A.CropTransform(32)(A.open_for_crop(truncated))
    with pytest.raises(InputError, match='cannot read image train/x/bad.JPEG'):
        A.open_for_crop(b'not an image', name='train/x/bad.JPEG')
    with pytest.raises(InputError, match='missing.JPEG'):
        A.open_for_crop(tmp_path / 'missing.JPEG')


def test_crop_parameter_statistics_match_random_resized_crop():
    n, width, height = 20000, 500, 375
    img = Image.new('RGB', (width, height))
    torch.manual_seed(0)
    crop = A.CropTransform(224)
    ours = [crop.sample_params(img) for _ in range(n)]
    torch.manual_seed(1)
    theirs = [T.RandomResizedCrop.get_params(img, (0.08, 1.0), (3 / 4, 4 / 3)) for _ in range(n)]

    def stats(boxes):
        boxes = torch.tensor(boxes, dtype=torch.float64)  # (n, 4): i, j, h, w
        assert (boxes[:, 0] + boxes[:, 2] <= height).all()
        assert (boxes[:, 1] + boxes[:, 3] <= width).all()
        return boxes[:, 2] * boxes[:, 3] / (width * height), torch.log(boxes[:, 3] / boxes[:, 2])

    for view in range(2):
        area, log_ratio = stats([p[view][:4] for p in ours])
        ref_area, ref_log_ratio = stats(theirs)
        # Rounding to whole pixels moves the bounds by well under 1%.
        assert area.min() >= 0.08 * 0.99 and area.max() <= 1.0
        assert log_ratio.abs().max() <= math.log(4 / 3) + 0.01
        for ours_x, ref_x in ((area, ref_area), (log_ratio, ref_log_ratio)):
            se = math.sqrt(ours_x.var().item() / n + ref_x.var().item() / n)
            assert abs(ours_x.mean().item() - ref_x.mean().item()) <= 4 * se
        assert within_sampling_error(torch.tensor([p[view][4] for p in ours]), 0.5)
    # The two views are drawn independently.
    area1, area2 = (stats([p[v][:4] for p in ours])[0] for v in range(2))
    assert abs(torch.corrcoef(torch.stack([area1, area2]))[0, 1].item()) < 4 / math.sqrt(n)


def test_same_seed_same_crops_through_seeded_samples(tmp_path):
    folder = tmp_path / 'train' / 'cls'
    folder.mkdir(parents=True)
    for k in range(3):
        smooth_image(100, 80, seed=k).save(folder / f'{k}.JPEG')
    images = torchvision.datasets.ImageFolder(tmp_path / 'train', transform=A.CropTransform(24),
                                              loader=A.open_for_crop)
    dataset = SeededSamples(images, seed=7)
    first = dataset[1][0]
    dataset[2]  # another sample in between changes nothing
    again = dataset[1][0]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    dataset.set_epoch(1)
    assert not torch.equal(dataset[1][0][0], first[0])


@pytest.mark.filterwarnings('ignore:The image decoding:DeprecationWarning')  # torchvision 0.29
def test_decode_and_crop_batch_on_cpu_matches_crop_transform():
    images = [smooth_image(160, 120, seed=k) for k in range(3)]
    encoded = [jpeg_bytes(img) for img in images]
    torch.manual_seed(3)
    v1, v2 = A.decode_and_crop_batch(encoded, 40, device='cpu')
    assert v1.shape == v2.shape == (3, 3, 40, 40) and v1.dtype == torch.uint8
    torch.manual_seed(3)
    expected = [A.decode_and_crop(data, 40, draft=False) for data in encoded]
    for k, (e1, e2) in enumerate(expected):
        for ours, theirs in ((v1[k], e1), (v2[k], e2)):
            assert (ours.float() - theirs.float()).abs().mean() < 1.0  # two JPEG decoders


# ---------------------------------------------------------------------------------------------
# Device side
# ---------------------------------------------------------------------------------------------

def random_batch(n=8, size=24, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=generator)


def test_batch_augment_output_dtype_shape_and_range():
    images = random_batch(16, 32)
    for augment in (A.BatchAugment(1.0, 0.0), A.BatchAugment(0.1, 0.2)):
        out = augment(images, generator=torch.Generator().manual_seed(0))
        assert out.dtype == torch.float32 and out.shape == images.shape
        low, high = (0 - MEAN) / STD, (1 - MEAN) / STD
        assert (out >= low - 1e-5).all() and (out <= high + 1e-5).all()
        # Channels-last input: the same values.
        cl = augment(images.contiguous(memory_format=torch.channels_last),
                     generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(cl, out, rtol=0, atol=1e-5)
        # Inside the model's autocast region it still computes in float32.
        with torch.autocast('cpu', dtype=torch.bfloat16):
            mixed = augment(images, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(mixed, out, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match='uint8'):
        A.BatchAugment(1.0, 0.0)(images.float())


@pytest.mark.parametrize('view, blur, solarize', [(1, 1.0, 0.0), (2, 0.1, 0.2)])
def test_parameter_statistics_match_the_reference(view, blur, solarize):
    n = 20000
    images = random_batch(n, 8, seed=view)
    augment = A.BatchAugment(blur, solarize)
    out, params = augment(images, generator=torch.Generator().manual_seed(view),
                          return_params=True)
    for key, p in (('jitter', 0.8), ('grayscale', 0.2), ('blur', blur), ('solarize', solarize)):
        assert within_sampling_error(params[key], p), key
    for key, (low, high) in dict(brightness=(0.6, 1.4), contrast=(0.6, 1.4),
                                 saturation=(0.8, 1.2), hue=(-0.1, 0.1),
                                 sigma=(0.1, 2.0)).items():
        x = params[key]
        assert low <= x.min() and x.max() <= high, key
        se = (high - low) / math.sqrt(12 * n)
        assert abs(x.mean().item() - (low + high) / 2) <= 4 * se, key
    # The four jitter ops in a uniformly random order: each row a permutation, the 24 orders
    # equally frequent (chi-square, 23 degrees of freedom; 60 is p < 1e-4).
    order = params['order']
    assert (order.sort(dim=1).values == torch.arange(4)).all()
    codes = (order * torch.tensor([64, 16, 4, 1])).sum(dim=1)
    counts = torch.unique(codes, return_counts=True)[1].double()
    assert len(counts) == 24
    assert ((counts - n / 24) ** 2 / (n / 24)).sum() < 60
    # The recorded parameters are the applied ones: grayscale gives equal channels, and a
    # sample with nothing applied comes out as ToTensor + Normalize of its input.
    pixels = out * STD + MEAN
    gray = params['grayscale']
    assert (pixels[gray].amax(dim=1) - pixels[gray].amin(dim=1)).max() < 1e-5
    untouched = ~(params['jitter'] | params['grayscale'] | params['blur'] | params['solarize'])
    if view == 2:
        assert untouched.sum() > 1000
        torch.testing.assert_close(pixels[untouched], images[untouched].float() / 255,
                                   rtol=0, atol=1e-5)


def test_colour_ops_match_torchvision():
    x = random_batch(6, 20).float() / 255
    generator = torch.Generator().manual_seed(0)
    factors = torch.rand(6, generator=generator) * 0.8 + 0.6
    hues = torch.rand(6, generator=generator) * 0.2 - 0.1
    # Brightness and hue: torchvision's tensor formulas exactly.
    for ours, theirs, f in ((A.adjust_brightness, TF.adjust_brightness, factors),
                            (A.adjust_hue, TF.adjust_hue, hues)):
        expected = torch.stack([theirs(x[k], float(f[k])) for k in range(6)])
        torch.testing.assert_close(ours(x.clone(), f), expected, rtol=0, atol=1e-5)
    # Luma: PIL's 0.299 (what the reference uses) where torchvision's tensor code has 0.2989,
    # so contrast, saturation and grayscale differ from torchvision by up to 1e-4 * red.
    for ours, theirs in ((A.adjust_contrast, TF.adjust_contrast),
                         (A.adjust_saturation, TF.adjust_saturation)):
        expected = torch.stack([theirs(x[k], float(factors[k])) for k in range(6)])
        torch.testing.assert_close(ours(x.clone(), factors), expected, rtol=0, atol=6e-5)
    expected = torch.stack([TF.rgb_to_grayscale(x[k], num_output_channels=3) for k in range(6)])
    torch.testing.assert_close(A._grayscale3(x), expected, rtol=0, atol=1.1e-4)
    # ... and PIL's own conversion (integer arithmetic) to half a level.
    images = random_batch(6, 20)
    pil = torch.stack([to_uint8_tensor(TF.to_pil_image(img).convert('L'))[0]
                       for img in images]).float()
    ours = A.rgb_to_grayscale(images.float())[:, 0]
    assert (ours - pil).abs().max() <= 0.5 + 1e-3


def test_jitter_follows_each_samples_order():
    # Every sample's four ops in its own drawn order, as ColorJitter applies fn_idx.
    images = random_batch(48, 12, seed=3)
    augment = A.BatchAugment(blur_prob=0.0, solarize_prob=0.0, grayscale_prob=0.0)
    out, params = augment(images, generator=torch.Generator().manual_seed(5), return_params=True)
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    expected = []
    for k in range(len(images)):
        x = images[k].float() / 255
        if params['jitter'][k]:
            for op in params['order'][k].tolist():
                x = ops[op](x, float(params[A.JITTER_OPS[op]][k]))
        expected.append(x)
    expected = (torch.stack(expected) - MEAN) / STD
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-3)  # luma 0.299 vs 0.2989, / std
    assert 0 < params['jitter'].sum() < len(images)


def test_solarize_matches_pil():
    levels = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(1, 3, 16, 16)
    expected = to_uint8_tensor(ImageOps.solarize(TF.to_pil_image(levels[0])))
    ours = (A.solarize(levels.float() / 255) * 255).round().to(torch.uint8)[0]
    assert torch.equal(ours, expected)


def test_blur_matches_pil_gaussian_blur():
    # PIL's GaussianBlur(radius=sigma) is three box passes per axis, rounded to uint8 after each;
    # ours is the same box passes in float. Measured: at most 3 levels apart (0.012), where a
    # sampled Gaussian differs by up to 17 levels at sigma 0.3 on a hard edge.
    img = smooth_image(64, 48)
    x = to_uint8_tensor(img).unsqueeze(0).float() / 255
    sigmas = [0.1, 0.3, 0.7, 1.2, 2.0]
    ours = A.gaussian_blur(x.expand(len(sigmas), -1, -1, -1), torch.tensor(sigmas))
    for k, sigma in enumerate(sigmas):
        expected = to_uint8_tensor(img.filter(ImageFilter.GaussianBlur(sigma))).float() / 255
        difference = (ours[k] - expected).abs()
        assert difference.max() <= 4 / 255, (sigma, difference.max() * 255)
        assert difference.mean() <= 1 / 255, (sigma, difference.mean() * 255)


def test_view_close_to_the_pil_reference_with_the_same_parameters():
    # One view end to end against the reference's PIL ops (uint8 between ops, PIL's own jitter,
    # blur and solarize) with the same drawn parameters: a few levels apart at most pixels
    # (PIL's hue works on uint8 HSV: up to ~15 levels on saturated pixels).
    crops = torch.stack([to_uint8_tensor(smooth_image(40, 40, seed=k)) for k in range(24)])
    augment = A.BatchAugment(blur_prob=0.5, solarize_prob=0.5)
    out, params = augment(crops, generator=torch.Generator().manual_seed(0), return_params=True)
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    signed = []
    for k in range(len(crops)):
        img = TF.to_pil_image(crops[k])
        if params['jitter'][k]:
            for op in params['order'][k].tolist():
                img = ops[op](img, float(params[A.JITTER_OPS[op]][k]))
        if params['grayscale'][k]:
            img = TF.rgb_to_grayscale(img, num_output_channels=3)
        if params['blur'][k]:
            img = img.filter(ImageFilter.GaussianBlur(float(params['sigma'][k])))
        if params['solarize'][k]:
            img = ImageOps.solarize(img)
        expected = TF.normalize(TF.to_tensor(img), A.IMAGENET_MEAN, A.IMAGENET_STD)
        signed.append((out[k] - expected) * STD[0] * 255)
        levels = signed[-1].abs()
        assert levels.mean() < 3 and torch.quantile(levels.flatten(), 0.99) < 12, k
    # The one bias: PIL's blend (brightness, contrast, saturation) truncates to uint8, about
    # -0.45 level per op, so the reference is slightly darker (measured here: 0.6 level).
    assert 0 < torch.stack(signed).mean() < 1.5


def test_same_seed_same_views():
    images = random_batch(8, 16)
    augment = A.FastTwoViews()
    first = augment(images, images, generator=A.step_generator('cpu', seed=0, step=5))
    again = augment(images, images, generator=A.step_generator('cpu', seed=0, step=5))
    other = augment(images, images, generator=A.step_generator('cpu', seed=0, step=6))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], other[0])
    torch.manual_seed(1)  # the default generator, seeded, reproduces too
    a = A.BatchAugment(0.1, 0.2)(images)
    torch.manual_seed(1)
    assert torch.equal(a, A.BatchAugment(0.1, 0.2)(images))


# ---- the recipe knobs (--blur-prob, --solarize-prob, --min-scale) on both pipelines ----

def applied_fraction(op, n=20000, seed=0):
    """How often a GaussianBlur/Solarization of main.Transform changes its input."""
    random.seed(seed)
    img = Image.new('RGB', (4, 4), (200, 40, 90))
    return sum(op(img) is not img for _ in range(n)) / n


def reference_ops(transform):
    """{kind: [(view 1's), (view 2's)]} of the reference pipeline's random ops."""
    ops = {'blur': [], 'solarize': [], 'crop': []}
    for view in (transform.transform, transform.transform_prime):
        for t in view.transforms:
            if isinstance(t, main.GaussianBlur):
                ops['blur'].append(t)
            elif isinstance(t, main.Solarization):
                ops['solarize'].append(t)
            elif isinstance(t, T.RandomResizedCrop):
                ops['crop'].append(t)
    return ops


@pytest.mark.parametrize('blur, solarize', [((1.0, 0.1), (0.0, 0.2)),  # the reference
                                            ((0.0, 0.0), (0.0, 0.2)),  # solo-learn's CIFAR
                                            ((0.5, 0.25), (0.3, 1.0))])
def test_reference_pipeline_applies_each_views_probabilities(blur, solarize):
    ops = reference_ops(main.Transform(32, blur, solarize))
    for kind, probabilities in (('blur', blur), ('solarize', solarize)):
        for view, p in enumerate(probabilities):
            fraction = applied_fraction(ops[kind][view], seed=view)
            # 4 standard errors of a binomial proportion; exact at 0 and 1
            assert abs(fraction - p) <= 4 * math.sqrt(p * (1 - p) / 20000), (kind, view)


def test_reference_pipeline_defaults_are_the_reference():
    ops = reference_ops(main.Transform(224))
    assert [op.p for op in ops['blur']] == [1.0, 0.1]
    assert [op.p for op in ops['solarize']] == [0.0, 0.2]
    assert [op.scale for op in ops['crop']] == [(0.08, 1.0)] * 2
    assert [op.interpolation for op in ops['crop']] == [T.InterpolationMode.BICUBIC] * 2
    args = main.parse_arguments(['data'])
    assert (args.blur_prob, args.solarize_prob, args.min_scale) == ((1.0, 0.1), (0.0, 0.2), 0.08)


def test_min_scale_bounds_the_crop_area_on_both_pipelines():
    img = Image.new('RGB', (500, 375))
    torch.manual_seed(0)
    crop = reference_ops(main.Transform(224, min_scale=0.5))['crop'][0]
    areas = [h * w / (500 * 375) for _, _, h, w in
             (T.RandomResizedCrop.get_params(img, crop.scale, crop.ratio) for _ in range(2000))]
    fast = A.CropTransform(224, scale=(0.5, 1.0))
    fast_areas = [h * w / (500 * 375) for p in (fast.sample_params(img) for _ in range(2000))
                  for _, _, h, w, _ in p]
    for sampled in (areas, fast_areas):
        assert min(sampled) >= 0.5 * 0.99 and max(sampled) <= 1.0
    # the same area distribution on both pipelines (crops that do not fit are redrawn, so
    # the mean is below the 0.75 of U(0.5, 1))
    a, b = torch.tensor(areas), torch.tensor(fast_areas)
    assert abs(a.mean() - b.mean()) <= 4 * math.sqrt(a.var() / len(a) + b.var() / len(b))


def test_min_scale_1_crops_the_whole_image_on_both_pipelines():
    # scale (1, 1): no crop of area 1 with an aspect ratio other than the image's fits, so
    # torchvision falls back to the central crop at the image's own ratio (clamped to 3/4-4/3):
    # for this square image, the whole image
    args = main.parse_arguments(['data', '--min-scale', '1'])
    assert args.min_scale == 1.0
    img = Image.new('RGB', (40, 40))
    crop = reference_ops(main.Transform(32, min_scale=args.min_scale))['crop'][0]
    fast = A.CropTransform(32, scale=(args.min_scale, 1.0))
    torch.manual_seed(0)
    boxes = {T.RandomResizedCrop.get_params(img, crop.scale, crop.ratio) for _ in range(200)}
    boxes |= {p[:4] for _ in range(200) for p in fast.sample_params(img)}
    assert boxes == {(0, 0, 40, 40)}


def test_recipe_flags_reach_both_pipelines():
    args = main.parse_arguments(['data', '--blur-prob', '0,0', '--solarize-prob', '0,0.2',
                                 '--min-scale', '0.2'])
    views = A.FastTwoViews(args.blur_prob, args.solarize_prob)
    assert (views.view1.blur_prob, views.view2.blur_prob) == (0.0, 0.0)
    assert (views.view1.solarize_prob, views.view2.solarize_prob) == (0.0, 0.2)
    ops = reference_ops(main.Transform(32, args.blur_prob, args.solarize_prob, args.min_scale))
    assert [op.p for op in ops['blur']] == [0.0, 0.0]
    assert [op.scale for op in ops['crop']] == [(0.2, 1.0)] * 2
    for bad in (['--blur-prob', '1.5,0'], ['--solarize-prob', 'nan,0'], ['--blur-prob', '0.5'],
                ['--min-scale', '0'], ['--min-scale', '1.5'], ['--min-scale', 'nan']):
        with pytest.raises(SystemExit) as exit_info:
            main.parse_arguments(['data'] + bad)
        assert exit_info.value.code == 2
