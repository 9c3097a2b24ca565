"""The built-in corpus `builtin:python-docs`: text that ships with every Python.

The pydoc topics (the language reference pages `help()` shows) and the docstrings of the
standard library, so the whole pipeline runs on a laptop with nothing to download.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import pkgutil
import subprocess
import sys
import warnings
from collections.abc import Iterator
from types import ModuleType

BUILTIN_PYTHON_DOCS = "builtin:python-docs"

# Docstrings this short ("Return self==value.") are boilerplate, not prose.
MIN_DOC_CHARS = 40

# Importing these has side effects (opens a browser, prints, starts Tk, rewrites terminal
# input, writes grammar caches, swaps in setuptools' distutils) or only holds tests.
_SKIP_TOP_LEVEL = frozenset(
    {
        "antigravity",
        "this",
        "idlelib",
        "tkinter",
        "_tkinter",
        "turtle",
        "turtledemo",
        "test",
        "readline",
        "rlcompleter",
        "lib2to3",
        "distutils",
        "pydoc_data",  # read directly below
    }
)
# Submodules named like this run code on import (`ensurepip.__main__` installs pip) or are tests.
_SKIP_SUBMODULES = frozenset({"__main__", "test", "tests", "idle_test"})
# Packages whose submodules are generated boilerplate (one codec table each).
_NO_SUBMODULES = frozenset({"encodings"})


def python_docs_texts() -> Iterator[str]:
    """Yield the documents of `builtin:python-docs` in a fixed order.

    First each pydoc topic (sorted by name), then one document per standard library
    module (sorted, packages depth-first): the module docstring followed by the docstrings
    of the classes, methods and functions it defines, each under its dotted name. A
    docstring already yielded, or of `MIN_DOC_CHARS` or fewer characters, is left out.

    The modules are imported in a fresh `python -I -S` child, because libraries such as
    torch and ray patch stdlib functions on import (which would change the text with what
    the caller imported first), and so the caller's process does not end up holding the
    whole standard library. The text depends only on the Python version and platform.
    """
    if not sys.executable:  # embedded interpreter: no child to start
        yield from collect_documents()
        return
    child = subprocess.run(
        [sys.executable, "-I", "-S", "-c", _CHILD, __file__],
        capture_output=True,
        encoding="utf-8",
        errors="replace",
    )
    if child.returncode != 0:
        last_line = (child.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"collecting {BUILTIN_PYTHON_DOCS} failed: {last_line}")
    yield from json.loads(child.stdout)


# Loads this file by path, so the child needs neither mtnlg_ray nor site-packages.
_CHILD = "import runpy, sys; runpy.run_path(sys.argv[1])['_write_documents']()"


def _write_documents() -> None:
    # A module that prints on import must not corrupt the JSON on stdout.
    with contextlib.redirect_stdout(sys.stderr):
        documents = list(collect_documents())
    json.dump(documents, sys.stdout)


def collect_documents() -> Iterator[str]:
    """Collect the documents in this process (see `python_docs_texts`)."""
    from pydoc_data.topics import topics

    seen: set[str] = set()
    for name in sorted(topics):
        text = topics[name].strip()
        if len(text) > MIN_DOC_CHARS and text not in seen:
            seen.add(text)
            yield text
    for module in _stdlib_modules():
        document = _module_document(module, seen)
        if document:
            yield document


def _stdlib_modules() -> Iterator[ModuleType]:
    for name in sorted(sys.stdlib_module_names):
        if name in _SKIP_TOP_LEVEL or name.startswith(("_test", "_xx")):
            continue
        yield from _walk(name)


def _walk(name: str) -> Iterator[ModuleType]:
    module = _import(name)
    if module is None:
        return
    yield module
    path = getattr(module, "__path__", None)
    if path is None or name in _NO_SUBMODULES:
        return
    children = sorted(info.name for info in pkgutil.iter_modules(path))
    for child in children:
        if child in _SKIP_SUBMODULES or child.startswith("test_"):
            continue
        yield from _walk(f"{name}.{child}")


def _import(name: str) -> ModuleType | None:
    # Modules for other platforms fail to import and deprecated ones warn; both are expected.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return importlib.import_module(name)
        except Exception:
            return None


def _module_document(module: ModuleType, seen: set[str]) -> str:
    sections: list[str] = []
    _add(sections, seen, module.__name__, module)
    for attr, obj in _members(module):
        if not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        if _safe_getattr(obj, "__module__") != module.__name__:
            continue  # re-exported; documented where it is defined
        qualname = f"{module.__name__}.{attr}"
        _add(sections, seen, qualname, obj)
        if inspect.isclass(obj):
            _add_class_members(sections, seen, qualname, obj)
    return "\n\n".join(sections)


def _add_class_members(sections: list[str], seen: set[str], qualname: str, cls: type) -> None:
    for attr, obj in _members(cls):
        if isinstance(obj, (staticmethod, classmethod)):
            obj = obj.__func__
        if isinstance(obj, property) or inspect.isroutine(obj) or inspect.isdatadescriptor(obj):
            _add(sections, seen, f"{qualname}.{attr}", obj)


def _members(obj: object) -> list[tuple[str, object]]:
    try:
        namespace = dict(vars(obj))
    except TypeError:
        return []
    return sorted(namespace.items(), key=lambda item: str(item[0]))


def _add(sections: list[str], seen: set[str], name: str, obj: object) -> None:
    doc = _safe_getattr(obj, "__doc__")
    if not isinstance(doc, str):
        return
    doc = inspect.cleandoc(doc).strip()
    if len(doc) <= MIN_DOC_CHARS or doc in seen:
        return
    seen.add(doc)
    sections.append(f"{name}\n{doc}")


def _safe_getattr(obj: object, attr: str) -> object:
    # Some stdlib objects compute attributes lazily and can raise anything.
    try:
        return getattr(obj, attr, None)
    except Exception:
        return None
