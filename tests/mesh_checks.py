"""Every mesh shape against one device, on four CPU devices.

`test_sharding.test_every_mesh_shape_matches_one_device` runs this file in its own pytest process
with XLA_FLAGS=--xla_force_host_platform_device_count=4: the flag must be set before JAX starts,
and the main test process already runs JAX on one device. (Not named test_*.py, so a plain
`pytest` run does not collect it on one device.)

"One device" is what a user gets without a mesh: packed weights and the CPU kernels where they
run. The mesh runs XLA's dot on unpacked weights, so the two differ by float32 rounding only.
"""

import dataclasses

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from checkpoints import hf_config, random_hf_model, save_safetensors
from jax_gpt2 import empty_cache, generate, gpt2_forward, gpt2_forward_cached, load_config, load_weights, perplexity
from jax_gpt2 import stream_generate
from jax_gpt2.sampling import SamplingSettings
from jax_gpt2.serve.engine import Engine, SequenceRequest
from jax_gpt2.tools.random_model import train_tokenizer
from jax_gpt2.sharding import block_specs, make_mesh
from jax_gpt2.tokenizer import load_tokenizer

assert jax.device_count() == 4, "run through test_sharding.py, which sets XLA_FLAGS for four host devices"

MESHES = [(1, 2), (2, 1), (2, 2), (1, 4)]  # (data, model)
# Four heads and F = 128 divide by every model axis above. The vocabulary is the trained tokenizer's.
SHAPE = dict(n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
PROMPTS = [[5, 17, 3], [9] * 11, [42], [7, 8, 9, 10, 11, 12]]  # ragged; 3 of them do not divide by 2
# The perplexity contract: the same windows, the same float64 sums; float32 rounding in the logits moves
# the mean NLL by ~1e-8 here.
PERPLEXITY_RELATIVE = 1e-6


@dataclasses.dataclass(frozen=True)
class Model:
    folder: object
    hf_model: object
    config: object
    weights: object  # one device, as load_weights gives it


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Model:
    folder = tmp_path_factory.mktemp("mesh-model")
    vocab_size = train_tokenizer(folder, 299)  # odd: a split lm_head needs padding rows
    assert vocab_size % 2 == 1
    hf_model = random_hf_model(hf_config(**SHAPE, vocab_size=vocab_size), std=0.3)
    save_safetensors(hf_model, folder)
    return Model(folder, hf_model, load_config(folder), load_weights(folder))


@pytest.fixture(scope="module", params=MESHES, ids=[f"{d}x{m}" for d, m in MESHES])
def placed(request, model):
    """The model's weights loaded onto a (data, model) mesh."""
    return load_weights(model.folder, mesh=make_mesh(*request.param))


def shards(mesh) -> tuple[int, int]:
    return mesh.shape["data"], mesh.shape["model"]


def test_every_weight_has_its_megatron_sharding(placed):
    expected = block_specs()
    for block in placed.blocks:
        for field in dataclasses.fields(block):
            assert getattr(block, field.name).sharding.spec == getattr(expected, field.name), field.name
    if placed.mesh.shape["model"] > 1:  # lm_head split along V, its rows padded to whole shards
        assert placed.lm_head_VD.sharding.spec == P("model", None)
        assert placed.lm_head_VD.shape[0] == -(-placed.wte_VD.shape[0] // placed.mesh.shape["model"]) * placed.mesh.shape["model"]
    else:  # nothing to split: lm_head stays tied to wte
        assert placed.lm_head_VD is None
    for array in (placed.wte_VD, placed.wpe_PD, placed.lnf_scale_D, placed.lnf_bias_D):
        assert array.sharding.spec == P()
        assert array.sharding.is_fully_replicated
    assert placed.lm_head_DV is None  # a mesh load does not pack
    assert placed.mesh is not None


def test_each_model_shard_holds_whole_heads_of_q_k_and_v(placed, model):
    """Device g of the model axis holds heads [g N/M, (g+1) N/M) of q, of k and of v, nothing else."""
    D, M = model.config.n_embd, shards(placed.mesh)[1]
    hf_w_DE = model.hf_model.transformer.h[0].attn.c_attn.weight.detach().numpy()
    q_DD, k_DD, v_DD = np.split(hf_w_DE, 3, axis=1)
    width = D // M
    for shard in placed.blocks[0].qkv_w_DE.addressable_shards:
        g = (shard.index[1].start or 0) // (3 * width)
        columns = slice(g * width, (g + 1) * width)
        expected = np.concatenate([q_DD[:, columns], k_DD[:, columns], v_DD[:, columns]], axis=1)
        np.testing.assert_array_equal(np.asarray(shard.data), expected)


def test_forward_matches_one_device(placed, model, assert_matches_transformers):
    ids_BT = np.random.default_rng(0).integers(0, model.config.vocab_size, (4, 24))
    reference_BTV = gpt2_forward(ids_BT, model.weights, model.config)
    assert_matches_transformers(gpt2_forward(ids_BT, placed, model.config), reference_BTV)


def decode_greedily(weights, config, steps: int) -> tuple[list[np.ndarray], object]:
    """A left-padded prompt batch through gpt2_forward_cached, then `steps` greedy tokens one at a time."""
    ids_BT = np.array([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]])
    cache = empty_cache(config, np.array([2, 0], np.int32), 16)
    logits_BTV, cache = gpt2_forward_cached(ids_BT, cache, weights, config)
    outputs = [np.asarray(logits_BTV)]
    for _ in range(steps):
        next_B1 = np.asarray(logits_BTV[:, -1].argmax(-1))[:, None]
        logits_BTV, cache = gpt2_forward_cached(next_B1, cache, weights, config)
        outputs.append(np.asarray(logits_BTV))
    return outputs, cache


def test_cached_decode_matches_one_device(placed, model, assert_matches_transformers):
    reference, _ = decode_greedily(model.weights, model.config, steps=4)
    actual, cache = decode_greedily(placed, model.config, steps=4)
    for step, (ours, theirs) in enumerate(zip(actual, reference, strict=True)):
        assert_matches_transformers(ours, theirs, what=f"step {step} logits")


def test_the_cache_is_split_by_rows_on_data_and_by_heads_on_model(placed, model):
    _, cache = decode_greedily(placed, model.config, steps=1)
    expected = NamedSharding(placed.mesh, P(None, "data", "model", None, None))
    assert cache.k_LBNSH.sharding.is_equivalent_to(expected, 5)
    assert cache.v_LBNSH.sharding.is_equivalent_to(expected, 5)


def test_greedy_generate_of_a_ragged_batch_matches_one_device(placed, model):
    reference = generate(PROMPTS, model.weights, model.config, max_new_tokens=12)
    assert generate(PROMPTS, placed, model.config, max_new_tokens=12) == reference
    # A batch that does not divide by the data axis is padded, and the padding is dropped.
    assert generate(PROMPTS[:3], placed, model.config, max_new_tokens=12) == reference[:3]


def test_sampled_generate_matches_one_device(placed, model):
    settings = dict(max_new_tokens=10, temperature=0.9, top_k=20, seed=3)
    reference = generate(PROMPTS[:3], model.weights, model.config, **settings)
    assert generate(PROMPTS[:3], placed, model.config, **settings) == reference


def test_stream_generate_matches_generate(placed, model):
    reference = generate(PROMPTS[:3], model.weights, model.config, max_new_tokens=9)
    steps = list(stream_generate(PROMPTS[:3], placed, model.config, max_new_tokens=9, chunk_steps=4))
    streamed = [[step[row] for step in steps if step[row] is not None] for row in range(3)]
    assert streamed == reference


@pytest.mark.parametrize("batch_size", [3, 4])
def test_perplexity_matches_one_device(placed, model, batch_size):
    ids = np.random.default_rng(1).integers(0, model.config.vocab_size, 400)
    reference = perplexity(ids, model.weights, model.config, max_length=64, stride=32, batch_size=batch_size)
    ours = perplexity(ids, placed, model.config, max_length=64, stride=32, batch_size=batch_size)
    assert abs(ours - reference) / reference <= PERPLEXITY_RELATIVE


def test_a_model_axis_that_does_not_divide_the_heads_is_refused(tmp_path):
    config = hf_config(**{**SHAPE, "vocab_size": 97, "n_embd": 24, "n_head": 3})
    folder = save_safetensors(random_hf_model(config, 0.3), tmp_path)
    with pytest.raises(ValueError, match=r"n_head=3 .*model axis \(4\)"):
        load_weights(folder, mesh=make_mesh(1, 4))


def test_a_model_axis_that_does_not_divide_the_mlp_is_refused(tmp_path):
    folder = save_safetensors(random_hf_model(hf_config(**{**SHAPE, "vocab_size": 97, "n_inner": 37}), 0.3), tmp_path)
    with pytest.raises(ValueError, match=r"n_inner=37 .*model axis \(2\)"):
        load_weights(folder, mesh=make_mesh(1, 2))


def test_a_mesh_load_refuses_packed_and_int8_weights(model):
    with pytest.raises(ValueError, match="not packed"):
        load_weights(model.folder, mesh=make_mesh(2, 1), pack=True)
    with pytest.raises(ValueError, match="not packed"):
        load_weights(model.folder, dtype=np.int8, mesh=make_mesh(2, 1))


def test_a_one_device_mesh_changes_nothing(model):
    weights = load_weights(model.folder, mesh=make_mesh(1, 1))
    assert weights.mesh is None
    assert (weights.lm_head_DV is None) == (model.weights.lm_head_DV is None)


def test_a_mesh_larger_than_the_devices_is_refused():
    with pytest.raises(ValueError, match="needs 8 devices but 4 are visible"):
        make_mesh(2, 4)


def serve(weights, model, requests: list[SequenceRequest], max_batch: int) -> tuple[dict, Engine]:
    """Every request through one engine until idle: {seq_id: (token ids, text, finish reason)}."""
    engine = Engine(weights, model.config, load_tokenizer(model.folder), max_batch=max_batch, max_seq_len=64)
    events: dict[int, list] = {}
    engine.submit(requests, lambda event: events.setdefault(event.seq_id, []).append(event))
    for _ in range(200):  # a scheduling bug fails instead of hanging
        if not engine.step():
            break
    assert not engine.busy
    answers = {
        seq_id: ([t for e in seq for t in e.token_ids], "".join(e.text for e in seq), seq[-1].finish_reason)
        for seq_id, seq in events.items()
    }  # fmt: skip
    return answers, engine


def test_the_server_engine_on_a_mesh_answers_as_on_one_device(placed, model):
    """Five sequences through four decode slots (one waits for a free slot), greedy and sampled."""
    requests = [SequenceRequest(tuple(prompt), SamplingSettings(max_new_tokens=10)) for prompt in PROMPTS]
    sampled = SamplingSettings(max_new_tokens=10, temperature=0.9, top_k=20, seed=5)
    requests.append(SequenceRequest((3, 4, 5), sampled))
    reference, _ = serve(model.weights, model, requests, max_batch=4)
    answers, engine = serve(placed, model, requests, max_batch=4)
    assert answers == reference
    assert all(len(ids) >= 1 for ids, _, _ in answers.values())
    slots = NamedSharding(placed.mesh, P(None, "data", "model", None, None))
    assert engine._slots.cache.k_LBNSH.sharding.is_equivalent_to(slots, 5)
    assert engine._slots.rows.done_B.sharding.is_equivalent_to(NamedSharding(placed.mesh, P("data")), 1)
    assert all(width % placed.mesh.shape["data"] == 0 for width in engine.widths)


def test_the_engine_refuses_slots_that_do_not_divide_by_the_data_axis(model):
    placed = load_weights(model.folder, mesh=make_mesh(2, 1))
    with pytest.raises(ValueError, match=r"max_batch=3 must divide by the mesh's data axis \(2\)"):
        Engine(placed, model.config, load_tokenizer(model.folder), max_batch=3, max_seq_len=64)


def test_a_server_on_a_mesh_warms_up_eagerly_behind_the_loading_gate_then_serves(model):
    """On a mesh the engine has no ahead-of-use jobs: the server's start-up thread runs every program
    once (warm_up), only then starts the engine thread and says it is ready."""
    from jax_gpt2.serve.routes import _warm_up_then_start

    placed = load_weights(model.folder, mesh=make_mesh(2, 1))
    engine = Engine(placed, model.config, load_tokenizer(model.folder), max_batch=2, max_seq_len=32, prefill_chunk=8)
    assert engine.programs.keys == ()
    assert not engine.ready
    _warm_up_then_start(engine)
    assert engine.ready
    assert engine.warm
    events = []
    engine.submit([SequenceRequest((3, 4, 5), SamplingSettings(max_new_tokens=4))], events.append)
    engine.shutdown(drain=True, timeout=120)
    assert events[-1].finish_reason is not None
