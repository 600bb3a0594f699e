"""The package's layout is its architecture: the model and inference modules never reach into the
developer tools (tools/), and the library outside serve/ never imports the web stack."""

import ast
from pathlib import Path

import pytest

import jax_gpt2
from jax_gpt2 import launch, sharding

PACKAGE = Path(jax_gpt2.__file__).parent


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def library_files() -> list[Path]:
    """Every module but the CLI (which offers the tools) and the tools themselves."""
    files = [p for p in PACKAGE.rglob("*.py") if "tools" not in p.relative_to(PACKAGE).parts and p.name != "cli.py"]
    assert len(files) > 15, files
    return files


def test_the_library_never_imports_the_tools():
    offenders = {str(p.relative_to(PACKAGE)): sorted(n for n in imported_modules(p) if n.startswith("jax_gpt2.tools"))
                 for p in library_files()}  # fmt: skip
    assert {path: names for path, names in offenders.items() if names} == {}


def test_only_serve_imports_the_web_stack():
    web = ("fastapi", "uvicorn", "starlette", "prometheus_client")
    outside = [p for p in library_files() if "serve" not in p.relative_to(PACKAGE).parts]
    offenders = {str(p.relative_to(PACKAGE)): sorted(n for n in imported_modules(p) if n.split(".")[0] in web)
                 for p in outside}  # fmt: skip
    assert {path: names for path, names in offenders.items() if names} == {}


def test_the_tools_folder_holds_the_tools_and_the_flat_folder_holds_the_model():
    tools = sorted(p.name for p in (PACKAGE / "tools").glob("*.py"))
    assert tools == [
        "__init__.py", "bench.py", "bench_speculate.py", "compare.py", "llama_cpp.py", "random_model.py", "remote.py",
        "runpod.py", "ssh.py",
    ]  # fmt: skip
    flat = sorted(p.name for p in PACKAGE.glob("*.py"))
    for model_module in ("config.py", "weights.py", "loader.py", "layers.py", "kvcache.py", "model.py"):
        assert model_module in flat
    assert not {"bench.py", "remote.py", "native.py", "packed.py", "engine.py", "server.py"} & set(flat)


def imports_outside(path: Path, function_name: str) -> set[str]:
    """The modules `path` imports anywhere but inside the function called function_name."""
    tree = ast.parse(path.read_text())
    inside = {id(node) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and f.name == function_name
              for node in ast.walk(f)}  # fmt: skip
    return {node.module for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module and id(node) not in inside}  # fmt: skip


def test_only_the_command_line_takes_over_the_process():
    """launch.py owns process-wide things (stderr, exit, a watchdog); the library never imports it,
    but for sharding's module __getattr__, which forwards the old name sharding.initialize there."""
    offenders = [str(p.relative_to(PACKAGE)) for p in library_files()
                 if any(n.startswith("jax_gpt2.launch") for n in imported_modules(p))]  # fmt: skip
    assert offenders == ["sharding.py"]
    assert "jax_gpt2.launch" not in imports_outside(PACKAGE / "sharding.py", "__getattr__")
    cli = imported_modules(PACKAGE / "cli.py")
    assert "jax_gpt2.launch" in cli


def test_the_old_name_sharding_initialize_still_reaches_launch_with_a_warning():
    with pytest.warns(DeprecationWarning, match="jax_gpt2.launch.initialize"):
        assert sharding.initialize is launch.initialize
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        sharding.nothing_here  # noqa: B018


def test_only_constraints_imports_the_grammar_engine():
    """llguidance stays behind constraints.py: the decode step sees only a mask of allowed tokens."""
    offenders = sorted(str(p.relative_to(PACKAGE)) for p in library_files()
                       if any(n.split(".")[0] == "llguidance" for n in imported_modules(p)) and p.name != "constraints.py")  # fmt: skip
    assert offenders == []


def test_the_wire_format_is_a_leaf_of_the_server():
    """protocol.py (request and response shapes) and events.py (what the engine sends back) import
    nothing of the engine, the slots or the HTTP layer: vLLM's split, so each reads alone."""
    for leaf in ("protocol.py", "events.py"):
        names = imported_modules(PACKAGE / "serve" / leaf)
        inward = sorted(n for n in names if n.startswith(("jax_gpt2.serve.engine", "jax_gpt2.serve.slots", "jax_gpt2.serve.routes")))
        assert inward == [], leaf
