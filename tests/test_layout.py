"""The package's layout: one owner of the run folder's file names, and an import graph with no
circle and no arrow from the bottom (config sections, records, storage) up into the stages."""

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "llm_dist"
OWNER = "llm_dist.run_folder"
# what a run folder and the prepared data beside it hold (run_folder.py's map)
RUN_FOLDER_FILE = re.compile(
    r"(manifest|winner|result|prepared|checkpoint|completed|origin)\.json|metrics\.jsonl|"
    r"quarantine\.jsonl|results\.csv|report\.html|llm-dist\.log|"
    r"(^|/)(pretrain|tune|trials|sweep|checkpoints|export|ledger|tensorboard|logs)/|"
    r"/(pretrain|tune|trials|sweep|checkpoints|export|ledger|tensorboard|logs)\b"
)
# the bottom of the graph: what any stage may import, and what imports no stage
BOTTOM = {"llm_dist", "llm_dist.base", "llm_dist.records", "llm_dist.storage", "llm_dist.compat", "llm_dist.redact", "llm_dist.lock",
          "llm_dist.run_folder", "llm_dist.reuse", "llm_dist.data.config",
          "llm_dist.train.config", "llm_dist.tune.config", "llm_dist.serve.config",
          "llm_dist.tracking.config", "llm_dist.finetune.scores", "llm_dist.tracking",
          "llm_dist.model", "llm_dist.cluster", "llm_dist.console", "llm_dist.data.tokenizer",
          "llm_dist.data", "llm_dist.train", "llm_dist.tune", "llm_dist.serve", "llm_dist.finetune"}  # fmt: skip


def modules() -> dict[str, ast.Module]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = ast.parse(path.read_text())
    return found


def imports(tree: ast.Module, known) -> set[str]:
    """Every llm_dist module `tree` imports, at the top or inside a function."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("llm_dist"):
            out |= {m for m in (node.module, *(f"{node.module}.{a.name}" for a in node.names))
                    if m in known}  # fmt: skip
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in known}
    return out


def code_strings(tree: ast.Module) -> list[str]:
    """The string constants of a module's code: docstrings left out, f-strings' text parts in."""
    docstrings = {
        id(n.body[0].value)
        for n in ast.walk(tree)
        if isinstance(n, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)
    }  # fmt: skip
    return [n.value for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings]  # fmt: skip


def test_only_the_run_folder_owner_names_its_files():
    """No path of a run folder is spelled outside its owner: in code, or in a message's words."""
    spelled = {
        name: hits
        for name, tree in modules().items()
        if name != OWNER
        and (
            hits := [w for s in code_strings(tree) for w in s.split() if RUN_FOLDER_FILE.search(w)]
        )
    }
    assert spelled == {}


def test_the_import_graph_has_no_circle():
    trees = modules()
    graph = {name: imports(tree, trees) - {name} for name, tree in trees.items()}
    circles = []

    def walk(node, path):
        for nxt in graph[node]:
            if nxt == path[0]:
                circles.append(" -> ".join([*path, nxt]))
            elif nxt not in path and nxt > path[0]:  # each circle once, from its least module
                walk(nxt, [*path, nxt])

    for name in graph:
        walk(name, [name])
    assert circles == []


def test_the_bottom_of_the_graph_imports_nothing_above_it():
    trees = modules()
    upward = {name: sorted(imports(trees[name], trees) - BOTTOM) for name in BOTTOM & trees.keys()}
    assert {name: up for name, up in upward.items() if up} == {}
