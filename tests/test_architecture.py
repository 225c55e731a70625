"""The package's floors, read from its imports (ast, nothing imported): docs/architecture.md.

Every import counts, module-level or inside a function (a lazy import is still a dependency),
except those under `if TYPE_CHECKING:`."""
import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "megatron_longpo"


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _type_checking(node) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(name: str) -> set[str]:
    """Dotted names this module imports (`from a import b`: a.b, and a when a.b is no module of ours)."""
    path = MODULES[name]
    tree = ast.parse(path.read_text(), str(path))
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and _type_checking(node)
            for child in node.body for n in ast.walk(child)}
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            for a in node.names:
                full = f"{base}.{a.name}"
                out.add(full)
                if full not in MODULES:
                    out.add(base)
    return out


IMPORTS = {name: _imports(name) for name in MODULES}


def _under(name: str, *prefixes: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _offenders(sources, targets):
    return sorted(f"{m} imports {i}" for m, imps in IMPORTS.items() if _under(m, *sources)
                  for i in imps if _under(i, *targets))


def test_the_module_list_is_real():
    assert {"megatron_longpo.training.loop", "megatron_longpo.training.batch", "megatron_longpo.parallel",
            "megatron_longpo.data.cp_split", "megatron_longpo.models.packed_params"} <= set(MODULES)
    assert "megatron_longpo.training.step" in IMPORTS["megatron_longpo.training.engine"]


def test_models_and_data_do_not_import_training():
    assert _offenders(["megatron_longpo.models", "megatron_longpo.data"], ["megatron_longpo.training"]) == []


def test_ground_floor_imports_nothing_above():
    ground = ["megatron_longpo.data", "megatron_longpo.losses", "megatron_longpo.generation"]
    above = ["megatron_longpo.models", "megatron_longpo.logprobs", "megatron_longpo.training"]
    assert _offenders(ground, above) == []


def test_config_and_platform_import_nothing_above_the_ground():
    above = ["megatron_longpo.parallel", "megatron_longpo.models", "megatron_longpo.logprobs",
             "megatron_longpo.training", "megatron_longpo.checkpoint", "megatron_longpo.eval"]
    assert _offenders(["megatron_longpo.config", "megatron_longpo.platform"], above) == []


def test_no_package_module_imports_tools():
    assert _offenders(["megatron_longpo"], ["tools"]) == []


# Allowed readers of megatron's global parallel state: parallel.py, the one adapter. (models/build.py
# needs no exception: the stage flags come from the Layout; megatron's own layers read the state.)
PARALLEL_STATE_READERS = {"megatron_longpo.parallel"}


def test_parallel_state_is_read_in_parallel_py_only():
    readers = {m for m, imps in IMPORTS.items() if "megatron.core.parallel_state" in imps}
    assert readers <= PARALLEL_STATE_READERS, sorted(readers - PARALLEL_STATE_READERS)


# The one translation of the run's configuration into megatron-core's config objects (docs/architecture.md).
MEGATRON_CONFIGS = ("TransformerConfig", "DistributedDataParallelConfig", "OptimizerConfig")
TRANSLATION = "megatron_longpo.models.megatron_config"


def _constructs(path: Path) -> set[str]:
    """The megatron config classes `path` calls (`TransformerConfig(...)`, `x.OptimizerConfig(...)`)."""
    calls = (n.func for n in ast.walk(ast.parse(path.read_text(), str(path))) if isinstance(n, ast.Call))
    return {name for f in calls if (name := f.id if isinstance(f, ast.Name) else getattr(f, "attr", None)) in MEGATRON_CONFIGS}


def test_megatron_config_objects_are_made_in_one_module():
    makers = {name: sorted(_constructs(path)) for name, path in MODULES.items() if _constructs(path)}
    makers.update({f"tools/{p.name}": sorted(_constructs(p)) for p in TOOLS if _constructs(p)})
    assert makers == {TRANSLATION: sorted(MEGATRON_CONFIGS)}


def test_no_import_circle():
    graph = {m: {i for i in imps if i in MODULES and i != m} for m, imps in IMPORTS.items()}
    index, low, on_stack, stack, cycles = {}, {}, set(), [], []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert cycles == []


@pytest.mark.parametrize("path, limit", [("training/loop.py", 250)] + [
    (str(p.relative_to(PKG)), 450) for p in sorted(PKG.rglob("*.py"))])
def test_file_sizes(path, limit):
    n = len((PKG / path).read_text().splitlines())
    assert n < limit, f"{path}: {n} lines"


# The edges: tools are command lines over the INSTALLED package, the package carries its own data,
# and docs/ holds pages for users (results live with their experiment: examples/<experiment>/results).
TOOLS = sorted((ROOT / "tools").glob("*.py"))


@pytest.mark.parametrize("path", TOOLS, ids=lambda p: p.name)
def test_tools_import_the_installed_package(path):
    assert "sys.path" not in path.read_text(), f"{path.name}: import megatron_longpo as installed, not through sys.path"


def test_no_package_module_reaches_out_of_the_package():
    """A non-editable install has no examples/ beside it: data the package reads is in megatron_longpo/resources."""
    reach = [str(p.relative_to(ROOT)) for p in PKG.rglob("*.py")
             if any(f"parents[{k}]" in p.read_text() for k in (1, 2, 3, 4)) or '"examples"' in p.read_text()]
    assert reach == []


def test_docs_are_pages_not_results():
    docs = ROOT / "docs"
    assert docs.is_dir()
    dumps = sorted(str(p.relative_to(docs)) for p in docs.rglob("*") if p.suffix in (".json", ".jsonl", ".log"))
    assert dumps == [], "raw results belong in examples/<experiment>/results/"
    long = {p.name: n for p in docs.rglob("*.md") if (n := len(p.read_text().splitlines())) > 600}
    assert long == {}


def test_methods_are_cited_from_the_repository():
    """The code cites docs/methods.md (§1-§4), a file every checkout has."""
    assert (ROOT / "docs" / "methods.md").is_file()
    text = (ROOT / "docs" / "methods.md").read_text()
    assert all(f"## {n}. " in text for n in (1, 2, 3, 4))
    files = [p for d in ("megatron_longpo", "tools", "examples", "docs") for p in (ROOT / d).rglob("*")
             if p.suffix in (".py", ".md", ".yaml", ".sh")] + [ROOT / "README.md"]
    assert [str(p.relative_to(ROOT)) for p in files if "METHODS.md" in p.read_text()] == []


def test_the_trainer_does_not_import_the_checks():
    """checks/ holds references that tools and tests compare the trainer with; training never runs them."""
    trainer = [m for m in MODULES if not _under(m, "megatron_longpo.checks")]
    assert "megatron_longpo.checks.numerics" in MODULES
    assert sorted(f"{m} imports {i}" for m in trainer for i in IMPORTS[m] if _under(i, "megatron_longpo.checks")) == []


@pytest.mark.parametrize("path", TOOLS, ids=lambda p: p.name)
def test_tools_spell_the_layout_as_the_trainer_does(path):
    """parallel.tensor_parallel / pipeline_parallel / context_parallel in the config are
    --tensor-parallel / --pipeline-parallel / --context-parallel in a tool (--tp/--pp/--cp: short aliases)."""
    text = path.read_text()
    for short, name in (("tp", "tensor-parallel"), ("pp", "pipeline-parallel"), ("cp", "context-parallel")):
        if f'"--{short}"' in text:
            assert f'"--{name}", "--{short}"' in text, f"{path.name}: --{short} without --{name}"


# Programs are Python; a shell script only launches: tools/ holds none, and a script in examples/
# (.sh, .sbatch) is a short list of commands: no loops, branches or functions.
SHELL_PROGRAM = re.compile(r"^\s*(if|for|while|until|case|select|function)\b|^\s*[A-Za-z_][\w-]*\s*\(\)\s*\{?", re.M)
LAUNCHERS = sorted(p for ext in ("*.sh", "*.sbatch") for p in (ROOT / "examples").rglob(ext))


def test_no_shell_script_in_tools():
    assert sorted(p.name for p in (ROOT / "tools").rglob("*") if p.suffix in (".sh", ".bash", ".sbatch")) == []


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: str(p.relative_to(ROOT / "examples")))
def test_example_scripts_only_launch(path):
    text = path.read_text()
    assert len(text.splitlines()) <= 40, f"{path.name}: {len(text.splitlines())} lines; a program belongs in Python"
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert SHELL_PROGRAM.findall(code) == [], f"{path.name}: a loop, branch or function; a program belongs in Python"


def test_the_launcher_rule_catches_a_program():
    assert SHELL_PROGRAM.search("set -e\nfor x in a b; do echo $x; done")
    assert SHELL_PROGRAM.search("run() {\n  srun \"$@\"\n}")
    assert SHELL_PROGRAM.search('  if [ -f x ]; then echo; fi')
    assert not SHELL_PROGRAM.search('torchrun --nproc-per-node 8 -m megatron_longpo.train --config "$@"')


def test_readme_is_short_and_starts_with_the_two_commands():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 120, f"README.md: {len(lines)} lines; detail belongs in docs/"
    first_block = lines[lines.index("```bash") + 1: lines.index("```")]
    assert [line.split()[:2] for line in first_block] == [["make", "demo"], ["make", "test"]]


def test_experiments_are_a_yaml_and_a_readme():
    """examples/<experiment>/ holds its YAML, a README or results, recipes and data; the runner is tools/experiment.py."""
    for yaml_path in sorted((ROOT / "examples").glob("*/experiment.yaml")):
        d = yaml_path.parent
        assert not list(d.glob("*.sh")) and not list(d.glob("*.py")), f"{d.name}: a program beside its YAML"
