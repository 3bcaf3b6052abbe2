"""Rule filters in the style of FaceID-6M (Wang et al., 2025, arXiv 2503.07091; github.com/ShuheSH/FaceID-6M):
keep a sample only if it passes every rule (resolution, aspect ratio, caption keywords, custom predicates)."""

from __future__ import annotations

import importlib
import re
from typing import Literal, Optional, Sequence

import numpy as np
import torch

from lightning_ext.core.validation import (
    NonNegativeFloat, PositiveFloat, PositiveInt, check_choice, check_non_negative, check_number, check_positive_int,
)
from lightning_ext.curation.base import Scorer, Scores, ScoringData

__all__ = ["RuleFilter", "import_predicate"]


def import_predicate(path: str):
    """``"package.module.function"`` -> the function (predicates are named by import path so YAML can hold them)."""
    module, _, name = path.rpartition(".")
    if not module:
        raise ValueError(f"Predicate {path!r} must be an import path such as 'my_package.filters.is_sharp'.")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"Cannot import predicate {path!r}: {err}.") from err
    if not callable(fn):
        raise TypeError(f"Predicate {path!r} is not callable.")
    return fn


class RuleFilter(Scorer):
    """Rule-based filtering in the FaceID-6M style (Wang et al., 2025): resolution filtering, keyword-based
    caption filtering and arbitrary per-sample predicates, each a hard pass/fail; a sample survives when it
    passes all of them (``score`` 0, else ``-inf``), and ``rejected_by`` records the first rule it failed.

    Sizes come from the metadata columns ``height``/``width`` when present, else from the input tensor's
    last two dimensions; captions from the metadata column ``caption_key``.

    Args:
        min_resolution: minimum of ``min(height, width)`` in pixels (FaceID-6M and DataComp: 200 for web images).
        max_aspect_ratio: maximum ``max(h, w) / min(h, w)`` (DataComp basic filter: 3.0).
        min_pixel_std: minimum standard deviation of the input's values: removes blank and constant images.
        keywords: caption keywords (case-insensitive whole words); ``keyword_mode`` ``"any"`` keeps captions
            containing at least one, ``"none"`` drops captions containing any (a block list).
        keyword_mode: ``"any"`` or ``"none"``.
        min_caption_words: minimum whitespace words in the caption (DataComp basic: more than 2).
        caption_key: metadata column of the captions.
        predicates: import paths of functions ``f(x, y, meta) -> bool`` (``meta``: that sample's metadata).

    Example:
        >>> import torch
        >>> x = torch.randn(4, 1, 8, 8); x[1] = 0.0  # a blank image
        >>> data = ScoringData.from_tensors(x, torch.zeros(4, dtype=torch.long),
        ...                                 metadata={"caption": ["a face", "a face", "a cat", "face of a man"]})
        >>> f = RuleFilter(min_pixel_std=1e-3, keywords=["face"])
        >>> f.select(f.score(data), data, None).tolist()
        [0, 3]
    """

    def __init__(
        self,
        min_resolution: Optional[PositiveInt] = None,
        max_aspect_ratio: Optional[PositiveFloat] = None,
        min_pixel_std: Optional[NonNegativeFloat] = None,
        keywords: Optional[Sequence[str]] = None,
        keyword_mode: Literal["any", "none"] = "any",
        min_caption_words: Optional[PositiveInt] = None,
        caption_key: str = "caption",
        predicates: Optional[Sequence[str]] = None,
    ) -> None:
        check_choice("keyword_mode", keyword_mode, ("any", "none"))
        if min_resolution is not None:
            check_positive_int("min_resolution", min_resolution)
        if max_aspect_ratio is not None:
            check_number("max_aspect_ratio", max_aspect_ratio, low=1)
        if min_pixel_std is not None:
            check_non_negative("min_pixel_std", min_pixel_std)
        if min_caption_words is not None:
            check_positive_int("min_caption_words", min_caption_words)
        if keywords is not None and len(keywords) == 0:
            raise ValueError("`keywords` is empty: give at least one keyword or None.")
        self.min_resolution, self.max_aspect_ratio, self.min_pixel_std = min_resolution, max_aspect_ratio, min_pixel_std
        self.keywords = list(keywords) if keywords is not None else None
        self.keyword_mode, self.min_caption_words, self.caption_key = keyword_mode, min_caption_words, caption_key
        self.predicates = list(predicates or [])
        self._functions = [import_predicate(p) for p in self.predicates]  # fail early on a bad path
        if not any([min_resolution, max_aspect_ratio, min_pixel_std is not None, keywords, min_caption_words,
                    self.predicates]):
            raise ValueError("RuleFilter has no rule: set at least one of min_resolution, max_aspect_ratio, "
                             "min_pixel_std, keywords, min_caption_words, predicates.")

    def _sizes(self, data: ScoringData) -> tuple[np.ndarray, np.ndarray]:
        meta = data.metadata
        if "height" in meta and "width" in meta:
            return np.asarray(meta["height"], dtype=float), np.asarray(meta["width"], dtype=float)
        x0 = data.dataset[0][0]
        n = len(data)
        return np.full(n, float(x0.shape[-2])), np.full(n, float(x0.shape[-1]))

    def _captions(self, data: ScoringData) -> list[str]:
        if self.caption_key not in data.metadata:
            raise ValueError(f"Caption rules need the metadata column {self.caption_key!r} (the wrapped datamodule's "
                             "`train_metadata`); it has: " + ", ".join(sorted(data.metadata)) + ".")
        return [str(c) for c in data.metadata[self.caption_key]]

    def score(self, data: ScoringData) -> Scores:
        n = len(data)
        reason = np.zeros(n, dtype=np.int64)  # 0 = kept, else 1 + index of the first failed rule
        rules: list[tuple[str, np.ndarray]] = []
        if self.min_resolution or self.max_aspect_ratio:
            h, w = self._sizes(data)
            if self.min_resolution:
                rules.append(("min_resolution", np.minimum(h, w) >= self.min_resolution))
            if self.max_aspect_ratio:
                rules.append(("max_aspect_ratio", np.maximum(h, w) / np.maximum(np.minimum(h, w), 1) <= self.max_aspect_ratio))
        if self.min_pixel_std is not None:
            std = torch.cat([x.flatten(1).std(1) for x, _ in data.loader(1024)]).numpy()
            rules.append(("min_pixel_std", std >= self.min_pixel_std))
        if self.keywords or self.min_caption_words:
            captions = self._captions(data)
            if self.min_caption_words:
                rules.append(("min_caption_words", np.array([len(c.split()) >= self.min_caption_words for c in captions])))
            if self.keywords:
                pattern = re.compile(r"\b(" + "|".join(re.escape(k) for k in self.keywords) + r")\b", re.IGNORECASE)
                hit = np.array([bool(pattern.search(c)) for c in captions])
                rules.append(("keywords", hit if self.keyword_mode == "any" else ~hit))
        for path, fn in zip(self.predicates, self._functions):
            ok = []
            for i in range(n):
                x, y = data.dataset[i][:2]
                meta = {k: v[i] for k, v in data.metadata.items()}
                ok.append(bool(fn(x, y, meta)))
            rules.append((path, np.array(ok)))
        for r, (_, ok) in reversed(list(enumerate(rules))):
            reason[~ok] = r + 1
        score = np.where(reason == 0, 0.0, -np.inf)
        return {"score": score, "rejected_by": reason, "rule_names": np.array([name for name, _ in rules])}

    @staticmethod
    def rejection_counts(scores: Scores) -> dict[str, int]:
        """Samples rejected by each rule (the first rule a sample failed)."""
        names = list(scores["rule_names"])
        return {name: int((scores["rejected_by"] == i + 1).sum()) for i, name in enumerate(names)}
