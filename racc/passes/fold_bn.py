"""fold-bn: fold an eval-mode BatchNorm into the conv or linear that feeds it.

With the BN's running statistics mu, sigma^2, eps and affine gamma, beta:

    W' = W * gamma / sqrt(sigma^2 + eps)      (per output channel)
    b' = (b - mu) * gamma / sqrt(sigma^2 + eps) + beta

Exact (up to float rounding) whenever the conv's output feeds only the BN: another user of the
conv's output would see the folded values, so such a pair is skipped with that reason, as is a BN
without running statistics or one whose input is not a conv or linear.

The folded layer keeps what the BN said of its output, per channel: mean beta and standard
deviation |gamma| (attribute `STATISTICS`), which data-free bias correction reads (int8).
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import ClassVar

import torch.fx as fx
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from racc.ir.fx import module_call_counts
from racc.ir.ops import BATCH_NORMS, CONVS
from racc.passes.base import (
    Exactness,
    Pass,
    PassContext,
    PassResult,
    Skip,
    check_patterns,
    label,
    module_names,
)

# The attribute of a folded layer holding (mean, std) of its output per channel, as its BN had
# them; passes that rescale or slice the layer's output keep it in step or let it go.
STATISTICS = "racc_output_statistics"


class FoldBatchNormIntoConv(Pass):
    """Fold every BatchNorm that directly follows a conv or linear into it.

    Options:
        skip: module-name patterns (fnmatch, e.g. "layer4.*") of BNs to keep, for instance to prune
            them by their gammas later.

    Example:
        >>> opt = racc.compile(model, passes=[FoldBatchNormIntoConv()], example_inputs=(x,))
    """

    name: ClassVar[str] = "fold-bn"
    exactness: ClassVar[Exactness] = "exact"
    skip: tuple[str, ...] = ()

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        check_patterns(self.name, "skip", self.skip, module_names(gm))
        result = PassResult(gm, modified=False)
        calls = module_call_counts(gm)
        for node in list(gm.graph.nodes):
            if node.op == "call_module" and type(gm.get_submodule(node.target)) in BATCH_NORMS:
                reason = self.check(gm, node, calls)
                if reason:
                    result.skipped.append(Skip(label(node), reason))
                    continue
                self.rewrite(gm, node)
                result.matched.append(node.target)
        if result.matched:
            gm.delete_all_unused_submodules()
            gm.recompile()
            result.modified = True
        return result

    def check(self, gm: fx.GraphModule, bn_node: fx.Node, calls: dict[str, int]) -> str:
        source = bn_node.args[0]
        bn = gm.get_submodule(bn_node.target)
        pattern = next((p for p in self.skip if fnmatchcase(bn_node.target, p)), None)
        if pattern:
            return f"BN '{bn_node.target}' matches skip pattern '{pattern}'"
        if bn.running_mean is None:
            return f"BN '{bn_node.target}' tracks no running statistics"
        if not isinstance(source, fx.Node) or source.op != "call_module":
            return f"its input '{getattr(source, 'name', source)}' is not a conv or linear"
        producer = gm.get_submodule(source.target)
        if type(producer) not in (*CONVS, nn.Linear):
            return (
                f"its input '{source.target}' ({type(producer).__name__}) is not a conv or linear"
            )
        if len(source.users) > 1:
            others = ", ".join(u.name for u in source.users if u is not bn_node)
            return f"'{source.target}' output has other users ({others}); folding would change them"
        if calls[source.target] > 1 or calls[bn_node.target] > 1:
            return f"'{source.target}' or '{bn_node.target}' is called more than once"
        return ""

    def rewrite(self, gm: fx.GraphModule, bn_node: fx.Node) -> None:
        source = bn_node.args[0]
        producer, bn = gm.get_submodule(source.target), gm.get_submodule(bn_node.target)
        fold = fuse_linear_bn_eval if isinstance(producer, nn.Linear) else fuse_conv_bn_eval
        folded = fold(producer.eval(), bn.eval())
        if bn.affine:
            setattr(folded, STATISTICS, (bn.bias.detach().clone(), bn.weight.detach().abs()))
        gm.set_submodule(source.target, folded)
        bn_node.replace_all_uses_with(source)
        gm.graph.erase_node(bn_node)
