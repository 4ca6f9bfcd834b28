"""Command line: argument parsing and wiring, no logic. User errors print one line and exit 2."""

from __future__ import annotations

import argparse
import os
import sys

from trainer.errors import USER_ERROR_EXIT, UserError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trainer", description="Fine-tune open LLMs with LoRA/QLoRA or fully.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train per a recipe (resumes from RUN_DIR's newest checkpoint)")
    t.add_argument("recipe", help="YAML recipe (see launch/recipes/)")
    t.add_argument("overrides", nargs="*", help="key.path=value, e.g. train.lr=1e-4 output_dir=runs/x")
    group = t.add_mutually_exclusive_group()
    group.add_argument("--resume", metavar="CKPT", help="resume from this checkpoint folder")
    group.add_argument("--fresh", action="store_true", help="start over; the previous run is moved aside")
    t.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")

    m = sub.add_parser("merge", help="merge RUN_DIR's adapter into the unquantized base -> RUN_DIR/merged/")
    m.add_argument("run_dir")

    e = sub.add_parser("eval", help="base vs tuned on the run's test split -> RUN_DIR/eval/, RUN_DIR/plots/")
    e.add_argument("run_dir")
    e.add_argument("--exact-match", action="store_true", help="also score greedy replies against the references")
    e.add_argument("--merged", action="store_true", help="evaluate RUN_DIR/merged instead of base + adapter")

    c = sub.add_parser("chat", help="chat with a tuned model (streaming); /use NAME switches adapters")
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
    c.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    c.add_argument("--top-p", type=float, default=0.9)
    c.add_argument("--max-new-tokens", type=int, default=256)

    x = sub.add_parser("export", help="write RUN_DIR/merged as a GGUF file for llama.cpp-style runtimes")
    x.add_argument("run_dir")
    x.add_argument("--gguf", choices=["f16", "q8_0"], default="f16")
    x.add_argument("--out", help="output file (default RUN_DIR/export/model-TYPE.gguf)")

    s = sub.add_parser("estimate", help="per-GPU memory plan for a recipe")
    s.add_argument("recipe")
    s.add_argument("overrides", nargs="*")
    s.add_argument("--gpus", type=int, default=1, help="GPUs per node")
    s.add_argument("--gpu-mem", type=float, default=24.0, help="GiB per GPU")
    s.add_argument("--nodes", type=int, default=1)
    s.add_argument("--zero", type=int, choices=[0, 2], default=None, help="ZeRO stage (default: 2 when >1 GPU)")
    s.add_argument("--offload", action="store_true", help="ZeRO-2 optimizer offload to CPU")

    w = sub.add_parser("sweep", help="train a grid of recipe variants one after the other, then compare them")
    w.add_argument("recipe", help="YAML recipe")
    w.add_argument("axes", nargs="*", help="key.path=v1,v2,... e.g. lora.r=4,8,16 lora=null train.lr=1e-4,3e-4")
    w.add_argument("--name", help="sweep folder runs/NAME (default: the recipe file's stem)")
    w.add_argument("--runs-root", default="runs", help="folder the sweep folder goes in (default: runs)")
    w.add_argument("--gpus", type=int, help="screen every point with the memory estimator on N GPUs ...")
    w.add_argument("--gpu-mem", type=float, help="... of this many GiB each; points that do not fit are skipped")
    w.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")

    k = sub.add_parser("compare", help="one table and overlaid plots over runs -> compare.md/.csv, PNGs")
    k.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    k.add_argument("--out", help="output folder (default: compare/ beside the first run)")

    d = sub.add_parser("demo", help="fine-tune the real SmolLM2-135M-Instruct on CPU and show what changed")
    d.add_argument("--output-dir", default="runs/demo")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--fresh", action="store_true", help="retrain even if the run is complete")
    return p


def cmd_train(args) -> int:
    from trainer.config import load_recipe
    from trainer.train import run

    recipe = load_recipe(args.recipe, args.overrides)
    run(recipe, resume=args.resume, fresh=args.fresh, show_progress=not args.no_progress)
    return 0


def cmd_merge(args) -> int:
    from trainer.merge import merge_run

    merge_run(args.run_dir)
    return 0


def cmd_eval(args) -> int:
    from trainer.evaluate import eval_run

    eval_run(args.run_dir, exact_match=args.exact_match, merged=args.merged)
    return 0


def cmd_chat(args) -> int:
    from pathlib import Path

    from trainer import chat

    extra = {}
    for item in args.adapter:
        if "=" not in item:
            raise UserError(f"--adapter {item}: expected NAME=DIR")
        name, folder = item.split("=", 1)
        extra[name] = Path(folder)
    gen = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)
    if args.prompts:
        if args.prompt:
            raise UserError("--prompt and --prompts: give one of them")
        prompts = chat.read_prompts(Path(args.prompts))  # before the model loads: a bad file fails at once
        models = chat.load_chat_models(
            Path(args.run_dir) if args.run_dir else None, extra, args.model, with_base=args.compare
        )
        names = models.names() if args.compare else [models.active]
        out = chat.prompts_dir(Path(args.run_dir) if args.run_dir else None)
        chat.run_prompts(models, prompts, names, out, **gen)
        return 0
    if args.compare and not args.prompt:
        raise UserError("--compare needs --prompt or --prompts")
    models = chat.load_chat_models(
        Path(args.run_dir) if args.run_dir else None, extra, args.model, with_base=args.compare
    )
    if args.compare:
        chat.print_side_by_side(chat.compare(models, args.prompt, models.names(), **gen))
    elif args.prompt:
        print(chat.reply(models, [{"role": "user", "content": args.prompt}], **gen))
    else:
        chat.interactive(models, **gen)
    return 0


def cmd_export(args) -> int:
    from pathlib import Path

    from trainer.export import export_gguf
    from trainer.merge import merge_run
    from trainer.run_dir import RunDir

    run = RunDir(args.run_dir)
    merged = run.model if (run.model / "config.json").is_file() else run.merged
    if not (merged / "config.json").is_file():
        merge_run(run.root)
    out = Path(args.out) if args.out else run.export / f"model-{args.gguf}.gguf"
    out.parent.mkdir(parents=True, exist_ok=True)
    facts = export_gguf(merged, out, args.gguf)
    print(f"export: {facts['path']} ({facts['bytes'] / 2**20:.1f} MiB, {facts['tensor_count']} tensors, {args.gguf})")
    return 0


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
        show_progress=not args.no_progress,
    )
    return 0


def cmd_compare(args) -> int:
    from trainer.compare import compare_runs

    compare_runs(args.run_dirs, args.out)
    return 0


def cmd_demo(args) -> int:
    from trainer.demo import run_demo

    run_demo(output_dir=args.output_dir, seed=args.seed, fresh=args.fresh)
    return 0


COMMANDS = {
    "train": cmd_train,
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
    try:
        return COMMANDS[args.command](args)
    except UserError as err:
        from trainer.distributed import is_main

        if is_main():  # one message, not one per process
            print(f"error: {err}", file=sys.stderr, flush=True)
        return USER_ERROR_EXIT
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
