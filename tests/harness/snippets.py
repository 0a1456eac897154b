"""Load files from snippets/ as fresh modules, and make broken copies to prove tests can fail.

Each load runs the file's top level again, so module-scope state such as a pool starts
empty, as it does in a new function instance (a cold start).
"""

from __future__ import annotations

import ast
import importlib.util
import sys
import uuid
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]
SNIPPETS = ROOT / "snippets"
TESTS = ROOT / "tests"


class MutationNotApplied(AssertionError):
    """A broken copy could not be made because the text to replace is not in the snippet once."""


def snippet_path(relative: str) -> Path:
    path = SNIPPETS / relative
    if not path.is_file():
        raise FileNotFoundError(f"snippets/{relative} does not exist")
    return path


def replace_once(source: str, old: str, new: str, *, name: str) -> str:
    """Return *source* with *old* replaced by *new*, failing unless *old* occurs exactly once."""
    count = source.count(old)
    if count != 1:
        raise MutationNotApplied(
            f"expected the text {old!r} once in snippets/{name}, found it {count} times; "
            "update the broken copy to match the snippet"
        )
    return source.replace(old, new)


def load_module(relative: str, source: str | None = None) -> ModuleType:
    """Execute a snippet file (or a changed copy of its *source*) as a new module."""
    path = snippet_path(relative)
    name = f"snippet_{path.stem}_{uuid.uuid4().hex[:8]}"
    spec = importlib.util.spec_from_loader(name, loader=None, origin=str(path))
    module = importlib.util.module_from_spec(spec)
    module.__file__ = str(path)
    # Registered while it runs, because dataclasses and pickling look modules up by name.
    sys.modules[name] = module
    code = compile(source if source is not None else path.read_text(), str(path), "exec")
    exec(code, module.__dict__)
    return module


def unload_module(module: ModuleType) -> None:
    sys.modules.pop(module.__name__, None)


def marked_snippets(test_file: Path) -> set[str]:
    """Return the paths named by @pytest.mark.snippet(...) in a test module's source.

    A path may be written as a string or as a module-level constant holding one.
    """
    tree = ast.parse(test_file.read_text(), filename=str(test_file))
    constants = {
        target.id: node.value.value
        for node in tree.body
        if isinstance(node, ast.Assign)
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
        for target in node.targets
        if isinstance(target, ast.Name)
    }

    found = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not node.args:
            continue
        function = node.func
        if not (isinstance(function, ast.Attribute) and function.attr == "snippet"):
            continue
        argument = node.args[0]
        if isinstance(argument, ast.Constant) and isinstance(argument.value, str):
            found.add(argument.value)
        elif isinstance(argument, ast.Name) and argument.id in constants:
            found.add(constants[argument.id])
    return found


class SnippetLoader:
    """Loads snippet files for one test, limited to the files the test is marked with."""

    def __init__(self, allowed: set[str]) -> None:
        self.allowed = allowed
        self.loaded: set[str] = set()
        self._modules: list[ModuleType] = []

    def _claim(self, relative: str) -> Path:
        if relative not in self.allowed:
            raise AssertionError(
                f"snippets/{relative} is loaded but the test lacks "
                f'@pytest.mark.snippet("{relative}")'
            )
        self.loaded.add(relative)
        return snippet_path(relative)

    def path(self, relative: str) -> Path:
        """Return the path of a file that the test runs some other way (SQL, Node.js)."""
        return self._claim(relative)

    def source(self, relative: str, replacements: tuple[tuple[str, str], ...] = ()) -> str:
        """Return the file's text, with each (old, new) pair replaced to make a broken copy."""
        text = self._claim(relative).read_text()
        for old, new in replacements:
            text = replace_once(text, old, new, name=relative)
        return text

    def load(self, relative: str, replacements: tuple[tuple[str, str], ...] = ()) -> ModuleType:
        """Run the file as a new module, as a cold start would, and return it."""
        module = load_module(relative, self.source(relative, replacements))
        self._modules.append(module)
        return module

    def close(self) -> None:
        for module in self._modules:
            close_pools(module)
            unload_module(module)
        self._modules.clear()


def close_pools(namespace: ModuleType | dict[str, object]) -> None:
    """Close every connection pool or engine that a module (or its globals) keeps."""
    values = namespace if isinstance(namespace, dict) else vars(namespace)
    for value in list(values.values()):
        closer = None
        type_name = f"{type(value).__module__}.{type(value).__qualname__}"
        if type_name.startswith("psycopg_pool.") and hasattr(value, "close"):
            closer = value.close
        elif type_name.startswith("psycopg2.pool.") and not value.closed:
            closer = value.closeall
        elif type_name == "sqlalchemy.engine.base.Engine":
            closer = value.dispose
        if closer is not None:
            closer()
