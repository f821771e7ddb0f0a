"""Datasets and transforms: AGD20K / HICO-IIF (``agd20k``), official transforms (``transforms``).

The AGD-Synth generator lives in ``affordance_core.data.synth`` and is imported on demand only.
"""
from __future__ import annotations

from affordance_core.data.agd20k import AGD20KTest, AGD20KTrain, collate_test, collate_train
from affordance_core.data.transforms import (IMAGENET_MEAN, IMAGENET_STD, preprocess_rgb,
                                             test_transform, train_transform, view_transform)

__all__ = [
    'AGD20KTest', 'AGD20KTrain', 'IMAGENET_MEAN', 'IMAGENET_STD', 'collate_test',
    'collate_train', 'preprocess_rgb', 'test_transform', 'train_transform', 'view_transform',
]
