"""Nested conditions: one tree-map and one leaf walk over the dicts, lists and tuples of tensors.

A condition is what the ``Denoiser`` passes to its backbone as keyword tensors, e.g.
``{"encoder_hidden_states": ..., "added_cond_kwargs": {"text_embeds": ..., "time_ids": ...}}``; its
leaves are tensors and, where a family needs them, plain values (``None``, numbers). Every operation on
a whole condition (moving it to a device, slicing or repeating its batch, concatenating two for CFG,
casting, detaching) is a ``tree_map`` of a function of its tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

Condition = dict


def _child(tree: Any, key: Any) -> Any:
    """``tree[key]`` for a container that has it, else ``None`` (a tree missing that branch)."""
    if isinstance(tree, dict):
        return tree.get(key)
    if isinstance(tree, (list, tuple)) and isinstance(key, int) and key < len(tree):
        return tree[key]
    return None


def tree_map(fn: Callable[..., Any], tree: Any, *others: Any) -> Any:
    """``tree`` with every tensor leaf ``x`` replaced by ``fn(x, *matching leaves of others)``.

    Dicts (key order kept), lists and tuples are rebuilt with the same structure; leaves that are not
    tensors (``None``, numbers, strings) are kept as they are, and ``fn`` is not called on them.
    ``others`` are trees read along ``tree``'s structure: ``fn`` receives the leaf at the same place
    in each, or ``None`` where that tree lacks it. For example
    ``tree_map(lambda a, b: torch.cat([a, b]), cond, uncond)`` stacks two conditions along the batch.
    """
    if isinstance(tree, dict):
        return {k: tree_map(fn, v, *(_child(o, k) for o in others)) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        out = [tree_map(fn, v, *(_child(o, i) for o in others)) for i, v in enumerate(tree)]
        return out if isinstance(tree, list) else tuple(out)
    return fn(tree, *others) if torch.is_tensor(tree) else tree


def tree_leaves(tree: Any, path: tuple = ()) -> Iterator[tuple[tuple, torch.Tensor]]:
    """``(path, tensor)`` for every tensor leaf of ``tree``, depth first in ``tree_map``'s order.

    ``path`` holds the dict keys and list/tuple indices that lead to the leaf.
    """
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from tree_leaves(value, (*path, key))
    elif isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            yield from tree_leaves(value, (*path, i))
    elif torch.is_tensor(tree):
        yield path, tree


def first_tensor(cond: Condition) -> torch.Tensor:
    """The first tensor of a condition (its batch size and device are the condition's)."""
    for _, leaf in tree_leaves(cond):
        return leaf
    raise ValueError("the condition holds no tensor: cannot tell its batch size.")


def flatten_condition(cond: Condition, prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensors of a (nested) condition under dotted keys, e.g. ``added_cond_kwargs.pooled_projections``."""
    return {prefix + ".".join(map(str, path)): leaf for path, leaf in tree_leaves(cond)}


def unflatten_condition(flat: dict[str, torch.Tensor]) -> Condition:
    """Inverse of ``flatten_condition``."""
    out: Condition = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = out
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return out


def concat_conditions(a: Condition, b: Condition) -> Condition:
    """Stack two conditions of the same structure along the batch axis (nested dicts too)."""

    def cat(x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        if not torch.is_tensor(y):
            raise ValueError(
                "the two conditions differ in structure: the second lacks a tensor of the first."
            )
        return torch.cat([x, y])

    return tree_map(cat, a, b)


def to_device(cond: Condition, device) -> Condition:
    """Every tensor of ``cond`` on ``device``."""
    return tree_map(lambda x: x.to(device), cond)


def repeat_condition(cond: Condition, n: int, device) -> Condition:
    """A batch-of-one condition repeated ``n`` times (nested dicts too) on ``device``; other batches are moved only."""
    return tree_map(lambda x: x.to(device).expand(n, *x.shape[1:]) if len(x) == 1 else x.to(device), cond)


def cast_floats(cond: Condition, dtype: torch.dtype) -> Condition:
    """The floating-point tensors of ``cond`` cast to ``dtype`` (integer tensors such as masks kept)."""
    return tree_map(lambda x: x.to(dtype) if x.is_floating_point() else x, cond)
