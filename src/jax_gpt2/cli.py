"""The `jax-gpt2` command: one subcommand per job, each a thin shell over the library.

Every subcommand turns a user mistake (bad path, bad flag value) into one line on stderr and a
non-zero exit code, never a traceback: `UserError` and `ValueError` are caught in `main`.
"""

import argparse
import concurrent.futures
import dataclasses
import itertools
import sys
import threading
from pathlib import Path

from jax_gpt2.tools.remote import add_remote_command


class UserError(Exception):
    """An error whose message is the whole story for the user: printed alone, no traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jax-gpt2", description="GPT-2 inference in pure JAX.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add_command in _COMMANDS:
        add_command(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args))
    except (UserError, ValueError, FileNotFoundError, TimeoutError) as error:
        _fail_distributed(args, error)
        print(f"jax-gpt2 {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"jax-gpt2 {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # in a multi-process run, the collectives' errors when a peer dies (XLA's types)
        _fail_distributed(args, error)
        raise


def _fail_distributed(args: argparse.Namespace, error: Exception) -> None:
    """In a multi-process run, any error ends this process at once with one line (see
    launch.exit_with_message): the others then fail fast on their next collective instead of waiting."""
    jax = sys.modules.get("jax")
    if jax is None or not jax.distributed.is_initialized():
        return
    from jax_gpt2.launch import EXIT_LOST_PEER, exit_with_message

    where = f"process {jax.process_index()} of {jax.process_count()}"
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if any(sign in text for sign in ("Gloo", "Connection closed", "heartbeat", "UNAVAILABLE", "Connection reset")):
        text = f"lost contact with another process (it died or its host is unreachable): {text}"
    exit_with_message(f"jax-gpt2 {args.command}: error: {where}: {text}", EXIT_LOST_PEER)


def _logit_bias_entry(text: str) -> tuple[int, float]:
    """--logit-bias ID=VALUE: a token id and the value added to its logit."""
    token, sep, value = text.partition("=")
    if not sep or not token.strip().isdigit():
        raise argparse.ArgumentTypeError(f"must be TOKEN_ID=VALUE (say 50256=-100); got {text!r}")
    try:
        return int(token), float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"the value must be a number; got {value!r}") from None


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1; got {value}")
    return value


def enable_compilation_cache() -> None:
    """JAX's persistent compilation cache, so a second run of the same command starts warm."""
    import os

    import jax

    cache_home = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    jax.config.update("jax_compilation_cache_dir", str(cache_home / "jax-gpt2" / "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def add_dtype_option(parser) -> None:
    from jax_gpt2.config import WEIGHT_DTYPES

    parser.add_argument(
        "--dtype", choices=sorted(WEIGHT_DTYPES), default="fp32",
        help="weight dtype: fp32 (default), bf16, or int8 (per-channel symmetric, weight-only)",
    )  # fmt: skip
    add_dot_options(parser)


def add_dot_options(parser) -> None:
    parser.add_argument(
        "--bf16-dot", action="store_true",
        help="with bf16 weights on a CPU with AVX512_BF16: prefill and scoring round activations to bf16 and "
        "use its bf16 dot products (~1.8x faster matmuls, as transformers' bf16 does; logits move slightly and "
        "depend on the batch); decode at batch 1 stays exact",
    )  # fmt: skip
    parser.add_argument(
        "--int8-dot", action="store_true",
        help="with int8 weights on a CPU with AVX512_VNNI: prefill and scoring quantize activations to int8 "
        "and use its integer dot products (~4x faster matmuls, as llama.cpp's q8_0 does; logits move "
        "slightly); decode at batch 1 stays exact",
    )  # fmt: skip


def add_kv_dtype_option(parser) -> None:
    from jax_gpt2.config import KV_DTYPES

    parser.add_argument(
        "--kv-dtype", choices=sorted(KV_DTYPES), default="fp32",
        help="KV-cache dtype: fp32 (default) or bf16 (half the cache bytes; attention math stays fp32)",
    )  # fmt: skip


def kv_dtype_from_flag(name: str):
    import jax.numpy as jnp

    from jax_gpt2.config import KV_DTYPES

    assert name in KV_DTYPES, name
    return jnp.dtype(KV_DTYPES[name])


def _load_model(
    name_or_path: str, dtype_name: str = "fp32", mesh=None, bf16_dot: bool = False, int8_dot: bool = False,
    huge_pages: bool = True,
):  # fmt: skip
    """(folder, config, weights) for a hub name or local folder; imports JAX only when a command needs it."""
    import jax.numpy as jnp

    from jax_gpt2.config import WEIGHT_DTYPES
    from jax_gpt2.loader import load_config, load_weights, resolve_model_dir

    assert dtype_name in WEIGHT_DTYPES, dtype_name
    enable_compilation_cache()
    folder = resolve_model_dir(name_or_path)
    config = load_config(folder)
    dtype = jnp.dtype(WEIGHT_DTYPES[dtype_name])
    weights = load_weights(
        folder, dtype=dtype, config=config, mesh=mesh, bf16_dot=bf16_dot, int8_dot=int8_dot, huge_pages=huge_pages
    )
    return folder, config, weights


def _mesh_shape(text: str) -> tuple[int, int]:
    from jax_gpt2.sharding import parse_mesh

    try:
        return parse_mesh(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_mesh_option(parser) -> None:
    parser.add_argument(
        "--mesh", type=_mesh_shape, default=None, metavar="DATAxMODEL",
        help="run on DATA x MODEL devices: the batch split DATA ways, each layer MODEL ways (e.g. 2x1, 1x4)",
    )  # fmt: skip


def add_distributed_options(parser) -> None:
    group = parser.add_argument_group("many processes (jax.distributed; every process runs the same command)")
    group.add_argument("--coordinator", default=None, metavar="HOST:PORT", help="process 0's address and a free port")
    group.add_argument("--num-processes", type=int, default=None, metavar="P", help="how many processes take part")
    group.add_argument("--process-id", type=int, default=None, metavar="I", help="this process's id, 0 .. P-1")
    group.add_argument(
        "--timeout", type=float, default=60.0, metavar="SECONDS",
        help="bound on waiting for the coordinator and the other processes, and on a silent peer (default 60)",
    )  # fmt: skip


def _start_processes(args: argparse.Namespace) -> None:
    """jax.distributed.initialize when --coordinator is given (before anything touches JAX's devices)."""
    given = [args.num_processes is not None, args.process_id is not None]
    if args.coordinator is None:
        if any(given):
            raise UserError("--num-processes and --process-id need --coordinator HOST:PORT")
        return
    if not all(given):
        raise UserError("--coordinator needs --num-processes P and --process-id I as well")
    from jax_gpt2.launch import check_processes, initialize, one_line_fatal_reports, parse_coordinator

    parse_coordinator(args.coordinator)  # every mistake in the flags is reported before stderr is taken over
    check_processes(args.num_processes, args.process_id)
    if not args.timeout > 0:
        raise UserError(f"--timeout must be > 0 seconds; got {args.timeout}")
    one_line_fatal_reports(
        f"jax-gpt2 {args.command}: error: process {args.process_id} of {args.num_processes}: JAX's coordination "
        "service failed: another process died, or the coordinator (process 0) is gone"
    )
    initialize(args.coordinator, args.num_processes, args.process_id, args.timeout)


def _mesh_from_args(args: argparse.Namespace):
    """The mesh --mesh asks for; in a multi-process run without --mesh, every device on "data"."""
    import jax

    from jax_gpt2.sharding import make_mesh

    if args.mesh is None:
        return None if jax.process_count() == 1 else make_mesh(jax.device_count(), 1)
    data, model = args.mesh
    if jax.process_count() > 1 and data * model != jax.device_count():
        raise UserError(f"--mesh {data}x{model} must use all {jax.device_count()} devices of the {jax.process_count()} processes")
    return make_mesh(data, model)


def _is_main_process() -> bool:
    import jax

    return jax.process_index() == 0


def run_next(args: argparse.Namespace) -> int:
    """The top-k next tokens after a prompt, with their probabilities."""
    import jax
    import numpy as np

    from jax_gpt2.model import gpt2_forward
    from jax_gpt2.tokenizer import encode, load_tokenizer

    folder, config, weights = _load_model(args.model, args.dtype, bf16_dot=args.bf16_dot, int8_dot=args.int8_dot)
    tokenizer = load_tokenizer(folder)
    ids = encode(tokenizer, args.prompt)
    if not ids:
        raise UserError("the prompt encodes to no tokens")
    logits_V = gpt2_forward(np.asarray([ids]), weights, config)[0, -1]
    probs_V = np.asarray(jax.nn.softmax(logits_V))
    top_k = min(args.top_k, config.vocab_size)
    print(f"prompt: {args.prompt!r} ({len(ids)} tokens)")
    print(f"top {top_k} next tokens:")
    for rank, token in enumerate(np.argsort(-probs_V)[:top_k], start=1):
        print(f"{rank:>3}. {tokenizer.decode([int(token)])!r:<20} id {int(token):>6}  p = {probs_V[token]:.4f}")
    return 0


def add_next_command(subparsers) -> None:
    parser = subparsers.add_parser("next", help="show the most likely next tokens after a prompt")
    parser.add_argument("prompt")
    parser.add_argument("--model", default="gpt2", help="hub name or local folder (default: gpt2)")
    parser.add_argument("--top-k", type=_positive_int, default=5)
    add_dtype_option(parser)
    parser.set_defaults(run=run_next)


def run_compare(args: argparse.Namespace) -> int:
    """N different inputs through jax-gpt2 and transformers; PASS/FAIL per batch and a summary."""
    from jax_gpt2.tools.compare import compare_batch, load_reference_model, random_batches

    folder, config, weights = _load_model(args.model)
    reference = load_reference_model(folder)
    results = []
    for index, ids_BT in enumerate(random_batches(config, args.batches, args.seed), start=1):
        result = compare_batch(reference, ids_BT, weights, config)
        results.append(result)
        shown = ids_BT[0, :8].tolist()
        verdict = "PASS" if result.passed else "FAIL"
        print(
            f"batch {index}: shape {ids_BT.shape}, tokens {shown}{'...' if ids_BT.shape[1] > 8 else ''}, "
            f"max abs diff {result.max_abs_diff:.3e} (tolerance {result.tolerance:.1e}), "
            f"argmax {'equal' if result.argmax_equal else 'DIFFERS'}: {verdict}"
        )
    passed = sum(result.passed for result in results)
    print(f"batches tested: {len(results)}, passed: {passed}, pass rate: {100.0 * passed / len(results):.1f}%")
    return 0 if passed == len(results) else 1


def add_compare_command(subparsers) -> None:
    parser = subparsers.add_parser("compare", help="check logits against transformers on random inputs")
    parser.add_argument("--model", default="gpt2", help="hub name or local folder (default: gpt2)")
    parser.add_argument("--batches", type=_positive_int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(run=run_compare)


def run_random_model(args: argparse.Namespace) -> int:
    """Write a random-weight checkpoint folder to try everything offline."""
    from jax_gpt2.config import PRESETS
    from jax_gpt2.tools.random_model import write_random_model

    config = write_random_model(args.folder, PRESETS[args.preset], args.std, args.seed, args.tokenizer_from)
    print(
        f"wrote {args.folder}: {args.preset} shape (n_layer={config.n_layer}, n_embd={config.n_embd}, "
        f"vocab_size={config.vocab_size}), random weights with std {args.std}"
    )
    return 0


def add_random_model_command(subparsers) -> None:
    from jax_gpt2.config import PRESETS

    parser = subparsers.add_parser("random-model", help="write a random-weight model folder (for offline trials)")
    parser.add_argument("folder", type=Path)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="gpt2")
    parser.add_argument("--std", type=float, default=0.1, help="weight std; larger gives more peaked logits")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--tokenizer-from", type=Path, default=None, help="folder with GPT-2's vocab.json + merges.txt to copy"
    )
    parser.set_defaults(run=run_random_model)


def _read_text_file(path: Path, what: str) -> str:
    """A UTF-8 text file's contents, or a UserError that names the file (never a traceback)."""
    if path.is_dir():
        raise UserError(f"{what} {path} is a folder; give a UTF-8 text file")
    if not path.is_file():
        raise UserError(f"{what} {path}: no such file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise UserError(f"{what} {path} is not UTF-8 text (byte {error.start}: {error.reason})") from None
    except OSError as error:
        raise UserError(f"{what} {path} cannot be read: {error.strerror}") from None


def _read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompts)
    if args.file is not None:
        prompts += [line for line in _read_text_file(args.file, "--file").splitlines() if line.strip()]
    if not prompts:
        raise UserError("give at least one prompt (as an argument or with --file)")
    return prompts


def _sampling_settings(args: argparse.Namespace):
    """The flags as SamplingSettings (its validator turns a bad value into one line on stderr)."""
    from jax_gpt2.generate import settings_from_arguments

    settings = settings_from_arguments(
        args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.min_p, args.repetition_penalty, args.seed,
        dict(args.logit_bias), args.frequency_penalty, args.presence_penalty,
    )  # fmt: skip
    if len(dict(args.logit_bias)) != len(args.logit_bias):
        raise UserError("--logit-bias names a token twice")
    return dataclasses.replace(settings, stop=tuple(args.stop))


def _stream_one(
    prompt: str, ids: list[int], tokenizer, weights, config, settings, eos_ids: list[int], kv_dtype, constraint,
    speculate,
) -> None:  # fmt: skip
    """Print one prompt's continuation as it is made: whole UTF-8 characters, nothing past a stop string."""
    from jax_gpt2.generate import stream_with_settings
    from jax_gpt2.stopping import TextFinisher

    finisher = TextFinisher(tokenizer, settings.stop, eos_ids, settings.max_new_tokens)
    steps = stream_with_settings([ids], weights, config, settings, eos_ids, kv_dtype, 4, constraint, speculate)
    first = next(steps)  # arguments are checked before anything is printed
    sys.stdout.write(prompt)
    for step in itertools.chain([first], steps):
        if step[0] is None:
            break
        sys.stdout.write(finisher.push(step[0]))
        sys.stdout.flush()
        if finisher.finish_reason is not None:
            break
    sys.stdout.write(finisher.close() + "\n")


def _constraint_from_args(args: argparse.Namespace, tokenizer, config):
    """--json-schema FILE or --regex PATTERN, compiled against the model's tokenizer (None: neither)."""
    import json

    from jax_gpt2 import constraints

    if args.json_schema is not None and args.regex is not None:
        raise UserError("give --json-schema or --regex, not both")
    if args.json_schema is not None:
        try:
            constraint = constraints.json_schema(json.loads(_read_text_file(args.json_schema, "--json-schema")))
        except json.JSONDecodeError as error:
            raise UserError(f"--json-schema {args.json_schema}: not JSON ({error})") from None
    elif args.regex is not None:
        constraint = constraints.regex(args.regex)
    else:
        return None
    tokens = constraints.grammar_tokenizer(tokenizer, config.vocab_size, config.eos_token_id)
    return constraints.compile_constraint(constraint, tokens)


def run_generate(args: argparse.Namespace) -> int:
    """Stream the continuation of one prompt, or generate several prompts as one batch."""
    from jax_gpt2.generate import generate_with_settings
    from jax_gpt2.stopping import finish_text
    from jax_gpt2.tokenizer import encode, load_tokenizer

    prompts = _read_prompts(args)
    _start_processes(args)
    settings, kv_dtype = _sampling_settings(args), kv_dtype_from_flag(args.kv_dtype)
    folder, config, weights = _load_model(args.model, args.dtype, _mesh_from_args(args), args.bf16_dot, args.int8_dot)
    speculate = speculate_from_args(args, folder, config)
    tokenizer = load_tokenizer(folder)
    prompt_ids = [encode(tokenizer, prompt) for prompt in prompts]
    eos_ids = [] if args.ignore_eos or config.eos_token_id is None else [config.eos_token_id]
    constraint = _constraint_from_args(args, tokenizer, config)
    if len(prompts) == 1 and args.coordinator is None:
        _stream_one(prompts[0], prompt_ids[0], tokenizer, weights, config, settings, eos_ids, kv_dtype, constraint,
                    speculate)  # fmt: skip
        return 0
    # Many processes: every one runs the whole batch's program (its rows are split over "data");
    # process 0 prints every output, in input order.
    rows = generate_with_settings(prompt_ids, weights, config, settings, eos_ids, kv_dtype, constraint, speculate)
    if not _is_main_process():
        return 0
    for prompt, new_ids in zip(prompts, rows):
        text, _ = finish_text(tokenizer, new_ids, settings.stop, eos_ids, settings.max_new_tokens)
        print(f"--- {prompt!r}\n{prompt}{text}")
    return 0


def add_speculate_options(parser, serving: bool = False) -> None:
    group = parser.add_argument_group("speculative decoding (same tokens, fewer passes over the weights)")
    if serving:  # a draft model is refused in run_serve, naming what works
        help_text = ("lookup: each decode slot drafts the continuation of an earlier occurrence of its last "
                     "tokens (prompt + output) and verifies it in the slots' shared pass; acceptance counts in "
                     "/metrics. draft: not served (generate only)")  # fmt: skip
    else:
        help_text = ("lookup: draft the continuation of an earlier occurrence of the last tokens; "
                     "draft: draft with a smaller model of the same vocabulary (--draft-model)")  # fmt: skip
    group.add_argument("--speculate", choices=["lookup", "draft"], default=None, help=help_text)
    if serving:
        parser.set_defaults(draft_model=None)
    else:
        group.add_argument("--draft-model", default=None, metavar="FOLDER", help="the draft model (hub name or folder)")
    group.add_argument("--max-draft", type=_positive_int, default=None,
                       help="draft tokens per verify pass at most (default: PromptLookup's, 5)")  # fmt: skip
    group.add_argument("--fixed-draft", action="store_true",
                       help="draft --max-draft tokens whenever a lookup hits, or a draft model every pass "
                            "(default: adapt the width to the recent acceptance and the price of a pass)")  # fmt: skip


def speculate_from_args(args: argparse.Namespace, folder=None, config=None):
    """The --speculate options as a PromptLookup or DraftModel (loaded beside the model in `folder`,
    whose config is `config`), or None (plain decoding)."""
    from jax_gpt2.speculate import PromptLookup

    if args.speculate is None:
        if args.draft_model is not None:
            raise UserError("--draft-model needs --speculate draft")
        return None
    if args.speculate == "draft":
        return _load_draft_model(args, folder, config)
    if args.draft_model is not None:
        raise UserError("--draft-model needs --speculate draft")
    try:
        max_draft = PromptLookup.max_draft if args.max_draft is None else args.max_draft
        return PromptLookup(max_draft=max_draft, adaptive=not args.fixed_draft)
    except ValueError as error:
        raise UserError(str(error)) from None


def _load_draft_model(args: argparse.Namespace, folder, config):
    """--draft-model as a DraftModel, refused at load unless it shares the model's vocabulary."""
    from jax_gpt2.speculate import DraftModel
    from jax_gpt2.tokenizer import load_tokenizer

    if args.draft_model is None:
        raise UserError("--speculate draft needs --draft-model FOLDER")
    draft_folder, draft_config, draft_weights = _load_model(args.draft_model, args.dtype)
    if draft_config.vocab_size != config.vocab_size:
        raise UserError(
            f"--draft-model {args.draft_model} has a vocabulary of {draft_config.vocab_size} tokens and the model "
            f"{config.vocab_size}: a draft must share the model's tokenizer"
        )
    if load_tokenizer(draft_folder).get_vocab() != load_tokenizer(folder).get_vocab():
        raise UserError(f"--draft-model {args.draft_model}'s tokenizer differs from the model's: it must be the same")
    max_draft = DraftModel.max_draft if args.max_draft is None else args.max_draft
    return DraftModel(draft_weights, draft_config, max_draft=max_draft, adaptive=not args.fixed_draft)


def add_generate_command(subparsers) -> None:
    parser = subparsers.add_parser("generate", help="continue prompts (one prompt streams; several run as a batch)")
    parser.add_argument("prompts", nargs="*", metavar="PROMPT")
    parser.add_argument("--file", type=Path, default=None, help="more prompts, one per line")
    parser.add_argument("--model", default="gpt2", help="hub name or local folder (default: gpt2)")
    parser.add_argument("--max-new-tokens", type=_positive_int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--min-p", type=float, default=None)
    parser.add_argument("--repetition-penalty", type=float, default=None)
    parser.add_argument("--frequency-penalty", type=float, default=0.0,
                        help="OpenAI's: minus this times the token's count in the output so far ([-2, 2])")
    parser.add_argument("--presence-penalty", type=float, default=0.0,
                        help="OpenAI's: minus this once the token is in the output ([-2, 2])")
    parser.add_argument("--logit-bias", type=_logit_bias_entry, action="append", default=[], metavar="ID=VALUE",
                        help="add VALUE ([-100, 100]) to token ID's logit; repeatable")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stop", action="append", default=[], help="end the text where this string occurs")
    parser.add_argument("--ignore-eos", action="store_true", help="do not stop at the model's end-of-text token")
    parser.add_argument("--json-schema", type=Path, default=None, metavar="FILE",
                        help="the text is JSON valid against this JSON Schema (structured output)")
    parser.add_argument("--regex", default=None, metavar="PATTERN", help="the text matches this regular expression")
    add_dtype_option(parser)
    add_kv_dtype_option(parser)
    add_mesh_option(parser)
    add_distributed_options(parser)
    add_speculate_options(parser)
    parser.set_defaults(run=run_generate)


def run_bench(args: argparse.Namespace) -> int:
    """Benchmark jax-gpt2 against transformers (and llama.cpp, given) on random weights of a preset shape."""
    import json

    if args.speculate is not None:
        return run_speculative_bench(args)

    import jax
    import torch

    from jax_gpt2.tools.bench import LlamaPeer, bench_model_stem, format_table, plot_results, run_benchmarks
    from jax_gpt2.config import PRESETS

    torch.set_num_threads(args.threads)  # XLA's CPU client uses every core; give torch the same
    if args.torch_device == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--torch-device cuda: torch {torch.__version__} sees no CUDA device here")
    config = PRESETS[args.preset]
    if args.layers is not None:
        config = dataclasses.replace(config, n_layer=args.layers)
    _start_processes(args)
    enable_compilation_cache()
    mesh = _mesh_from_args(args)
    llama = None
    if args.llama_bench is not None:
        if args.gguf_dir is None:
            raise UserError("--llama-bench needs --gguf-dir (bash benchmarks/build_llama_cpp.sh convert PRESET [LAYERS])")
        llama = LlamaPeer(args.llama_bench, args.gguf_dir, bench_model_stem(args.preset, config.n_layer), args.threads)
    results = run_benchmarks(
        config, args.dtypes, args.batch_sizes, args.prefill, args.new_tokens, args.repeats, args.contexts,
        progress=_is_main_process(), kv_dtype=args.kv_dtype, llama=llama, torch_device=args.torch_device, mesh=mesh,
        scoring=tuple(args.scoring), bf16_dot=args.bf16_dot, int8_dot=args.int8_dot,
    )  # fmt: skip
    results["preset"], results["layers"] = args.preset, config.n_layer
    if not _is_main_process():
        return 0
    print(format_table(results))
    if mesh is not None:
        devices = f"{_mesh_name(mesh)} mesh (data x model) of {jax.device_count()} devices"
        print(f"jax-gpt2 ran on a {devices}: unpacked weights, XLA's dot")
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2))
        print(f"wrote {args.out}")
    if args.plot is not None:
        plot_results(results, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _batch_by_length(text: str) -> tuple[int, int]:
    """'4x1024' -> (4, 1024): a batch of rows of a length, both positive."""
    batch, _, length = text.partition("x")
    if not (batch.isdigit() and length.isdigit() and int(batch) >= 1 and int(length) >= 1):
        raise argparse.ArgumentTypeError(f"expected BATCHxLENGTH, e.g. 4x1024; got {text!r}")
    return int(batch), int(length)


def run_speculative_bench(args: argparse.Namespace) -> int:
    """`bench --speculate`: plain and speculative decoding side by side (tools/bench_speculate.py)."""
    import json

    from jax_gpt2.config import PRESETS
    from jax_gpt2.tools import bench_speculate

    config = PRESETS[args.preset]
    if args.layers is not None:
        config = dataclasses.replace(config, n_layer=args.layers)
    enable_compilation_cache()
    if args.speculate == "draft":  # a random draft of the --draft-model preset's shape
        if args.draft_model not in PRESETS:
            raise UserError(f"bench --speculate draft: --draft-model must name a preset ({', '.join(sorted(PRESETS))})")
        speculate, draft_config = None, PRESETS[args.draft_model]
    else:
        speculate, draft_config = speculate_from_args(args), None
    draft_max = 4 if args.max_draft is None else args.max_draft
    results = bench_speculate.run_speculative_bench(
        config, args.dtypes, args.batch_sizes, args.new_tokens, args.repeats, speculate, draft_config, draft_max,
        draft_adaptive=not args.fixed_draft
    )
    print(bench_speculate.format_results(results))
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2))
        print(f"wrote {args.out}")
    return 0


def add_bench_command(subparsers) -> None:
    import os

    from jax_gpt2.config import PRESETS, WEIGHT_DTYPES

    parser = subparsers.add_parser("bench", help="speed against transformers, and against the bandwidth roofline")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="gpt2")
    parser.add_argument("--layers", type=_positive_int, default=None, help="override n_layer (quick runs)")
    parser.add_argument("--batch-sizes", type=_positive_int, nargs="+", default=[1, 8])
    parser.add_argument("--contexts", type=_positive_int, nargs="*", default=[990], help="long-context decode at B=1: prompt tokens")
    parser.add_argument("--prefill", type=_positive_int, nargs="*", default=[128, 512])
    parser.add_argument("--new-tokens", type=_positive_int, default=32)
    parser.add_argument("--repeats", type=_positive_int, default=3)
    parser.add_argument("--threads", type=_positive_int, default=os.cpu_count() or 1, help="torch's and llama.cpp's threads")
    parser.add_argument(
        "--torch-device", choices=["cpu", "cuda"], default="cpu", help="where transformers runs (default: cpu)"
    )
    parser.add_argument("--dtypes", nargs="+", choices=list(WEIGHT_DTYPES), default=list(WEIGHT_DTYPES))
    add_dot_options(parser)
    add_kv_dtype_option(parser)
    parser.add_argument("--llama-bench", type=Path, default=None, help="llama.cpp's llama-bench binary: a third column")
    parser.add_argument("--gguf-dir", type=Path, default=None, help="GGUF conversions of the bench's weights (see benchmarks/build_llama_cpp.sh)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    parser.add_argument("--plot", type=Path, default=None, help="write a PNG chart of the results (needs matplotlib)")
    parser.add_argument(
        "--scoring", type=_batch_by_length, nargs="*", default=[], metavar="BxT",
        help="forwards with every position's logits to time, e.g. 4x1024 (perplexity windows, evaluation)",
    )  # fmt: skip
    add_mesh_option(parser)
    add_distributed_options(parser)
    add_speculate_options(parser)
    parser.set_defaults(run=run_bench)


def run_perplexity(args: argparse.Namespace) -> int:
    """Sliding-window perplexity of a text file, with a progress bar over windows on stderr."""
    import json
    import time

    import jax
    from tqdm import tqdm

    from jax_gpt2.perplexity import batch_nlls, check_arguments, perplexity_of, plan_windows
    from jax_gpt2.tokenizer import encode, load_tokenizer

    text = _read_text_file(args.file, "text file")
    _start_processes(args)
    folder, config, weights = _load_model(args.model, args.dtype, _mesh_from_args(args), args.bf16_dot, args.int8_dot)
    ids = encode(load_tokenizer(folder), text)
    max_length = args.max_length if args.max_length is not None else config.n_positions
    stride = args.stride if args.stride is not None else max(1, max_length // 2)
    check_arguments(len(ids), config, max_length, stride, args.batch_size)
    num_windows = len(plan_windows(len(ids), max_length, stride))
    start = time.perf_counter()
    with tqdm(total=num_windows, unit="window", file=sys.stderr, desc="perplexity") as bar:
        batches = batch_nlls(ids, weights, config, max_length, stride, args.batch_size, kv_dtype_from_flag(args.kv_dtype))
        ppl, num_scored = perplexity_of(_advancing(bar, batches))
    seconds = time.perf_counter() - start
    result = {
        "perplexity": ppl, "tokens": len(ids), "scored_tokens": num_scored, "windows": num_windows,
        "seconds": seconds, "tokens_per_second": len(ids) / seconds, "model": str(args.model),
        "max_length": max_length, "stride": stride, "batch_size": args.batch_size, "dtype": args.dtype,
        "mesh": _mesh_name(weights.mesh), "processes": jax.process_count(), "process_id": jax.process_index(),
        "kv_dtype": args.kv_dtype, "bf16_dot": args.bf16_dot, "int8_dot": args.int8_dot,
    }  # fmt: skip
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"perplexity: {ppl:.4f}")
    print(f"tokens: {len(ids)} ({num_scored} scored, {num_windows} windows of up to {max_length}, stride {stride})")
    if weights.mesh is not None:
        print(f"mesh: {result['mesh']} (data x model), process {jax.process_index()} of {jax.process_count()}")
    print(f"speed: {len(ids) / seconds:.1f} tokens/s ({seconds:.2f} s, compilation included)")
    return 0


def _advancing(bar, batches):
    """The batches unchanged, moving the progress bar by each one's windows as it arrives."""
    for batch in batches:
        bar.update(batch.num_windows)
        yield batch


def add_perplexity_command(subparsers) -> None:
    parser = subparsers.add_parser("perplexity", help="sliding-window perplexity of a text file")
    parser.add_argument("file", type=Path, help="UTF-8 text file")
    parser.add_argument("--model", default="gpt2", help="hub name or local folder (default: gpt2)")
    parser.add_argument("--max-length", type=_positive_int, default=None, help="window length (default: n_positions)")
    parser.add_argument("--stride", type=_positive_int, default=None, help="window step (default: max-length / 2)")
    parser.add_argument("--batch-size", type=_positive_int, default=8, help="windows per device call (default: 8)")
    add_dtype_option(parser)
    add_kv_dtype_option(parser)
    add_mesh_option(parser)
    add_distributed_options(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON line instead of text")
    parser.set_defaults(run=run_perplexity)


def _mesh_name(mesh) -> str:
    return "1x1" if mesh is None else f"{mesh.shape['data']}x{mesh.shape['model']}"


def run_serve(args: argparse.Namespace) -> int:
    """An OpenAI-compatible HTTP server with continuous batching (needs the `serve` extra)."""
    import os

    if args.speculate == "draft":
        raise UserError("serve speculates with --speculate lookup only (prompt lookup, with --max-draft and "
                        "--fixed-draft); a draft model works with generate --speculate draft")  # fmt: skip
    speculate = speculate_from_args(args)  # before the model loads: a bad option fails fast
    # The weights load while the web stack imports (~0.4 s of it: numpy's copies run outside the GIL),
    # and go onto 2 MiB pages only once the server answers (routes._compile_programs): ~1 s sooner.
    # What the loading thread imports is imported here first: no module is imported by two threads at once.
    import safetensors.numpy  # noqa: F401
    import jax_gpt2.loader  # noqa: F401

    loaded = _in_background(
        _load_model, args.model, args.dtype, _mesh_from_args(args), args.bf16_dot, args.int8_dot, huge_pages=False
    )
    try:
        from jax_gpt2.serve.engine import Engine
        from jax_gpt2.serve.routes import ServerLimits, run_server
    except ImportError as error:
        raise UserError(f"serve needs the serve extra ({error.name} is missing): pip install 'jax-gpt2[serve]'")
    from jax_gpt2.tokenizer import load_tokenizer

    api_key = args.api_key or os.environ.get("JAX_GPT2_API_KEY") or None
    limits = ServerLimits(args.max_body_bytes, args.max_prompt_tokens, args.max_n, args.max_tokens, args.max_stops)
    folder, config, weights = loaded.result()
    engine = Engine(
        weights, config, load_tokenizer(folder), max_batch=args.max_batch, max_seq_len=args.max_seq_len,
        max_queue=args.max_queue, chunk_steps=args.chunk_steps, prefill_chunk=args.prefill_chunk,
        prefix_cache_mib=args.prefix_cache_mib, kv_dtype=kv_dtype_from_flag(args.kv_dtype), speculate=speculate,
    )  # fmt: skip
    run_server(args.model, engine, args.host, args.port, limits, api_key, args.drain_timeout)
    return 0


def _in_background(function, *args, **kwargs) -> concurrent.futures.Future:
    """function(*args, **kwargs) on a daemon thread, its result (or exception) in the Future returned.
    Daemon, not an executor's thread: a process that fails meanwhile does not wait for it to end."""
    future: concurrent.futures.Future = concurrent.futures.Future()

    def run() -> None:
        try:
            future.set_result(function(*args, **kwargs))
        except BaseException as error:  # the caller's result() raises it
            future.set_exception(error)

    threading.Thread(target=run, name="jax-gpt2-load", daemon=True).start()
    return future


def _non_negative(kind):
    def parse(text: str):
        value = kind(text)
        if value < 0:
            raise argparse.ArgumentTypeError(f"must be >= 0; got {value}")
        return value

    return parse


def add_serve_command(subparsers) -> None:
    parser = subparsers.add_parser("serve", help="an OpenAI-compatible HTTP server (completions, chat, streaming)")
    parser.add_argument("--model", default="gpt2", help="hub name or local folder (default: gpt2); also the served id")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-batch", type=_positive_int, default=8, help="decode slots (sequences decoded together)")
    parser.add_argument("--max-seq-len", type=_positive_int, default=1024, help="cache slots per sequence (prompt + output)")
    parser.add_argument("--max-queue", type=_non_negative(int), default=64,
                        help="sequences that may wait beyond the slots; past that, 503 (0: none wait)")  # fmt: skip
    parser.add_argument("--chunk-steps", type=_positive_int, default=4, help="decode steps between scheduling rounds")
    parser.add_argument("--prefill-chunk", type=_positive_int, default=128,
                        help="prompt tokens prefilled per round, between decode chunks")  # fmt: skip
    parser.add_argument("--prefix-cache-mib", type=_non_negative(float), default=256,
                        help="memory for reusable prompt-prefix keys/values (0: off)")  # fmt: skip
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' on every route but /health (or set JAX_GPT2_API_KEY)")  # fmt: skip
    parser.add_argument("--max-body-bytes", type=_positive_int, default=2 << 20, help="larger request bodies: 413")
    parser.add_argument("--max-prompt-tokens", type=_positive_int, default=65536, help="prompt tokens per request")
    parser.add_argument("--max-n", type=_positive_int, default=16, help="choices per prompt (n)")
    parser.add_argument("--max-tokens", type=_positive_int, default=None, help="max_tokens a request may ask (default: the context)")
    parser.add_argument("--max-stops", type=_positive_int, default=4, help="stop strings per request")
    parser.add_argument("--drain-timeout", type=_non_negative(float), default=25.0,
                        help="seconds open requests may run after SIGTERM before they end with an error "
                             "(default 25: inside Kubernetes' 30 s grace period); a second signal exits at once")  # fmt: skip
    add_dtype_option(parser)
    add_kv_dtype_option(parser)
    add_mesh_option(parser)
    add_speculate_options(parser, serving=True)
    parser.set_defaults(run=run_serve)


# Each entry registers one subcommand on the parser and sets `run` (args -> exit code) as its default.
_COMMANDS: list = [
    add_next_command, add_generate_command, add_compare_command, add_perplexity_command,
    add_random_model_command, add_bench_command, add_serve_command, add_remote_command,
]


if __name__ == "__main__":
    sys.exit(main())
