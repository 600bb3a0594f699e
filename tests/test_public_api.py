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
