"""How params files are read and written: with DVC's own YAML parser, used the way DVC uses it.

DVC 3 reads params.yaml with ruamel.yaml's safe loader, `YAML(typ="safe").load(text)`
(dvc/utils/serialize/_yaml.py), which speaks YAML 1.2: `010` is 10 (not 8), `1:30` the string
'1:30' (not 90), `on`/`yes`/`off`/`no` are strings, `2e-4` is a float, and a key given twice in
one mapping is an error. ganpipe calls the same parser the same way, for the file and for every
`--set` value, so a value means the same to `ganpipe` as to `dvc repro`, `dvc exp run -S` and
`dvc params diff` (tests/pipeline/test_params_yaml.py compares the two on the cases that differed).

On top of what DVC does, two inputs that no params file needs are refused with a short message:
YAML aliases that expand the document by more than ALIAS_BUDGET (an "alias bomb": a few hundred
bytes that stand for a billion values once written out or echoed), or that refer to themselves;
and nesting deeper than MAX_DEPTH (the parser would otherwise hit Python's recursion limit).
"""

from __future__ import annotations

from typing import Any

import yaml
from ruamel.yaml import YAML
from ruamel.yaml.error import MarkedYAMLError
from ruamel.yaml.error import YAMLError as RuamelYAMLError
from ruamel.yaml.nodes import ScalarNode
from ruamel.yaml.resolver import VersionedResolver

from pipeline.errors import shorten

# What aliases may add to a document, in values plus characters of strings: `lr_d: *lr` adds a
# few, an alias bomb billions.
ALIAS_BUDGET = 100_000
# The deepest nesting read (the schema's deepest key, a list of sweep values, is 5 deep).
MAX_DEPTH = 100
_STR = "tag:yaml.org,2002:str"


class YAMLInputError(ValueError):
    """Text that cannot be read as a params document; the message says where and why."""


def parse_yaml(text: str) -> Any:
    """`text` read exactly as DVC reads params.yaml (YAML 1.2, a duplicated key an error);
    YAMLInputError if it is not valid YAML, nests too deeply or is an alias bomb."""
    reader = YAML(typ="safe")  # DVC's reader; a fresh one per document, as DVC does
    reader.max_depth = MAX_DEPTH  # refuses what would otherwise be a RecursionError
    try:
        data = reader.load(text)
    except MarkedYAMLError as exc:
        raise YAMLInputError(_describe(exc)) from None
    except RuamelYAMLError as exc:
        raise YAMLInputError(f"not valid YAML: {shorten(str(exc))}") from None
    except RecursionError:
        raise YAMLInputError(f"not valid YAML: nested more than {MAX_DEPTH} levels") from None
    except ValueError as exc:  # a value its tag or form cannot hold: 2001-13-45, !!int x
        raise YAMLInputError(f"not valid YAML: {shorten(str(exc))}") from None
    added = alias_expansion(data)
    if added > ALIAS_BUDGET:
        raise YAMLInputError(
            f"YAML aliases (*name) expand this document by over {ALIAS_BUDGET:,} values and "
            f"characters ({added:,}): an alias bomb? Write the values out, or use fewer aliases"
        )
    return data


def _describe(exc: MarkedYAMLError) -> str:
    """One short line: where (the line and column of the problem) and what."""
    mark = exc.problem_mark or exc.context_mark
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
    problem = ", ".join(part for part in (exc.context, exc.problem) if part) or type(exc).__name__
    if "maximum depth" in problem:
        problem = f"nested more than {MAX_DEPTH} levels"
    elif "duplicate key" in problem:
        problem += "; DVC refuses a duplicated key too: keep one"
    return f"not valid YAML{where}: {shorten(problem)}"


def _shareable(node: Any) -> bool:
    """An object that only an alias makes appear twice (CPython shares small ints and
    one-character strings by itself)."""
    return isinstance(node, (dict, list)) or (isinstance(node, str) and len(node) >= 32)


def alias_expansion(data: Any) -> int:
    """How much larger `data` is written out in full than as parsed, where each YAML alias is
    one shared object: its size (values, plus the characters of strings) with every collection
    and long string counted as often as it is referred to, less that size counted once. A
    collection that contains itself raises YAMLInputError."""
    full: dict[int, int] = {}  # id of a shareable object -> its size written out
    once = 0  # the size with every shareable object counted once
    open_ids: set[int] = set()

    def size(node: Any) -> int:
        nonlocal once
        if not _shareable(node):
            return len(node) if isinstance(node, str) else 1
        key = id(node)
        if key in full:
            return full[key]
        if isinstance(node, str):
            full[key] = len(node)
            once += len(node)
            return full[key]
        if key in open_ids:
            raise YAMLInputError(
                "a YAML alias refers to itself (to a collection that contains it); "
                "params cannot be recursive"
            )
        open_ids.add(key)
        items = [*node.keys(), *node.values()] if isinstance(node, dict) else node
        full[key] = 1 + sum(size(item) for item in items)
        once += 1 + sum(size(item) for item in items if not _shareable(item))
        open_ids.discard(key)
        return full[key]

    return size(data) - once if _shareable(data) else 0


_RESOLVER = VersionedResolver(version=(1, 2))


class _Dumper(yaml.SafeDumper):
    """PyYAML's safe dumper, which quotes strings that YAML 1.1 reads as something else
    ('on', '010'), also quoting those that YAML 1.2 (DVC, ganpipe) reads as something else
    ('1e-4', '0o17'): what it writes means the same to both."""

    def represent_str(self, data: str) -> yaml.ScalarNode:
        node = super().represent_str(data)
        if node.style is None and _RESOLVER.resolve(ScalarNode, data, (True, False)) != _STR:
            node.style = "'"
        return node


_Dumper.add_representer(str, _Dumper.represent_str)


def dump_yaml(data: Any) -> str:
    """`data` as block-style YAML (keys in their order) that parse_yaml reads back as `data`."""
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False)
