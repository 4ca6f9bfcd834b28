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
    return p


def cmd_train(args) -> int:
    from trainer.config import load_recipe
    from trainer.train import run

    recipe = load_recipe(args.recipe, args.overrides)
    run(recipe, resume=args.resume, fresh=args.fresh, show_progress=not args.no_progress)
    return 0


COMMANDS = {"train": cmd_train}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    # overrides may come after options (`train r.yaml --no-progress train.lr=1e-4`)
    if unknown and hasattr(args, "overrides") and all("=" in u and not u.startswith("-") for u in unknown):
        args.overrides += unknown
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return COMMANDS[args.command](args)
    except UserError as err:
        rank = os.environ.get("RANK", "0")
        if rank == "0":  # one message, not one per process
            print(f"error: {err}", file=sys.stderr, flush=True)
        return USER_ERROR_EXIT
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
