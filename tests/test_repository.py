"""Repository-wide rules: no import cycles among the project's modules, imports pointing one way
(the network at the bottom), and no absolute path of a development machine in tracked files."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("model", "microtransformer")


# ---------------------------------------------------------------- the import graph
def module_name(path: Path) -> str:
    """Dotted module name of a file under ROOT (a package's __init__.py is the package)."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    """Every module of the project's packages, by dotted name (new modules included)."""
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _type_checking_only(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    """True inside `if TYPE_CHECKING:` (never executed, so it cannot make a runtime cycle)."""
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules `name` imports anywhere in its file: module level, inside functions
    and methods (lazy imports run too), relative or absolute."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    is_package = path.name == "__init__.py"
    out: set[str] = set()

    def known(target: str) -> str | None:
        while target and target not in modules:  # `import a.b.c` depends on the module a.b.c
            target = target.rpartition(".")[0]
        return target or None

    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)) or _type_checking_only(node,
                                                                                      parents):
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:  # relative: from the package that holds this module
                package = name if is_package else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    package = package.rpartition(".")[0]
                base = f"{package}.{base}".rstrip(".") if base else package
            # `from pkg import sub` imports the module pkg.sub when there is one
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                       for a in node.names]
        for target in targets:
            hit = known(target)
            if hit is not None and hit != name:
                out.add(hit)
    return out


def import_graph() -> dict[str, set[str]]:
    """{module: the project modules it imports}."""
    modules = project_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a closed path a -> ... -> a) per strongly connected component that has
    one (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        top = stack.pop()
                        on_stack.discard(top)
                        comp.append(top)
                        if top == node:
                            break
                    if len(comp) > 1:
                        components.append(sorted(comp))
    return [_a_cycle(graph, comp) for comp in components]


def _a_cycle(graph: dict[str, set[str]], comp: list[str]) -> list[str]:
    """A shortest closed path through the component's first module (breadth-first)."""
    members, start = set(comp), comp[0]
    paths = {start: [start]}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for child in sorted(graph[node] & members):
            if child == start:
                return [*paths[node], start]
            if child not in paths:
                paths[child] = [*paths[node], child]
                queue.append(child)
    return comp  # unreachable for a strongly connected component


def test_cycle_finder_finds_a_planted_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    assert find_cycles({"x": {"y"}, "y": set()}) == []


def test_import_resolution_sees_lazy_and_relative_imports() -> None:
    graph = import_graph()
    assert "model.transformer" in graph["model"]  # relative, in the package __init__
    assert "model.io" in graph["model.transformer"]  # inside a method
    assert "microtransformer.config" in graph["microtransformer.checkpoint"]  # in a function


def test_no_import_cycles() -> None:
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_model_imports_nothing_from_the_toolkit() -> None:
    up = {name: sorted(t for t in targets if t.split(".")[0] != "model")
          for name, targets in import_graph().items() if name.split(".")[0] == "model"}
    assert not any(up.values()), {k: v for k, v in up.items() if v}


# ---------------------------------------------------------------- machine paths
# An absolute path of a development machine: a name under the root-level `work` or `root`
# directory, or a user's directory under `home` or `Users` -- at the start of a token (not inside
# a relative path or a URL path; test_machine_path_pattern has examples of both kinds).
MACHINE_PATH = re.compile(r"(?<![\w.~/:-])/(?:work|root)/[\w.-]+|(?<![\w.~/:-])/(?:home|Users)/"
                          r"[\w.-]+/")


def test_machine_path_pattern() -> None:
    # the examples are assembled here so that this file names no machine path itself and the
    # scan below needs no exception for it
    work, root, home, users = ("/" + d for d in ("work", "root", "home", "Users"))
    for bad in (f"data at {work}/shared/data", f"`{root}/.cache/x`", f"({home}/alice/corpus)",
                f"--out={work}/runs/a", f"'{users}/bob/'"):
        assert MACHINE_PATH.search(bad), bad
    for ok in ("../shared/data/tinystories", f"https://example.org{work}/x", "~/.cache/x",
               f"a{work}/b", f"workflows{root}/x", "/workspace", "$HOME/data", "C:/work"):
        assert not MACHINE_PATH.search(ok), ok


def tracked_text_files() -> list[Path]:
    git = shutil.which("git")
    if git is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    out = subprocess.run([git, "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
    files = []
    for rel in out.stdout.decode().split("\0"):
        path = ROOT / rel
        if rel and path.is_file() and path.suffix not in (".png", ".jpg", ".pt", ".bin"):
            files.append(path)
    return files


def test_no_machine_paths_in_tracked_files() -> None:
    found = []
    for path in tracked_text_files():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for lineno, line in enumerate(text.splitlines(), 1):
            for m in MACHINE_PATH.finditer(line):
                rel = path.relative_to(ROOT).as_posix()
                found.append(f"{rel}:{lineno}: {m.group(0)}")
    assert not found, ("absolute machine paths (use a path relative to the repo or a named "
                       "source): " + "; ".join(found[:20]))


# ---------------------------------------------------------------- docs/ARCHITECTURE.md
ARCHITECTURE = ROOT / "docs" / "ARCHITECTURE.md"
GENERATED_BEGIN, GENERATED_END = "<!-- imports: generated -->\n", "<!-- /imports -->"
TABLE_HEADING = "## Modules: one concern each"


def group_of(module: str) -> str:
    """The box a module is drawn in: `model`, a subpackage of the toolkit (`data`, `serve`,
    `commands`...), or a top-level toolkit module by its own name."""
    parts = module.split(".")
    if parts[0] == "model":
        return "model"
    if len(parts) == 1:
        return "microtransformer"
    return parts[1]


def transitive_reduction(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The fewest arrows with the same reachability (the graph must be acyclic)."""
    def reach(start: str) -> set[str]:
        seen: set[str] = set()
        todo = list(graph[start])
        while todo:
            node = todo.pop()
            if node not in seen:
                seen.add(node)
                todo += graph[node]
        return seen

    reachable = {node: reach(node) for node in graph}
    return {node: {t for t in targets
                   if not any(t in reachable[other] for other in targets if other != t)}
            for node, targets in graph.items()}


def architecture_imports_section() -> str:
    """The generated part of docs/ARCHITECTURE.md: the import picture between the module groups
    (Mermaid, arrows implied by others left out) and every module's project imports."""
    graph = import_graph()
    groups: dict[str, set[str]] = {}
    for module, targets in graph.items():
        src = group_of(module)
        groups.setdefault(src, set())
        groups[src] |= {group_of(t) for t in targets} - {src}
    reduced = transitive_reduction(groups)
    lines = ["```mermaid", "flowchart TD"]
    for src in sorted(reduced):
        lines += [f"  {src} --> {dst}" for dst in sorted(reduced[src])]
    lines += ["```", "", "| module | imports (project modules) |", "| --- | --- |"]
    for module in sorted(graph):
        targets = ", ".join(f"`{t}`" for t in sorted(graph[module])) or "nothing"
        lines.append(f"| `{module}` | {targets} |")
    return "\n".join(lines) + "\n"


def table_modules(text: str) -> set[str]:
    """The modules the hand-written module table of ARCHITECTURE.md names (first column).

    A cell names files as `model/x.py` (from the repository root), `data/x.py` or `x.py` (in
    `microtransformer/`), a bare `y.py` after a path meaning the same folder, and `dir/` for
    every module in that folder (also `dir/<name>.py`)."""
    section = text.split(TABLE_HEADING, 1)[1].split("\n## ", 1)[0]
    modules = project_modules()
    named: set[str] = set()
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        folder = "microtransformer"
        for token in re.findall(r"`([\w/.<>]+)`", line.split("|")[1]):
            rel = token if token.startswith("model") else f"microtransformer/{token}"
            if "/" in token:
                folder = rel.rsplit("/", 1)[0] if not token.endswith("/") else rel.rstrip("/")
            else:
                rel = f"{folder}/{token}"
            if token.endswith("/") or "<name>" in token:  # a folder: every module in it
                prefix = rel.split("<name>")[0].rstrip("/").replace("/", ".")
                named |= {m for m in modules if m == prefix or m.startswith(prefix + ".")}
            elif token.endswith(".py"):
                named.add(module_name(ROOT / rel))
    return named


def test_architecture_table_names_every_module() -> None:
    text = ARCHITECTURE.read_text(encoding="utf-8")
    named, modules = table_modules(text), set(project_modules())
    packages = {m for m in modules if (ROOT / m.replace(".", "/") / "__init__.py").is_file()}
    missing, unknown = sorted(modules - packages - named), sorted(named - modules)
    assert not missing, f"modules missing from the table in {ARCHITECTURE.name}: {missing}"
    assert not unknown, f"the table names modules that do not exist: {unknown}"


def test_architecture_import_picture_is_generated_from_the_code() -> None:
    text = ARCHITECTURE.read_text(encoding="utf-8")
    assert GENERATED_BEGIN in text, f"{ARCHITECTURE.name} lacks its generated imports section"
    section = text.split(GENERATED_BEGIN, 1)[1].split(GENERATED_END, 1)[0]
    assert section == architecture_imports_section(), (
        "regenerate it: python -m tests.test_repository --update-architecture")


def test_transitive_reduction_drops_implied_arrows() -> None:
    graph = {"a": {"b", "c"}, "b": {"c"}, "c": set()}
    assert transitive_reduction(graph) == {"a": {"b"}, "b": {"c"}, "c": set()}


if __name__ == "__main__":
    import sys

    if "--update-architecture" not in sys.argv:
        sys.exit("usage: python -m tests.test_repository --update-architecture")
    doc = ARCHITECTURE.read_text(encoding="utf-8")
    head, rest = doc.split(GENERATED_BEGIN, 1)
    tail = rest.split(GENERATED_END, 1)[1]
    ARCHITECTURE.write_text(head + GENERATED_BEGIN + architecture_imports_section()
                            + GENERATED_END + tail, encoding="utf-8")
    print(f"updated {ARCHITECTURE.relative_to(ROOT)}")
