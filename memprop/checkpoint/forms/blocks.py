"""Which modules are the repeated blocks that checkpointing segments.

    find_chains(model)                              # automatic: every chain of blocks
    find_chains(model, blocks="LlamaDecoderLayer")  # a class, by name or type
    find_chains(model, check_fn=lambda m: ...)      # a predicate, as torch's
                                                    # apply_activation_checkpointing
    find_chains(model, "transformer.h")             # an attribute path (blocks_attr)

NOTE [ How blocks are found ]
  In order of precedence:
    1. ``blocks_attr`` (the argument, else ``model.blocks_attr``): that ModuleList or
       Sequential is the one chain; then ``model.blocks`` (the zoo's chain).
    2. ``blocks`` (a class or class name) or ``check_fn`` (a predicate on modules): the
       matching modules, outermost only (a match inside a match is not a block), grouped
       into one chain per parent module, in registration order.
    3. The model itself, if it is an ``nn.Sequential``.
    4. Automatically: every ``nn.ModuleList`` / ``nn.Sequential`` holding at least two
       modules, all of one class; outermost only. An encoder-decoder has two chains.
  A strategy applies to each chain. Finding a chain claims nothing about how the model
  calls its blocks: a multi-block segment verifies at run time that the model's loop
  feeds each block the previous block's output (NOTE [ How a segment is checkpointed
  without changing the model ] in memprop.checkpoint.forms.chain).
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from memprop.errors import StrategyError

__all__ = ["find_chains", "find_blocks"]

_CONTAINERS = (nn.ModuleList, nn.Sequential)


def _by_attr(model: nn.Module, attr: str) -> list[nn.Module]:
    target: object = model
    for part in attr.split("."):
        target = getattr(target, part, None)
    if not isinstance(target, _CONTAINERS) or len(target) == 0:
        raise StrategyError(f"memprop.checkpoint: {type(model).__name__}.{attr} is not a "
                            "non-empty nn.ModuleList or nn.Sequential of blocks; name the "
                            "attribute that holds the chain")
    return list(target)


def _outermost(model: nn.Module, pick: Callable[[nn.Module], bool]) -> list[tuple[str, nn.Module]]:
    """Modules (with their names) for which ``pick`` holds, none inside another."""
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix, _ in found):
            continue
        if module is not model and pick(module):
            found.append((name, module))
    return found


def _repeated(module: nn.Module) -> bool:
    children = list(module.children())
    return (isinstance(module, _CONTAINERS) and len(children) >= 2
            and len({type(c) for c in children}) == 1)


def _class_matcher(blocks) -> Callable[[nn.Module], bool]:
    if isinstance(blocks, type):
        return lambda m: isinstance(m, blocks)
    if isinstance(blocks, str):
        return lambda m: type(m).__name__ == blocks
    raise StrategyError(f"memprop.checkpoint: blocks={blocks!r} is neither a module class "
                        "nor a class name; write blocks=\"LlamaDecoderLayer\" or pass "
                        "check_fn=lambda module: ...")


def find_chains(model: nn.Module, blocks_attr: str | None = None, *, blocks=None,
                check_fn: Callable[[nn.Module], bool] | None = None) -> list[list[nn.Module]]:
    """Every chain of blocks in ``model`` (NOTE [ How blocks are found ])."""
    attr = blocks_attr or getattr(model, "blocks_attr", None)
    if attr:
        return [_by_attr(model, attr)]
    if blocks is None and check_fn is None and isinstance(getattr(model, "blocks", None),
                                                            _CONTAINERS):
        return [_by_attr(model, "blocks")]
    if blocks is not None or check_fn is not None:
        match = check_fn if check_fn is not None else _class_matcher(blocks)
        chains: dict[str, list[nn.Module]] = {}
        for name, module in _outermost(model, match):
            chains.setdefault(name.rpartition(".")[0], []).append(module)
        if not chains:
            what = f"blocks={blocks!r}" if check_fn is None else "check_fn"
            classes = sorted({type(m).__name__ for m in model.modules()})[:12]
            raise StrategyError(f"memprop.checkpoint: no module of {type(model).__name__} "
                                f"matches {what}; its module classes include: "
                                f"{', '.join(classes)}")
        return list(chains.values())
    if isinstance(model, nn.Sequential):
        return [list(model)]
    chains_found = [list(m.children()) for _, m in _outermost(model, _repeated)]
    if not chains_found:
        raise StrategyError(
            f"memprop.checkpoint: cannot find the block chain of {type(model).__name__}: it "
            "has no nn.ModuleList or nn.Sequential of two or more blocks of one class. Name "
            "the blocks: blocks=\"MyBlock\" (a class name) or check_fn=... in Python, or the "
            "attribute holding them: blocks_attr='layers' in Python, --blocks-attr layers on "
            "the command line, blocks_attr = \"layers\" in a spec's [model]")
    return chains_found


def find_blocks(model: nn.Module, blocks_attr: str | None = None, *, blocks=None,
                check_fn=None) -> list[nn.Module]:
    """The one chain of blocks of ``model`` (the planner's view); an error naming the
    chains if there are several."""
    chains = find_chains(model, blocks_attr, blocks=blocks, check_fn=check_fn)
    if len(chains) > 1:
        names = {id(m): n for n, m in model.named_modules()}
        where = ", ".join(f"{names[id(c[0])].rpartition('.')[0] or '(model)'} "
                          f"({len(c)} x {type(c[0]).__name__})" for c in chains)
        raise StrategyError(f"memprop.checkpoint: {type(model).__name__} has {len(chains)} "
                            f"block chains ({where}); the planner segments one chain: name "
                            "it with blocks_attr='<attribute path>'")
    return chains[0]
