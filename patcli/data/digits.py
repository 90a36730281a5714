"""scikit-learn's bundled 8×8 digits (1,797 images): the default task, offline and small enough for seconds-long runs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ConfigError
from .base import DATASETS, DataBundle, Split

IMAGES = 1797  # in scikit-learn's digits
# At 20 images a fold, every test_size leaves each digit in more non-test images than there are folds (>= 56 more);
# at 10, StratifiedKFold runs out of the rarest digit.
MIN_FOLD_SIZE = 20


@DATASETS.register("digits")
@dataclass
class Digits:
    """A stratified split made once with ``split_seed``: test 360 / validation 180 / train 1,257 by default.

    ``val_fold`` makes one fold of a stratified k-fold split of the non-test images the validation split (k = their
    count / val_size, rounded), so recipes can be compared by cross-validation: 180 validation images are too few to
    rank recipes a few tenths of a percent apart. The test split never moves.
    """

    test_size: int = 360
    val_size: int = 180
    split_seed: int = 0
    val_fold: int | None = None
    flatten: bool = True

    def validate(self, prefix: str) -> None:
        for key in ("test_size", "val_size"):
            value = getattr(self, key)
            if not 10 <= value <= 600:
                raise ConfigError(f"{prefix}.{key}", f"{value} is out of range; allowed: 10..600")
        if self.val_fold is not None and self.val_size < MIN_FOLD_SIZE:  # more folds than images of the rarest digit
            raise ConfigError(f"{prefix}.val_size", f"{self.val_size} is too small for cross-validation folds that hold "
                                                    f"every digit; allowed with val_fold: {MIN_FOLD_SIZE}..600")
        if not 0 <= self.split_seed < 2**32:  # scikit-learn's random_state range
            raise ConfigError(f"{prefix}.split_seed", f"{self.split_seed} is out of range; allowed: 0 <= value < 2**32")
        folds = self.folds()
        if self.val_fold is not None and not 0 <= self.val_fold < folds:
            raise ConfigError(f"{prefix}.val_fold", f"{self.val_fold} is out of range; allowed: null or 0..{folds - 1}"
                                                    f" ({folds} folds of about {(IMAGES - self.test_size) // folds} images)")

    def folds(self) -> int:
        return max(2, round((IMAGES - self.test_size) / self.val_size))

    def load(self) -> DataBundle:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import StratifiedKFold, train_test_split

        images, labels = load_digits(return_X_y=True)
        rest_x, test_x, rest_y, test_y = train_test_split(
            images, labels, test_size=self.test_size, stratify=labels, random_state=self.split_seed
        )
        if self.val_fold is None:
            train_x, val_x, train_y, val_y = train_test_split(
                rest_x, rest_y, test_size=self.val_size, stratify=rest_y, random_state=self.split_seed
            )
        else:
            folds = StratifiedKFold(n_splits=self.folds(), shuffle=True, random_state=self.split_seed)
            train_idx, val_idx = list(folds.split(rest_x, rest_y))[self.val_fold]
            train_x, val_x, train_y, val_y = rest_x[train_idx], rest_x[val_idx], rest_y[train_idx], rest_y[val_idx]

        def split(x, y) -> Split:
            inputs = torch.tensor(x, dtype=torch.float32) / 16.0
            if not self.flatten:
                inputs = inputs.reshape(-1, 1, 8, 8)
            return Split(inputs, torch.tensor(y, dtype=torch.long))

        shape = [64] if self.flatten else [1, 8, 8]
        return DataBundle(
            name="digits",
            task="classification",
            train=split(train_x, train_y),
            val=split(val_x, val_y),
            test=split(test_x, test_y),
            meta={"input_shape": shape, "image_shape": [1, 8, 8], "num_classes": 10},
        )
