"""Command line: argument parsing and wiring, no logic. User errors print one line and exit 2."""

from __future__ import annotations

import argparse
import os
import sys

from trainer.errors import USER_ERROR_EXIT, UserError


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors as one `error: ` line (what, and where the help is), exit 2, like every other
    error a user can cause; `--help` is unchanged. Subparsers are of this class too (argparse's default)."""

    def error(self, message: str):
        if "required: command" in message:
            message = f"give a command: {', '.join(COMMANDS)}"
        print(f"error: {self.prog}: {message}; see `{self.prog} --help`", file=sys.stderr, flush=True)
        raise SystemExit(USER_ERROR_EXIT)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="trainer", description="Fine-tune open LLMs with LoRA/QLoRA or fully.")
    verbose_help = "show the libraries' known harmless warnings and progress bars too (silenced by default)"
    p.add_argument("-v", "--verbose", action="store_true", help=verbose_help)
    # -v also after the verb (`trainer train r.yaml -v`); SUPPRESS keeps the global value when it is not given there
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=verbose_help)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", parents=[common], help="train per a recipe (resumes from RUN_DIR's newest checkpoint)")
    t.add_argument("recipe", help="YAML recipe (see launch/recipes/)")
    t.add_argument("overrides", nargs="*", help="key.path=value, e.g. train.lr=1e-4 output_dir=runs/x")
    group = t.add_mutually_exclusive_group()
    group.add_argument("--resume", metavar="CKPT", help="resume from this checkpoint folder")
    group.add_argument("--fresh", action="store_true", help="start over; the previous run is moved aside")
    t.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar: one plain line per logged step (also when stdout is not a terminal)",
    )
    checkpoint_help = "use this checkpoint folder (RUN_DIR/checkpoints/step-N) instead of the final adapter"

    v = sub.add_parser(
        "data", parents=[common], help="prepare the data as train would; stats, samples with trained tokens highlighted"
    )
    v.add_argument("recipe", help="YAML recipe (see launch/recipes/)")
    v.add_argument("overrides", nargs="*", help="key.path=value, e.g. data.max_seq_len=512")
    v.add_argument("--show", type=int, default=2, metavar="N", help="print the first N train samples (default 2)")
    v.add_argument("--jsonl", metavar="FILE", help="write every train sample: sample_id, row, input_ids, labels")

    m = sub.add_parser(
        "merge", parents=[common], help="merge RUN_DIR's adapter into the unquantized base -> RUN_DIR/merged/"
    )
    m.add_argument("run_dir")
    m.add_argument("--checkpoint", metavar="CKPT", help=checkpoint_help)
    m.add_argument(
        "--dtype",
        choices=["auto", "fp32", "bf16", "fp16"],
        default="auto",
        help="storage dtype of the merged weights (auto: the base checkpoint's own; the check runs in fp32)",
    )

    e = sub.add_parser(
        "eval", parents=[common], help="base vs tuned on the run's test split -> RUN_DIR/eval/, RUN_DIR/plots/"
    )
    e.add_argument("run_dir")
    e.add_argument("--exact-match", action="store_true", help="also score greedy replies against the references")
    e.add_argument("--merged", action="store_true", help="evaluate RUN_DIR/merged instead of base + adapter")
    e.add_argument("--checkpoint", metavar="CKPT", help=checkpoint_help)

    c = sub.add_parser(
        "chat", parents=[common], help="chat with a tuned model (streaming); /use NAME switches adapters"
    )
    c.add_argument("run_dir", nargs="?", help="a run folder (its base model and adapter)")
    c.add_argument("--model", help="a base model folder/hub id when no RUN_DIR is given")
    c.add_argument("--prompt", help="answer this one prompt and exit")
    c.add_argument(
        "--prompts",
        metavar="FILE",
        help="answer every prompt of FILE (one per line, or JSONL with prompt and optional reference) "
        "-> RUN_DIR/eval/prompts.md and .jsonl",
    )
    c.add_argument(
        "--compare", action="store_true", help="base and every adapter side by side (with --prompt or --prompts)"
    )
    c.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR", help="extra adapter (repeatable)")
    c.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; > 0 samples")
    c.add_argument("--top-p", type=float, help="default: the run's generation section; 0.9 without a run")
    c.add_argument("--max-new-tokens", type=int, help="default: the run's generation section; 256 without a run")
    c.add_argument("--checkpoint", metavar="CKPT", help=checkpoint_help)

    from trainer.export.run import OUTTYPES

    x = sub.add_parser(
        "export", parents=[common], help="RUN_DIR's merged model as a GGUF (+ Ollama Modelfile) for llama.cpp/Ollama"
    )
    x.add_argument("run_dir")
    x.add_argument(
        "--gguf",
        choices=OUTTYPES,
        default="f16",
        help="f16/bf16/f32/q8_0 written directly; K-quants (q4_k_m, ...) by llama.cpp (pip install 'trainer[gguf]')",
    )
    x.add_argument("--out", help="output file (default RUN_DIR/export/model-TYPE.gguf)")
    x.add_argument("--checkpoint", metavar="CKPT", help=checkpoint_help + " (merged first)")
    x.add_argument(
        "--check",
        action="store_true",
        help="also write the f16/q8_0 hops, run each in llama.cpp against the merged model on the test "
        "split -> RUN_DIR/export/report.{json,md}; exit 1 if a check fails",
    )

    s = sub.add_parser("estimate", parents=[common], help="per-GPU memory plan for a recipe")
    s.add_argument("recipe")
    s.add_argument("overrides", nargs="*")
    s.add_argument("--gpus", type=int, default=1, help="GPUs per node")
    s.add_argument("--gpu-mem", type=float, default=24.0, help="GiB per GPU")
    s.add_argument("--nodes", type=int, default=1)
    s.add_argument("--zero", type=int, choices=[0, 2], default=None, help="ZeRO stage (default: 2 when >1 GPU)")
    s.add_argument("--offload", action="store_true", help="ZeRO-2 optimizer offload to CPU")

    w = sub.add_parser(
        "sweep", parents=[common], help="train a grid of recipe variants one after the other, then compare them"
    )
    w.add_argument("recipe", help="YAML recipe")
    w.add_argument("axes", nargs="*", help="key.path=v1,v2,... e.g. lora.r=4,8,16 lora=null train.lr=1e-4,3e-4")
    w.add_argument("--name", help="sweep folder runs/NAME (default: the recipe file's stem)")
    w.add_argument("--runs-root", default="runs", help="folder the sweep folder goes in (default: runs)")
    w.add_argument("--gpus", type=int, help="screen every point with the memory estimator on N GPUs ...")
    w.add_argument("--gpu-mem", type=float, help="... of this many GiB each; points that do not fit are skipped")
    w.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")

    k = sub.add_parser(
        "compare", parents=[common], help="one table and overlaid plots over runs -> compare.md/.csv, PNGs"
    )
    k.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    k.add_argument("--out", help="output folder (default: compare/ beside the first run)")

    d = sub.add_parser(
        "demo", parents=[common], help="fine-tune the real SmolLM2-135M-Instruct on CPU and show what changed"
    )
    d.add_argument("--output-dir", default="runs/demo")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--fresh", action="store_true", help="retrain even if the run is complete")
    d.add_argument(
        "--export",
        choices=OUTTYPES,
        metavar="TYPE",
        help="end with `trainer export RUN_DIR --gguf TYPE --check` (e.g. q4_k_m) and its hop table",
    )
    return p


def cmd_train(args) -> int:
    from trainer.config import load_recipe
    from trainer.run_dir import RunDir, check_output_dir

    recipe = load_recipe(args.recipe, args.overrides)  # every value checked before anything heavy is imported
    check_output_dir(RunDir(recipe.output_dir), recipe, fresh=args.fresh, resume=args.resume)
    from trainer.preflight import check_sources

    check_sources(recipe)  # data and model paths: exist, readable, of a type we read
    from trainer.train import run

    show_progress = not args.no_progress and sys.stdout.isatty()
    run(recipe, resume=args.resume, fresh=args.fresh, show_progress=show_progress)
    return 0


def cmd_data(args) -> int:
    from pathlib import Path

    from trainer.config import load_recipe
    from trainer.data_command import data_command

    recipe = load_recipe(args.recipe, args.overrides)
    data_command(recipe, show=args.show, jsonl=Path(args.jsonl) if args.jsonl else None)
    return 0


def cmd_merge(args) -> int:
    from trainer.artifacts import tuned_source

    source = tuned_source(args.run_dir, args.checkpoint, log=print)  # checked before torch is imported
    from trainer.merge import merge_run

    merge_run(args.run_dir, source=source, dtype=args.dtype)
    return 0


def cmd_eval(args) -> int:
    from trainer.artifacts import tuned_source

    source = None if args.merged else tuned_source(args.run_dir, args.checkpoint, log=print)
    from trainer.evaluate import eval_run

    eval_run(args.run_dir, exact_match=args.exact_match, merged=args.merged, source=source)
    return 0


def cmd_chat(args) -> int:
    from pathlib import Path

    extra = {}
    for item in args.adapter:
        if "=" not in item:
            raise UserError(f"--adapter {item}: expected NAME=DIR")
        name, folder = item.split("=", 1)
        extra[name] = Path(folder)
    if args.prompts and args.prompt:
        raise UserError("--prompt and --prompts: give one of them")
    if args.compare and not (args.prompt or args.prompts):
        raise UserError("--compare needs --prompt or --prompts")
    source = None
    if args.run_dir:
        from trainer.artifacts import tuned_source

        source = tuned_source(args.run_dir, args.checkpoint, log=print)  # checked before torch is imported
    from trainer import chat

    run_dir = Path(args.run_dir) if args.run_dir else None
    prompts = chat.read_prompts(Path(args.prompts)) if args.prompts else None  # a bad file fails before loading
    models = chat.load_chat_models(run_dir, extra, args.model, source=source, with_base=args.compare)
    gen = _chat_generation(args)
    if prompts is not None:
        names = models.names() if args.compare else [models.active]
        chat.run_prompts(models, prompts, names, chat.prompts_dir(run_dir), **gen)
    elif args.compare:
        chat.print_side_by_side(chat.compare(models, args.prompt, models.names(), **gen))
    elif args.prompt:
        print(chat.reply(models, [{"role": "user", "content": args.prompt}], **gen))
    else:
        chat.interactive(models, **gen)
    return 0


def _chat_generation(args) -> dict:
    """Generation settings for `trainer chat`: greedy unless --temperature > 0; --max-new-tokens and --top-p as
    given, else the run's `generation` section (what the task's replies need), else 256 and 0.9."""
    gen = {"max_new_tokens": 256, "temperature": 0.0, "top_p": 0.9}
    if args.run_dir:
        from trainer.artifacts import read_recipe
        from trainer.run_dir import RunDir

        g = read_recipe(RunDir(args.run_dir)).generation
        gen.update(max_new_tokens=g.max_new_tokens, top_p=g.top_p)
    given = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p}
    return {**gen, **{k: v for k, v in given.items() if v is not None}}


def cmd_export(args) -> int:
    from pathlib import Path

    from trainer.artifacts import merged_source

    merged_source(args.run_dir, args.checkpoint, log=lambda m: None)  # checked before torch is imported
    from trainer.export import export_run

    result = export_run(
        Path(args.run_dir),
        args.gguf,
        out=Path(args.out) if args.out else None,
        check=args.check,
        checkpoint=args.checkpoint,
    )
    report = result["report"]
    return 1 if report is not None and report["failures"] else 0


def cmd_estimate(args) -> int:
    from trainer.config import load_recipe
    from trainer.estimate import estimate, format_table, load_model_config

    recipe = load_recipe(args.recipe, args.overrides)
    world = args.gpus * args.nodes
    zero = args.zero if args.zero is not None else (2 if world > 1 else 0)
    est = estimate(
        recipe,
        load_model_config(recipe.model.name_or_path),
        gpus=args.gpus,
        gpu_mem_gib=args.gpu_mem,
        nodes=args.nodes,
        zero_stage=zero,
        offload_optimizer=args.offload,
    )
    print(format_table(est))
    return 0


def cmd_sweep(args) -> int:
    from trainer.sweep import run_sweep

    run_sweep(
        args.recipe,
        args.axes,
        name=args.name,
        gpus=args.gpus,
        gpu_mem_gib=args.gpu_mem,
        runs_root=args.runs_root,
        show_progress=not args.no_progress and sys.stdout.isatty(),
    )
    return 0


def cmd_compare(args) -> int:
    from trainer.compare import compare_runs

    compare_runs(args.run_dirs, args.out)
    return 0


def cmd_demo(args) -> int:
    from trainer.demo import run_demo

    report = run_demo(output_dir=args.output_dir, seed=args.seed, fresh=args.fresh, export=args.export)
    exported = report.get("export")
    return 1 if exported is not None and exported["failures"] else 0


COMMANDS = {
    "train": cmd_train,
    "data": cmd_data,
    "merge": cmd_merge,
    "eval": cmd_eval,
    "chat": cmd_chat,
    "export": cmd_export,
    "estimate": cmd_estimate,
    "demo": cmd_demo,
    "sweep": cmd_sweep,
    "compare": cmd_compare,
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    # overrides may come after options (`train r.yaml --no-progress train.lr=1e-4`)
    if unknown and hasattr(args, "overrides") and all("=" in u and not u.startswith("-") for u in unknown):
        args.overrides += unknown
    elif unknown and hasattr(args, "axes") and all("=" in u and not u.startswith("-") for u in unknown):
        args.axes += unknown
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from trainer.quiet import silence_known_noise

    silence_known_noise(verbose=args.verbose)
    try:
        return COMMANDS[args.command](args)
    except UserError as err:
        return _fail(str(err))
    except OSError as err:
        from trainer.files import disk_error, is_disk_error

        if not is_disk_error(err):
            raise
        return _fail(f"{args.command}: cannot write {disk_error(err)}")
    except KeyboardInterrupt:
        return 130


def _fail(message: str) -> int:
    """Print a user error once (rank 0 of a launch), as `error: ...`; the exit code of user errors."""
    import sys as _sys

    if "accelerate.state" in _sys.modules or "RANK" in os.environ:  # a launch: one message, not one per process
        from trainer.distributed import is_main

        if not is_main():
            return USER_ERROR_EXIT
    print("\n".join(f"error: {line}" for line in message.splitlines()), file=sys.stderr, flush=True)
    return USER_ERROR_EXIT


if __name__ == "__main__":
    raise SystemExit(main())
