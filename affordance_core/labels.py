"""Class lists of the supported benchmarks: the only copy in the project.

The order is the official index order used by every classifier (``methods.md`` §1.2): a class id
is the position of the affordance name in the list of its split. Checkpoints, evaluation and the
robot all read their class names from here.
"""
from __future__ import annotations

AFFORDANCES_SEEN: tuple[str, ...] = (
    'beat', 'boxing', 'brush_with', 'carry', 'catch', 'cut', 'cut_with', 'drag', 'drink_with',
    'eat', 'hit', 'hold', 'jump', 'kick', 'lie_on', 'lift', 'look_out', 'open', 'pack', 'peel',
    'pick_up', 'pour', 'push', 'ride', 'sip', 'sit_on', 'stick', 'stir', 'swing', 'take_photo',
    'talk_on', 'text_on', 'throw', 'type_on', 'wash', 'write',
)

AFFORDANCES_UNSEEN: tuple[str, ...] = (
    'carry', 'catch', 'cut', 'cut_with', 'drink_with', 'eat', 'hit', 'hold', 'jump', 'kick',
    'lie_on', 'open', 'peel', 'pick_up', 'pour', 'push', 'ride', 'sip', 'sit_on', 'stick',
    'swing', 'take_photo', 'throw', 'type_on', 'wash',
)

AFFORDANCES_HICO_IIF: tuple[str, ...] = (
    'cut_with', 'drink_with', 'hold', 'open', 'pour', 'sip', 'stick', 'stir', 'swing', 'type_on',
)

OBJECTS: tuple[str, ...] = (
    'apple', 'axe', 'badminton_racket', 'banana', 'baseball', 'baseball_bat', 'basketball', 'bed',
    'bench', 'bicycle', 'binoculars', 'book', 'bottle', 'bowl', 'broccoli', 'camera', 'carrot',
    'cell_phone', 'chair', 'couch', 'cup', 'discus', 'drum', 'fork', 'frisbee', 'golf_clubs',
    'hammer', 'hot_dog', 'javelin', 'keyboard', 'knife', 'laptop', 'microwave', 'motorcycle',
    'orange', 'oven', 'pen', 'punching_bag', 'refrigerator', 'rugby_ball', 'scissors',
    'skateboard', 'skis', 'snowboard', 'soccer_ball', 'suitcase', 'surfboard', 'tennis_racket',
    'toothbrush', 'wine_glass',
)

# split name (as in the AGD20K folder names, plus HICO-IIF) -> class list
SPLITS: dict[str, tuple[str, ...]] = {
    'Seen': AFFORDANCES_SEEN,
    'Unseen': AFFORDANCES_UNSEEN,
    'HICO-IIF': AFFORDANCES_HICO_IIF,
}


def classes_for(split: str) -> tuple[str, ...]:
    """Return the affordance names of ``split`` ('Seen', 'Unseen' or 'HICO-IIF') in index order."""
    try:
        return SPLITS[split]
    except KeyError:
        raise ValueError(f"unknown split '{split}'; expected one of {', '.join(SPLITS)}") from None


def class_id(name: str, classes: tuple[str, ...] | list[str]) -> int:
    """Index of affordance ``name`` in ``classes``; a clear error lists the valid names."""
    try:
        return list(classes).index(name)
    except ValueError:
        raise ValueError(
            f"unknown action '{name}'; known actions: {', '.join(classes)}") from None
