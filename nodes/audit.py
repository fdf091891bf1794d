"""Audit a Python codebase: the example job bundled with ``zlink demo``.

The job runs three independent skills on every file and one skill that
checks and merges their results:

* ``inspect(path, source)`` -- size and complexity metrics (lines, functions,
  classes, cyclomatic complexity per function, nesting depth).
* ``scan(path, source)`` -- risky calls such as ``eval``, ``pickle.loads``,
  ``subprocess.run(..., shell=True)`` or ``yaml.load`` without a safe loader.
* ``docs(path, source)`` -- public functions, classes and methods that lack
  a docstring.
* ``verify(results)`` -- checks that every file got exactly one result of
  each kind and merges everything into one report.

The per-file skills receive the source text rather than a path to open, so
they can run on any node; they never touch the file system and never print.
Everything they take and return is plain msgpack-compatible data (dicts with
string keys, lists, str, int, float, bool, None).

Run it with zlink::

    zlink node --skills nodes/audit.py     # start a worker offering these skills
    zlink demo                             # audit a codebase using the workers

or without zlink, in one process::

    from nodes import audit
    report = audit.run_sequential(audit.find_files("src"))
    print(audit.format_report(report))
"""

from __future__ import annotations

import ast
import json
import os
import re
import tokenize
import warnings
from collections import Counter
from collections.abc import Callable
from typing import Any, TypeAlias

import zlink

Result = dict[str, Any]

SKILLS = ("inspect", "scan", "docs")

TOP_N = 5  # functions listed per file by inspect()
HOTSPOT = 10  # inspect() also lists every function with complexity above this
REPORT_N = 10  # entries in each "top" list of the merged report
SNIPPET_CHARS = 120
SEVERITIES = ("high", "medium", "low")

# ast.parse raises SyntaxError for bad code, ValueError for null bytes on
# some Python versions (and UnicodeEncodeError, a ValueError, for lone
# surrogates), and RecursionError or MemoryError for absurdly deep nesting
# (CPython 3.11 reports a parser stack overflow as MemoryError).
_PARSE_ERRORS = (SyntaxError, ValueError, RecursionError, MemoryError)


# --------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------


def _parse(source: str, path: str) -> ast.Module:
    """Parse ``source`` without emitting SyntaxWarning/DeprecationWarning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ast.parse(source, filename=path)


def _error(path: str, kind: str, exc: BaseException) -> Result:
    """The result a skill returns for a file it cannot parse."""
    if isinstance(exc, SyntaxError):
        message = f"{type(exc).__name__}: {exc.msg}"
        if exc.lineno is not None:
            message += f" line {exc.lineno}"
    else:
        message = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return {"path": path, "kind": kind, "error": message}


def _split_lines(source: str) -> list[str]:
    """Split on the same line endings the Python tokenizer uses.

    ``str.splitlines`` also splits on form feeds and other separators, which
    would shift line numbers relative to those reported by ``ast``.
    """
    return re.split(r"\r\n|\r|\n", source)


_FUNCTION_NODES = (ast.FunctionDef, ast.AsyncFunctionDef)
_SCOPE_NODES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
_Scope: TypeAlias = ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef


# --------------------------------------------------------------------------
# inspect: size and complexity
# --------------------------------------------------------------------------

# Statements that open a nested block for the nesting-depth metric.
_BLOCK_NODES = (
    ast.If,
    ast.For,
    ast.AsyncFor,
    ast.While,
    ast.With,
    ast.AsyncWith,
    ast.Try,
    ast.TryStar,
    ast.Match,
)


def _decisions(node: ast.AST) -> int:
    """Decision points a single node adds to the cyclomatic complexity."""
    if isinstance(node, (ast.If, ast.IfExp, ast.With, ast.AsyncWith, ast.ExceptHandler, ast.match_case, ast.Assert)):
        return 1
    if isinstance(node, (ast.For, ast.AsyncFor, ast.While)):
        return 2 if node.orelse else 1  # a loop's else is a second branch
    if isinstance(node, ast.BoolOp):
        return len(node.values) - 1  # a and b and c: two short-circuits
    if isinstance(node, ast.comprehension):
        return 1 + len(node.ifs)
    return 0


def _functions(tree: ast.Module) -> tuple[list[dict[str, Any]], int]:
    """Every function with its qualified name and complexity, plus the class count.

    Complexity is McCabe-style: 1 + decision points in the function body.
    Nested functions are measured on their own and do not add to the
    enclosing function; lambdas and comprehensions do.
    """
    functions: list[dict[str, Any]] = []
    classes = 0
    # (node, qualified-name prefix, index in `functions` of the enclosing
    # function or -1 at module or class level)
    stack: list[tuple[ast.AST, str, int]] = [(tree, "", -1)]
    while stack:
        node, prefix, owner = stack.pop()
        for child in ast.iter_child_nodes(node):
            if isinstance(child, _FUNCTION_NODES):
                name = prefix + child.name
                functions.append({"name": name, "line": child.lineno, "complexity": 1})
                stack.append((child, name + ".", len(functions) - 1))
            elif isinstance(child, ast.ClassDef):
                classes += 1
                stack.append((child, prefix + child.name + ".", -1))
            else:
                if owner >= 0:
                    functions[owner]["complexity"] += _decisions(child)
                stack.append((child, prefix, owner))
    functions.sort(key=lambda f: (f["line"], f["name"]))
    return functions, classes


def _max_nesting(tree: ast.Module) -> int:
    """Deepest nesting of control-flow blocks (if/for/while/with/try/match).

    ``elif`` counts as the same level as its ``if``; function and class
    definitions do not add a level.
    """
    deepest = 0
    stack: list[tuple[list[ast.stmt], int]] = [(tree.body, 0)]
    while stack:
        body, depth = stack.pop()
        for stmt in body:
            inner = depth + 1 if isinstance(stmt, _BLOCK_NODES) else depth
            deepest = max(deepest, inner)
            if isinstance(stmt, ast.If) and len(stmt.orelse) == 1 and isinstance(stmt.orelse[0], ast.If):
                stack.append((stmt.body, inner))
                stack.append((stmt.orelse, depth))  # elif chain
                continue
            for field in ("body", "orelse", "finalbody"):
                stack.append((getattr(stmt, field, []), inner))
            for handler in getattr(stmt, "handlers", []):
                stack.append((handler.body, inner))
            for case in getattr(stmt, "cases", []):
                stack.append((case.body, inner))
    return deepest


@zlink.skill()
def inspect(path: str, source: str) -> Result:
    """Size and complexity metrics for one file.

    Returns ``{"path", "kind": "inspect", "lines", "code_lines", "functions",
    "classes", "total_complexity", "max_complexity", "mean_complexity",
    "top", "hotspots", "max_nesting"}`` where ``top`` holds the 5 most complex
    functions and ``hotspots`` every function with complexity above 10, each
    as ``{"name", "line", "complexity"}``.  Unparsable files give
    ``{"path", "kind", "error"}``.
    """
    try:
        tree = _parse(source, path)
    except _PARSE_ERRORS as exc:
        return _error(path, "inspect", exc)

    lines = _split_lines(source)
    if lines and lines[-1] == "":
        lines.pop()  # text ending in a newline has no extra empty line
    code_lines = sum(1 for line in lines if line.strip() and not line.lstrip().startswith("#"))

    functions, classes = _functions(tree)
    ranked = sorted(functions, key=lambda f: (-f["complexity"], f["line"], f["name"]))
    total = sum(f["complexity"] for f in functions)
    return {
        "path": path,
        "kind": "inspect",
        "lines": len(lines),
        "code_lines": code_lines,
        "functions": len(functions),
        "classes": classes,
        "total_complexity": total,
        "max_complexity": ranked[0]["complexity"] if ranked else 0,
        "mean_complexity": round(total / len(functions), 2) if functions else 0.0,
        "top": ranked[:TOP_N],
        "hotspots": [f for f in ranked if f["complexity"] > HOTSPOT],
        "max_nesting": _max_nesting(tree),
    }


# --------------------------------------------------------------------------
# scan: risky calls
# --------------------------------------------------------------------------

# Calls that are risky whatever their arguments: qualified name -> (rule, severity).
_RISKY_CALLS: dict[str, tuple[str, str]] = {
    **{
        f"{module}.{func}": ("pickle", "medium")
        for module in ("pickle", "_pickle", "cPickle", "dill", "cloudpickle")
        for func in ("load", "loads", "Unpickler")
    },
    "marshal.load": ("marshal", "medium"),
    "marshal.loads": ("marshal", "medium"),
    "shelve.open": ("shelve", "low"),
    "tempfile.mktemp": ("mktemp", "medium"),
    "yaml.unsafe_load": ("yaml_load", "high"),
    "yaml.unsafe_load_all": ("yaml_load", "high"),
}
# Calls that always go through a shell.
_SHELL_CALLS = {
    "os.system",
    "os.popen",
    "subprocess.getoutput",
    "subprocess.getstatusoutput",
    "asyncio.create_subprocess_shell",
}
# Calls that use a shell only with shell=True.
_SUBPROCESS_CALLS = {f"subprocess.{func}" for func in ("Popen", "run", "call", "check_call", "check_output")}
_SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader", "BaseLoader", "CBaseLoader"}


def _add_aliases(node: ast.Import | ast.ImportFrom, aliases: dict[str, str]) -> None:
    """Record which local names an import statement binds, and to what.

    ``import subprocess as sp`` gives ``{"sp": "subprocess"}`` and
    ``from pickle import loads`` gives ``{"loads": "pickle.loads"}``.
    """
    if isinstance(node, ast.Import):
        for alias in node.names:
            if alias.asname:
                aliases[alias.asname] = alias.name
            else:
                top = alias.name.split(".")[0]
                aliases[top] = top
    else:
        module = "." * node.level + (node.module or "")
        for alias in node.names:
            if alias.name != "*":
                aliases[alias.asname or alias.name] = f"{module}.{alias.name}"


def _module_level_names(tree: ast.Module) -> set[str]:
    """Names the module itself defines at top level (they shadow builtins)."""
    names: set[str] = set()
    for stmt in tree.body:
        if isinstance(stmt, _SCOPE_NODES):
            names.add(stmt.name)
        elif isinstance(stmt, (ast.Assign, ast.AnnAssign)):
            targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
    return names


def _call_name(func: ast.expr, aliases: dict[str, str], local: set[str]) -> str | None:
    """The dotted name a call refers to, with import aliases resolved."""
    attrs: list[str] = []
    while isinstance(func, ast.Attribute):
        attrs.append(func.attr)
        func = func.value
    if not isinstance(func, ast.Name):
        return None  # e.g. foo().bar() or obj[0]()
    if func.id in aliases:
        base = aliases[func.id]
    elif func.id in local:
        return None  # a function or variable of this module, not a builtin
    else:
        base = func.id
    name = ".".join([base, *reversed(attrs)])
    return name.removeprefix("builtins.")


def _is_literal(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and isinstance(node.value, (str, bytes))


def _argument(call: ast.Call, position: int | None, keyword: str | None) -> ast.expr | None:
    """The argument passed at ``position`` or as ``keyword=``, if any."""
    for kw in call.keywords:
        if keyword is not None and kw.arg == keyword:
            return kw.value
    if position is not None and position < len(call.args):
        arg = call.args[position]
        return None if isinstance(arg, ast.Starred) else arg
    return None


def _classify(name: str, call: ast.Call) -> tuple[str, str] | None:
    """Return ``(rule, severity)`` if the call is risky, else None."""
    first = _argument(call, 0, "source" if name == "compile" else None)
    if name in ("eval", "exec"):
        return name, "medium" if _is_literal(first) else "high"
    if name == "compile":
        return None if first is None or _is_literal(first) else ("compile", "medium")
    if name == "__import__":
        return None if first is None or _is_literal(first) else ("dynamic_import", "low")
    if name in _RISKY_CALLS:
        return _RISKY_CALLS[name]
    if name in _SHELL_CALLS:
        return "shell", "low" if _is_literal(first) else "high"
    if name in _SUBPROCESS_CALLS:
        shell = _argument(call, None, "shell")
        if shell is None or (isinstance(shell, ast.Constant) and not shell.value):
            return None
        if not isinstance(shell, ast.Constant):
            return "shell", "medium"  # shell=<some variable>
        return "shell", "low" if _is_literal(_argument(call, 0, "args")) else "high"
    if name in ("yaml.load", "yaml.load_all"):
        loader = _argument(call, 1, "Loader")
        if isinstance(loader, ast.Attribute):
            loader_name = loader.attr
        elif isinstance(loader, ast.Name):
            loader_name = loader.id
        else:
            loader_name = ""
        return None if loader_name in _SAFE_YAML_LOADERS else ("yaml_load", "medium")
    return None


@zlink.skill()
def scan(path: str, source: str) -> Result:
    """Risky calls in one file, found by walking the syntax tree.

    Returns ``{"path", "kind": "scan", "findings": [{"line", "rule",
    "severity", "call", "snippet"}], "counts": {rule: n}}``.  Rules: eval,
    exec, compile (non-literal source), dynamic_import (``__import__`` of a
    non-literal), pickle, marshal, shelve, mktemp, yaml_load (no safe
    Loader), shell (os.system, os.popen, subprocess with shell=True, ...).
    Unparsable files give ``{"path", "kind", "error"}``.
    """
    try:
        tree = _parse(source, path)
    except _PARSE_ERRORS as exc:
        return _error(path, "scan", exc)

    # One walk collects the imports and the calls.  Scopes are ignored: an
    # import anywhere in the file applies to every call.
    aliases: dict[str, str] = {}
    calls: list[ast.Call] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            calls.append(node)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            _add_aliases(node, aliases)

    local = _module_level_names(tree)
    lines = _split_lines(source)
    found: list[tuple[int, int, dict[str, Any]]] = []
    for node in calls:
        name = _call_name(node.func, aliases, local)
        hit = _classify(name, node) if name else None
        if hit is None:
            continue
        rule, severity = hit
        snippet = lines[node.lineno - 1].strip() if node.lineno <= len(lines) else ""
        finding = {
            "line": node.lineno,
            "rule": rule,
            "severity": severity,
            "call": name,
            "snippet": snippet[:SNIPPET_CHARS],
        }
        found.append((node.lineno, node.col_offset, finding))

    findings = [finding for _, _, finding in sorted(found, key=lambda f: f[:2])]
    counts = Counter(f["rule"] for f in findings)
    return {
        "path": path,
        "kind": "scan",
        "findings": findings,
        "counts": dict(sorted(counts.items())),
    }


# --------------------------------------------------------------------------
# docs: missing docstrings
# --------------------------------------------------------------------------


def _flat_body(body: list[ast.stmt]) -> list[ast.stmt]:
    """Statements of a module or class body, looking inside if/try/with.

    Definitions are often wrapped, e.g. ``try: from _c import f`` /
    ``except ImportError: def f(): ...``; those still define public names.
    """
    flat: list[ast.stmt] = []
    stack = list(reversed(body))
    while stack:
        stmt = stack.pop()
        if isinstance(stmt, (ast.If, ast.Try, ast.TryStar, ast.With, ast.AsyncWith)):
            inner = list(stmt.body)
            for field in ("orelse", "finalbody"):
                inner += getattr(stmt, field, [])
            for handler in getattr(stmt, "handlers", []):
                inner += handler.body
            stack.extend(reversed(inner))
        else:
            flat.append(stmt)
    return flat


def _is_secondary_def(func: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """``@overload`` stubs and ``@x.setter``/``@x.deleter`` need no docstring."""
    for decorator in func.decorator_list:
        if isinstance(decorator, ast.Name) and decorator.id == "overload":
            return True
        if isinstance(decorator, ast.Attribute) and decorator.attr in ("overload", "setter", "deleter"):
            return True
    return False


@zlink.skill()
def docs(path: str, source: str) -> Result:
    """Docstring coverage of one file's public API.

    Counts public (not ``_``-prefixed) top-level functions and classes and
    the public methods of public classes.  Returns ``{"path", "kind": "docs",
    "module_docstring": bool, "public", "documented", "missing": [{"name",
    "line", "kind": "function"|"class"|"method"}]}``.  Unparsable files give
    ``{"path", "kind", "error"}``.
    """
    try:
        tree = _parse(source, path)
    except _PARSE_ERRORS as exc:
        return _error(path, "docs", exc)

    definitions: list[tuple[str, str, _Scope]] = []  # (qualname, kind, node)
    for stmt in _flat_body(tree.body):
        if isinstance(stmt, _FUNCTION_NODES) and not stmt.name.startswith("_"):
            if not _is_secondary_def(stmt):
                definitions.append((stmt.name, "function", stmt))
        elif isinstance(stmt, ast.ClassDef) and not stmt.name.startswith("_"):
            definitions.append((stmt.name, "class", stmt))
            for member in _flat_body(stmt.body):
                if (
                    isinstance(member, _FUNCTION_NODES)
                    and not member.name.startswith("_")
                    and not _is_secondary_def(member)
                ):
                    definitions.append((f"{stmt.name}.{member.name}", "method", member))

    missing = [
        {"name": name, "line": node.lineno, "kind": kind}
        for name, kind, node in definitions
        if ast.get_docstring(node) is None
    ]
    return {
        "path": path,
        "kind": "docs",
        "module_docstring": ast.get_docstring(tree) is not None,
        "public": len(definitions),
        "documented": len(definitions) - len(missing),
        "missing": missing,
    }


# --------------------------------------------------------------------------
# verify: check and merge
# --------------------------------------------------------------------------


# Keys verify() reads from each kind of result.
_REQUIRED_KEYS = {
    "inspect": {"lines", "code_lines", "functions", "classes", "total_complexity", "top", "hotspots"},
    "scan": {"findings"},
    "docs": {"module_docstring", "public", "documented", "missing"},
}


def _kind_of(item: Result) -> str | None:
    """The skill that produced a result, or None if it is not recognisable."""
    kind = item.get("kind")
    if kind is None:  # tolerate results without "kind": guess from the keys
        for key, guess in (("lines", "inspect"), ("findings", "scan"), ("missing", "docs")):
            if key in item:
                kind = guess
    if kind not in _REQUIRED_KEYS:
        return None
    if "error" not in item and not _REQUIRED_KEYS[kind] <= item.keys():
        return None
    return str(kind)


def _canonical(item: Any) -> str:
    """A stable text form used to pick among duplicates deterministically."""
    return json.dumps(item, sort_keys=True, default=repr)


@zlink.skill()
def verify(results: list[Any]) -> Result:
    """Check the per-file results and merge them into one report.

    ``results`` holds every result of ``inspect``, ``scan`` and ``docs`` in
    any order.  Every path must have exactly one result of each kind; paths
    with missing or duplicate results (and malformed items) are listed under
    ``problems`` and make ``ok`` false.  Files that failed to parse are
    listed under ``parse_errors`` but are not problems.  The output is the
    same for the same results in any order.
    """
    problems: list[dict[str, str]] = []
    by_path: dict[str, dict[str, list[Result]]] = {}
    for item in results:
        if not isinstance(item, dict) or not isinstance(item.get("path"), str):
            issue = f"malformed result: {_canonical(item)[:80]}"
            problems.append({"path": "", "issue": issue})
            continue
        kind = _kind_of(item)
        if kind is None:
            issue = f"malformed or unknown result: {_canonical(item)[:80]}"
            problems.append({"path": item["path"], "issue": issue})
            continue
        by_path.setdefault(item["path"], {}).setdefault(kind, []).append(item)

    chosen: dict[str, dict[str, Result]] = {}  # path -> kind -> result
    parse_errors: list[dict[str, str]] = []
    for path in sorted(by_path):
        kinds = by_path[path]
        for kind in SKILLS:
            copies = kinds.get(kind, [])
            if not copies:
                problems.append({"path": path, "issue": f"missing {kind} result"})
            elif len(copies) > 1:
                problems.append({"path": path, "issue": f"{len(copies)} {kind} results"})
        chosen[path] = {k: v[0] if len(v) == 1 else min(v, key=_canonical) for k, v in kinds.items()}
        errors = sorted(r["error"] for r in chosen[path].values() if "error" in r)
        if errors:
            parse_errors.append({"path": path, "error": str(errors[0])})
    problems.sort(key=lambda p: (p["path"], p["issue"]))

    def good(kind: str) -> list[tuple[str, Result]]:
        return [(path, kinds[kind]) for path, kinds in chosen.items() if kind in kinds and "error" not in kinds[kind]]

    inspected, scanned, documented = good("inspect"), good("scan"), good("docs")

    # Size and complexity.
    functions = sum(int(r["functions"]) for _, r in inspected)
    total_complexity = sum(int(r["total_complexity"]) for _, r in inspected)
    candidates = {
        (path, f["name"], f["line"]): f["complexity"] for path, r in inspected for f in [*r["top"], *r["hotspots"]]
    }
    top_complex = [
        {"path": path, "name": name, "line": line, "complexity": complexity}
        for (path, name, line), complexity in sorted(candidates.items(), key=lambda c: (-c[1], c[0]))[:REPORT_N]
    ]

    # Findings.
    rank = {severity: i for i, severity in enumerate(SEVERITIES)}
    findings = [{"path": path, **f} for path, r in scanned for f in r["findings"]]
    findings.sort(key=lambda f: (rank.get(f["severity"], 99), f["path"], f["line"], f["rule"]))
    by_rule = Counter(f["rule"] for f in findings)
    by_severity = Counter(f["severity"] for f in findings)
    top_findings = [
        {
            "where": f"{f['path']}:{f['line']}",
            "rule": f["rule"],
            "severity": f["severity"],
            "snippet": f["snippet"],
        }
        for f in findings[:REPORT_N]
    ]

    # Docstrings.
    public = sum(int(r["public"]) for _, r in documented)
    has_doc = sum(int(r["documented"]) for _, r in documented)
    worst_docs = sorted(
        ({"path": path, "missing": len(r["missing"]), "public": r["public"]} for path, r in documented if r["missing"]),
        key=lambda d: (-d["missing"], d["path"]),
    )[:REPORT_N]

    totals = {
        "files": len(chosen),
        "parse_errors": len(parse_errors),
        "lines": sum(int(r["lines"]) for _, r in inspected),
        "code_lines": sum(int(r["code_lines"]) for _, r in inspected),
        "functions": functions,
        "classes": sum(int(r["classes"]) for _, r in inspected),
        "mean_complexity": round(total_complexity / functions, 2) if functions else 0.0,
        "complex_functions": sum(len(r["hotspots"]) for _, r in inspected),
        "findings": len(findings),
        "findings_by_rule": dict(sorted(by_rule.items())),
        "findings_by_severity": {s: by_severity.get(s, 0) for s in SEVERITIES},
        "public_names": public,
        "documented": has_doc,
        "docstring_coverage": round(100.0 * has_doc / public, 1) if public else 100.0,
        "module_docstrings": sum(1 for _, r in documented if r["module_docstring"]),
    }
    return {
        "ok": not problems,
        "problems": problems,
        "totals": totals,
        "parse_errors": parse_errors,
        "top_complex": top_complex,
        "top_findings": top_findings,
        "worst_docs": worst_docs,
    }


# --------------------------------------------------------------------------
# Plain helpers used by the demo (not skills)
# --------------------------------------------------------------------------

_SKIP_DIRS = {"__pycache__", "site-packages"}


def find_files(root: str, *, limit: int | None = None) -> list[str]:
    """All ``*.py`` files under ``root``, sorted.

    Skips ``__pycache__``, ``site-packages`` and hidden directories and does
    not follow symbolic links.  ``root`` may also be a single ``.py`` file.
    """
    if os.path.isfile(root):
        return [root] if root.endswith(".py") else []
    found: list[str] = []
    for directory, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = [
            d
            for d in dirnames
            if d not in _SKIP_DIRS and not d.startswith(".") and not os.path.islink(os.path.join(directory, d))
        ]
        for name in filenames:
            path = os.path.join(directory, name)
            if name.endswith(".py") and not name.startswith(".") and not os.path.islink(path):
                found.append(path)
    found.sort()
    return found if limit is None else found[:limit]


def read_source(path: str) -> str:
    """Read a Python file as text, honouring its coding cookie or BOM.

    Falls back to UTF-8 with replacement characters if the declared
    encoding is unknown or the bytes do not decode.
    """
    try:
        with tokenize.open(path) as f:
            return f.read()
    except (SyntaxError, UnicodeDecodeError, LookupError):
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()


_SKILL_FUNCTIONS: dict[str, Callable[[str, str], Result]] = {
    "inspect": inspect,
    "scan": scan,
    "docs": docs,
}


def run_sequential(paths: list[str]) -> Result:
    """Run the whole audit in this process, without zlink.

    Reads every file, runs the three per-file skills on it and merges the
    results with ``verify``.  A file that cannot be read gets an error result
    from each skill, like a file that does not parse.
    """
    results: list[Result] = []
    for path in paths:
        try:
            source = read_source(path)
        except OSError as exc:
            results += [_error(path, kind, exc) for kind in SKILLS]
            continue
        for kind in SKILLS:
            results.append(_SKILL_FUNCTIONS[kind](path, source))
    return verify(results)


def _shorten(path: str, prefix: str) -> str:
    return path[len(prefix) :].lstrip("/\\") if prefix and path.startswith(prefix) else path


def format_report(report: Result) -> str:
    """A short human-readable summary of a ``verify`` result."""
    t = report["totals"]
    paths = [p["path"] for p in report["parse_errors"]]
    paths += [f["path"] for f in report["top_complex"]]
    paths += [d["path"] for d in report["worst_docs"]]
    paths += [f["where"].rsplit(":", 1)[0] for f in report["top_findings"]]
    try:
        prefix = os.path.commonpath(paths) if len(set(paths)) > 1 else ""
    except ValueError:  # mix of absolute and relative paths
        prefix = ""

    severity = t["findings_by_severity"]
    rules = ", ".join(f"{rule} {n}" for rule, n in t["findings_by_rule"].items())
    problems = report["problems"]
    header = "Audit report"
    if not report["ok"]:
        header += f" INCOMPLETE ({len(problems)} problems)"
    if prefix:
        header += f" -- paths relative to {prefix}"
    out = [
        header,
        (
            f"  files {t['files']:,}  lines {t['lines']:,} ({t['code_lines']:,} code)"
            f"  parse errors {t['parse_errors']:,}"
        ),
        (
            f"  functions {t['functions']:,}  classes {t['classes']:,}"
            f"  mean complexity {t['mean_complexity']}"
            f"  over {HOTSPOT}: {t['complex_functions']:,}"
        ),
        (
            f"  docstrings {t['docstring_coverage']}% of {t['public_names']:,} public names"
            f"  modules with docstring {t['module_docstrings']:,}"
        ),
        (
            f"  findings {t['findings']:,} (high {severity['high']},"
            f" medium {severity['medium']}, low {severity['low']})" + (f": {rules}" if rules else "")
        ),
    ]
    if report["top_findings"]:
        out.append("Top findings:")
        for f in report["top_findings"][:5]:
            where = _shorten(f["where"], prefix)
            out.append(f"  {f['severity']:<6} {f['rule']:<14} {where}  {f['snippet'][:50]}")
    if report["top_complex"]:
        out.append("Most complex functions:")
        for f in report["top_complex"][:5]:
            where = _shorten(f"{f['path']}:{f['line']}", prefix)
            out.append(f"  {f['complexity']:>4}  {f['name']}  ({where})")
    if report["parse_errors"]:
        out.append(f"Files that do not parse: {len(report['parse_errors'])}")
        for e in report["parse_errors"][:3]:
            out.append(f"  {_shorten(e['path'], prefix)}: {e['error'][:70]}")
    out.append(f"Problems: {len(problems)}" if problems else "Problems: none")
    for p in problems[:5]:
        out.append(f"  {_shorten(p['path'], prefix) or '?'}: {p['issue']}")
    if len(problems) > 5:
        out.append(f"  ... and {len(problems) - 5} more")
    return "\n".join(out)
