"""The names the issues promise users, importable from the package itself, without torch."""

import subprocess
import sys


def test_the_documented_calls_import_from_jax_gpt2():
    from jax_gpt2 import (  # noqa: F401
        GPT2Config,
        empty_cache,
        generate,
        gpt2_forward,
        gpt2_forward_cached,
        load_config,
        load_weights,
        perplexity,
        stream_generate,
    )

    assert GPT2Config().n_layer == 12


def test_importing_the_library_does_not_import_torch_or_transformers():
    code = "import sys, jax_gpt2, jax_gpt2.cli; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def documented_members() -> list[str]:
    """Every object the API reference pages name (`::: module` and their `members: [...]` lists)."""
    import re
    from pathlib import Path

    names = []
    for page in sorted((Path(__file__).parents[1] / "docs" / "reference").glob("*.md")):
        module = None
        for line in page.read_text().splitlines():
            if line.startswith("::: "):
                module = line[4:].strip()
                names.append(module)
            elif (found := re.match(r"\s+members: \[(.*)\]", line)) and module:
                names += [f"{module}.{name.strip()}" for name in found.group(1).split(",")]
    assert len(names) > 20, names
    return names


def test_every_public_name_and_every_documented_object_has_a_docstring():
    import importlib

    import jax_gpt2

    objects = {f"jax_gpt2.{name}": getattr(jax_gpt2, name) for name in jax_gpt2.__all__ if name != "PRESETS"}
    for dotted in documented_members():
        module_name, _, attribute = dotted.rpartition(".")
        try:
            objects[dotted] = importlib.import_module(dotted)
        except ModuleNotFoundError:
            objects[dotted] = getattr(importlib.import_module(module_name), attribute)
    missing = sorted(name for name, obj in objects.items() if not has_own_docstring(obj))
    assert missing == []


def has_own_docstring(obj) -> bool:
    """A docstring written for this object: not inherited, not the one dataclasses make up ("Name(field=...)")."""
    doc = (getattr(obj, "__doc__", None) or "").strip()
    return bool(doc) and not doc.startswith(f"{getattr(obj, '__name__', '')}(")
