"""Image transforms of the official AGD20K pipeline (``methods.md`` §0.3), on PIL images.

* Training: Resize(256) of the shorter side (``resize_mode='square'``: Resize((256, 256)), as in
  LoopTrans) -> RandomCrop(224) -> RandomHorizontalFlip -> ToTensor -> ImageNet normalisation.
* Test: Resize((224, 224)) without keeping the aspect ratio -> ToTensor -> normalisation.
* Feature-cache views: view 0 is the test transform, view 1 the test transform followed by an
  exact horizontal flip of the tensor.

All resizes go through ``torchvision.transforms.functional.resize`` on PIL images, i.e. PIL's
bilinear filter (always antialiased), exactly like the official ``transforms.Resize``.
The random training transform takes its randomness from an explicit ``numpy.random.Generator``
so that datasets can make every draw a function of (seed, epoch, index).
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision import transforms as T
from torchvision.transforms import functional as F

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

RESIZE_MODES: tuple[str, ...] = ('short', 'square')
MAX_VIEWS = 2  # view 0 = plain, view 1 = horizontal flip


def _check_size(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f'{name} must be a positive integer, got {value!r}')


class TrainTransform:
    """Random training augmentation with an explicit random generator.

    Args:
        image_size: side S of the square random crop.
        resize: size of the resize before the crop (must be >= ``image_size``).
        resize_mode: 'short' resizes the shorter side to ``resize`` (aspect kept);
            'square' resizes to (``resize``, ``resize``).

    Calling it on a PIL image returns a normalised tensor (3, S, S).
    """

    def __init__(self, image_size: int = 224, resize: int = 256,
                 resize_mode: str = 'short') -> None:
        _check_size('image_size', image_size)
        _check_size('resize', resize)
        if resize < image_size:
            raise ValueError(f'resize ({resize}) must be >= image_size ({image_size}) '
                             'so that the random crop fits')
        if resize_mode not in RESIZE_MODES:
            raise ValueError(f"unknown resize_mode '{resize_mode}'; expected one of "
                             f"{', '.join(RESIZE_MODES)}")
        self.image_size = image_size
        self.resize = resize
        self.resize_mode = resize_mode

    def __call__(self, img: Image.Image, rng: np.random.Generator | None = None) -> Tensor:
        """Augment ``img``.

        Args:
            img: PIL image (converted to RGB if needed).
            rng: source of the crop offset and flip draws; ``None`` draws a generator from
                torch's global RNG (torchvision-like behaviour).

        Returns:
            (3, S, S) float32 tensor, ImageNet-normalised.
        """
        if rng is None:
            rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,)).item()))
        if img.mode != 'RGB':
            img = img.convert('RGB')
        size = self.resize if self.resize_mode == 'short' else [self.resize, self.resize]
        img = F.resize(img, size)
        width, height = img.size
        s = self.image_size
        top = int(rng.integers(0, height - s + 1))
        left = int(rng.integers(0, width - s + 1))
        img = F.crop(img, top, left, s, s)
        if rng.random() < 0.5:
            img = F.hflip(img)
        return F.normalize(F.to_tensor(img), IMAGENET_MEAN, IMAGENET_STD)

    def __repr__(self) -> str:
        return (f'{type(self).__name__}(image_size={self.image_size}, resize={self.resize}, '
                f"resize_mode='{self.resize_mode}')")


def train_transform(image_size: int = 224, resize: int = 256,
                    resize_mode: str = 'short') -> TrainTransform:
    """Official training transform; see :class:`TrainTransform`."""
    return TrainTransform(image_size, resize, resize_mode)


@functools.lru_cache(maxsize=8)
def test_transform(image_size: int = 224) -> Callable[[Image.Image], Tensor]:
    """Official test transform: Resize((S, S)) (aspect not kept), ToTensor, Normalize.

    Returns:
        callable PIL image -> (3, S, S) float32 tensor.
    """
    _check_size('image_size', image_size)
    return T.Compose([
        T.Resize((image_size, image_size)),  # PIL bilinear, antialiased
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


class _FlipAfter:
    """Apply a transform, then flip the resulting tensor horizontally (exact)."""

    def __init__(self, base: Callable[[Image.Image], Tensor]) -> None:
        self.base = base

    def __call__(self, img: Image.Image) -> Tensor:
        return torch.flip(self.base(img), dims=(-1,))

    def __repr__(self) -> str:
        return f'_FlipAfter({self.base!r})'


def view_transform(view: int, image_size: int = 224) -> Callable[[Image.Image], Tensor]:
    """Deterministic augmentation ``view`` used by feature-cache epochs.

    Args:
        view: 0 = :func:`test_transform`; 1 = the same followed by a horizontal flip, so that
            view 1 is exactly ``view0.flip(-1)``.
        image_size: output side S.

    Returns:
        callable PIL image -> (3, S, S) float32 tensor.
    """
    if view == 0:
        return test_transform(image_size)
    if view == 1:
        return _FlipAfter(test_transform(image_size))
    raise ValueError(f'view must be 0 (plain) or 1 (horizontal flip), got {view!r}')


def check_rgb(rgb: Any, error: type[Exception] = ValueError) -> np.ndarray:
    """Validate an RGB frame: a non-empty (H, W, 3) uint8 numpy array; raise ``error`` if not.

    Shared by ``preprocess_rgb`` and the inference pipeline (which raises its ``InputError``).
    """
    if not isinstance(rgb, np.ndarray):
        raise error(f'rgb must be a numpy array (H, W, 3) uint8, got {type(rgb).__name__}')
    if rgb.dtype != np.uint8:
        raise error(f'rgb must have dtype uint8 (0..255), got {rgb.dtype}; '
                    'convert with (img * 255).round().astype(np.uint8) if it is in [0, 1]')
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise error(f'rgb must have shape (H, W, 3) in RGB order, got {tuple(rgb.shape)}; '
                    'drop the alpha channel or stack grey images to 3 channels')
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise error(f'rgb is empty: shape {tuple(rgb.shape)}')
    return rgb


def preprocess_rgb(rgb: np.ndarray, image_size: int = 224) -> Tensor:
    """Preprocess an RGB camera frame exactly like :func:`test_transform` does a PIL image.

    Args:
        rgb: (H, W, 3) uint8 array in RGB order.
        image_size: output side S.

    Returns:
        (3, S, S) float32 tensor, ImageNet-normalised.

    Raises:
        ValueError: if ``rgb`` is not a non-empty (H, W, 3) uint8 array.
    """
    check_rgb(rgb)
    img = Image.fromarray(np.ascontiguousarray(rgb))  # (H, W, 3) uint8 -> 'RGB'
    return test_transform(image_size)(img)
