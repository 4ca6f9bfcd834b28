"""The training loop: `train_step` (accumulate, normalise, clip, step) and `train` (steps, eval, save, stop)."""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from trainer import checkpoint, lora_dropout
from trainer.config import Recipe
from trainer.data import IGNORE, collate, count_targets
from trainer.distributed import is_deepspeed
from trainer.flops import FlopsMeter
from trainer.loss import dataset_loss, token_loss_stats
from trainer.optim import lr_at, set_lr
from trainer.run_dir import RunDir
from trainer.state import TrainState, epoch_order, step_rows

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: "try again"; a requeued job resumes from the checkpoint just written


class NonFiniteLoss(RuntimeError):
    pass


@dataclass
class Plan:
    """How many optimizer steps, derived once from the data size and the recipe."""

    rows: int
    rows_per_step: int  # global: micro_batch * grad_accum * world
    steps_per_epoch: int
    total_steps: int
    lengths: object = None  # row lengths when steps are grouped by length (packing off), else None
    _order: tuple = field(default=(None, None), repr=False, compare=False)  # ((seed, epoch), order) last built

    def epoch_order(self, data_seed: int, epoch: int) -> np.ndarray:
        """The epoch's row order, built once per epoch, not once per step (grouping 200k rows costs ~25 ms)."""
        if self._order[0] != (data_seed, epoch):
            self._order = (
                (data_seed, epoch),
                epoch_order(self.rows, data_seed, epoch, self.lengths, self.rows_per_step),
            )
        return self._order[1]


def make_plan(n_rows: int, recipe: Recipe, world: int, lengths=None) -> Plan:
    t = recipe.train
    per_step = t.global_batch(world)
    steps_per_epoch = max(1, math.ceil(n_rows / per_step))
    total = t.max_steps if t.max_steps is not None else steps_per_epoch * t.epochs
    grouped = lengths is not None and recipe.data.group_by_length and not recipe.data.packing
    return Plan(n_rows, per_step, steps_per_epoch, total, np.asarray(lengths) if grouped else None)


def micro_batches(rows, state: TrainState, plan: Plan, recipe: Recipe, world: int, rank: int, pad_id: int):
    """This rank's micro-batches for the next step, and the sample ids they hold."""
    order = plan.epoch_order(state.data_seed, state.epoch)
    slices = step_rows(order, state.cursor, recipe.train.micro_batch_size, recipe.train.grad_accum, world, rank)
    batches, sample_ids = [], []
    for idx in slices:
        if idx:
            picked = rows.select(idx)
            batches.append(collate(picked, pad_id))
            sample_ids += [s for row in picked["sample_ids"] for s in row]
            lengths = [len(ids) for ids in picked["input_ids"]]
        else:  # end of epoch: an empty slot still runs (collectives stay in step) and trains nothing
            batches.append(collate([{"input_ids": [pad_id], "labels": [IGNORE], "position_ids": [0]}], pad_id))
            batches[-1].update(n_rows=torch.tensor(0), n_tokens=torch.tensor(0))
            idx, lengths = [-1], [0]
        batches[-1].update(row_ids=list(idx), row_lengths=lengths)  # for LoRA dropout masks (lora_dropout.py)
    return batches, sample_ids


def train_step(
    accelerator,
    model,
    optimizer,
    batches: list[dict],
    max_grad_norm: float,
    chunked_loss: bool = True,
    dropout_key: tuple[int, int] = (0, 0),
) -> dict:
    """One optimizer step over this rank's micro-batches.

    The loss is the sum of token losses divided by the target tokens of the whole step (all micro-batches,
    all ranks). accelerate divides by grad_accum and DDP averages over ranks, so the backward loss is scaled
    by grad_accum * world to undo both: the gradient is then exactly d(mean target-token loss)/dw, whatever
    the split into micro-batches and ranks. `dropout_key`: (train.seed, step) of the LoRA dropout masks, drawn
    per row (`row_ids` of each batch, from `micro_batches`).

    Non-finite steps: without DeepSpeed the optimizer steps here, only when the all-reduced loss and gradient norm
    are finite. Under DeepSpeed accelerate runs `engine.step()` inside the backward of the last micro-batch
    (accelerate/utils/deepspeed.py, DeepSpeedEngineWrapper.backward), before this function sees the reduced loss;
    DeepSpeed's ZeRO optimizer skips that step itself when the gradient norm is not finite (fp32, fp16) or its
    overflow check fires (bf16 `check_grad_overflow`, on by default in DeepSpeed 0.19). `engine.was_step_applied()` says
    what it did: a skipped step is reported here as non-finite, and a non-finite step that DeepSpeed applied
    anyway (overflow check turned off) raises NonFiniteLoss, since the weights can no longer be trusted.
    """
    device = accelerator.device
    local = torch.tensor(float(sum(count_targets(b["labels"]) for b in batches)), dtype=torch.float64, device=device)
    n_targets = accelerator.reduce(local, reduction="sum").item()
    scale = accelerator.gradient_accumulation_steps * accelerator.num_processes / max(n_targets, 1.0)
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, correctly predicted targets
    for batch in batches:
        n = len(batch["input_ids"])
        masks = lora_dropout.rows(*dropout_key, batch.get("row_ids", [-1] * n), batch.get("row_lengths", [0] * n))
        batch = {k: batch[k].to(device) for k in ("input_ids", "labels", "position_ids")}
        with accelerator.accumulate(model), accelerator.autocast(), masks:
            step_loss, _, correct = token_loss_stats(model, batch, chunked_loss)
            accelerator.backward(step_loss * scale)
        sums += torch.stack([step_loss.detach().double(), correct.double()])
    loss_sum, correct = accelerator.reduce(sums, reduction="sum").tolist()
    loss, token_accuracy = loss_sum / max(n_targets, 1.0), correct / max(n_targets, 1.0)
    params = [p for p in model.parameters() if p.requires_grad]
    grad_norm = accelerator.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf"))
    grad_norm = float(grad_norm) if grad_norm is not None else _engine_grad_norm(model)
    finite = math.isfinite(loss) and math.isfinite(grad_norm)
    if is_deepspeed(accelerator):  # the engine has stepped (or skipped) inside the last backward already
        applied = model.was_step_applied()
        if not finite and applied:
            raise NonFiniteLoss(
                f"non-finite loss/grad norm ({loss}, {grad_norm}) but DeepSpeed applied the optimizer step anyway "
                "(its overflow check is off: bf16.check_grad_overflow false in the DeepSpeed config?); the weights "
                "are no longer trustworthy, so the run stops here without saving. Resume from the last checkpoint "
                "with the check on."
            )
        finite = finite and applied
    elif finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {
        "loss": loss,
        "token_accuracy": token_accuracy,
        "grad_norm": grad_norm,
        "finite": finite,
        "targets": n_targets,
    }


def _engine_grad_norm(model) -> float:
    norm = getattr(model, "get_global_grad_norm", lambda: None)()
    return float(norm) if norm is not None else float("nan")


class StopSignal(BaseException):
    """Raised by `StopRequest` when a stop signal arrives while nothing can be saved yet (the setup: data, model).
    A BaseException, like KeyboardInterrupt, so library code's `except Exception` does not swallow it and every
    `finally` (the data cache's temp folder) still runs."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@dataclass
class StopRequest:
    """Set by SIGTERM/SIGUSR1 (schedulers' preemption signals); the loop finishes the step, saves, exits.

    With `raising` True (the setup before the first step) the handler raises StopSignal instead, so the process
    unwinds at once; after the last step the flag is only recorded and the run finishes its final save."""

    signum: int | None = None
    raising: bool = False
    previous: dict = field(default_factory=dict)

    def install(self):
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum
        if self.raising:
            raise StopSignal(signum)

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}


def train(
    recipe: Recipe,
    accelerator,
    model,
    optimizer,
    data,
    state: TrainState,
    plan: Plan,
    tracker,
    run: RunDir,
    pad_id: int,
    stop: StopRequest | None = None,
) -> dict:
    """Run optimizer steps until plan.total_steps over `data.train` (validating on `data.val`); returns the final
    metrics. Every rank runs this. `stop`: the run's installed StopRequest (its handlers stay installed after the
    loop); None installs one for the loop only."""
    t = recipe.train
    world, rank = accelerator.num_processes, accelerator.process_index
    own_stop = stop is None
    stop = StopRequest().install() if own_stop else stop
    stop.raising = False
    model.train()
    meter = FlopsMeter(model, recipe.model.dtype, accelerator.device, world)  # model TFLOP/s; MFU on known GPUs
    last = {"loss": float("nan")}
    window = Window()
    val_parts = validation_parts(data)
    session_start, wall_at_start = time.perf_counter(), state.wall_time
    try:
        while state.step < plan.total_steps:
            t0 = time.perf_counter()
            set_lr(optimizer, lr_at(state.step, t, plan.total_steps))
            batches, sample_ids = micro_batches(data.train, state, plan, recipe, world, rank, pad_id)
            try:
                out = train_step(
                    accelerator,
                    model,
                    optimizer,
                    batches,
                    t.max_grad_norm,
                    recipe.model.chunked_loss,
                    dropout_key=(t.seed, state.step),
                )
            except NonFiniteLoss as err:
                raise NonFiniteLoss(f"step {state.step + 1}: {err}") from None
            counts = step_counts(
                accelerator,
                batches,
                sample_ids,
                stop_requested=stop.signum is not None,
                len_sq=meter.batches_len_sq(batches),
            )
            _check_finite(out, state, sample_ids, world, tracker, t.max_bad_steps)
            advance(
                state, plan, samples=int(counts["samples"]), tokens=int(counts["tokens"]), targets=int(out["targets"])
            )
            dt = time.perf_counter() - t0
            window.add(counts, out["targets"], dt)
            meter.add(counts["tokens"], counts["len_sq"], dt)
            state.wall_time = wall_at_start + time.perf_counter() - session_start
            last = {"loss": out["loss"], "token_accuracy": out["token_accuracy"], "grad_norm": out["grad_norm"]}
            tracker.advance(state.step)
            is_last = state.step == plan.total_steps
            if state.step % t.log_every == 0 or is_last:
                tracker.log(state.step, _train_metrics(state, out, window, meter, t, plan))
                window = Window()
            if data.val is not None and (state.step % t.eval_every == 0 or is_last):
                last.update(_validate(model, val_parts, t, accelerator, pad_id, state, tracker))
            preempted = counts["stop_votes"] > 0
            if state.step % t.save_every == 0 or is_last or preempted:
                # a resume refuses data that changed since (data_fingerprint) and names "step N of M" (total_steps)
                extra = {"data_fingerprint": data.fingerprint, "total_steps": plan.total_steps}
                checkpoint.save(accelerator, model, run.root, state, recipe, extra_state=extra, log=tracker.print)
            if preempted:
                tracker.print(
                    f"preempted (signal {stop.signum}): checkpoint saved at step {state.step}; "
                    f"exiting with code {PREEMPTED_EXIT}; rerun the same command to resume"
                )
                last["preempted"] = True
                break
    finally:
        if own_stop:
            stop.restore()
    return {**last, "flops": meter.summary()}


COUNTS = ("rows", "tokens", "slots", "samples", "stop_votes", "len_sq")
"""What `step_counts` sums over the ranks each step: rows, real tokens, token slots (padding included), samples,
ranks that received a stop signal, and sum of squared sample lengths (attention FLOPs)."""


def step_counts(
    accelerator, batches: list[dict], sample_ids: list[int], *, stop_requested: bool, len_sq: float
) -> dict[str, float]:
    """This step's counts (`COUNTS`), summed over all ranks in one all-reduce."""
    local = [
        sum(int(b["n_rows"]) for b in batches),
        sum(int(b["n_tokens"]) for b in batches),
        sum(b["input_ids"].numel() for b in batches),
        len(sample_ids),
        float(stop_requested),
        len_sq,
    ]
    total = accelerator.reduce(torch.tensor(local, dtype=torch.float64, device=accelerator.device), "sum").tolist()
    return dict(zip(COUNTS, total))


@dataclass
class Window:
    """Counts since the last logged step, for the rates in that log row."""

    tokens: float = 0.0
    targets: float = 0.0
    slots: float = 0.0
    len_sq: float = 0.0
    time: float = 0.0

    def add(self, counts: dict, targets: float, seconds: float) -> None:
        self.tokens += counts["tokens"]
        self.slots += counts["slots"]
        self.len_sq += counts["len_sq"]
        self.targets += targets
        self.time += seconds


def _train_metrics(state: TrainState, out: dict, window: Window, meter: FlopsMeter, t, plan: Plan) -> dict:
    return {
        "epoch": state.epoch,
        "loss": out["loss"],
        "token_accuracy": out["token_accuracy"],
        "lr": lr_at(state.step - 1, t, plan.total_steps),
        "grad_norm": out["grad_norm"],
        "tokens_per_s": window.tokens / window.time,
        "target_tokens_per_s": window.targets / window.time,
        "padding_frac": 1 - window.tokens / max(window.slots, 1),
        "samples_seen": state.samples_seen,
        "tokens_seen": state.tokens_seen,
        "mem_gib": peak_memory_gib(),
        "elapsed_s": state.wall_time,
        "skipped": state.skipped_steps,
        **meter.metrics(window.tokens, window.len_sq, window.time),
    }


def validation_parts(data) -> dict:
    """{name: validation rows} to evaluate: one entry (`None`: all rows) for a single dataset, one per dataset
    (`eval/loss/NAME`) when `data.datasets` mixes several."""
    if data.val is None:
        return {}
    if len(data.names) < 2:
        return {None: data.val}
    return data.val_by_dataset()


def _validate(model, parts: dict, t, accelerator, pad_id: int, state: TrainState, tracker) -> dict:
    """Validation loss, perplexity and token accuracy (and the loss per dataset when several): means over every
    target token of the validation rows; with several datasets the overall figures weigh each dataset's means
    by its target tokens."""
    losses, loss_sum, correct, tokens = {}, 0.0, 0.0, 0
    for name, rows in parts.items():
        ev = dataset_loss(
            model,
            rows,
            batch_size=t.eval_batch_size,
            pad_id=pad_id,
            device=accelerator.device,
            rank=accelerator.process_index,
            world=accelerator.num_processes,
            reduce=lambda x: accelerator.reduce(x, reduction="sum"),
            max_batches=t.max_eval_batches,
        )
        if name is None:
            loss, ppl, accuracy = ev["loss"], ev["ppl"], ev["token_accuracy"]
            break
        losses[f"eval/loss/{name}"] = ev["loss"]
        if ev["tokens"]:
            loss_sum, tokens = loss_sum + ev["loss"] * ev["tokens"], tokens + ev["tokens"]
            correct += ev["token_accuracy"] * ev["tokens"]
    else:
        loss = loss_sum / tokens if tokens else float("nan")
        ppl = math.exp(min(loss, 50.0)) if tokens else float("nan")
        accuracy = correct / tokens if tokens else float("nan")
    metrics = {"eval_loss": loss, "eval_ppl": ppl, "eval_token_accuracy": accuracy, **losses}
    tracker.log(state.step, {"epoch": state.epoch, **metrics})
    return metrics


def _check_finite(out: dict, state: TrainState, sample_ids: list[int], world: int, tracker, max_bad_steps: int):
    """Count a non-finite step (it was skipped) and stop after max_bad_steps in a row. Every rank agrees: the flag
    comes from all-reduced values."""
    if out["finite"]:
        state.bad_steps_in_row = 0
        return
    state.bad_steps_in_row += 1
    state.skipped_steps += 1
    if world > 1:  # every rank is here: name all ranks' samples
        from accelerate.utils import gather_object

        sample_ids = gather_object(list(sample_ids))
    tracker.print(
        f"step {state.step + 1}: non-finite loss/grad norm ({out['loss']}, {out['grad_norm']}); "
        f"step skipped; samples {sorted(sample_ids)[:20]}"
    )
    if state.bad_steps_in_row >= max_bad_steps:
        raise NonFiniteLoss(
            f"{state.bad_steps_in_row} non-finite steps in a row at step {state.step + 1}; "
            "stopping. The last good checkpoint is kept; lower train.lr or check the data."
        )


def advance(state: TrainState, plan: Plan, *, samples: int, tokens: int, targets: int) -> None:
    state.step += 1
    state.samples_seen += samples
    state.tokens_seen += tokens
    state.target_tokens_seen += targets
    state.cursor += plan.rows_per_step
    if state.cursor >= plan.rows:
        state.epoch += 1
        state.cursor = 0


def peak_memory_gib() -> float:
    """Peak memory since `reset_peak_memory`: CUDA memory allocated by torch, else the process's peak resident set
    (Linux VmHWM; ru_maxrss where /proc is missing, which cannot be reset)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def reset_peak_memory() -> None:
    """Start `peak_memory_gib` afresh (a sweep trains several runs in one process): CUDA's peak counter, and on
    Linux the peak resident set (writing 5 to /proc/self/clear_refs, Linux >= 4.0)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass
