"""The package's shape: no import cycles, peft behind one module, families named only in ``backbones/``,
objectives free of export code and built by one constructor, recipes as short mains on the one driver, one
tree-map over nested conditions."""

import ast
import io
import re
import tokenize
from pathlib import Path

import pytest
import torch

from stepdistill.conditions import (
    concat_conditions,
    first_tensor,
    flatten_condition,
    repeat_condition,
    tree_leaves,
    tree_map,
    unflatten_condition,
)
from stepdistill.objectives import OBJECTIVES

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "stepdistill"


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: Path) -> dict[str, set[str]]:
    """``{module: modules of the package it imports}`` for every ``.py`` under ``package``.

    Imports anywhere in a file count, inside functions too (a lazy import is still a dependency);
    ``from .x import name`` counts as an import of ``x.name`` when that is a module, else of ``x``.
    Modules whose source is not under ``package`` (``stepdistill.pipelines`` lives in ``pipelines/``)
    and ``importlib`` look-ups by string are not edges.
    """
    modules = {_module_name(p, package): p for p in package.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name in modules)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = here.split(".")
                    source = ".".join(parts[: len(parts) - node.level + 1] + [node.module or ""]).rstrip(".")
                else:
                    source = node.module or ""
                for alias in node.names:
                    submodule = f"{source}.{alias.name}"
                    deps.update(
                        [submodule] if submodule in modules else [source] if source in modules else []
                    )
        graph[name] = deps - {name}
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (or a module importing itself)."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_the_graph_sees_a_cycle_through_a_lazy_import(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import thing\n")
    (pkg / "b.py").write_text("def thing():\n    from .sub.c import other\n")
    (pkg / "sub" / "c.py").write_text("from ..a import x\nimport os\n")
    (pkg / "d.py").write_text("from . import a\n")
    graph = import_graph(pkg)
    assert graph["pkg.b"] == {"pkg.sub.c"}
    assert graph["pkg.d"] == {"pkg.a"}
    assert import_cycles(graph) == [["pkg.a", "pkg.b", "pkg.sub.c"]]


def test_stepdistill_has_no_import_cycles():
    graph = import_graph(PACKAGE)
    assert "stepdistill.lora" in graph["stepdistill.roles"]  # the graph reads real edges
    assert import_cycles(graph) == []


def _imports_peft(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and not node.level:
            names = [node.module or ""]
        if any(n == "peft" or n.startswith("peft.") for n in names):
            return True
    return False


def test_only_lora_py_imports_peft():
    files = sorted(PACKAGE.rglob("*.py"))
    importers = [p.relative_to(ROOT).as_posix() for p in files if _imports_peft(p)]
    assert importers == ["stepdistill/lora.py"]


# -- families are named in backbones/ only ------------------------------------------------------------
# guidance_adapters.py is shipped verbatim into exported AGD folders (torch and diffusers imports only,
# dispatch on the saved class name), so it keeps its own family knowledge; teachers.py builds (and loads
# by default) the digits teacher, a UNet2DModel.
NAMING_ALLOWED = {"stepdistill/guidance_adapters.py": None, "stepdistill/teachers.py": {"UNet2DModel"}}


def family_mentions(path: Path, classes: set[str], names: set[str]) -> list[tuple[int, str]]:
    """``(line, name)`` of every model or pipeline class in ``classes`` that a name, string or docstring
    of ``path`` mentions, and of every string literal that is exactly a family name in ``names``."""
    word = re.compile(r"\b(" + "|".join(sorted(classes)) + r")\b")
    found = []
    for tok in tokenize.generate_tokens(io.StringIO(path.read_text(encoding="utf-8")).readline):
        if tok.type not in (tokenize.NAME, tokenize.STRING):
            continue
        found += [(tok.start[0], m) for m in word.findall(tok.string)]
        if tok.type == tokenize.STRING and tok.string.strip("'\"") in names:
            found.append((tok.start[0], tok.string))
    return found


def test_no_module_outside_backbones_names_a_family():
    from stepdistill.backbones.base import REGISTRY

    families = [b for b in REGISTRY if b.name != "module"]
    classes = {c.__name__ for b in families for c in b.model_classes()} | {
        b.pipeline for b in families if b.pipeline
    }
    names = {b.name for b in families}
    assert {"UNet2DConditionModel", "FluxTransformer2DModel", "StableDiffusionXLPipeline"} <= classes
    assert family_mentions(ROOT / "tests" / "t2i_models.py", classes, names)  # the check sees mentions
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith("stepdistill/backbones/"):
            continue
        allowed = NAMING_ALLOWED.get(rel, set())
        if allowed is None:
            continue
        offenders += [f"{rel}:{line} {name}" for line, name in family_mentions(path, classes, names)
                      if name not in allowed]  # fmt: skip
    assert offenders == []


def test_backbones_import_only_the_leaves_they_build_on():
    graph = import_graph(PACKAGE)
    deps = set().union(*(d for m, d in graph.items() if m.startswith("stepdistill.backbones")))
    outside = {d for d in deps if not d.startswith("stepdistill.backbones")}
    assert outside == {"stepdistill.conditions", "stepdistill.lora"}


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module ``start`` imports, directly or through others."""
    seen, todo = set(), [start]
    while todo:
        for dep in graph.get(todo.pop(), ()):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


NOT_TRAINING = ("export", "agd_export", "evaluation", "benchmark", "sample_grids", "recipes", "t2i_recipes",
                "recipe_driver", "cli", "pipelines")  # fmt: skip


def test_objectives_reach_no_export_evaluation_or_recipe_code():
    graph = import_graph(PACKAGE)
    forbidden = {f"stepdistill.{name}" for name in NOT_TRAINING}
    objectives = [name for name in graph if name.startswith("stepdistill.objectives")]
    assert "stepdistill.objectives.dmd" in objectives
    for name in objectives:
        assert not reachable(graph, name) & forbidden, name


def tiny_digits_teacher():
    from conftest import tiny_unet2d

    from stepdistill.recipes import DigitsTeacher, StudentArgs
    from stepdistill.schedules import schedule_from_scheduler
    from stepdistill.teachers import digits_scheduler

    scheduler = digits_scheduler()
    model = tiny_unet2d().requires_grad_(False)
    return DigitsTeacher(StudentArgs(lora_rank=4), model, scheduler, schedule_from_scheduler(scheduler))


def test_both_teachers_are_what_objectives_ask_for():
    from types import SimpleNamespace

    from stepdistill.objectives import Teacher
    from stepdistill.t2i_recipes import TextToImageRun

    assert isinstance(tiny_digits_teacher(), Teacher)
    loaded = SimpleNamespace(backbone=torch.nn.Linear(1, 1), schedule=None, latent_shape=(4, 8, 8))
    assert isinstance(TextToImageRun(loaded, None, None), Teacher)


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_every_registered_objective_builds_from_the_digits_teacher_by_one_constructor(name):
    from torch.utils.data import default_collate

    from stepdistill.data import DigitsDataset
    from stepdistill.objectives import build_objective, get_objective

    config_cls, objective_cls = get_objective(name)
    objective = build_objective(name, tiny_digits_teacher(), config_cls())
    assert isinstance(objective, objective_cls)
    batch = default_collate([DigitsDataset("train")[i] for i in range(2)])
    torch.manual_seed(0)
    for phase in objective.phases():
        loss, _ = objective.loss(phase.name, batch, 0)
        assert torch.isfinite(loss), phase.name


def test_the_registry_lists_every_objective_file():
    helpers = {"__init__", "fake_score", "disback"}  # shared pieces of objectives, not objectives
    files = {p.stem for p in (PACKAGE / "objectives").glob("*.py")} - helpers
    assert files == {module for module, _, _ in OBJECTIVES.values()}


@pytest.mark.parametrize("script", ["train_dmd2", "train_sid", "train_consistency", "train_agd"])
def test_each_recipe_is_one_short_main_on_the_driver(script):
    tree = ast.parse((ROOT / "training_scripts" / f"{script}.py").read_text(encoding="utf-8"))
    main = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main")
    assert main.end_lineno - main.lineno <= 60
    calls = [
        n for n in ast.walk(main) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "run_recipe"
    ]
    assert len(calls) == 1 and calls[0].args[0].value in OBJECTIVES  # built from the registry


# -- conditions.tree_map ------------------------------------------------------------------------


def nested():
    return {
        "a": torch.tensor([1.0, 2.0]),
        "b": {"c": torch.tensor([[3.0], [4.0]]), "d": None},
        "e": [torch.tensor([5.0, 6.0]), 7],
        "f": (torch.tensor([8, 9]),),
    }


def test_tree_map_applies_fn_to_every_tensor_and_keeps_the_structure():
    out = tree_map(lambda x: 2 * x + 1, nested())
    assert list(out) == ["a", "b", "e", "f"]
    assert torch.equal(out["a"], torch.tensor([3.0, 5.0]))
    assert torch.equal(out["b"]["c"], torch.tensor([[7.0], [9.0]]))
    assert out["b"]["d"] is None
    assert isinstance(out["e"], list) and torch.equal(out["e"][0], torch.tensor([11.0, 13.0]))
    assert out["e"][1] == 7  # a non-tensor leaf is kept, fn never sees it
    assert isinstance(out["f"], tuple) and torch.equal(out["f"][0], torch.tensor([17, 19]))


def test_tree_map_over_several_trees_pairs_leaves_by_place():
    a, b = nested(), tree_map(lambda x: 10 * x, nested())
    total = tree_map(lambda x, y: x + y, a, b)  # x + 10 x = 11 x
    for (path, got), (_, x) in zip(tree_leaves(total), tree_leaves(a)):
        assert torch.equal(got, 11 * x), path
    seen = []
    tree_map(
        lambda x, y: seen.append(y), {"k": torch.zeros(1), "m": {"n": torch.zeros(1)}}, {"k": torch.ones(1)}
    )
    assert torch.equal(seen[0], torch.ones(1)) and seen[1] is None  # a missing branch reads as None


def test_condition_helpers_are_tree_maps():
    cond = {
        "encoder_hidden_states": torch.randn(2, 3, 4),
        "added_cond_kwargs": {"text_embeds": torch.randn(2, 5)},
    }
    both = concat_conditions(cond, tree_map(torch.zeros_like, cond))
    assert both["encoder_hidden_states"].shape == (4, 3, 4) and both["added_cond_kwargs"][
        "text_embeds"
    ].shape == (4, 5)
    assert torch.equal(both["added_cond_kwargs"]["text_embeds"][:2], cond["added_cond_kwargs"]["text_embeds"])
    with pytest.raises(ValueError, match="differ in structure"):
        concat_conditions(cond, {"encoder_hidden_states": torch.zeros(2, 3, 4)})
    flat = flatten_condition(cond)
    assert list(flat) == ["encoder_hidden_states", "added_cond_kwargs.text_embeds"]
    assert tree_map(torch.equal, unflatten_condition(flat), cond) == {
        "encoder_hidden_states": True, "added_cond_kwargs": {"text_embeds": True}
    }  # fmt: skip
    assert first_tensor(cond) is cond["encoder_hidden_states"]
    one = tree_map(lambda x: x[:1], cond)
    repeated = repeat_condition(one, 3, "cpu")
    assert torch.equal(
        repeated["added_cond_kwargs"]["text_embeds"], one["added_cond_kwargs"]["text_embeds"].expand(3, 5)
    )
    with pytest.raises(ValueError, match="holds no tensor"):
        first_tensor({"added_cond_kwargs": {}})
