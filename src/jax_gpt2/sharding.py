"""Many devices and many hosts: one mesh and Megatron-style weight placement (joining the processes is launch.py's job).

JAX already is the distributed engine: arrays carry a `NamedSharding` over a `Mesh`, `jax.jit`
partitions every computation to match (GSPMD) and inserts the collectives, and
`jax.distributed.initialize` joins processes on many hosts into one set of devices. This module
only says where each array lives:

    mesh (data, model)   "data" splits the batch (rows, windows, decode slots);
                         "model" splits every layer Megatron-style (tensor parallelism):
    c_attn   (D, 3D)  columns: q, k and v each split by heads     P(None, "model")
    c_fc     (D, F)   columns                                     P(None, "model")
    c_proj   (D, D)   rows (the heads' outputs)                   P("model", None)
    mlp proj (F, D)   rows                                        P("model", None)
    lm_head  (V, D)   rows (vocabulary entries), padded           P("model", None)
    wte, wpe, LayerNorms, output biases: replicated               P()
    KV cache (L, B, N, S, H): rows on "data", heads on "model"    P(None, "data", "model", None, None)

So a block needs two all-reduces of its (B, T, D) output per layer (after c_proj and after the
MLP) and nothing else; the logits come out split along V. Why lm_head is split and wte is not:
see `weight_specs`.

The fused c_attn matrix cannot be split by heads as it is stored, [q | k | v]: a plain column split
gives the first device all of q and part of k. `qkv_column_order` reorders its columns once at load
into one run [q_g | k_g | v_g] per "model" shard g (Megatron-LM's layout); `model.split_qkv`
reads them back, and the weights record the mesh (a static field) so it knows the grouping.

The CPU kernels (packed weights, the native decode attention) are not used on a mesh: a mesh
load does not pack, and the model takes XLA's dot and attention. The kernels work on whole,
unsharded matrices in one process's memory; XLA cannot partition an opaque custom call, so it
would gather every operand onto each device (the whole KV cache, every step) and run the kernel
on all of them. Running them per shard under `shard_map` is possible, but meshes exist for
accelerators, where the kernels never run; on CPU, one device with the kernels is the faster
choice (see README, "Many devices and many hosts").
"""

import dataclasses

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jax_gpt2.config import GPT2Config
from jax_gpt2.kvcache import KVCache
from jax_gpt2.weights import BlockWeights, GPT2Weights

AXES = ("data", "model")


def make_mesh(data: int = 1, model: int = 1, devices=None) -> Mesh:
    """A (data, model) mesh over the first data * model devices (default: every process's, `jax.devices()`).

    "model" is the inner axis, so one model group is consecutive devices: a process's devices are
    listed together, so tensor parallelism stays inside a host and only data parallelism crosses hosts.
    """
    for name, value in (("data", data), ("model", model)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise ValueError(f"mesh axis {name!r} must be an integer >= 1; got {value!r}")
    devices = list(jax.devices() if devices is None else devices)
    if data * model > len(devices):
        raise ValueError(
            f"a {data}x{model} mesh needs {data * model} devices but {len(devices)} are visible "
            "(on CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N set before JAX starts gives N; "
            "across processes, every process's devices count)"
        )
    grid = np.array(devices[: data * model], dtype=object).reshape(data, model)
    mesh = Mesh(grid, AXES, axis_types=(AxisType.Auto, AxisType.Auto))
    assert mesh.shape == {"data": data, "model": model}
    return mesh


def parse_mesh(text: str) -> tuple[int, int]:
    """'DATAxMODEL' (e.g. '2x2', '1x4') -> (data, model)."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(part.isdigit() for part in parts):
        raise ValueError(f"a mesh is DATAxMODEL, two positive integers such as 2x1 or 1x4; got {text!r}")
    data, model = int(parts[0]), int(parts[1])
    if data < 1 or model < 1:
        raise ValueError(f"mesh axes must be >= 1; got {text!r}")
    return data, model


def model_shards(mesh: Mesh | None) -> int:
    """How many devices split each layer (1 without a mesh)."""
    return 1 if mesh is None else mesh.shape["model"]


def data_shards(mesh: Mesh | None) -> int:
    """How many devices split the batch (1 without a mesh)."""
    return 1 if mesh is None else mesh.shape["data"]


def check_mesh_fits(config: GPT2Config, mesh: Mesh) -> None:
    """Whole heads and whole MLP columns per "model" shard, or a ValueError naming both numbers."""
    shards = model_shards(mesh)
    if config.n_head % shards != 0:
        raise ValueError(f"n_head={config.n_head} does not divide by the mesh's model axis ({shards})")
    if config.d_mlp % shards != 0:
        raise ValueError(f"n_inner={config.d_mlp} (the MLP width) does not divide by the mesh's model axis ({shards})")


def block_specs() -> BlockWeights:
    """Where each array of a block lives (see the module docstring for the scheme)."""
    replicated = P()
    return BlockWeights(
        ln1_scale_D=replicated, ln1_bias_D=replicated,
        qkv_w_DE=P(None, "model"), qkv_b_E=P("model"),
        attn_out_w_DD=P("model", None), attn_out_b_D=replicated,
        ln2_scale_D=replicated, ln2_bias_D=replicated,
        fc_w_DF=P(None, "model"), fc_b_F=P("model"),
        proj_w_FD=P("model", None), proj_b_D=replicated,
    )  # fmt: skip


def weight_specs(weights: GPT2Weights, mesh: Mesh) -> GPT2Weights:
    """A GPT2Weights of PartitionSpecs, one per array of `weights` as place_weights lays them out.

    The output projection is split along V on "model" (its own copy of wte, padded to whole shards
    when V does not divide, as GPT-2's 50257 never does): every decode step reads it whole, so
    split it is read 1/model of it per device; measured on forced host devices (README) a 1x4 mesh
    decoded B=8 at 21.9 tok/s split against 12.3 replicated. The embedding stays replicated:
    its gather reads B x T rows, and split it would cost an all-reduce for nothing.
    """
    assert weights.lm_head_DV is None, "packed weights are not placed on a mesh"
    assert weights.mesh is None, "already placed"
    split_head = model_shards(mesh) > 1 or weights.lm_head_VD is not None
    specs = GPT2Weights(
        wte_VD=P(), wpe_PD=P(), blocks=tuple(block_specs() for _ in weights.blocks),
        lnf_scale_D=P(), lnf_bias_D=P(), lm_head_VD=P("model", None) if split_head else None,
    )  # fmt: skip
    assert len(specs.blocks) == len(weights.blocks)
    return specs


def padded_lm_head(weights: GPT2Weights, shards: int) -> np.ndarray:
    """The output projection (V, D) with zero rows appended up to a multiple of `shards`.

    model.lm_logits drops the logits of the padding rows (it keeps the first wte_VD.shape[0]).
    """
    head_VD = np.asarray(weights.wte_VD if weights.lm_head_VD is None else weights.lm_head_VD)
    V, D = head_VD.shape
    padded_VD = np.zeros((-(-V // shards) * shards, D), head_VD.dtype)
    padded_VD[:V] = head_VD
    assert padded_VD.shape[0] % shards == 0
    return padded_VD


def qkv_column_order(config: GPT2Config, groups: int) -> np.ndarray:
    """order_E: the fused qkv columns regrouped, HF's [q | k | v] -> [q_1 k_1 v_1 | ... | q_Z k_Z v_Z],
    each q_g (k_g, v_g) the g-th run of whole heads; take it along the last axis (`w_DE[:, order_E]`,
    `b_E[order_E]`).

    Then a contiguous column split into Z shards gives shard g exactly its heads' q, k and v.
    """
    assert groups >= 1
    assert config.n_head % groups == 0
    E, N, H = 3 * config.n_embd, config.n_head, config.n_embd // config.n_head
    columns_3ZJH = np.arange(E).reshape(3, groups, N // groups, H)
    order_E = np.swapaxes(columns_3ZJH, 0, 1).reshape(E)
    assert order_E.shape == (E,)
    assert np.array_equal(np.sort(order_E), np.arange(E))  # a permutation: no column lost or doubled
    return order_E


def place_weights(weights: GPT2Weights, config: GPT2Config, mesh: Mesh) -> GPT2Weights:
    """Every array of (unpacked) weights put on the mesh with its NamedSharding; c_attn regrouped.

    Works alike in one process and in many: each process holds the whole host array and hands
    over only the pieces that live on its own devices (`jax.make_array_from_callback`).
    """
    if weights.lm_head_DV is not None:
        raise ValueError("packed weights (for the CPU kernels) cannot go on a mesh: load them with pack=False")
    check_mesh_fits(config, mesh)
    groups = model_shards(mesh)

    def regrouped(w: BlockWeights) -> BlockWeights:
        order_E = qkv_column_order(config, groups)
        qkv_w_DE, qkv_b_E = np.asarray(w.qkv_w_DE)[:, order_E], np.asarray(w.qkv_b_E)[order_E]
        return dataclasses.replace(w, qkv_w_DE=qkv_w_DE, qkv_b_E=qkv_b_E)

    specs = weight_specs(weights, mesh)
    head = None if specs.lm_head_VD is None else padded_lm_head(weights, groups)
    host = dataclasses.replace(weights, blocks=tuple(regrouped(w) for w in weights.blocks), lm_head_VD=head)
    placed = jax.tree.map(lambda x, spec: put(x, mesh, spec), host, specs)
    placed = dataclasses.replace(placed, mesh=mesh)
    assert not placed.use_kernels, "the CPU kernels do not run on a mesh"
    assert placed.blocks[0].qkv_w_DE.sharding.spec == P(None, "model")
    assert placed.wte_VD.dtype == weights.wte_VD.dtype
    return placed


def put(x, mesh: Mesh, spec: P) -> jax.Array:
    """A host array (the same on every process) as one global array on the mesh, laid out by spec."""
    host = np.asarray(x)
    sharding = NamedSharding(mesh, spec)
    array = jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
    assert array.shape == host.shape
    assert array.sharding == sharding
    return array


def rows_spec(ndim: int, rows: int, mesh: Mesh) -> P:
    """Split the leading (batch) axis over "data" when it divides; replicate it otherwise (one row)."""
    assert ndim >= 1
    assert rows >= 1
    return P("data", *[None] * (ndim - 1)) if rows % data_shards(mesh) == 0 else P()


def put_rows(x, mesh: Mesh) -> jax.Array:
    """A host array whose axis 0 is the batch, split over "data"."""
    host = np.asarray(x)
    return put(host, mesh, rows_spec(host.ndim, host.shape[0], mesh))


def padded_rows(rows: int, mesh: Mesh | None) -> int:
    """The batch rounded up to a multiple of the "data" axis."""
    assert rows >= 1
    shards = data_shards(mesh)
    padded = -(-rows // shards) * shards
    assert padded % shards == 0
    return padded


def pad_rows(x, rows: int) -> np.ndarray:
    """Axis 0 grown to `rows` by repeating the last row: a copy of a real row finishes when it does,
    so padding never keeps a decode loop running longer, and it is dropped from every result."""
    host = np.asarray(x)
    assert 1 <= host.shape[0] <= rows
    padded = np.concatenate([host, np.repeat(host[-1:], rows - host.shape[0], axis=0)])
    assert padded.shape[0] == rows
    return padded


def fetch(array: jax.Array) -> np.ndarray:
    """A global array as one host numpy array on every process (gathered if other processes hold parts)."""
    if array.is_fully_addressable:
        return np.asarray(array)
    gathered = np.asarray(multihost_utils.process_allgather(array, tiled=True))
    assert gathered.shape == array.shape
    return gathered


def cache_specs(cache: KVCache, mesh: Mesh) -> KVCache:
    """Rows on "data" (when the batch divides), heads on "model"."""
    B, cache_rows = cache.start_B.shape[0], cache.k_LBNSH.shape[1]  # a server's cache may hold more rows than B
    rows = "data" if B % data_shards(mesh) == 0 else None
    kv_rows = "data" if cache_rows % data_shards(mesh) == 0 else None
    kv = P(None, kv_rows, "model", None, None)
    return KVCache(k_LBNSH=kv, v_LBNSH=kv, start_B=P(rows), end_B=P(rows))


def constrain_cache(cache: KVCache, mesh: Mesh | None) -> KVCache:
    """Inside jit: pin the cache to `cache_specs` (a no-op without a mesh), so XLA never has to guess."""
    if mesh is None:
        return cache
    shardings = jax.tree.map(lambda spec: NamedSharding(mesh, spec), cache_specs(cache, mesh))
    return jax.lax.with_sharding_constraint(cache, shardings)


def __getattr__(name: str):
    """`jax_gpt2.sharding.initialize` moved to `jax_gpt2.launch.initialize` (2026-12-06): the old name
    still works, with a DeprecationWarning, so scripts written against it keep running. launch is
    imported only when the old name is used: the library itself never takes over the process."""
    if name != "initialize":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import warnings

    from jax_gpt2.launch import initialize

    warnings.warn("jax_gpt2.sharding.initialize is now jax_gpt2.launch.initialize", DeprecationWarning, stacklevel=2)
    return initialize
