"""Rewrites. One module per pass; `REGISTRY` maps pipeline names to pass classes."""

from racc.passes.base import REGISTRY, Pass, PassContext, PassResult, Skip
from racc.passes.equalize import EqualizeChannels
from racc.passes.fold_bn import FoldBatchNormIntoConv
from racc.passes.fuse_5x5 import FuseConv3x3PairInto5x5
from racc.passes.int8 import QuantizeInt8
from racc.passes.pipeline import format_pipeline, parse_pipeline
from racc.passes.prune_bn import PruneChannelsByBnGamma
from racc.passes.rac import RewriteConv3x3ToRac

__all__ = [
    "REGISTRY",
    "EqualizeChannels",
    "FoldBatchNormIntoConv",
    "FuseConv3x3PairInto5x5",
    "PruneChannelsByBnGamma",
    "QuantizeInt8",
    "RewriteConv3x3ToRac",
    "Pass",
    "PassContext",
    "PassResult",
    "Skip",
    "format_pipeline",
    "parse_pipeline",
]
