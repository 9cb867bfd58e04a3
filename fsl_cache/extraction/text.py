"""Stage one's text side: which text arrays a store still lacks, and encoding them with the frozen text tower."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..backbones.backbone import class_weights
from ..datasets import DatasetSpec
from ..datasets.descriptions import Descriptions
from ..methods.needs import Needs
from ..store.backend import ArraySpec
from ..store.text import DESCRIPTIONS_COUNT, DESCRIPTIONS_MEAN, per_template_name, weights_name


def text_arrays(
    spec: DatasetSpec,
    needs: Sequence[Needs],
    *,
    embed_dim: int,
    descriptions: Descriptions | None,
    existing: dict | Sequence[str] = (),
) -> list[ArraySpec]:
    """The text arrays to write: class weights of every template set, the raw per-template embeddings
    of the sets ``needs`` name, and the description means when a file is given; minus ``existing``."""
    c, d = spec.num_classes, embed_dim
    raw_sets = {s for n in needs for s in n.text_raw if s in spec.templates}
    arrays = [ArraySpec(weights_name(t), (c, d), "float32", (c, d)) for t in spec.templates]
    arrays += [
        ArraySpec(per_template_name(t), (c, len(ts), d), "float32", (c, len(ts), d))
        for t, ts in spec.templates.items()
        if t in raw_sets
    ]
    if descriptions is not None:
        arrays += [
            ArraySpec(DESCRIPTIONS_MEAN, (c, d), "float32", (c, d)),
            ArraySpec(DESCRIPTIONS_COUNT, (c,), "int32", (c,)),
        ]
    return [a for a in arrays if a.name not in existing]


def encode_text(
    backbone,
    spec: DatasetSpec,
    planned: Sequence[ArraySpec],
    *,
    descriptions: Descriptions | None,
    read: Callable[[str], np.ndarray],
    write: Callable[[ArraySpec, np.ndarray], None] | None,
) -> dict[str, torch.Tensor]:
    """Encode the ``planned`` text arrays (``write`` them when given); return every set's class weights
    (``read`` back from the store when not planned, so the zero-shot logits use what the store holds)."""
    todo = {a.name: a for a in planned}
    weights, out = {}, {}
    with torch.no_grad():
        for name, templates in spec.templates.items():
            if weights_name(name) in todo or per_template_name(name) in todo:
                raw = backbone.template_embeddings(list(spec.classnames), list(templates)).float().cpu()
                out[per_template_name(name)] = raw.numpy()
                out[weights_name(name)] = class_weights(raw).numpy()
            weights[name] = torch.from_numpy(
                out[weights_name(name)] if weights_name(name) in todo else read(weights_name(name))
            )
        if DESCRIPTIONS_MEAN in todo:
            out[DESCRIPTIONS_MEAN], out[DESCRIPTIONS_COUNT] = description_means(backbone, descriptions)
    if write is not None:
        for name, array in todo.items():
            write(array, out[name])
    return weights


def description_means(backbone, descriptions: Descriptions) -> tuple[np.ndarray, np.ndarray]:
    """Per class: the mean of the L2-normalised sentence embeddings ``[C, D]``, and the sentence counts ``[C]``."""
    counts = [len(s) for s in descriptions.sentences]
    emb = F.normalize(backbone.encode_texts([t for s in descriptions.sentences for t in s]).float(), dim=-1)
    means = torch.stack([chunk.mean(0) for chunk in emb.split(counts)])
    return means.numpy(), np.asarray(counts, np.int32)
