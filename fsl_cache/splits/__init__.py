"""Which images train, select and test: CoOp few-shot sampling, the protocols' splits, split references."""

from .protocol import (
    PROTOCOLS,
    VALIDATIONS,
    Splits,
    base_novel_classes,
    build_splits,
    check_full_val,
    check_protocol,
    check_validation,
    default_validation,
    harmonic_mean,
    shift_classes,
    subset_classes,
    test_split,
)
from .refs import SplitRef
from .sampling import FewShotPools, FewShotSubset, few_shot_pools, sample_few_shot

__all__ = [
    "PROTOCOLS",
    "VALIDATIONS",
    "FewShotPools",
    "FewShotSubset",
    "SplitRef",
    "Splits",
    "base_novel_classes",
    "build_splits",
    "check_full_val",
    "check_protocol",
    "check_validation",
    "default_validation",
    "harmonic_mean",
    "few_shot_pools",
    "sample_few_shot",
    "shift_classes",
    "subset_classes",
    "test_split",
]
