"""`lorakit train | eval | merge | chat | data | bench | inspect`: each subcommand only calls library code.

Every training option is a field of `RunConfig` or `TrainConfig`; the parser is built from those
fields, so each flag is also a YAML key (`--config run.yaml`), and flags given on the command line
override the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

RUN_GROUPS = ("RunConfig", "TrainConfig")


def _add_dataclass_flags(parser: argparse.ArgumentParser, cls: type, title: str) -> None:
    group = parser.add_argument_group(title)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        help_text = f"{f.metadata.get('help', '')} (default: {f.default})"
        if kind is bool:
            group.add_argument(
                flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
            continue
        choices = typing.get_args(kind) if typing.get_origin(kind) is typing.Literal else None
        base = (
            next((t for t in typing.get_args(kind) if t is not type(None)), kind) if choices is None else str
        )
        convert = base if base in (int, float) else str
        group.add_argument(flag, dest=f.name, type=convert, choices=choices, default=None, help=help_text)


def _options(args: argparse.Namespace, fields: Sequence[str]) -> dict[str, Any]:
    """YAML file values, then the flags the user actually gave (None = not given)."""
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        loaded = read_yaml(Path(args.config))
        if not isinstance(loaded, dict):
            raise ValueError(
                f"{args.config} must hold a mapping of option: value, got {type(loaded).__name__}"
            )
        values.update({k.replace("-", "_"): v for k, v in loaded.items()})
    values.update({k: v for k, v in vars(args).items() if k in fields and v is not None})
    return values


def read_yaml(path: Path) -> Any:
    """A YAML options file; a syntax error names the file, line and column."""
    if path.is_dir():
        raise ValueError(f"--config {path} is a folder; pass the YAML file inside it")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ValueError(f"{path}{where}: not valid YAML ({problem})") from None


def _run_fields() -> list[str]:
    from .options import RunConfig
    from .train import TrainConfig

    return [f.name for cls in (RunConfig, TrainConfig) for f in dataclasses.fields(cls)]


def cmd_train(args: argparse.Namespace) -> None:
    from .options import split_options
    from .run import train_run
    from .train import distributed

    values, line = _recipe(_options(args, _run_fields()))
    run, train = split_options(values)
    if line and distributed.World.from_env().main:  # the run's first line (rank 0 of a launch)
        print(line)
    train_run(run, train)


def _recipe(values: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """`lorakit train`'s recipe for this machine (lorakit.recipe) and the line saying why."""
    from .device import resolve_device
    from .recipe import choose_recipe
    from .train.optim import precision_choice

    device = resolve_device(values.get("device", "auto"))  # a GPU asked for and not there: said here
    fp32 = precision_choice(values.get("precision", "auto"), device)[0] is None
    return choose_recipe(values, fp32)


def cmd_eval(args: argparse.Namespace) -> None:
    import json

    from . import api
    from .options import split_options
    from .run import api_load
    from .run_data import build_data, read_data
    from .run_eval import eval_autocast, evaluate, format_table
    from .train import evaluate as ev

    _check_router_flags(args)
    run, train = split_options(_options(args, _run_fields()))
    conversations = read_data(run, train.seed)
    model, tokenizer = api_load(run.model, run.attention, run.device)
    if args.router:
        return _eval_routed(args, run, model, tokenizer, conversations)
    if args.adapter:  # an adapter with added tokens: the grown model and its tokenizer, as trained
        from .vocab import prepare_for_adapter

        tokenizer = prepare_for_adapter(model, tokenizer, args.adapter)
    _, data = build_data(run, tokenizer, conversations)
    reference = (
        ev.reference_next_token_logprobs(model, tokenizer, data.prompts, autocast_dtype=eval_autocast(model))
        if args.adapter
        else None
    )
    base = None
    if args.adapter:  # base scores and the KL reference: the full-precision base, as `train` does
        base = evaluate(model, tokenizer, data, run) if args.compare_base else None
        api.load_as_trained(model, tokenizer, args.adapter)
    result = evaluate(model, tokenizer, data, run, reference)
    print(format_table(base, result))
    if args.json:
        print(json.dumps({"base": base, "model": result}, indent=2))


def _check_router_flags(args: argparse.Namespace) -> None:
    """`chat` and `eval`: --adapters only with --router, and --adapter not with it."""
    if args.adapters and not args.router:
        raise ValueError("--adapters goes with --router (the router picks among them); use --adapter for one")
    if args.adapter and args.router:
        raise ValueError("--adapter and --router exclude each other: the router's adapters are loaded for it")


def _eval_routed(
    args: argparse.Namespace,
    run: typing.Any,
    model: typing.Any,
    tokenizer: typing.Any,
    conversations: typing.Any,
) -> None:
    """`lorakit eval --router R`: the task's exact match with each item answered by the adapter(s)
    the router picks from its prompt; forgetting is not scored (general text has no prompt to route)."""
    from .data.tasks import score_exact_match
    from .routing import TaskRouter, load_task_adapters, routed_exact_match
    from .run_data import build_data
    from .run_eval import eval_autocast

    router = TaskRouter.load(args.router, args.route_mode)
    load_task_adapters(model, router, args.adapters.split(",") if args.adapters else None)
    _, data = build_data(run, tokenizer, conversations)
    result = routed_exact_match(
        model, tokenizer, router, data.items, score_exact_match, run.eval_max_new_tokens, eval_autocast(model)
    )
    print(f"routed exact match ({router.mode}): {result['accuracy']:.1%} of {result['n']}")
    for name, count in result["routing"].items():
        accuracy = result["by_adapter"].get(name)
        print(
            f"  {name:<20} {count:>5} items"
            + (f"  {accuracy:.1%} exact match" if accuracy is not None else "")
        )
    if args.json:
        print(json.dumps(result, indent=2))


def cmd_merge(args: argparse.Namespace) -> None:
    from . import api
    from .generate import export_merged
    from .quant.linear import dequantize_model
    from .run import api_load

    model, tokenizer = api_load(args.model)
    tokenizer, quantized = api.load_as_trained(model, tokenizer, args.adapter)
    if quantized:
        print("QLoRA adapter: merging onto its NF4 base, dequantized; the output is full precision")
    plain = api.merge_and_unload(model)
    dequantize_model(plain)  # layers without an adapter, if any were quantized
    out = export_merged(plain, tokenizer, args.out)
    print(
        f"wrote a plain Hugging Face model folder to {out} (load it with AutoModelForCausalLM.from_pretrained)"
    )


def cmd_export(args: argparse.Namespace) -> None:
    import tempfile
    from pathlib import Path

    from . import api
    from .core.state import read_adapter_config
    from .run import api_load

    peft_type = read_adapter_config(args.adapter)[0].get("peft_type")  # a bad folder fails first
    if args.format == "gguf" and args.merged and (Path(args.adapter) / "vocabulary.json").is_file():
        raise ValueError(
            f"{args.adapter} adds tokens, and a merged GGUF keeps the base GGUF's tokenizer, which "
            "lacks them: write the merged folder (lorakit merge), which has the extended tokenizer, "
            "and convert it with llama.cpp's convert_hf_to_gguf.py"
        )
    if args.format == "peft" and peft_type == "LORA":  # LoRA and aLoRA: from the folder alone
        from .combine import portable_lora

        out = portable_lora(args.adapter, args.out)
        print(f"wrote {out}: the same change with its scale folded into B, one rank and lora_alpha = r")
        return
    model, tokenizer = api_load(args.model)
    if args.format == "peft":
        api.load_as_trained(model, tokenizer, args.adapter)
        out = api.export_lora(model, args.out)
        print(
            f"wrote a plain LoRA adapter folder to {out} (PeftModel.from_pretrained reads it; the same outputs)"
        )
        return
    from .export_gguf import export_gguf_adapter, export_merged_gguf, ollama_modelfile
    from .models import source_gguf

    base_gguf = Path(args.base_gguf) if args.base_gguf else source_gguf(args.model)
    out = Path(args.out)
    if args.merged:
        if base_gguf is None:
            raise ValueError(
                "a merged GGUF keeps the base's own GGUF metadata (tokenizer, chat template): give "
                "--base-gguf FILE, or write the merged folder (lorakit merge) and convert it with "
                "llama.cpp's convert_hf_to_gguf.py"
            )
        from .quant.linear import dequantize_model

        api.load_as_trained(model, tokenizer, args.adapter)
        plain = api.merge_and_unload(model)
        dequantize_model(plain)
        export_merged_gguf(plain, base_gguf, out, args.outtype or "f16")
        print(f"wrote the merged model as one GGUF to {out} (llama-cli -m {out})")
    else:
        with tempfile.TemporaryDirectory() as tmp:
            lora = args.adapter
            if peft_type not in ("LORA", None):  # a fixed low-rank change: its LoRA form first
                api.load_as_trained(model, tokenizer, args.adapter)
                lora = str(api.export_lora(model, Path(tmp) / "lora"))
            export_gguf_adapter(lora, out, model.config, args.outtype or "f32")
        print(f"wrote a llama.cpp adapter GGUF to {out} (llama-cli -m BASE.gguf --lora {out})")
    if base_gguf is None:
        print("no Ollama Modelfile: the base is not a GGUF file lorakit knows (give --base-gguf FILE)")
        return
    from .core.io import atomic_write
    from .models import load_tokenizer

    modelfile = Path(args.modelfile) if args.modelfile else out.with_suffix(".Modelfile")
    text = (
        ollama_modelfile(load_tokenizer(args.model), f"./{out.name}")
        if args.merged
        else ollama_modelfile(load_tokenizer(args.model), str(base_gguf.resolve()), f"./{out.name}")
    )
    if modelfile.parent.resolve() != out.parent.resolve():  # relative paths are read from its folder
        text = text.replace(f"./{out.name}", str(out.resolve()))
    atomic_write(modelfile, lambda tmp: tmp.write_text(text))
    print(f"wrote {modelfile} (ollama create NAME -f {modelfile})")


def cmd_check(args: argparse.Namespace) -> None:
    import json

    from .serving import as_json, check_folder, format_verdicts

    features, results = check_folder(args.adapter)
    print(
        json.dumps(as_json(features, results), indent=2) if args.json else format_verdicts(features, results)
    )


def cmd_merge_adapters(args: argparse.Namespace) -> None:
    from .combine import merge_adapters

    weights = None
    if args.weights:
        try:
            weights = [float(w) for w in args.weights.split(",")]
        except ValueError:
            raise ValueError(f"--weights takes numbers separated by commas, got {args.weights!r}") from None
    report = merge_adapters(
        args.adapters,
        args.out,
        weights,
        args.combination,
        args.rank,
        args.density,
        args.majority_sign,
        args.seed,
    )
    exact = (
        "exact"
        if report.max_residual == 0
        else f"the rank cut leaves at most {report.max_residual:.1%} of a module's change"
    )
    print(
        f"wrote a PEFT LoRA folder to {report.out}: {report.combination} of {len(args.adapters)} adapters, "
        f"weights {', '.join(f'{w:g}' for w in report.weights)}, rank {report.rank}, "
        f"{len(report.residual)} modules ({exact})"
    )


def cmd_chat(args: argparse.Namespace) -> None:
    from . import api
    from .conversation import conversation_repl
    from .core.model import registry
    from .generate import chat_repl
    from .routing import TaskRouter, load_task_adapters
    from .run import api_load

    _check_router_flags(args)
    model, tokenizer = api_load(args.model)
    if args.router:
        router = TaskRouter.load(args.router, args.route_mode)
        load_task_adapters(model, router, args.adapters.split(",") if args.adapters else None)
        chat_repl(
            model, tokenizer, max_new_tokens=args.max_new_tokens, route=router.chat_route(model, tokenizer)
        )
        return
    if args.adapter:
        tokenizer, _ = api.load_as_trained(model, tokenizer, args.adapter)
        config = registry(model).configs["default"]
        if getattr(config, "invoked_on_base_cache", False):  # aLoRA: no merge; reuse the base cache
            conversation_repl(model, tokenizer, "default", max_new_tokens=args.max_new_tokens)
            return
        if args.merge:
            api.merge(model)
    chat_repl(model, tokenizer, max_new_tokens=args.max_new_tokens)


def cmd_router(args: argparse.Namespace) -> None:
    from .data import load_task, read_examples
    from .options import name_value_pairs
    from .routing import train_router
    from .run import api_load

    adapters = name_value_pairs(args.adapters, "--adapters")
    data = name_value_pairs(args.data, "--data")
    if set(adapters) != set(data):
        raise ValueError(
            f"--adapters names {sorted(adapters)} and --data names {sorted(data)} must be the same tasks"
        )
    for name, folder in adapters.items():
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"adapter folder {folder} (task {name}) does not exist")
    prompts = {}
    for name, source in data.items():
        examples = (
            load_task(source.removeprefix("task:")).train
            if source.startswith("task:")
            else read_examples(source)
        )
        prompts[name] = examples[: args.per_task]
    held = {n: p[len(p) * 4 // 5 :] for n, p in prompts.items()}  # the last fifth: routing accuracy
    fit = {n: p[: len(p) * 4 // 5] for n, p in prompts.items()}
    if any(len(p) == 0 for p in [*held.values(), *fit.values()]):
        raise ValueError("each task needs at least 2 examples (4/5 to fit the router, 1/5 to check it)")
    model, tokenizer = api_load(args.model)
    router = train_router(model, tokenizer, fit, adapters, layer=args.layer, mode=args.mode)
    for name, rows in held.items():
        picked = router.probabilities(model, tokenizer, rows).argmax(-1)
        right = int((picked == router.names.index(name)).sum())
        print(f"{name}: {right}/{len(rows)} held-out prompts routed to its adapter")
    out = router.save(args.out)
    print(f"wrote the router to {out} (layer {router.layer}, {len(adapters)} adapters, mode {router.mode})")


def cmd_vocab(args: argparse.Namespace) -> None:
    from .data import load_task
    from .data.jsonl import read_examples
    from .models import load_tokenizer
    from .options import column_map
    from .vocab import conversation_texts, extend_tokenizer, propose_tokens, token_count, write_token_file

    conversations = (
        read_examples(args.data, column_map(args.columns)) if args.data else load_task(args.task).train
    )
    texts = conversation_texts(conversations)
    tokenizer = load_tokenizer(args.model)
    proposals = propose_tokens(tokenizer, texts, args.max_new, args.min_count)
    if not proposals:
        raise ValueError(
            f"no string occurs {args.min_count}+ times and takes more than one token; lower --min-count"
        )
    width = max(8, *(len(repr(p.string)) for p in proposals[: args.show]))
    print(f"{'string':<{width}}  {'count':>7}  {'pieces now':>10}  {'tokens saved':>12}")
    for p in proposals[: args.show]:
        print(f"{p.string!r:<{width}}  {p.count:>7,}  {p.pieces:>10}  {p.saved:>12,}")
    if len(proposals) > args.show:
        print(f"... {len(proposals) - args.show} more (--show N)")
    chars = sum(len(t) for t in texts)
    asked = (int(n) for n in args.sizes.split(",") if n.strip())
    sizes = sorted({0, len(proposals), *(n for n in asked if n < len(proposals))})
    print(f"\n{len(conversations)} conversations, {chars:,} characters")
    print(f"{'new tokens':>10}  {'tokens':>10}  {'per sample':>10}  {'per char':>8}  {'change':>7}")
    before = token_count(tokenizer, texts)
    for n in sizes:
        picked = proposals[:n]  # greedy by rounds: the first n are what --max-new n would propose
        count = (
            token_count(extend_tokenizer(tokenizer, [p.string for p in picked]).tokenizer, texts)
            if picked
            else before
        )
        print(
            f"{len(picked):>10,}  {count:>10,}  {count / len(conversations):>10.1f}  {count / chars:>8.3f}  "
            f"{count / before - 1:>+7.1%}"
        )
    if args.out:
        write_token_file(args.out, [p.string for p in proposals])
        print(f"\nwrote {len(proposals)} tokens to {args.out} (lorakit train --add-tokens {args.out})")


def cmd_data(args: argparse.Namespace) -> None:
    from .data import load_task, render_mask
    from .data.chat import encode_chat
    from .data.jsonl import read_data_file
    from .options import column_map
    from .run import api_load

    if args.data:
        found = read_data_file(args.data, column_map(args.columns))
        conversations = found.conversations
        print(f"{args.data}: {found.kind}, {found.format} records, {len(conversations)} conversations\n")
    else:
        conversations = load_task(args.task).train
    _, tokenizer = api_load(args.model)
    for conversation in conversations[: args.show]:
        encoded = encode_chat(tokenizer, conversation, args.max_length, last_turn_only=args.last_turn_only)
        if encoded is None:
            print("(skipped: no answer token left after truncation)\n")
            continue
        print(render_mask(tokenizer, encoded, color=sys.stdout.isatty()))
        print(f"-- {encoded.num_loss_tokens} trained tokens of {len(encoded.input_ids)}\n")


def cmd_bench(args: argparse.Namespace) -> None:
    from .bench import main as bench_main

    status = bench_main(args)
    if status:
        raise SystemExit(status)


def cmd_compare(args: argparse.Namespace) -> None:
    from .compare import compare, parse_groups, render

    result = compare(parse_groups(args.groups), args.target_nll)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(render(result), end="")


def cmd_arena(args: argparse.Namespace) -> None:
    from .arena import ArenaConfig, run_arena
    from .arena.report import write_report

    if args.report_only:
        write_report(Path(args.out))
        print(f"report: {Path(args.out) / 'report.html'}, {Path(args.out) / 'report.md'}")
        return
    options = {
        k: getattr(args, k) for k in ArenaConfig.__dataclass_fields__ if k != "settings" and hasattr(args, k)
    }
    run_arena(ArenaConfig(**options))


def cmd_inspect(args: argparse.Namespace) -> None:
    from .ranks import adapter_ranks, format_ranks, plot_rank_heatmap

    peft_type, rows = adapter_ranks(args.adapter)
    print(format_ranks(peft_type, rows))
    if args.plot != "none":
        plot = Path(args.plot) if args.plot else Path(args.adapter) / "rank_heatmap.png"
        print(f"heatmap: {plot_rank_heatmap(rows, plot, f'{peft_type} rank per module: {args.adapter}')}")


def build_parser() -> argparse.ArgumentParser:
    from .options import RunConfig
    from .train import TrainConfig

    parser = argparse.ArgumentParser(prog="lorakit", description="Parameter-efficient fine-tuning, measured.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback of an error (also: LORAKIT_DEBUG=1)"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def command(
        name: str, func: Callable[[argparse.Namespace], None], help_text: str
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(func=func)
        return p

    for name, func, text in (
        (
            "train",
            cmd_train,
            "fine-tune (default: LoRA on SmolLM2-135M-Instruct, ICD-10-CM task) and evaluate before/after",
        ),
        ("eval", cmd_eval, "evaluate a model (and an adapter) on the task and for forgetting"),
    ):
        p = command(name, func, text)
        p.add_argument(
            "--config", help="YAML file of options (the same names as the flags); flags override it"
        )
        _add_dataclass_flags(p, RunConfig, "run")
        _add_dataclass_flags(p, TrainConfig, "training")
        if name == "eval":
            p.add_argument(
                "--adapter", help="adapter folder (lorakit or PEFT) to evaluate on top of the model"
            )
            p.add_argument("--compare-base", action="store_true", help="also evaluate the base model")
            p.add_argument("--json", action="store_true", help="print the full results as JSON")
            p.add_argument(
                "--router",
                default=None,
                help="a task router folder (lorakit router): each item is answered by the adapter it picks",
            )
            p.add_argument(
                "--adapters", default=None, help="with --router: the task adapters' folders, in its order"
            )
            p.add_argument(
                "--route-mode",
                choices=("pick", "weights"),
                default=None,
                help="with --router (default: its own)",
            )

    p = command(
        "merge", cmd_merge, "merge an adapter into its base and write a plain Hugging Face model folder"
    )
    p.add_argument("--adapter", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--model", default=None, help="base model folder (default: SmolLM2-135M-Instruct)")

    p = command(
        "export",
        cmd_export,
        "write an adapter for serving: a plain PEFT LoRA folder every server reads alike, or a llama.cpp GGUF",
    )
    p.add_argument("--adapter", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--model", default=None, help="base model folder (default: SmolLM2-135M-Instruct)")
    p.add_argument("--format", choices=("peft", "gguf"), default="peft")
    p.add_argument(
        "--outtype",
        choices=("f32", "f16", "bf16", "q8_0"),
        default=None,
        help="gguf: tensor type (default f32 for an adapter, f16 for --merged)",
    )
    p.add_argument(
        "--merged", action="store_true", help="gguf: the merged model as one GGUF instead of an adapter"
    )
    p.add_argument(
        "--base-gguf",
        default=None,
        help="gguf: the GGUF the base model came from (default: the default model's own file)",
    )
    p.add_argument(
        "--modelfile", default=None, help="gguf: where the Ollama Modelfile goes (default: OUT.Modelfile)"
    )

    p = command(
        "check",
        cmd_check,
        "say whether vLLM, SGLang, llama.cpp and Ollama serve an adapter as trained, and what to change",
    )
    p.add_argument("adapter", metavar="ADAPTER", help="adapter folder (lorakit or PEFT)")
    p.add_argument("--json", action="store_true", help="print the verdicts as JSON")

    from .combine import COMBINATIONS, MAJORITY_SIGN

    p = command(
        "merge-adapters",
        cmd_merge_adapters,
        "combine trained LoRA adapters into one PEFT LoRA folder (linear, svd, ties, dare)",
    )
    p.add_argument("adapters", nargs="+", metavar="ADAPTER", help="LoRA adapter folders (lorakit or PEFT)")
    p.add_argument("--out", required=True)
    p.add_argument("--weights", default=None, help="one per adapter, comma-separated (default: 1 each)")
    p.add_argument("--combination", choices=COMBINATIONS, default="linear")
    p.add_argument(
        "--rank",
        type=int,
        default=None,
        help="output rank (default: the inputs' ranks added: exact for linear/svd)",
    )
    p.add_argument("--density", type=float, default=1.0, help="ties/dare: share of each change kept")
    p.add_argument(
        "--majority-sign", choices=MAJORITY_SIGN, default="total", help="ties: how signs are elected"
    )
    p.add_argument("--seed", type=int, default=0, help="dare: seed of the drop pattern")

    p = command("chat", cmd_chat, "chat with the model (and an adapter), streaming tokens")
    p.add_argument("--adapter", default=None)
    p.add_argument("--model", default=None)
    p.add_argument(
        "--merge", action=argparse.BooleanOptionalAction, default=True, help="merge the adapter for speed"
    )
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument(
        "--router", default=None, help="a task router folder (lorakit router): it picks an adapter per reply"
    )
    p.add_argument(
        "--adapters",
        default=None,
        help="with --router: the task adapters' folders, comma-separated, in its order",
    )
    p.add_argument(
        "--route-mode", choices=("pick", "weights"), default=None, help="with --router (default: its own)"
    )

    p = command(
        "router", cmd_router, "train a per-input router over trained task adapters (for chat --router)"
    )
    p.add_argument("--adapters", required=True, help="NAME=FOLDER pairs, comma-separated: the task adapters")
    p.add_argument(
        "--data",
        required=True,
        help="NAME=FILE.jsonl (or NAME=task:icd10-chapter) pairs: prompts of each task",
    )
    p.add_argument("--out", required=True)
    p.add_argument("--per-task", type=int, default=200, help="prompts per task (4/5 fit, 1/5 checked)")
    p.add_argument("--layer", type=int, default=None, help="hidden state read (default: the middle layer)")
    p.add_argument("--mode", choices=("pick", "weights"), default="pick")
    p.add_argument("--model", default=None)

    p = command(
        "vocab",
        cmd_vocab,
        "propose new tokens from training data: strings the tokenizer splits most, by tokens saved",
    )
    p.add_argument("--data", default=None, help="data file or datasets folder (default: the built-in task)")
    p.add_argument("--columns", default=None, help="NAME=COLUMN,...: read these keys from other columns")
    p.add_argument("--task", default="icd10-chapter")
    p.add_argument("--model", default=None)
    p.add_argument("--max-new", type=int, default=500, help="how many tokens to propose")
    p.add_argument("--min-count", type=int, default=5, help="a string must occur at least this often")
    p.add_argument("--show", type=int, default=40, help="rows of the table")
    p.add_argument(
        "--sizes", default="100,500,2000", help="also count the data's tokens with this many new tokens"
    )
    p.add_argument("--out", default=None, help="write the tokens here, one per line (for train --add-tokens)")

    p = command("data", cmd_data, "show how samples are formatted and which tokens train")
    p.add_argument("--show", type=int, default=3, help="how many samples to render")
    p.add_argument("--data", default=None, help="data file or datasets folder (default: the built-in task)")
    p.add_argument("--columns", default=None, help="NAME=COLUMN,...: read these keys from other columns")
    p.add_argument("--task", default="icd10-chapter")
    p.add_argument("--model", default=None)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--last-turn-only", action="store_true")

    p = command(
        "compare",
        cmd_compare,
        "compare finished runs by method: scores over seeds and steps to a held-out loss",
    )
    p.add_argument("groups", nargs="+", metavar="NAME=GLOB", help="e.g. lora='runs/lora-s*' (quote the glob)")
    p.add_argument(
        "--target-nll",
        type=float,
        nargs="+",
        default=None,
        help="held-out answer NLL targets (default: the highest mean final held-out NLL of the groups)",
    )
    p.add_argument("--json", action="store_true", help="print the full comparison as JSON")

    p = command("inspect", cmd_inspect, "print the rank per layer of an adapter folder and plot a heatmap")
    p.add_argument("adapter", help="adapter folder (lorakit or PEFT)")
    p.add_argument(
        "--plot", default=None, help="heatmap PNG path (default: ADAPTER/rank_heatmap.png; 'none' to skip)"
    )

    p = command(
        "arena",
        cmd_arena,
        "train every method on the same task, data, steps and seeds; one table, one report (HTML, Markdown, PNG)",
    )
    p.add_argument(
        "--methods", default="all", help="comma-separated arms (lora,rslora,pissa,dora,...) or all"
    )
    p.add_argument(
        "--out", default="arena", help="the arena folder: runs/, results.json, report.html (default: arena)"
    )
    p.add_argument(
        "--quick", action="store_true", help="one seed, fewer steps and a smaller evaluation (~10 min)"
    )
    for name, kind, text in (
        ("seeds", int, "seeds per method (default 3; --quick 1)"),
        ("steps", int, "optimizer steps per run (default 24; --quick 8)"),
        ("batch-size", int, "samples per step (default 8)"),
        ("micro-batch-size", int, "samples per forward (default 8)"),
        ("eval-limit", int, "held-out items scored per run (default 40; --quick 16)"),
        ("general-questions", int, "general questions of the forgetting probe (default 30; --quick 12)"),
        ("general-tokens", int, "general-text tokens for the perplexity change (default 2048; --quick 1024)"),
        ("kl-prompts", int, "prompts for the KL from the base (default 8; --quick 4)"),
        ("latency-tokens", int, "new tokens per timed generation (default 24; --quick 16)"),
        ("model", str, "base model (default: SmolLM2-135M-Instruct)"),
        ("task", str, "built-in task (default: lorakit train's)"),
        ("data", str, "training data file (JSONL/CSV/Parquet, as lorakit train --data)"),
        ("eval-data", str, "held-out data file"),
    ):
        p.add_argument(f"--{name}", type=kind, default=None, help=text)
    p.add_argument(
        "--train-args", default="", help='more lorakit train options for every run, e.g. "--max-length 128"'
    )
    p.add_argument(
        "--match-params",
        type=int,
        default=None,
        help="size each arm (rank, adapter width, virtual tokens) to train about this many parameters",
    )
    p.add_argument("--retry-failed", action="store_true", help="run the failed runs of a resumed arena again")
    p.add_argument("--no-progress-bar", dest="progress_bar", action="store_false")
    p.add_argument("--report-only", action="store_true", help="only rebuild the report from the run folders")

    p = command("bench", cmd_bench, "benchmark speed and memory against Hugging Face PEFT in the same run")
    from .bench import add_arguments as add_bench_arguments

    add_bench_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Run a subcommand. Errors a user can act on print one line (what, where, what to do) and exit
    with status 1; anything else says it is unexpected. `--debug` or LORAKIT_DEBUG=1 shows the
    traceback instead."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    debug = args.debug or os.environ.get("LORAKIT_DEBUG", "") not in ("", "0")
    try:
        args.func(args)
    except KeyboardInterrupt:
        if debug:
            raise
        raise SystemExit("interrupted (checkpoints written so far are kept; --resume continues)") from None
    except Exception as err:
        if debug:
            raise
        raise SystemExit(error_line(err)) from None


def error_line(err: BaseException) -> str:
    """The one line `lorakit` prints for an exception."""
    from .core.contract import NotMergeableError
    from .train.checkpoint import CheckpointError

    user_errors = (
        ValueError,
        KeyError,
        OSError,
        TypeError,
        ArithmeticError,
        CheckpointError,
        NotMergeableError,
    )
    if isinstance(err, KeyError) and err.args:
        text = str(err.args[0])
    elif isinstance(err, OSError) and err.filename is not None and err.strerror:
        text = f"{err.filename}: {err.strerror}" + _os_advice(err)
    else:
        text = str(err) or type(err).__name__
    text = " ".join(text.split())  # one line, whatever the message held
    if isinstance(err, user_errors):
        return f"error: {text}"
    return (
        f"error: unexpected {type(err).__name__}: {text} (rerun with --debug for the traceback, "
        "and please report it)"
    )


def _os_advice(err: OSError) -> str:
    if isinstance(err, IsADirectoryError):
        return " (a folder was given where a file is expected)"
    if isinstance(err, FileNotFoundError):
        return " (check the path)"
    if err.errno == 28:  # ENOSPC
        return " (the disk is full; free space and rerun, with --resume for a training run)"
    return ""


if __name__ == "__main__":
    main()
