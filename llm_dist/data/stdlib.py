"""The quickstart corpus: the Python standard library's own sources, on every machine with Python.

Two JSONL files: `stdlib.jsonl`, one document per top-level definition (or run of module-level
statements) of each module, for pretraining; `stdlib_docstrings.jsonl`, a chat per documented
function (OpenAI `messages`: a system turn, the signature, its docstring), a task for fine-tuning.
"""

import ast
import json
import sysconfig
from pathlib import Path

SYSTEM = "Write the docstring of this Python function."
SKIP = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "__pycache__"}


def stdlib_files() -> list[Path]:
    """The standard library's .py files (tests and bundled tools left out), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if not SKIP & set(p.relative_to(root).parts))


def collect(out_dir: str | Path) -> dict[str, int]:
    """Write both files under `out_dir`; returns how many records each got."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = pairs = 0
    with (
        open(out / "stdlib.jsonl", "w") as corpus,
        open(out / "stdlib_docstrings.jsonl", "w") as task,
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
    return {"documents": docs, "docstring_pairs": pairs}


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
