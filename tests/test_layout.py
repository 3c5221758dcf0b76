"""The package's shape: what it imports, which module may import which, and that every fact written
in two places (docs and code) is the same in both. Read from the source with `ast`, never by
running it."""

import ast
import configparser
import re
import sys
from pathlib import Path

import pytest

from llama3_np import stages
from llama3_np.text.tokenizer import TOKENIZER_FILES
from llama3_np.xcheck.dump import METADATA

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "llama3_np"
DESIGN = REPO / "docs" / "DESIGN.md"
# The distribution that provides each top-level module, where the names differ.
DISTRIBUTIONS = {"ml_dtypes": "ml_dtypes", "lm_eval": "lm-eval"}


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = modules()


def imports(name: str) -> tuple[set[str], set[str]]:
    """(package modules, third-party top-level modules) that module `name` imports, anywhere in it."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    inside, outside = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [(a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            targets = [(module, a.name) for a in node.names]
        else:
            continue
        for module, member in targets:
            if module.split(".")[0] == "llama3_np":
                # `from . import x` imports module x when there is one.
                inside.add(f"{module}.{member}" if f"{module}.{member}" in MODULES else module)
            elif module.split(".")[0] not in sys.stdlib_module_names and module != "__future__":
                outside.add(module.split(".")[0])
    return inside, outside


def requirements(cfg: configparser.ConfigParser, key: str, section: str = "options") -> set[str]:
    return {re.split(r"[<>=!~ \[]", line.strip())[0] for line in cfg[section][key].splitlines() if line.strip()}


def test_install_requires_is_what_the_package_imports():
    """Run-time requirements are exactly the third-party modules the package imports; an optional
    extra (`viz`: matplotlib, for the walkthrough's pictures; `gguf`, for GGUF files; `templates`:
    jinja2, for chat templates; `eval`: lm-eval, for its model adapter) is imported
    only inside the function that needs it, so that the package runs without it."""
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    optional = set().union(*(requirements(cfg, extra, "options.extras_require") for extra in ("viz", "gguf", "templates", "eval")))
    imported = {DISTRIBUTIONS.get(m, m) for m in set().union(*(imports(m)[1] for m in MODULES))}
    assert imported - optional == requirements(cfg, "install_requires")
    for m, path in MODULES.items():
        top_level = {a.name.split(".")[0] for n in ast.parse(path.read_text()).body
                     if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
        top_level |= {n.module.split(".")[0] for n in ast.parse(path.read_text()).body
                      if isinstance(n, ast.ImportFrom) and n.module}
        assert not top_level & optional, f"{m} imports {top_level & optional} at load time"


def test_no_import_cycles():
    graph = {m: imports(m)[0] - {m} for m in MODULES}
    done, path = set(), []

    def visit(m):
        if m in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(m):] + [m]))
        if m in done:
            return
        path.append(m)
        for n in sorted(graph[m]):
            # A package's __init__ is run before any of its modules: importing a module of a
            # package whose __init__ imports it back is not a cycle of the module's own making.
            if not (n == "llama3_np" and m != "llama3_np"):
                visit(n)
        path.pop()
        done.add(m)

    for m in MODULES:
        visit(m)


def test_the_specification_and_the_formats_import_only_what_they_may():
    assert imports("llama3_np.model")[0] == {"llama3_np.config", "llama3_np.stages", "llama3_np.linear",
                                             "llama3_np.checks"}
    for m in MODULES:
        if m.startswith("llama3_np.formats."):
            assert not imports(m)[0] & {"llama3_np.model", "llama3_np.linear", "llama3_np.stages"}, m


def test_commands_import_the_library_never_each_other():
    commands = [m for m in MODULES if m.startswith("llama3_np.cli.") and m != "llama3_np.cli.common"]
    for m in commands:
        assert not {n for n in imports(m)[0] if n.startswith("llama3_np.cli")} - {"llama3_np.cli.common"}, m
    for m in MODULES:
        if not m.startswith("llama3_np.cli") and m != "llama3_np.__main__":
            assert not {n for n in imports(m)[0] if n.startswith("llama3_np.cli")}, f"{m} imports the command line"


COMMAND_FUNCTIONS = re.compile(r"add_command|run\w*|print\w*|parse\w*|say")
# Command modules that still hold library logic, and what is to move out of them: the list may only
# shrink (a module that no longer breaks the rule must leave it).
NOT_YET_THIN = {
    "llama3_np.cli.score": "reading JSONL requests, the tables and the JSON of scores",
}


def test_command_modules_hold_no_library_logic():
    """A command parses its flags, calls the library and prints (docs/DESIGN.md, `cli/`); what it
    computes, a library caller or a tool can call too. Checkably, for every command module (a
    module of `cli/` other than `cli/common.py`, which holds what the commands share, and the
    parser in `cli/__init__.py`):
    - it imports no numpy: computing on arrays is the library's;
    - its top-level functions add the command's flags (`add_command`), parse them (`parse…`), run
      it (`run…`) or print (`print…`, `say`);
    - neither the library nor a tool imports from it, and tools import from the command line only
      the conventions `cli/common.py` keeps (how an error is printed, how -m, -f and --tokens read).
    """
    commands = [m for m in MODULES if m.startswith("llama3_np.cli.") and m != "llama3_np.cli.common"]
    for m in commands:
        tree = ast.parse(MODULES[m].read_text())
        functions = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        logic = [f for f in functions if not COMMAND_FUNCTIONS.fullmatch(f)]
        logic += ["imports numpy"] if "numpy" in imports(m)[1] else []
        if m in NOT_YET_THIN:
            assert logic, f"{m} is thin now: take it off NOT_YET_THIN"
        else:
            assert not logic, f"{m}: {logic}: library logic belongs in the library"
    for m in MODULES:
        if not m.startswith("llama3_np.cli") and m != "llama3_np.__main__":
            assert not imports(m)[0] & set(commands), m
    for path in sorted((REPO / "tools").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("llama3_np.cli"):
                assert node.module == "llama3_np.cli.common", f"{path.relative_to(REPO)} imports {node.module}"


FLAG = re.compile(r"(?<![\w-])--[a-z][a-z-]+")


def test_the_library_neither_parses_flags_nor_names_them_in_errors():
    for m, path in MODULES.items():
        if m.startswith("llama3_np.cli"):
            continue
        tree = ast.parse(path.read_text())
        assert "argparse" not in imports(m)[1] | {n.split(".")[0] for n in imports(m)[0]}
        assert not any(isinstance(n, ast.Import) and any(a.name == "argparse" for a in n.names)
                       for n in ast.walk(tree)), m
        for node in ast.walk(tree):
            if isinstance(node, ast.Raise):
                for s in ast.walk(node):
                    if isinstance(s, ast.Constant) and isinstance(s.value, str) and FLAG.search(s.value):
                        pytest.fail(f"{path.relative_to(REPO)}:{node.lineno}: an error names the flag "
                                    f"{FLAG.search(s.value).group()}")


# ---------------------------------------------------------------------------------------------
# One fact, one place: the docs agree with the code that defines it.


def design_table(heading: str) -> list[list[str]]:
    """The rows of the first table after `## heading` in docs/DESIGN.md, cells stripped of backticks."""
    text = DESIGN.read_text()
    section = text[text.index(f"## {heading}\n"):]
    rows = []
    for line in section.splitlines()[1:]:
        if line.startswith("|"):
            rows.append([c.strip().strip("`") for c in line.strip("|").split("|")])
        elif rows:
            break
    return rows[2:]  # past the header and its rule


def test_design_stage_table_is_the_stage_contract():
    want = [[stages.EMBED.name, stages.EMBED.shape, stages.EMBED.operation]]
    want += [[f"layers.i.{s.name}", s.shape, s.operation] for s in stages.LAYER]
    want += [[s.name, s.shape, s.operation] for s in stages.HEAD]
    got = design_table("Stage contract")
    assert [r[0] for r in got] == [w[0] for w in want]
    for row, (name, shape, operation) in zip(got, want):
        assert row[1] == "[" + ", ".join(shape) + "]", name
        assert row[2].startswith(operation), name


def test_design_metadata_table_is_the_dump_metadata_and_every_dump_has_those_keys():
    assert [(r[0], r[1]) for r in design_table("Dump files")] == list(METADATA.items())
    from llama3_np.xcheck.dump import Inputs, dump_metadata
    from tests.helpers import tiny_config

    made = dump_metadata(tiny_config(), Inputs([1, 2], 3, [], 3), "float32", residency="float32")
    assert list(made) == [*METADATA, "residency"] and all(isinstance(v, str) for v in made.values())


def test_design_tokenizer_search_order_is_the_tokenizer_s():
    text = DESIGN.read_text()
    assert ", ".join(f"`{n}`" for n in TOKENIZER_FILES) in text


# Paths named in prose and code: each must exist (weights/ holds fetched assets, only its README is
# committed).
PATH = re.compile(r"(?<![\w/.-])((?:llama3_np|tests|tools|docs)/[\w./-]*\w|weights/README\.md|[A-Z]+\.md)")


def referring_files():
    yield from (REPO / "README.md", REPO / "BENCHMARKS.md", REPO / "Makefile", DESIGN, REPO / "weights" / "README.md")
    yield from (REPO / "tests" / "fixtures").glob("*/README.md")
    for folder in ("llama3_np", "tests", "tools"):
        yield from (p for p in (REPO / folder).rglob("*.py") if p != Path(__file__).resolve())


def test_every_file_named_in_docs_code_and_help_exists():
    missing = []
    for path in referring_files():
        for m in PATH.finditer(path.read_text()):
            target = m.group(1).rstrip(".")
            if "*" in target or "{" in target or target.endswith("/"):
                continue
            if not (REPO / target).exists() and not (path.parent / target).exists():
                missing.append(f"{path.relative_to(REPO)} names {target}")
    assert not missing, "\n".join(missing)


def test_every_design_reference_names_docs_design():
    for path in referring_files():
        text = path.read_text()
        for m in re.finditer(r"[\w/]*DESIGN\.md", text):
            assert m.group() in ("docs/DESIGN.md", "DESIGN.md") and (
                m.group() == "docs/DESIGN.md" or path == DESIGN), f"{path.relative_to(REPO)}: {m.group()}"


def test_every_name_tests_and_tools_import_from_llama3_np_exists():
    """A module moved or a function renamed shows here, without running the tools (which need torch)."""
    import importlib

    missing = []
    for path in sorted([*(REPO / "tools").glob("*.py"), *(REPO / "tests").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "llama3_np":
                module = importlib.import_module(node.module)
                missing += [f"{path.relative_to(REPO)}: {node.module}.{a.name}" for a in node.names
                            if not hasattr(module, a.name) and f"{node.module}.{a.name}" not in MODULES]
    assert not missing, "\n".join(missing)


def test_every_parameter_the_library_names_has_its_flag():
    from llama3_np.cli.common import FLAGS

    named = set()
    for m, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "ParameterError"
                    and isinstance(node.args[0], ast.Constant)):
                named.add(node.args[0].value)
    assert named == set(FLAGS), f"without a flag: {sorted(named - set(FLAGS))}, unused: {sorted(set(FLAGS) - named)}"


def test_every_package_folder_is_a_package_so_an_install_carries_it():
    folders = {p.parent for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts}
    assert not [f for f in folders if not (f / "__init__.py").is_file()]


def test_design_lists_the_commands_the_command_line_has():
    import argparse

    from llama3_np.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    listed = re.search(r"has them: (.*?) \(README", DESIGN.read_text(), re.S).group(1)
    assert re.findall(r"`([a-z-]+)`", listed) == list(sub.choices)


HTML_TAG = re.compile(r"</?[a-z][a-z0-9]*[\s>/]")


def test_the_walkthrough_page_is_a_template_not_python_strings():
    """The page's HTML is in `xcheck/walkthrough.html.jinja` (Jinja2, escaping every value): the
    module computes what the page shows and holds no markup."""
    path = MODULES["llama3_np.xcheck.walkthrough"]
    markup = [f"{path.relative_to(REPO)}:{node.lineno}: {node.value[:40]!r}" for node in ast.walk(ast.parse(path.read_text()))
              if isinstance(node, ast.Constant) and isinstance(node.value, str) and HTML_TAG.search(node.value)]
    assert not markup, "\n".join(markup)
    assert (path.parent / "walkthrough.html.jinja").is_file()


# A fact's telltale words: each fact is said in docs/DESIGN.md ("Numerical facts") and pointed to
# from the README, the Makefile, the code and the --help texts (fixture READMEs keep the records
# of the measurements themselves).
FACTS = {"compare's tolerance and how it was measured": ("2.1e-10", "15x"),
         "NumPy's float32 kernels differ between AVX2 and AVX-512": ("not correctly rounded",)}


def test_each_numerical_fact_is_said_once_in_design():
    places = [REPO / "README.md", REPO / "Makefile", *PACKAGE.rglob("*.py")]
    for fact, words in FACTS.items():
        assert all(w in DESIGN.read_text() for w in words), fact
        repeated = [f"{path.relative_to(REPO)} ({w})" for path in places for w in words if w in path.read_text()
                    and not (path.name == "model.py" and w == "not correctly rounded")]
        assert not repeated, f"{fact}: said again in {', '.join(repeated)}; point to docs/DESIGN.md instead"


def test_shared_facts_of_the_code_are_defined_once():
    """One Llama 3 split pattern, one rule for the ids that end a generation."""
    pattern = r"\p{N}{1,3}"  # Meta's Llama 3 pre-tokenizer splits numbers into runs of 1 to 3 digits
    defining = {m for m, path in MODULES.items() for node in ast.walk(ast.parse(path.read_text()))
                if isinstance(node, ast.Constant) and isinstance(node.value, str) and pattern in node.value}
    assert defining == {"llama3_np.text.tokenizer"}, defining
    rules = {m for m, path in MODULES.items() for node in ast.walk(ast.parse(path.read_text()))
             if isinstance(node, ast.FunctionDef) and "end_of_generation" in node.name}
    assert rules == {"llama3_np.text.tokenizer"}, rules
