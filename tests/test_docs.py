"""The documentation cannot drift from the code: its examples run, and api.md matches the API.

(a) Every ```python block of README.md and docs/*.md runs: it is written to `block.py` in a
    temp folder of its own and run as a script (`python block.py`, so a driver's
    `if __name__ == "__main__":` part runs too), with this checkout first on `PYTHONPATH`,
    several blocks at once, each bounded by `BLOCK_TIMEOUT` seconds; it must exit 0. A block
    that cannot run here says why in an HTML comment on the line right before its fence:

        <!-- not-run: needs a SLURM allocation -->
        ```python

    Such a block (like every block) is still compiled, must bind every global name it reads
    (import or define it: a copied example must not raise NameError), and the names it
    imports from isdgrid, the attributes it reads from them and the keywords it passes to
    them must exist. A block preceded by `<!-- file: NAME -->` (NAME may hold folders:
    `src/physics.py`) is not run but written as NAME into the folder of every Python block
    of the same page: the hosts file a block loads, a module it copies or imports.
    A marker that is not right before a fence is an error.
(b) Every name in `isdgrid.__all__`, and every public method, property and attribute of a
    `Grid`, appears in a code span of docs/api.md. Every heading of api.md that is a
    signature in a code span (`### \\`grid.publish(instance) -> str\\``) names something that
    exists and has exactly those parameters, kinds and defaults; `Grid`'s parameters are
    also each described in its section, and a documented dataclass's fields in its section.
(c) Every `isdgrid.X...`, `Grid.X`, `grid.X`, `host.X`, `slot.X` and `result.X` that a code
    span of README.md or docs/*.md mentions exists (`grid.X` and `slot.X` on a real one-slot
    grid, `host.X` on a Host, `result.X` on Result), apart from ALLOWED_MENTIONS; a code
    span that is a call (`Grid(hosts, min_hosts=k)`) passes only keywords the code takes.
(d) The README's first command (make a venv, install, run the demo) works as written, in a
    copy of this checkout.
(e) Every option of every `isdgrid` command is in its section of docs/cli.md, and every
    link between the pages leads to a file (and a heading) that exists.
(f) The `>>>` examples in isdgrid's docstrings (`help(isdgrid)` shows the package's) run as
    doctests, on real local grids, and none is skipped.
"""

from __future__ import annotations

import ast
import builtins
import concurrent.futures
import dataclasses
import doctest
import importlib
import importlib.util
import inspect
import io
import os
import pkgutil
import re
import shutil
import signal
import subprocess
import symtable
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import require

import isdgrid
from isdgrid import Grid, Host, Result

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
API = ROOT / "docs" / "api.md"
BLOCK_TIMEOUT = 60.0
README_COMMAND_TIMEOUT = 400.0
PYTHON_LANGS = {"python", "py", "python3"}

# Mentions that are not Python objects, each with the reason.
ALLOWED_MENTIONS = {
    "isdgrid.remote": "the logger the daemons' output goes to, not a module",
    "isdgrid.myrun": "a daemon's name in a Pyro5 name server (group myrun, clusters.md), not a module",
}

FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>```+|~~~+)(?P<lang>[\w+-]*)\s*$")
MARKER = re.compile(r"^\s*<!--\s*(?P<kind>not-run|file):(?P<value>.*?)-->\s*$")
SPAN = re.compile(r"`([^`\n]+)`")
MENTION = re.compile(r"(?<![\w.])(isdgrid(?:\.\w+)+|(?:Grid|grid|host|slot|result)\.\w+)")


@dataclasses.dataclass
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    not_run: str | None  # the reason, when marked
    file_name: str | None  # for `<!-- file: NAME -->` blocks

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def parse_page(page: Path) -> tuple[list[Block], list[str], str]:
    """The fenced blocks of a page, the problems with its markers, and its text outside fences."""
    blocks: list[Block] = []
    problems: list[str] = []
    prose: list[str] = []
    lines = page.read_text().splitlines()
    marker: tuple[int, str, str] | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        opening = FENCE.match(line)
        if opening:
            fence, indent, lang = opening["fence"], opening["indent"], opening["lang"].lower()
            body: list[str] = []
            i += 1
            while i < len(lines) and not (lines[i].strip().startswith(fence) and not lines[i].strip()[len(fence) :]):
                body.append(lines[i][len(indent) :] if lines[i].startswith(indent) else lines[i])
                i += 1
            start = i - len(body)  # 1-based line of the opening fence
            kind, value = (marker[1], marker[2]) if marker and marker[0] == start - 1 else (None, "")
            if kind == "not-run" and lang not in PYTHON_LANGS:
                problems.append(f"{page.name}:{start}: a not-run marker before a {lang or 'plain'} block")
            if kind == "not-run" and not value:
                problems.append(f"{page.name}:{start}: a not-run marker without a reason")
            if kind == "file" and (not re.fullmatch(r"[\w.-]+(/[\w.-]+)*", value) or ".." in value.split("/")):
                problems.append(f"{page.name}:{start}: file marker with a bad name {value!r}")
            if marker and marker[0] != start - 1:
                problems.append(f"{page.name}:{marker[0]}: a marker not on the line right before a fence")
            marker = None
            blocks.append(
                Block(
                    page,
                    start,
                    lang,
                    "\n".join(body) + "\n",
                    value if kind == "not-run" else None,
                    value if kind == "file" else None,
                )
            )
            prose += [""] * (len(body) + 2)  # the prose keeps the page's line numbers
        else:
            found = MARKER.match(line)
            if found:
                if marker:
                    problems.append(f"{page.name}:{marker[0]}: a marker not on the line right before a fence")
                marker = (i + 1, found["kind"], found["value"].strip())
                prose.append("")
            else:
                prose.append(line)
        i += 1
    if marker:
        problems.append(f"{page.name}:{marker[0]}: a marker not on the line right before a fence")
    return blocks, problems, "\n".join(prose)


PARSED = {page: parse_page(page) for page in PAGES}
PY_BLOCKS = [b for page in PAGES for b in PARSED[page][0] if b.lang in PYTHON_LANGS]
RUNNABLE = [b for b in PY_BLOCKS if b.not_run is None and b.file_name is None]


def test_markers_are_well_placed() -> None:
    problems = [p for page in PAGES for p in PARSED[page][1]]
    assert not problems, "bad markers:\n" + "\n".join(problems)


def test_there_are_python_blocks_to_run() -> None:
    assert len(RUNNABLE) >= 4, [b.where for b in RUNNABLE]


# -- (a) the Python blocks ----------------------------------------------------------------


def _static_problems(block: Block) -> list[str]:
    """Compile the block; check what it takes from isdgrid exists and accepts its keywords."""
    try:
        tree = ast.parse(block.code, block.where)
    except SyntaxError as exc:
        return [f"does not compile: {exc}"]
    bound: dict[str, Any] = {}
    problems: list[str] = []
    if undefined := _undefined_names(block.code, block.where):
        problems.append(f"uses names it never defines or imports: {sorted(undefined)}")
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "isdgrid":
            try:
                module = importlib.import_module(node.module)
            except ImportError as exc:
                problems.append(f"line {node.lineno}: {exc}")
                continue
            for alias in node.names:
                if not hasattr(module, alias.name):
                    problems.append(f"line {node.lineno}: {node.module} has no {alias.name!r}")
                else:
                    bound[alias.asname or alias.name] = getattr(module, alias.name)
    return problems + [f"line {p}" for p in _call_problems(tree, bound)]


def _call_problems(tree: ast.AST, bound: dict[str, Any], attributes: bool = True) -> list[str]:
    """Keywords that calls of ``bound`` names do not take; with ``attributes``, their attributes that do not exist."""
    problems: list[str] = []
    for node in ast.walk(tree):
        if (
            attributes
            and isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in bound
            and not hasattr(bound[node.value.id], node.attr)
        ):
            problems.append(f"{node.lineno}: {node.value.id}.{node.attr} does not exist")
        if isinstance(node, ast.Call):
            target = _resolve(node.func, bound)
            if target is None:
                continue
            try:
                sig = inspect.signature(target)
            except (TypeError, ValueError):
                continue
            has_var_kw = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
            for keyword in node.keywords:
                param = sig.parameters.get(keyword.arg or "")
                if keyword.arg is None or (param is None and has_var_kw):
                    continue
                if param is None or param.kind is param.POSITIONAL_ONLY:
                    problems.append(f"{node.lineno}: {ast.unparse(node.func)}() takes no keyword {keyword.arg!r}")
    return problems


def _undefined_names(code: str, where: str) -> set[str]:
    """Global names the code reads but never binds (a copied example would raise NameError)."""
    top = symtable.symtable(code, where, "exec")
    bound = {s.get_name() for s in top.get_symbols() if s.is_assigned() or s.is_imported()}
    tables = [top]
    undefined = set()
    while tables:
        table = tables.pop()
        tables += table.get_children()
        for sym in table.get_symbols():
            name = sym.get_name()
            if sym.is_referenced() and (table is top or sym.is_global()) and name not in bound:
                undefined.add(name)
    return undefined - set(dir(builtins))


def _resolve(func: ast.expr, bound: dict[str, Any]) -> Any:
    if isinstance(func, ast.Name):
        return bound.get(func.id)
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id in bound:
        return getattr(bound[func.value.id], func.attr, None)
    return None


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float) -> tuple[int | None, str]:
    """Run ``cmd`` in a session of its own; on timeout kill the whole session. (rc, output)."""
    with subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    ) as proc:
        try:
            out, _ = proc.communicate(timeout=timeout)
            return proc.returncode, out
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate(timeout=30)
            return None, out


def _run_block(block: Block, folder: Path, run_dir: Path) -> tuple[int | None, str]:
    folder.mkdir(parents=True)
    for other in PARSED[block.page][0]:
        if other.file_name:
            (folder / other.file_name).parent.mkdir(parents=True, exist_ok=True)
            (folder / other.file_name).write_text(other.code)
    (folder / "block.py").write_text(block.code)
    env = dict(os.environ, ISDGRID_RUN_DIR=str(run_dir))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return _run([sys.executable, "block.py"], folder, env, BLOCK_TIMEOUT)


COPY_IGNORE = shutil.ignore_patterns(
    ".git", ".venv", "*.egg-info", "__pycache__", "build", "dist", ".mypy_cache", ".ruff_cache", ".pytest_cache"
)


def readme_first_command() -> str:
    """The first line of the README's first bash block, without its comment."""
    blocks = [b for b in PARSED[ROOT / "README.md"][0] if b.lang in ("bash", "sh", "shell")]
    assert blocks, "README.md has no bash block"
    first = blocks[0].code.strip().splitlines()[0]
    return first.split("  #")[0].strip()


def _run_readme_command(workdir: Path, run_dir: Path) -> tuple[int | None, str]:
    copy = workdir / "checkout"
    shutil.copytree(ROOT, copy, ignore=COPY_IGNORE)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["ISDGRID_RUN_DIR"] = str(run_dir)
    return _run(["bash", "-c", readme_first_command()], copy, env, README_COMMAND_TIMEOUT)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, concurrent.futures.Future]]:
    """Every runnable block, and the README's first command, started at once in the background."""
    base = tmp_path_factory.mktemp("docs")
    run_dir = base / "run"
    run_dir.mkdir()
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(3, min(6, os.cpu_count() or 1) + 1))
    futures = {"readme-command": pool.submit(_run_readme_command, base, run_dir)}
    for n, block in enumerate(RUNNABLE):
        futures[block.where] = pool.submit(_run_block, block, base / f"block-{n}", run_dir)
    try:
        yield futures
    finally:
        pool.shutdown(wait=True)  # every run is bounded by its own timeout


@pytest.mark.timeout(BLOCK_TIMEOUT * 5)  # the blocks run a few at a time; each is bounded by BLOCK_TIMEOUT
@pytest.mark.parametrize("block", PY_BLOCKS, ids=[b.where for b in PY_BLOCKS])
def test_python_block(block: Block, request: pytest.FixtureRequest) -> None:
    problems = _static_problems(block)
    assert not problems, f"{block.where}: " + "; ".join(problems)
    if block.not_run is not None:
        assert block.not_run.strip(), f"{block.where}: not-run without a reason"
        return
    if block.file_name is not None:
        return  # a module the page's other blocks use: it runs when they import it
    runs = request.getfixturevalue("runs")
    rc, out = runs[block.where].result(timeout=BLOCK_TIMEOUT * 4)
    what = "timed out" if rc is None else f"exited with {rc}"
    assert rc == 0, f"the Python block at {block.where} {what} (run as a script); its output:\n{out[-4000:]}"


@pytest.mark.timeout(README_COMMAND_TIMEOUT + 60)
def test_readme_first_command_works_as_written(runs: dict[str, concurrent.futures.Future]) -> None:
    command = readme_first_command()
    assert "venv" in command and "isdgrid demo" in command, f"README's first command: {command!r}"
    require(
        subprocess.run(["python3", "-c", "import venv, ensurepip"], capture_output=True, timeout=60).returncode == 0,
        "python3 -m venv does not work here (on Debian/Ubuntu: apt install python3-venv)",
    )
    rc, out = runs["readme-command"].result(timeout=README_COMMAND_TIMEOUT + 30)
    assert rc == 0 and "Boltzmann check" in out, f"README's first command {command!r} failed ({rc}):\n{out[-4000:]}"


# -- (a2) the example drivers the docs tell users to copy run once copied ------------------

# "The full driver to copy from is [`isdgrid/examples/x.py`]", "`isdgrid/examples/x.py` is a
# complete driver ... to copy from": every example file a page says to copy.
COPY_MENTION = re.compile(
    r"cop(?:y|ied)[^.`]*`(isdgrid/examples/\w+\.py)`|`(isdgrid/examples/\w+\.py)`[^.]*?\bto copy\b", re.I
)
COPIED_DRIVERS = sorted({a or b for page in PAGES for a, b in COPY_MENTION.findall(PARSED[page][2])})


def test_the_docs_name_a_driver_to_copy() -> None:
    assert "isdgrid/examples/replica_exchange.py" in COPIED_DRIVERS, COPIED_DRIVERS


@pytest.mark.timeout(BLOCK_TIMEOUT * 3)
@pytest.mark.parametrize("driver", COPIED_DRIVERS)
def test_a_copied_driver_runs_as_a_script(driver: str, tmp_path: Path) -> None:
    """``cp isdgrid/examples/x.py my_x.py && python my_x.py``, edited: it runs this copy's code."""
    copy = tmp_path / f"my_{Path(driver).name}"
    code = (ROOT / driver).read_text()
    assert "replica exchange: " in code
    copy.write_text(code.replace("replica exchange: ", "my edited replica exchange: "))
    env = dict(os.environ, ISDGRID_RUN_DIR=str(tmp_path / "run"))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    rc, out = _run(
        [sys.executable, copy.name, "--slots", "2", "--rounds", "3", "--steps", "20"], tmp_path, env, BLOCK_TIMEOUT
    )
    assert rc == 0, f"python {copy.name} {'timed out' if rc is None else f'exited with {rc}'}:\n{out[-4000:]}"
    assert "my edited replica exchange: 2 replicas on 2 slots" in out  # the copy's own code ran
    assert "3 rounds x 20 steps" in out and "Boltzmann check" in out


# -- (b) api.md has every public name, and its signatures are the code's ------------------


def _api_text() -> str:
    return PARSED[API][2]


def _spans(text: str) -> list[str]:
    return SPAN.findall(text)


def _mentioned(name: str, spans: list[str]) -> bool:
    word = re.compile(rf"(?<![\w]){re.escape(name)}(?!\w)")
    return any(word.search(s) for s in spans)


@dataclasses.dataclass
class Section:
    line: int
    heading: str  # the code span of the heading
    body: str


def api_sections() -> list[Section]:
    """Headings of api.md that are one code span, with the text up to the next heading."""
    sections: list[Section] = []
    current: Section | None = None
    for n, line in enumerate(_api_text().splitlines(), 1):
        if line.startswith("#"):
            found = re.fullmatch(r"#+ `([^`]+)`\s*", line)
            current = Section(n, found[1], "") if found else None
            if current:
                sections.append(current)
        elif current:
            current.body += line + "\n"
    return sections


def test_every_public_name_is_in_api_md() -> None:
    spans = _spans(_api_text())
    missing = [n for n in isdgrid.__all__ if not _mentioned(n, spans)]
    assert not missing, f"docs/api.md does not mention these names of isdgrid.__all__ (in a code span): {missing}"


@pytest.fixture(scope="module")
def live_grid() -> Iterator[Grid]:
    g = Grid([Host("localhost", n_cpu=1)], status_file=False)
    try:
        yield g
    finally:
        g.terminate()


def test_every_public_member_of_a_grid_is_in_api_md(live_grid: Grid) -> None:
    spans = _spans(_api_text())
    names = {n for n in dir(Grid) if not n.startswith("_")} | {n for n in vars(live_grid) if not n.startswith("_")}
    missing = sorted(n for n in names if not (_mentioned(f"grid.{n}", spans) or _mentioned(f"Grid.{n}", spans)))
    assert not missing, (
        "docs/api.md does not mention these public members of a Grid as `grid.NAME` or `Grid.NAME` "
        f"in a code span: {missing}"
    )


def _doc_signature(params: str, where: str) -> list[tuple[str, str, Any]]:
    """(name, kind, default) of a parameter list written in the docs."""
    args = ast.parse(f"def _f({params}): pass").body[0].args  # type: ignore[attr-defined]
    out: list[tuple[str, str, Any]] = []

    def default(node: ast.expr | None) -> Any:
        if node is None:
            return inspect.Parameter.empty
        return eval(compile(ast.Expression(node), where, "eval"), {"__builtins__": {}})  # noqa: S307

    positional = args.posonlyargs + args.args
    pos_defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    for a, d in zip(positional, pos_defaults, strict=True):
        out.append((a.arg, "positional", default(d)))
    if args.vararg:
        out.append((args.vararg.arg, "*args", inspect.Parameter.empty))
    for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True):
        out.append((a.arg, "keyword-only", default(d)))
    if args.kwarg:
        out.append((args.kwarg.arg, "**kwargs", inspect.Parameter.empty))
    return out


KINDS = {
    inspect.Parameter.POSITIONAL_ONLY: "positional",
    inspect.Parameter.POSITIONAL_OR_KEYWORD: "positional",
    inspect.Parameter.VAR_POSITIONAL: "*args",
    inspect.Parameter.KEYWORD_ONLY: "keyword-only",
    inspect.Parameter.VAR_KEYWORD: "**kwargs",
}

HEADING = re.compile(r"(?P<target>(?:grid\.|Grid\.)?[A-Za-z_]\w*)(?:\((?P<params>.*)\))?(?:\s*->\s*.+)?")


def _heading_target(target: str, live: Grid) -> tuple[Any, bool]:
    """The object a heading names, and whether its signature includes ``self``."""
    if target.startswith("grid."):
        name = target[5:]
        attr = inspect.getattr_static(Grid, name, None)
        if isinstance(attr, (staticmethod, classmethod)) or attr is None:
            return getattr(live, name), False
        return getattr(Grid, name), inspect.isfunction(attr)
    if target.startswith("Grid."):
        return getattr(Grid, target[5:]), False
    return getattr(isdgrid, target), False


def test_api_md_signatures_are_the_code_signatures(live_grid: Grid) -> None:
    problems: list[str] = []
    sections = api_sections()
    assert len(sections) > 20, "api.md: too few `code` headings found; did the format change?"
    for section in sections:
        short = section.heading if len(section.heading) < 50 else section.heading.split("(")[0] + "(...)"
        where = f"docs/api.md:{section.line} `{short}`"
        found = HEADING.fullmatch(section.heading)
        if not found:
            problems.append(f"{where}: not a name or a signature")
            continue
        try:
            obj, has_self = _heading_target(found["target"], live_grid)
        except AttributeError as exc:
            problems.append(f"{where}: names nothing that exists ({exc})")
            continue
        if dataclasses.is_dataclass(obj) and isinstance(obj, type) and found["params"] is None:
            spans = _spans(section.body)
            problems += [
                f"{where}: field {f.name!r} is not described" for f in dataclasses.fields(obj) if f.name not in spans
            ]
        if found["params"] is None:
            continue
        try:
            documented = _doc_signature(found["params"], where)
        except SyntaxError as exc:
            problems.append(f"{where}: the parameter list does not parse: {exc}")
            continue
        params = list(inspect.signature(obj).parameters.values())[1 if has_self else 0 :]
        actual = [(p.name, KINDS[p.kind], p.default) for p in params]
        if documented != actual:
            problems.append(_signature_difference(where, documented, actual))
        if found["target"] == "Grid":
            spans = _spans(section.body)
            problems += [
                f"{where}: parameter {p.name!r} is not described below the heading (in a code span)"
                for p in params
                if not _mentioned(p.name, spans)
            ]
    assert not problems, "docs/api.md differs from the code:\n" + "\n".join(problems)


def _signature_difference(where: str, documented: list[tuple], actual: list[tuple]) -> str:
    doc_names, real_names = [d[0] for d in documented], [a[0] for a in actual]
    lines = [f"{where}: the signature differs from the code's"]
    if missing := [n for n in real_names if n not in doc_names]:
        lines.append(f"  missing parameters: {missing}")
    if extra := [n for n in doc_names if n not in real_names]:
        lines.append(f"  parameters the code does not have: {extra}")
    if not missing and not extra and doc_names != real_names:
        lines.append(f"  order: the code's is {real_names}")
    real = {a[0]: a for a in actual}
    for name, kind, default in documented:
        if name in real and (kind, default) != real[name][1:]:
            _, real_kind, real_default = real[name]
            lines.append(
                f"  {name}: documented {kind}, default {default!r}; "
                f"the code: {real_kind}, default {real_default!r}"
            )
    return "\n".join(lines)


# -- (c) what the docs mention exists ------------------------------------------------------


def _resolve_dotted(path: str) -> bool:
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for part in parts[cut:]:
            if not hasattr(obj, part):
                return False
            obj = getattr(obj, part)
        return True
    return False


def _mention_problems(text: str, owners: dict[str, Any]) -> list[str]:
    """``line: problem`` for each mention in ``text``'s code spans that names nothing."""
    problems = []
    for n, line in enumerate(text.splitlines(), 1):
        for span in _spans(line):
            for mention in MENTION.findall(span):
                owner, _, name = mention.partition(".")
                if mention in ALLOWED_MENTIONS or (
                    _resolve_dotted(mention) if owner == "isdgrid" else hasattr(owners[owner], name)
                ):
                    continue
                problems.append(f"{n} (in `{span}`): {mention} does not exist")
    return problems


def _owners(live_grid: Grid) -> dict[str, Any]:
    return {"Grid": Grid, "grid": live_grid, "host": Host("localhost"), "slot": live_grid.slots[0], "result": Result}


def test_every_mentioned_name_exists(live_grid: Grid) -> None:
    owners = _owners(live_grid)
    problems = [f"{page.relative_to(ROOT)}:{p}" for page in PAGES for p in _mention_problems(PARSED[page][2], owners)]
    assert not problems, "the docs mention names the code does not have:\n" + "\n".join(problems)


SPAN_NAMES: dict[str, Any] = {**{n: getattr(isdgrid, n) for n in isdgrid.__all__}, "grid": Grid}


def test_calls_in_code_spans_use_real_keywords() -> None:
    """`Grid(hosts, launcher="ssh", min_hosts=k)` in prose: each keyword is a real parameter."""
    problems: list[str] = []
    for page in PAGES:
        for span in _spans(PARSED[page][2]):
            try:
                tree = ast.parse(span, mode="eval")
            except SyntaxError:
                continue
            found = _call_problems(tree, SPAN_NAMES, attributes=False)  # attributes: test_every_mentioned_name_exists
            problems += [f"{page.relative_to(ROOT)} (in `{span}`): {p}" for p in found]
    assert not problems, "code spans pass keywords the code does not take:\n" + "\n".join(problems)


def test_every_cli_option_is_in_cli_md() -> None:
    """Each command of the CLI has a section `## \\`isdgrid NAME\\`` in cli.md naming all its options."""
    import click

    from isdgrid.cli import cli

    text = (ROOT / "docs" / "cli.md").read_text()
    sections = dict(re.findall(r"^## `isdgrid (\w+)`\n(.*?)(?=^## |\Z)", text, re.M | re.S))
    problems = []
    for name, command in cli.commands.items():
        if name not in sections:
            problems.append(f"no section `isdgrid {name}`")
            continue
        for param in command.params:
            if isinstance(param, click.Option) and not param.hidden:
                long = [o for o in param.opts if o.startswith("--")]
                if long and not any(o in sections[name] for o in long):
                    problems.append(f"`isdgrid {name}`: option {long[0]} is not described")
    assert not problems, "docs/cli.md differs from the CLI:\n" + "\n".join(problems)


LINK = re.compile(r"\]\((?P<target>[^)\s]+)\)")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_links_between_pages_resolve() -> None:
    problems: list[str] = []
    for page in PAGES:
        for target in LINK.findall(PARSED[page][2]):
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                problems.append(f"{page.relative_to(ROOT)}: link to {target}: no such file")
            elif anchor and dest.suffix == ".md":
                headings = [line.lstrip("#") for line in dest.read_text().splitlines() if line.startswith("#")]
                if anchor not in {_slug(h) for h in headings}:
                    problems.append(f"{page.relative_to(ROOT)}: link to {target}: no such heading in {dest.name}")
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_the_checks_catch_drift(live_grid: Grid) -> None:
    """The rules above reject what they are meant to reject (so a passing run means something)."""
    doc = _doc_signature('hosts, launcher="local", *, debug=False', "x")
    actual = [(p.name, KINDS[p.kind], p.default) for p in inspect.signature(Grid).parameters.values()]
    assert "missing parameters" in _signature_difference("x", doc, actual)
    assert not _resolve_dotted("isdgrid.no_such_name") and _resolve_dotted("isdgrid.statusfile.run_dir")
    old = "x\n`host.is_local` is True; `grid.slots`, `isdgrid.remote`, `Grid.attach(...)`, `isdgrid.nope.f`"
    assert _mention_problems(old, _owners(live_grid)) == [
        "2 (in `host.is_local`): host.is_local does not exist",
        "2 (in `isdgrid.nope.f`): isdgrid.nope.f does not exist",
    ]
    bad = Block(API, 1, "python", "from isdgrid import Grid, NoSuchThing\nGrid([], launcher_opts={})\n", None, None)
    problems = _static_problems(bad)
    assert any("NoSuchThing" in p for p in problems) and any("launcher_opts" in p for p in problems), problems
    code = "import os\nclass A:\n    def f(self): return os.x + Replica\nwith Grid() as g: g"
    assert _undefined_names(code, "x") == {"Replica", "Grid"}
    span = ast.parse('Grid(hosts, launcher="ssh", min_host=2)', mode="eval")
    assert _call_problems(span, SPAN_NAMES, attributes=False) == ["1: Grid() takes no keyword 'min_host'"]
    assert _slug("Files: `copy_files`") == "files-copy_files" and _slug('"No module named X"') == "no-module-named-x"


# -- (f) the docstrings' examples run --------------------------------------------------------


def _modules_with_examples() -> list[str]:
    found = []
    for info in pkgutil.walk_packages(isdgrid.__path__, "isdgrid."):
        spec = importlib.util.find_spec(info.name)
        origin = spec.origin if spec is not None else None
        if origin and origin.endswith(".py") and ">>>" in Path(origin).read_text():
            found.append(info.name)
    return ["isdgrid", *found] if ">>>" in Path(isdgrid.__file__).read_text() else found


DOCTEST_MODULES = _modules_with_examples()


def test_the_package_docstring_has_an_example() -> None:
    assert "isdgrid" in DOCTEST_MODULES and ">>> " in (isdgrid.__doc__ or "")


@pytest.mark.timeout(BLOCK_TIMEOUT * 3)
@pytest.mark.parametrize("module", DOCTEST_MODULES)
def test_docstring_examples_run(module: str) -> None:
    mod = importlib.import_module(module)
    tests = [t for t in doctest.DocTestFinder().find(mod) if t.examples]
    skipped = [
        f"{t.name} line {(t.lineno or 0) + e.lineno + 1}"
        for t in tests
        for e in t.examples
        if e.options.get(doctest.SKIP)
    ]
    assert not skipped, f"skipped docstring examples (make them run): {skipped}"
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    report = io.StringIO()
    for test in tests:
        runner.run(test, out=report.write)
    results = runner.summarize(verbose=False)
    assert results.attempted > 0
    assert results.failed == 0, f"{module}'s docstring examples failed:\n{report.getvalue()[-4000:]}"
