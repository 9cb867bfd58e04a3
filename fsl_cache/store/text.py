"""Where a store keeps its text side: class weights, raw per-template embeddings, class descriptions.

``text/<set>`` ``[C, D]`` are the L2-normalised zero-shot class weights of a template set;
``text_raw/<set>`` ``[C, T, D]`` the un-normalised embeddings they are averaged from (fp32, as the text
encoder returns them), for the methods whose official code averages raw embeddings or uses them one by
one; ``text_descriptions/mean`` ``[C, D]`` and ``/count`` ``[C]`` the per-class mean of the L2-normalised
sentence embeddings of a ``--descriptions`` file and how many sentences it averages (APE).
"""

from __future__ import annotations

DESCRIPTIONS_MEAN = "text_descriptions/mean"
DESCRIPTIONS_COUNT = "text_descriptions/count"


def weights_name(template_set: str) -> str:
    return f"text/{template_set}"


def per_template_name(template_set: str) -> str:
    return f"text_raw/{template_set}"
