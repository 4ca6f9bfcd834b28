"""`trainer train`: the setup sequence, one small step each, then the loop.

config -> accelerator -> run folder / resume decision -> tokenizer -> data -> model -> optimizer
-> accelerator.prepare -> checkpoint.load -> loop.train -> final adapter + run_summary.json
"""

from __future__ import annotations

import json
import signal
import time
from dataclasses import replace
from pathlib import Path

import torch

from trainer import checkpoint
from trainer.arch import trainable_share
from trainer.config import Recipe, dump_yaml, recipe_hash, to_dict
from trainer.data import describe, prepare_data
from trainer.distributed import build_accelerator, describe_launch, is_deepspeed, is_main, world_info
from trainer.dtypes import MIXED_PRECISION
from trainer.errors import UserError
from trainer.files import as_storage_error, atomic_write_text, disk_error
from trainer.loop import (
    PREEMPTED_EXIT,
    NonFiniteLoss,
    StopRequest,
    StopSignal,
    make_plan,
    peak_memory_gib,
    reset_peak_memory,
    train,
)
from trainer.model import CONVERTED_INITS, build_model, count_parameters
from trainer.optim import build_optimizer
from trainer.packing_check import packing_isolation
from trainer.run_dir import FRESH, RESTART, RESUME, RunDir, check_output_dir, move_aside, restart_or_refuse
from trainer.state import TrainState
from trainer.tokenizer import RunTokenizer, run_tokenizer, save_tokenizer
from trainer.tracking import check_report_to, flat_hparams, make_tracker


def run(recipe: Recipe, *, resume: str | None = None, fresh: bool = False, show_progress: bool = True) -> dict:
    """Train per the recipe; returns run_summary (also written to RUN_DIR/run_summary.json on rank 0).

    Nothing is written before the output_dir is known to be ours (`check_output_dir`). A stop signal during the
    setup exits with PREEMPTED_EXIT and nothing saved; during the loop the step finishes, a checkpoint is saved
    and the exit code is PREEMPTED_EXIT; after the last step the run completes its final save and exits 0."""
    started = time.perf_counter()
    reset_peak_memory()  # this run's peak, also when a sweep trains several runs in one process
    check_report_to(recipe.train.report_to)  # a missing tracker package: one line, before anything loads
    run = RunDir(recipe.output_dir)
    decision = check_output_dir(run, recipe, fresh=fresh, resume=resume)  # before anything is written or loaded
    stop = StopRequest(raising=True).install()
    try:
        return _run(recipe, run, decision, resume, show_progress, stop, started)
    except StopSignal as sig:
        if is_main():
            print(
                f"stopped by {signal.Signals(sig.signum).name} during setup, before the first step: nothing to save "
                f"yet; exiting with code {PREEMPTED_EXIT}; rerun the same command to start",
                flush=True,
            )
        raise SystemExit(PREEMPTED_EXIT) from None
    finally:
        stop.restore()


def _run(recipe: Recipe, run: RunDir, decision: str, resume, show_progress: bool, stop: StopRequest, started) -> dict:
    accelerator = _setup_accelerator(recipe)
    log = _logger(accelerator)
    ckpt = _setup_resume(run, recipe, resume, decision, accelerator, log)
    torch.manual_seed(recipe.train.seed)
    chat = run_tokenizer(recipe.model.name_or_path, recipe.data)  # pad token, chat template, stop tokens: once, here
    tokenizer = chat.tokenizer
    log(_describe_chat(chat))
    data, data_prepare_s = _setup_data(recipe, tokenizer, accelerator, log, ckpt)
    model, optimizer, model_load_s, params = _setup_model(recipe, accelerator, run, log, chat)
    packing, used, data, more_s = _decide_packing(recipe, accelerator, model, data, tokenizer, log, ckpt)
    data_prepare_s += more_s
    state, plan = _setup_state(used, accelerator, model, optimizer, data, ckpt, log)
    if accelerator.is_main_process:
        _claim(run, recipe)
    accelerator.wait_for_everyone()
    per_dataset = [f"eval/loss/{name}" for name in data.names] if len(data.names) > 1 and data.val else []
    tracker = make_tracker(
        accelerator.is_main_process,
        run,
        plan.total_steps,
        state.step,
        show_progress,
        report_to=recipe.train.report_to,
        hparams=flat_hparams(to_dict(recipe)),
        extra_fields=per_dataset,
    )
    log(
        f"train: {plan.total_steps} steps of {plan.rows_per_step} rows ({plan.steps_per_epoch} per epoch); "
        f"{describe_launch(world_info(accelerator))}"
    )
    before = {"step": state.step, "tokens": state.tokens_seen, "wall": state.wall_time}
    try:
        last = train(
            recipe, accelerator, model, optimizer, data, state, plan, tracker, run, tokenizer.pad_token_id, stop=stop
        )
    except NonFiniteLoss as err:
        raise UserError(str(err)) from None
    finally:
        tracker.close()
    saved = {}
    if not last.get("preempted"):
        saved = _save_final(accelerator, model, tokenizer, run)  # every rank: the adapter is gathered collectively
    summary = _summary(
        accelerator,
        state,
        last,
        before,
        data.stats,
        started=started,
        model_load_s=model_load_s,
        data_prepare_s=data_prepare_s,
        params=params,
        saved=saved,
    )
    summary["tokenizer"] = chat.summary()
    summary["packing"] = (
        {"requested": False}
        if packing is None
        else {"requested": True, "used": packing["isolated"], "check": {k: v for k, v in packing.items()}}
    )
    _write_summary(accelerator, run, recipe, summary, log)
    if last.get("preempted"):
        raise SystemExit(PREEMPTED_EXIT)
    log(_final_line(summary, run, recipe))
    if stop.signum is not None:
        log(
            f"{signal.Signals(stop.signum).name} arrived after the last step: the run had finished and its final "
            "save is complete; exiting with code 0"
        )
    return summary


def _decide_packing(recipe: Recipe, accelerator, model, data, tokenizer, log, ckpt):
    """(packing check result or None, the recipe as trained, the data, extra prepare seconds). When the model's
    attention ignores position ids (`_check_packing`), the data is prepared again one sample per row, grouped by
    length; the returned recipe says so (the data settings the step plan uses), while config.yaml and checkpoints
    keep the user's recipe, so a resume decides the same way again."""
    if not recipe.data.packing:
        return None, recipe, data, 0.0
    packing = _check_packing(accelerator, model)
    if packing["isolated"]:
        return packing, recipe, data, 0.0
    log(
        f"packing: this model's attention mask ignores position ids (a packed sample sees the one before "
        f"it: log-prob change {packing['leak']:.2g}); training one sample per row, grouped by length"
    )
    used = replace(recipe, data=replace(recipe.data, packing=False, group_by_length=True))
    data, seconds = _setup_data(used, tokenizer, accelerator, log, ckpt)
    return packing, used, data, seconds


def _setup_state(used: Recipe, accelerator, model, optimizer, data, ckpt, log):
    """(TrainState, step plan): a fresh state, or the checkpoint's (weights and optimizer loaded into `model` and
    `optimizer`); UserError when the checkpoint's data cursor is past this data's epoch."""
    state = TrainState(data_seed=used.train.seed)
    if ckpt is not None:
        state = checkpoint.load(accelerator, ckpt, model, optimizer)
        log(f"resume: from {ckpt} at step {state.step} (epoch {state.epoch}, {state.samples_seen} samples seen)")
    plan = make_plan(len(data.train), used, accelerator.num_processes, data.train["length"])
    if ckpt is not None and state.cursor >= plan.rows:
        raise UserError(
            f"{ckpt / 'trainer_state.json'}: cursor={state.cursor} is past the {plan.rows} training rows of an "
            "epoch; this checkpoint is not of this data; resume another checkpoint or start over with --fresh"
        )
    return state, plan


def _write_summary(accelerator, run: RunDir, recipe: Recipe, summary: dict, log) -> None:
    """Log the FLOP rates when known; rank 0 writes run_summary.json (atomically); every rank waits for it."""
    if summary.get("mfu") is not None:
        log(
            f"train: {summary['tflops']:.1f} model TFLOP/s per device, MFU {summary['mfu']:.1%} "
            f"(peak {summary['mfu_peak']}, {recipe.model.dtype})"
        )
    if accelerator.is_main_process:
        try:
            atomic_write_text(run.summary, json.dumps(summary, indent=1))
        except OSError as err:
            raise UserError(f"train: cannot write the run summary: {disk_error(err, run.summary)}") from None
    accelerator.wait_for_everyone()


def _final_line(summary: dict, run: RunDir, recipe: Recipe) -> str:
    """The last line of a run: steps, time, final loss, eval loss and perplexity, where the result is."""
    from trainer.tracking import format_seconds

    loss, ev, ppl = summary.get("final_loss"), summary.get("final_eval_loss"), summary.get("final_eval_ppl")
    parts = [f"done: {summary['steps']} steps in {format_seconds(summary['process_wall_s'])}"]
    if not summary.get("steps_this_session"):
        parts[0] = f"done: the run was already complete at step {summary['steps']}; its final result written again"
    if loss is not None and loss == loss:  # NaN when no step ran in this session
        parts.append(f"final loss {loss:.4f}")
    if ev is not None:
        parts.append(f"eval loss {ev:.4f} (ppl {ppl:.2f})")
    parts.append(f"{'adapter' if recipe.lora is not None else 'model'} in {run.adapter if recipe.lora else run.model}")
    return "; ".join(parts)


def _claim(run: RunDir, recipe: Recipe) -> None:
    """Rank 0: create or adopt the run folder (the marker first, then the recipe). A storage that refuses the
    write is one line naming the path."""
    try:
        run.write_marker(recipe_hash(recipe))
        atomic_write_text(run.config, dump_yaml(recipe))
    except OSError as err:
        raise UserError(f"output_dir: cannot write {run.root}: {disk_error(err, run.root)}") from None


def _setup_data(recipe: Recipe, tokenizer, accelerator, log, ckpt: Path | None):
    """The prepared data and the seconds it took. The first process of each node prepares it (one in all when the
    cache is on shared storage: `KEY.lock`), the others wait for the cache and stop with a message if it shows no
    progress for data.wait_timeout. A resume whose data changed since `ckpt` is refused before any tokenizing."""
    t0 = time.perf_counter()
    check = (lambda fingerprint: checkpoint.check_data(ckpt, fingerprint)) if ckpt is not None else None
    data = prepare_data(recipe.data, tokenizer, log=log, check=check, wait=not accelerator.is_local_main_process)
    seconds = time.perf_counter() - t0
    log(f"data: {describe(data.stats)} ({seconds:.1f} s)")
    return data, seconds


def _describe_chat(chat: RunTokenizer) -> str:
    tok = chat.tokenizer
    added = f", added tokens {', '.join(chat.new_tokens)}" if chat.new_tokens else ""
    return (
        f"tokenizer: chat template {chat.template}; a reply ends with {tok.convert_ids_to_tokens(chat.end_of_turn)}; "
        f"generation stops on ids {chat.stop_ids}{added}"
    )


def _check_packing(accelerator, model) -> dict:
    """`trainer.packing_check.packing_isolation` on the prepared model, under the training autocast; a leak seen
    by any process counts on all (they must all fall back together)."""
    result = packing_isolation(accelerator.unwrap_model(model), autocast=accelerator.autocast)
    leak = torch.tensor(0.0 if result["isolated"] else 1.0, device=accelerator.device)
    if accelerator.num_processes > 1:
        leak = accelerator.reduce(leak, reduction="sum")
    result["isolated"] = bool(leak.item() == 0.0)
    return result


def _setup_model(recipe: Recipe, accelerator, run: RunDir, log, chat: RunTokenizer):
    """(model, optimizer) prepared by accelerate, with the checkpoint hooks installed, the load seconds, and the
    parameter counts {"trainable_params", "total_params", "trainable_share"} (percent, `arch.trainable_share`: the
    one definition the log line and the estimator use; 4-bit weights count 2 per byte).

    PiSSA / OLoRA change the base weights when they initialise the adapter: that initial adapter is written to
    RUN_DIR/initial_adapter (rank 0; the same every time, the SVD/QR of the same weights) so that every adapter saved
    later is converted into one for the original base (`checkpoint.save_adapter`)."""
    if recipe.lora is not None and recipe.lora.init in CONVERTED_INITS and is_deepspeed(accelerator):
        raise UserError(
            f"lora.init={recipe.lora.init} is not supported under DeepSpeed (its adapter conversion reads the "
            "module's weights, which ZeRO keeps in partitions); launch without DeepSpeed or use lora.init=default"
        )
    if recipe.lora is not None and recipe.lora.init == "loftq" and recipe.model.quantization != "nf4":
        raise UserError("lora.init=loftq needs model.quantization: nf4")
    t0 = time.perf_counter()
    model = build_model(
        recipe.model,
        recipe.lora,
        device_map=_device_map(recipe, accelerator),
        log=log,
        vocab_size=len(chat.tokenizer),
        new_token_ids=chat.new_token_ids,
    )
    seconds = time.perf_counter() - t0
    if recipe.lora is not None and recipe.lora.init in CONVERTED_INITS and accelerator.is_main_process:
        checkpoint.save_initial_adapter(model, run.initial_adapter)
    log(f"model: loaded in {seconds:.1f} s")
    trainable, total = count_parameters(model)
    params = {
        "trainable_params": trainable,
        "total_params": total,
        "trainable_share": trainable_share(trainable, total),
    }
    optimizer = build_optimizer(model, recipe.train)
    model, optimizer = accelerator.prepare(model, optimizer)
    checkpoint.install_trainable_only_hook(accelerator)
    return model, optimizer, seconds, params


def _summary(
    accelerator,
    state: TrainState,
    last: dict,
    before: dict,
    data_stats: dict,
    *,
    started: float,
    model_load_s: float,
    data_prepare_s: float,
    params: dict,
    saved: dict,
) -> dict:
    """run_summary.json: where the run ended, throughput of this session, timings, final losses and FLOP rates,
    parameter counts, and the bytes of the saved weights (`adapter_bytes`: the adapter's safetensors; `model_bytes`:
    a full fine-tune's; null when the run was preempted before its final save)."""
    return {
        **world_info(accelerator),
        "steps": state.step,
        "epochs_completed": state.epoch,
        "samples_seen": state.samples_seen,
        "tokens_seen": state.tokens_seen,
        "target_tokens_seen": state.target_tokens_seen,
        "skipped_steps": state.skipped_steps,
        "train_wall_s": round(state.wall_time, 3),
        "process_wall_s": round(time.perf_counter() - started, 3),
        "tokens_per_s": round((state.tokens_seen - before["tokens"]) / max(state.wall_time - before["wall"], 1e-9), 2),
        "steps_this_session": state.step - before["step"],
        "peak_mem_gib": round(peak_memory_gib(), 3),
        "final_loss": last.get("loss"),
        "final_token_accuracy": last.get("token_accuracy"),
        "final_eval_loss": last.get("eval_loss"),
        "final_eval_ppl": last.get("eval_ppl"),
        "final_eval_token_accuracy": last.get("eval_token_accuracy"),
        **params,
        "adapter_bytes": saved.get("adapter_bytes"),
        "model_bytes": saved.get("model_bytes"),
        "data": data_stats,
        "preempted": bool(last.get("preempted")),
        "model_load_s": round(model_load_s, 3),
        "data_prepare_s": round(data_prepare_s, 3),
        **last.get("flops", {}),
    }  # model_flops_per_token, tflops (per device); mfu, mfu_peak on known GPUs


def _setup_accelerator(recipe: Recipe):
    t = recipe.train
    if recipe.model.dtype == "fp16" and not torch.cuda.is_available():
        raise UserError("model.dtype=fp16 needs a GPU; on CPU use bf16 or fp32")
    return build_accelerator(
        grad_accum=t.grad_accum,
        mixed_precision=MIXED_PRECISION[recipe.model.dtype],
        micro_batch_size=t.micro_batch_size,
        max_grad_norm=t.max_grad_norm,
    )


def _setup_resume(run: RunDir, recipe: Recipe, resume: str | None, decision: str, accelerator, log):
    """Which checkpoint to resume from (None: start at step 0). Decided before anything heavy is loaded;
    `decision` is `check_output_dir`'s."""
    if resume:
        ckpt = Path(resume)
        if not ckpt.is_dir():
            raise UserError(f"--resume {ckpt}: no such checkpoint folder")
        problem = checkpoint.verify(ckpt)
        if problem:
            raise UserError(f"--resume {ckpt}: {problem}; pick another checkpoint from {ckpt.parent}")
    elif decision == FRESH:
        if accelerator.is_main_process:  # nothing on disk is lost: the previous run moves aside
            move_aside(run.root, log=lambda m: log(f"--fresh: starting over; {m}"))
        accelerator.wait_for_everyone()
        return None
    elif decision == RESTART:
        log(f"train: {run.root} holds an unfinished run with no checkpoint; starting it over")
        return None
    else:
        ckpt = checkpoint.find_resumable(run.root, log=log)
        if ckpt is None:
            if decision == RESUME and restart_or_refuse(run, recipe) == RESTART:
                log(f"train: no complete checkpoint in {run.checkpoints}; starting over")
            return None
    problem = resume_topology_problem(
        checkpoint.read_state(ckpt),
        world_info(accelerator),
        full_state=(ckpt / checkpoint.FULL_OPTIMIZER).is_file(),
        optimizer=recipe.train.optimizer,
    )
    if problem:
        raise UserError(f"{ckpt}: {problem}")
    for change in checkpoint.check_compatible(ckpt, recipe):
        log(f"resume: recipe change accepted: {change}")
    if accelerator.is_main_process and ckpt.parent == run.checkpoints:
        if resume:
            checkpoint.set_aside_newer(ckpt, log=log)
        checkpoint.point_latest_at(ckpt)
    accelerator.wait_for_everyone()
    return ckpt


def resume_topology_problem(
    saved: dict, now: dict, *, full_state: bool = False, optimizer: str = "adamw"
) -> str | None:
    """Why a checkpoint (its trainer_state.json) cannot resume on this launch (`world_info`), or None.

    * Both without DeepSpeed, any numbers of processes: the optimizer state is whole (accelerate's files).
    * Both DeepSpeed on the same number of processes: DeepSpeed's own shards.
    * DeepSpeed checkpoint on another number of processes, or without DeepSpeed: from its whole optimizer state
      (`full_state`: checkpoint.FULL_OPTIMIZER exists; written for AdamW up to checkpoint.FULL_STATE_MAX_PARAMS).
    * Non-DeepSpeed checkpoint under DeepSpeed: from accelerate's files, for torch AdamW (`optimizer` "adamw");
      8-bit optimizer states are quantized per block and cannot be cut into ZeRO partitions.
    """
    if "distributed_type" not in saved:  # written before these keys existed: let load_state decide
        return None
    was_ds, now_ds = saved["distributed_type"] == "DEEPSPEED", now["distributed_type"] == "DEEPSPEED"
    then_n, now_n = saved.get("world_size"), now["world_size"]
    if (not was_ds and not now_ds) or (was_ds and now_ds and then_n == now_n):
        return None
    if (was_ds and full_state) or (not was_ds and optimizer == "adamw"):
        return None

    def launch(kind: str, n) -> str:
        return "a single process" if kind == "NO" else f"{kind.replace('DEEPSPEED', 'DeepSpeed')} with {n} processes"

    if was_ds:
        return (
            f"saved by {launch('DEEPSPEED', then_n)}, but this launch is {launch(now['distributed_type'], now_n)}, "
            f"and the checkpoint has no {checkpoint.FULL_OPTIMIZER} (written only with train.optimizer adamw and "
            f"at most {checkpoint.FULL_STATE_MAX_PARAMS:,} trainable parameters), so its ZeRO shards load only under "
            f"DeepSpeed with the same number of processes: relaunch with the DeepSpeed accelerate config and "
            f"--num_processes {then_n}, or start over with --fresh"
        )
    return (
        f"saved by {launch(saved['distributed_type'], then_n)} with train.optimizer {optimizer}, but this launch uses "
        f"DeepSpeed, which cannot cut 8-bit optimizer states into its partitions; relaunch without DeepSpeed (any "
        f"number of processes resumes it), or start over with --fresh"
    )


def _device_map(recipe: Recipe, accelerator):
    if recipe.model.quantization != "nf4":
        return None
    # Each process loads its own 4-bit copy on its own device (QLoRA under DDP).
    return {"": accelerator.device.index if accelerator.device.type == "cuda" else "cpu"}


def _save_final(accelerator, model, tokenizer, run: RunDir) -> dict:
    """Every rank calls it (under DeepSpeed the adapter's fp32 weights are gathered collectively); rank 0 writes
    adapter/ (or model/) with the tokenizer, then its manifest.json (size and sha256 of every file, the
    checkpoints' format) last, so that post-training commands can tell a complete one from a torn one.
    Returns {"adapter_bytes": n} or {"model_bytes": n}: the saved safetensors' bytes ({} on other ranks)."""
    unwrapped = accelerator.unwrap_model(model)
    adapter = checkpoint.trainable_state_dict(accelerator, model) if checkpoint.is_peft(accelerator, model) else None
    if not accelerator.is_main_process:
        return {}
    out = run.adapter if adapter is not None else run.model
    try:
        (out / "manifest.json").unlink(missing_ok=True)  # the folder is incomplete until the new manifest exists
        if adapter is not None:
            checkpoint.save_adapter(accelerator, model, out, adapter, initial=checkpoint.initial_adapter_of(run.root))
        else:
            unwrapped.save_pretrained(str(out), safe_serialization=True, state_dict=accelerator.get_state_dict(model))
        base = getattr(unwrapped, "get_base_model", lambda: unwrapped)()
        # the exact tokenizer and chat template used in training, and generation_config.json with the stop ids
        save_tokenizer(tokenizer, out, generation_config=getattr(base, "generation_config", None))
        checkpoint.write_manifest(out)
    except Exception as err:  # noqa: BLE001 - a refused write is one line; anything else is raised as it is
        storage = as_storage_error(err, out if out.exists() else run.root)
        if storage is None:
            raise
        last = checkpoint.find_resumable(run.root, log=lambda m: None)
        kept = f"the last complete checkpoint {last} holds the trained weights" if last else "no checkpoint was saved"
        raise UserError(
            f"train: cannot write {out.name}/: {disk_error(storage, out)}; {kept}. Free space and rerun the same "
            "command: it resumes from there and writes the final result again"
        ) from None
    weights = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    return {"adapter_bytes" if adapter is not None else "model_bytes": weights}


def _logger(accelerator):
    def log(message: str) -> None:
        if accelerator.is_main_process:
            print(message, flush=True)

    return log
