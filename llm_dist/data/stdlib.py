"""The quickstart corpus: the Python standard library's own sources, on every machine with Python.

Three JSONL files: `stdlib.jsonl`, one document per top-level definition (or run of
module-level statements) of each module, for pretraining; `stdlib_docstrings.jsonl`, a chat per
documented function (OpenAI `messages`: a system turn, the signature, its docstring), a
generation task; `stdlib_packages.jsonl`, the documented functions of ten packages as `text`
(the signature and docstring) and `label` (the package), a classification task. Every record
has its module as `source`, so a task split by module is tested on modules no trial saw (the
base pretrained on `stdlib.jsonl` saw every function's source).
"""

import ast
import json
import sysconfig
from pathlib import Path

SYSTEM = "Write the docstring of this Python function."
SKIP = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "__pycache__"}
# Packages in every CPython from 3.10 on, each with a hundred-odd documented functions or more
PACKAGES = ("asyncio", "email", "http", "importlib", "logging", "multiprocessing", "unittest",
            "urllib", "wsgiref", "xml")  # fmt: skip
CLASSIFY = "Which standard-library package is this function from?"


def stdlib_files() -> list[Path]:
    """The standard library's .py files (tests and bundled tools left out), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if not SKIP & set(p.relative_to(root).parts))


def collect(out_dir: str | Path) -> dict[str, int]:
    """Write the three files under `out_dir`; returns how many records each got.

    A file whose content is already there is left alone (its modification time too), so the
    data prepared from it keeps its fingerprint and a rerun reuses it and what was trained on it.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = pairs = labelled = 0
    names = ("stdlib.jsonl", "stdlib_docstrings.jsonl", "stdlib_packages.jsonl")
    with (
        open(out / f".{names[0]}.tmp", "w") as corpus,
        open(out / f".{names[1]}.tmp", "w") as task,
        open(out / f".{names[2]}.tmp", "w") as classify,
    ):
        for path in stdlib_files():
            source = path.read_text(encoding="utf-8", errors="replace")
            name = str(path.relative_to(root))
            try:
                tree = ast.parse(source)
            except SyntaxError:  # a few files are templates, not Python
                continue
            for text in _chunks(source, tree):
                corpus.write(json.dumps({"text": text, "source": name}) + "\n")
                docs += 1
            for prompt, response in _signature_docstrings(tree):
                turns = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt},
                         {"role": "assistant", "content": response}]  # fmt: skip
                task.write(json.dumps({"messages": turns, "source": name}) + "\n")
                pairs += 1
                package = path.relative_to(root).parts[0]
                if package in PACKAGES:
                    record = {"system": CLASSIFY, "text": f"{prompt}\n{response}",
                              "label": package, "source": name}  # fmt: skip
                    classify.write(json.dumps(record) + "\n")
                    labelled += 1
    for name in names:
        made, target = out / f".{name}.tmp", out / name
        if target.exists() and target.read_bytes() == made.read_bytes():
            made.unlink()
        else:
            made.replace(target)
    return {"documents": docs, "docstring_pairs": pairs, "labelled_functions": labelled}


def _chunks(source: str, tree: ast.Module) -> list[str]:
    """Each top-level def/class is a document; module-level statements between them form one."""
    lines = source.splitlines(keepends=True)
    chunks, pending = [], []
    for node in tree.body:
        start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])]) - 1
        segment = "".join(lines[start : node.end_lineno])
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            if pending:
                chunks.append("".join(pending))
                pending = []
            chunks.append(segment)
        else:
            pending.append(segment if segment.endswith("\n") else segment + "\n")
    if pending:
        chunks.append("".join(pending))
    return chunks


def _signature_docstrings(tree: ast.Module) -> list[tuple[str, str]]:
    """(`def name(args):`, its docstring's first paragraph) for each documented function."""
    pairs = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        doc = ast.get_docstring(node)
        if not doc or node.name.startswith("_"):
            continue
        summary = doc.strip().split("\n\n")[0].strip()
        if 10 <= len(summary) <= 400:
            prefix = "async def" if isinstance(node, ast.AsyncFunctionDef) else "def"
            pairs.append((f"{prefix} {node.name}({ast.unparse(node.args)}):", summary))
    return pairs
