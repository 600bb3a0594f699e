"""Hub name or local folder -> GPT2Config and GPT2Weights.

Files come from the folder itself, or from the Hugging Face hub through `huggingface_hub` (cached).
Formats, in order of preference: model.safetensors (or its sharded index), pytorch_model.bin
(read by torch with weights_only=True; torch is optional), model.npz. Keys may carry the
`transformer.` prefix (GPT2LMHeadModel) or not (GPT2Model); every expected key must be there with
the shape the config implies, and no unknown key may be left over.
"""

import json
import os
import re
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jax_gpt2 import kernels
from jax_gpt2.config import GPT2Config, config_from_file
from jax_gpt2.sharding import check_mesh_fits, place_weights
from jax_gpt2.weights import PACKED_DTYPES, BlockWeights, GPT2Weights, PackedMatrix, pack_weights, round_weights

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_FILE = "model.safetensors"
TORCH_FILE = "pytorch_model.bin"
NPZ_FILE = "model.npz"
_HUB_PATTERNS = ["config.json", "*.safetensors", SAFETENSORS_INDEX, "tokenizer.json", "vocab.json", "merges.txt"]


class ModelNotFoundError(FileNotFoundError):
    """The name is neither a folder here nor a model that the hub (or its local cache) can give."""


# "gpt2" or "openai-community/gpt2": anything else that is not a folder here is a mistyped path.
_HUB_ID = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*(/[A-Za-z0-9_-][A-Za-z0-9_.-]*)?$")


def resolve_model_dir(name_or_path: str | os.PathLike) -> Path:
    """A local folder as is; a hub name ("gpt2", "openai-community/gpt2") downloaded into the HF cache."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    if path.exists() or not _HUB_ID.match(name):
        raise ModelNotFoundError(f"{name}: no such model folder")
    return _download_from_hub(name)


def _download_from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    def fetch(patterns: list[str], local_only: bool) -> Path:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=local_only))

    try:
        folder = fetch(_HUB_PATTERNS, local_only=True)
    except Exception:  # not in the cache: any failure here just means "try the network"
        folder = None
    if folder is None or not _has_weights(folder):
        try:
            folder = fetch(_HUB_PATTERNS, local_only=False)
            if not _has_weights(folder):
                folder = fetch([TORCH_FILE, "*.npz"], local_only=False)
        except Exception as error:
            raise ModelNotFoundError(
                f"could not get {repo_id!r} from the Hugging Face hub ({type(error).__name__}). "
                "Offline, pass a local folder instead: --model ./my-gpt2, where the folder holds config.json "
                "and model.safetensors (or pytorch_model.bin / model.npz), e.g. one written by "
                "transformers' save_pretrained"
            ) from None
    return folder


def _has_weights(folder: Path) -> bool:
    names = (SAFETENSORS_FILE, SAFETENSORS_INDEX, TORCH_FILE, NPZ_FILE)
    return any((folder / name).is_file() for name in names)


def load_config(name_or_path: str | os.PathLike) -> GPT2Config:
    """The GPT2Config of a hub model or a local folder holding config.json."""
    folder = resolve_model_dir(name_or_path)
    config = config_from_file(folder / "config.json")
    assert isinstance(config, GPT2Config)
    assert config.n_embd % config.n_head == 0
    return config


def load_weights(
    name_or_path: str | os.PathLike, dtype=jnp.float32, config: GPT2Config | None = None, pack: bool | None = None,
    mesh: Mesh | None = None, bf16_dot: bool = False, int8_dot: bool = False, huge_pages: bool = True,
) -> GPT2Weights:  # fmt: skip
    """Every parameter of a hub model or local folder, checked against its config.

    dtype is float32, bfloat16 or int8 (weight-only: activations stay float32). `pack` says whether
    the CPU kernels run this model, decided here once and kept in the weights (use_kernels):
    None (the default) where they build and run (kernels/native.py), True to insist (a ValueError
    where they cannot), False for XLA alone. With the kernels, the block matrices and lm_head
    become PackedMatrix tiles of `dtype`. Without them, on a CPU, a narrow dtype is widened to
    float32 once, here, with a warning: the values stay the rounded ones, but XLA's CPU dot would
    widen narrow weights again before every product (see `weights_without_kernels`).

    With a mesh of more than one device (sharding.make_mesh) the arrays are placed on it,
    Megatron-style, and never packed (sharding.py says why); a one-device mesh changes nothing.

    bf16_dot=True (dtype bfloat16 only; off by default) is a prefill and scoring option: matmuls of
    many rows (at least the dot threshold, kernels.native.dot_min_rows(); not batch-1
    decode) round the activations to bfloat16, as transformers' bf16 path does, and multiply by the
    host's bf16 dot-product instructions (AVX512_BF16's vdpbf16ps), nearly twice as fast. Logits then
    move by the activation rounding (docs/guides/kernels.md gives the measured error) and a row's
    logits depend on how many rows share its call: batch invariance is lost. Refused with a
    ValueError where it cannot run (no kernels, a mesh, a CPU or build without AVX512_BF16), rather
    than silently meaning the exact path. The default weight-only bf16 path stays exact.

    int8_dot=True (dtype int8 only; off by default) is the same kind of option for int8 weights:
    matmuls of many rows quantize the activations to int8 (symmetric, per row and block of 256
    inputs) and multiply by AVX512_VNNI's integer dot products (vpdpbusd), as llama.cpp's q8_0
    does, about four times the float32 FMA rate. Logits move by the activation rounding
    (docs/guides/gemm.md gives the measured error and the perplexity change); a row's result depends
    only on itself from the dot threshold on. Refused where it cannot run (no kernels, a mesh, a CPU
    or build without AVX512_VNNI). The default weight-only int8 path stays the reference.
    """
    folder = resolve_model_dir(name_or_path)
    if config is None:
        config = config_from_file(folder / "config.json")
    if mesh is not None and mesh.size > 1:
        check_mesh_fits(config, mesh)  # before reading gigabytes
        if pack or bf16_dot or int8_dot or jnp.dtype(dtype) == jnp.int8:
            raise ValueError(
                "weights on a mesh are not packed for the CPU kernels: use float32 or bfloat16, pack=None, "
                "bf16_dot=False, int8_dot=False"
            )
        state = normalize_keys(read_state_dict(folder))
        return place_weights(weights_for_dtype(state, config, dtype, pack=False), config, mesh)
    check_dot_options(dtype, pack, bf16_dot, int8_dot)  # before reading gigabytes
    state = normalize_keys(read_state_dict(folder))
    return weights_for_dtype(state, config, dtype, pack, bf16_dot, int8_dot, huge_pages)


def choose_kernels(pack: bool | None) -> bool:
    """Whether a model loaded now runs on the CPU kernels: the one place the process is asked."""
    if pack is None:
        return kernels.kernels_available()
    if pack and not kernels.kernels_available():
        raise ValueError(
            "pack=True asks for the CPU kernels, which do not run here (they need a C++ compiler, a CPU "
            "backend and a supported CPU; JAX_GPT2_NATIVE=0 turns them off): pass pack=None or pack=False"
        )
    return bool(pack)


def check_dot_options(dtype, pack: bool | None, bf16_dot: bool, int8_dot: bool) -> None:
    """Raises ValueError, saying why, where bf16_dot=True or int8_dot=True cannot take its dot path."""
    if bf16_dot:
        check_dot_option("bf16_dot", jnp.bfloat16, dtype, pack, kernels.native.has_bf16_dot, "AVX512_BF16 (vdpbf16ps)")
    if int8_dot:
        check_dot_option("int8_dot", jnp.int8, dtype, pack, kernels.native.has_int8_dot, "AVX512_VNNI (vpdpbusd)")


def check_dot_option(option: str, tiles, dtype, pack: bool | None, build_has_it, instructions: str) -> None:
    """Raises ValueError where the dot option `option` (for `tiles` weights) cannot run."""
    tiles_name = jnp.dtype(tiles).name
    if jnp.dtype(dtype) != jnp.dtype(tiles):
        raise ValueError(f"{option}=True multiplies {tiles_name} weights: pass dtype={tiles_name} (got {jnp.dtype(dtype).name})")
    if pack is False or not kernels.kernels_available():
        raise ValueError(f"{option}=True is a path of the CPU kernels, which do not run here (or pack=False)")
    if not build_has_it():
        raise ValueError(
            f"{option}=True needs a CPU with {instructions}; the kernels here are built for "
            f"{kernels.kernels_isa()} without it: drop {option} (the default {tiles_name} path is exact anyway)"
        )


def weights_for_dtype(
    state: dict[str, np.ndarray], config: GPT2Config, dtype, pack: bool | None, bf16_dot: bool = False,
    int8_dot: bool = False, huge_pages: bool = True,
) -> GPT2Weights:  # fmt: skip
    """weights_from_state_dict in `dtype`: packed for the kernels, or in the form XLA runs best here;
    bf16_dot, int8_dot and huge_pages as load_weights takes them (checked there)."""
    dtype = jnp.dtype(dtype)
    if dtype.name not in PACKED_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(PACKED_DTYPES)}; got {dtype.name}")
    check_dot_options(dtype, pack, bf16_dot, int8_dot)
    use_kernels = choose_kernels(pack)
    float32 = weights_from_state_dict(state, config, jnp.float32)
    if not use_kernels:
        return weights_without_kernels(float32, dtype, jax.default_backend())
    weights = pack_weights(float32, dtype, use_kernels=True, dot=bf16_dot or int8_dot)
    if huge_pages:
        collapse_weight_pages(weights)
    assert weights.use_kernels
    assert weights.bf16_dot == bf16_dot
    assert weights.int8_dot == int8_dot
    return weights


def collapse_weight_pages(weights: GPT2Weights) -> int:
    """Move the packed matrices onto 2 MiB pages (pages.advise_huge_pages), as load_weights does
    unless told not to; safe while the model runs. Returns how many matrices took it."""
    return sum(kernels.advise_huge_pages(packed.tiles_GIC) for packed in packed_matrices(weights))


def packed_matrices(weights: GPT2Weights) -> list[PackedMatrix]:
    leaves = jax.tree.leaves(weights, is_leaf=lambda leaf: isinstance(leaf, PackedMatrix))
    return [leaf for leaf in leaves if isinstance(leaf, PackedMatrix)]


def weights_without_kernels(float32: GPT2Weights, dtype, backend: str) -> GPT2Weights:
    """The model for XLA alone, from its float32 weights.

    On a CPU, XLA's dot reads a float32 matrix at ~40 GB/s but widens a bf16 or int8 one to a
    float32 copy first, every product (~1.6 GB/s measured): a narrow model would decode several
    times slower than the float32 one. So the weights are widened once, here, keeping the values
    the narrow dtype rounds them to (round_weights), and a warning says the narrow dtype saves
    nothing on this machine. On an accelerator XLA's own bf16 dot is fast and int8 tiles are
    dequantized inside the fused dot: both stay narrow.
    """
    assert not float32.use_kernels
    if dtype == jnp.float32:
        return float32
    if backend == "cpu":
        warnings.warn(
            f"jax-gpt2: {dtype.name} weights widened to float32 at load: without the CPU kernels XLA "
            f"would widen them before every matmul, so here {dtype.name} saves neither time nor memory "
            f"(the values are still the {dtype.name}-rounded ones)",
            stacklevel=4,  # the caller of load_weights
        )
        return round_weights(float32, dtype)
    if dtype == jnp.int8:
        return pack_weights(float32, dtype, use_kernels=False)
    return jax.tree.map(lambda array: array.astype(dtype), float32)


def read_state_dict(folder: Path) -> dict[str, np.ndarray]:
    """The raw tensors of the first format present in the folder, as float32 numpy arrays."""
    assert folder.is_dir()
    if (folder / SAFETENSORS_INDEX).is_file():
        shards = sorted(set(json.loads((folder / SAFETENSORS_INDEX).read_text())["weight_map"].values()))
        state: dict[str, np.ndarray] = {}
        for shard in shards:
            state.update(_read_safetensors(folder / shard))
        return state
    if (folder / SAFETENSORS_FILE).is_file():
        return _read_safetensors(folder / SAFETENSORS_FILE)
    if (folder / TORCH_FILE).is_file():
        return _read_torch_bin(folder / TORCH_FILE)
    npz_files = [folder / NPZ_FILE] if (folder / NPZ_FILE).is_file() else sorted(folder.glob("*.npz"))
    if len(npz_files) == 1:
        return _read_npz(npz_files[0])
    raise FileNotFoundError(
        f"{folder} holds no weights: expected {SAFETENSORS_FILE}, {SAFETENSORS_INDEX}, {TORCH_FILE} or {NPZ_FILE}"
    )


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    if not path.is_file():
        raise FileNotFoundError(f"missing weights shard {path}")
    try:
        return {key: np.asarray(value, np.float32) for key, value in load_file(path).items()}
    except (SafetensorError, OSError, ValueError) as error:
        if "bfloat16" in str(error) or "BF16" in str(error):
            return _read_safetensors_via_torch(path)
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {error}") from None


def _read_safetensors_via_torch(path: Path) -> dict[str, np.ndarray]:
    # numpy has no bfloat16: a bf16 checkpoint is read through torch and widened to float32.
    torch = _import_torch(path)
    from safetensors.torch import load_file

    return {key: value.to(torch.float32).numpy() for key, value in load_file(path).items()}


def _import_torch(path: Path):
    try:
        import torch
    except ImportError:
        raise ValueError(
            f"reading {path} needs PyTorch, which is not installed: `uv sync --extra torch` "
            "(or `pip install 'jax-gpt2[torch]'`), or convert the checkpoint to model.safetensors"
        ) from None
    return torch


def _read_torch_bin(path: Path) -> dict[str, np.ndarray]:
    torch = _import_torch(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for a truncated or corrupt pickle
        raise ValueError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?): {error}") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict; got {type(state).__name__}")
    return {key: value.detach().to(torch.float32).numpy() for key, value in state.items()}


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {key: np.asarray(npz[key], np.float32) for key in npz.files}
    except Exception as error:  # zipfile and numpy raise several types for a truncated archive
        raise ValueError(f"{path} is not a readable .npz archive (truncated or corrupt?): {error}") from None


# Buffers transformers keeps in old checkpoints: the causal mask and its fill value, never parameters.
_BUFFER_KEY = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")


def normalize_keys(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Drop the `transformer.` prefix (GPT2LMHeadModel) and the known non-parameter buffers."""
    assert isinstance(state, dict)
    normalized = {}
    for key, value in state.items():
        bare = key.removeprefix("transformer.")
        if _BUFFER_KEY.match(bare):
            continue
        if bare in normalized:
            raise ValueError(f"checkpoint holds {bare!r} both with and without the 'transformer.' prefix")
        normalized[bare] = value
    assert all(not key.startswith("transformer.") for key in normalized)
    return normalized


def expected_shapes(config: GPT2Config) -> dict[str, tuple[int, ...]]:
    """Every parameter key of a GPT2Model checkpoint (no prefix) with the shape the config implies."""
    D, F, V, P = config.n_embd, config.d_mlp, config.vocab_size, config.n_positions
    shapes: dict[str, tuple[int, ...]] = {"wte.weight": (V, D), "wpe.weight": (P, D)}
    for i in range(config.n_layer):
        layer = {
            "ln_1.weight": (D,), "ln_1.bias": (D,),
            "attn.c_attn.weight": (D, 3 * D), "attn.c_attn.bias": (3 * D,),
            "attn.c_proj.weight": (D, D), "attn.c_proj.bias": (D,),
            "ln_2.weight": (D,), "ln_2.bias": (D,),
            "mlp.c_fc.weight": (D, F), "mlp.c_fc.bias": (F,),
            "mlp.c_proj.weight": (F, D), "mlp.c_proj.bias": (D,),
        }  # fmt: skip
        shapes.update({f"h.{i}.{name}": shape for name, shape in layer.items()})
    shapes.update({"ln_f.weight": (D,), "ln_f.bias": (D,)})
    return shapes


def check_state_dict(state: dict[str, np.ndarray], config: GPT2Config) -> None:
    """Every expected key present with its config shape; nothing unknown left over."""
    expected = expected_shapes(config)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ValueError(f"checkpoint is missing {len(missing)} key(s), first {missing[0]!r}: {missing[:5]}")
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise ValueError(f"{key!r} has shape {tuple(state[key].shape)} but the config implies {shape}")
    unknown = sorted(set(state) - set(expected) - {"lm_head.weight"})
    if unknown:
        raise ValueError(f"checkpoint has {len(unknown)} unknown key(s) for GPT-2: {unknown[:5]}")
    if "lm_head.weight" in state and state["lm_head.weight"].shape != expected["wte.weight"]:
        shape = tuple(state["lm_head.weight"].shape)
        raise ValueError(f"'lm_head.weight' has shape {shape} but the config implies {expected['wte.weight']}")
    if not config.tie_word_embeddings and "lm_head.weight" not in state:
        raise ValueError("config unties the embeddings (tie_word_embeddings=false) but the checkpoint has no lm_head.weight")


def weights_from_state_dict(state: dict[str, np.ndarray], config: GPT2Config, dtype=jnp.float32) -> GPT2Weights:
    """Convert to `dtype` device arrays, one BlockWeights per layer."""
    check_state_dict(state, config)

    def block(i: int) -> BlockWeights:
        def array(name: str) -> jnp.ndarray:
            return jnp.asarray(state[f"h.{i}.{name}"], dtype)

        return BlockWeights(
            ln1_scale_D=array("ln_1.weight"), ln1_bias_D=array("ln_1.bias"),
            qkv_w_DE=array("attn.c_attn.weight"), qkv_b_E=array("attn.c_attn.bias"),
            attn_out_w_DD=array("attn.c_proj.weight"), attn_out_b_D=array("attn.c_proj.bias"),
            ln2_scale_D=array("ln_2.weight"), ln2_bias_D=array("ln_2.bias"),
            fc_w_DF=array("mlp.c_fc.weight"), fc_b_F=array("mlp.c_fc.bias"),
            proj_w_FD=array("mlp.c_proj.weight"), proj_b_D=array("mlp.c_proj.bias"),
        )  # fmt: skip

    weights = GPT2Weights(
        wte_VD=jnp.asarray(state["wte.weight"], dtype),
        wpe_PD=jnp.asarray(state["wpe.weight"], dtype),
        blocks=tuple(block(i) for i in range(config.n_layer)),
        lnf_scale_D=jnp.asarray(state["ln_f.weight"], dtype),
        lnf_bias_D=jnp.asarray(state["ln_f.bias"], dtype),
        lm_head_VD=jnp.asarray(state["lm_head.weight"], dtype) if uses_own_lm_head(state, config) else None,
    )
    assert len(weights.blocks) == config.n_layer
    assert weights.wte_VD.shape == (config.vocab_size, config.n_embd)
    return weights


def uses_own_lm_head(state: dict[str, np.ndarray], config: GPT2Config) -> bool:
    """Whether the output projection is lm_head.weight rather than wte.

    transformers (5.x) ties them when the config says so, except that a stored lm_head.weight
    whose values differ from wte is kept (it warns "will NOT tie them"): we do the same.
    """
    if "lm_head.weight" not in state:
        assert config.tie_word_embeddings, "check_state_dict rejects an untied config without lm_head"
        return False
    return not config.tie_word_embeddings or not np.array_equal(state["lm_head.weight"], state["wte.weight"])
