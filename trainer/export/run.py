"""`trainer export RUN_DIR --gguf TYPE [--out FILE] [--check]`: the run's merged model as a GGUF + Modelfile.

RUN_DIR/merged/ (merged first if missing; RUN_DIR/model/ for a full fine-tune)
  -> RUN_DIR/export/model-TYPE.gguf   (f16/bf16/f32/q8_0 written by us; K-quants by llama.cpp)
  -> RUN_DIR/export/Modelfile         (Ollama: FROM, TEMPLATE, PARAMETER stop ..., generation settings)
  -> RUN_DIR/export/export.json       (facts of every file written: tensor types, K-quant fallbacks, stops)
--check: also model-f16.gguf and model-q8_0.gguf (the hops before TYPE), then
  -> RUN_DIR/export/report.json, report.md (see trainer.export.check)
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from trainer.errors import UserError
from trainer.export.quantize import LLAMA_CPP_FTYPES, QUANTIZED_OUTTYPES, export_quantized
from trainer.export.writer import WRITTEN_OUTTYPES, export_gguf

OUTTYPES = WRITTEN_OUTTYPES + QUANTIZED_OUTTYPES


def write_gguf(model_dir: Path, out_path: Path, outtype: str) -> dict:
    """Any supported `outtype`: written by `export_gguf`, or by llama.cpp's quantizer for the rest.
    Adds `"type"` and `"seconds"` to the facts."""
    outtype = str(outtype).lower()
    started = time.perf_counter()
    if outtype in WRITTEN_OUTTYPES:
        facts = export_gguf(model_dir, out_path, outtype)
    elif outtype in LLAMA_CPP_FTYPES:
        facts = export_quantized(model_dir, out_path, outtype)
    else:
        raise UserError(f"GGUF export: type {outtype!r} is not supported; use one of: {', '.join(OUTTYPES)}.")
    return {**facts, "type": outtype, "seconds": round(time.perf_counter() - started, 2)}


def hop_types(outtype: str) -> list[str]:
    """The GGUF hops `--check` measures for `outtype`: f16, then q8_0 for any quantized type, then `outtype`."""
    chain = ["f16"]
    if outtype not in ("f16", "bf16", "f32"):
        chain.append("q8_0")
    if outtype not in chain:
        chain.append(outtype)
    return chain


def fallback_summary(fallback: list[dict]) -> str:
    """'N matrices fell back (rows not a multiple of 256): 576 columns -> Q5_0 x150, ...' in one line."""
    groups: dict[tuple[int, str], int] = {}
    for f in fallback:
        groups[(f["columns"], f["type"])] = groups.get((f["columns"], f["type"]), 0) + 1
    parts = ", ".join(f"{cols} columns -> {t} x{n}" for (cols, t), n in sorted(groups.items()))
    return f"{len(fallback)} matrices fell back as llama.cpp does (rows not a multiple of 256): {parts}"


def model_folder(run_dir: Path, checkpoint: str | Path | None = None, log=print):
    """(the model folder to export, the adapter it was merged from or None): RUN_DIR/model (full fine-tune) or
    a verified RUN_DIR/merged (merged-step-N for `checkpoint`), merging the adapter first when it is missing or
    was merged from an earlier adapter (`trainer.artifacts.merged_source`)."""
    from trainer.artifacts import merged_source, tuned_source

    merged, source = merged_source(run_dir, checkpoint, log=log)
    if merged is None:
        from trainer.merge import merge_run

        merge_run(run_dir, log=log, source=source)
        merged = source.merged
    tuned = tuned_source(run_dir, checkpoint, log=lambda m: None)
    return Path(merged), tuned.adapter


def _refuse_overwrite(out: Path, outtype: str, check: bool) -> None:
    """`--out` outside the run's export folder: every file the export would write there must be new (the user's
    files are never overwritten): the GGUF, Modelfile, export.json, and with `--check` the hop files and reports."""
    names = [out.name, "Modelfile", "export.json"]
    if check:
        names += [f"model-{hop}.gguf" for hop in hop_types(outtype) if hop != outtype] + ["report.json", "report.md"]
    taken = [n for n in names if (out.parent / n).exists()]
    if taken:
        raise UserError(
            f"export --out {out}: {', '.join(taken)} already exist{'s' if len(taken) == 1 else ''} in {out.parent} "
            "(nothing is overwritten); give --out a file in a new or empty folder, or remove them"
        )


def export_run(
    run_dir: Path,
    outtype: str = "f16",
    *,
    out: Path | None = None,
    check: bool = False,
    checkpoint: str | Path | None = None,
    log=print,
) -> dict:
    """Export the run's model as `outtype` (+ Modelfile); with `check`, every hop checked (report files).

    Writes the GGUF(s), `Modelfile` and `export.json` (every file's facts: tensor types, fallbacks, stop ids)
    in the output folder. Returns `{"gguf": facts of the requested file, "files": {type: facts},
    "modelfile": {"path", "family"}, "report": check report or None}`; `report["failures"]` lists the failed
    checks (empty when the export passed).
    """
    from trainer.artifacts import read_recipe
    from trainer.export.modelfile import write_modelfile
    from trainer.run_dir import RunDir
    from trainer.tokenizer import load_tokenizer

    run_dir = Path(run_dir)
    outtype = str(outtype).lower()
    if outtype not in OUTTYPES:
        raise UserError(f"GGUF export: type {outtype!r} is not supported; use one of: {', '.join(OUTTYPES)}.")
    if check or outtype in LLAMA_CPP_FTYPES:
        from trainer.export.quantize import require_llama_cpp

        require_llama_cpp("--check" if check else outtype)  # one line before anything is merged or written
    recipe = read_recipe(RunDir(run_dir))
    own = RunDir(run_dir).export
    out = Path(out) if out else own / f"model-{outtype}.gguf"
    if out.parent.resolve() != own.resolve():
        _refuse_overwrite(out, outtype, check)  # before anything is merged or written
    model_dir, adapter = model_folder(run_dir, checkpoint, log=log)
    out.parent.mkdir(parents=True, exist_ok=True)
    export_dir = out.parent

    files: dict[str, dict] = {}
    for hop in hop_types(outtype) if check else [outtype]:
        path = out if hop == outtype else export_dir / f"model-{hop}.gguf"
        facts = write_gguf(model_dir, path, hop)
        files[hop] = facts
        log(f"export: {path} ({facts['bytes'] / 2**20:.1f} MiB, {hop}, {facts['seconds']} s)")
        if facts.get("fallback"):
            log(f"export: {hop}: {fallback_summary(facts['fallback'])} (list in {export_dir / 'export.json'})")
    main = files[outtype]
    if main.get("not_stopping_llama_cpp"):
        log(
            f"export: warning: llama.cpp ends generation only on eos/eot/eom and tokens it knows by text; "
            f"{main['not_stopping_llama_cpp']} may not stop it (the Modelfile stops on them)"
        )

    tokenizer = load_tokenizer(str(model_dir))  # the run's tokenizer and chat template, saved with the model
    import gguf

    fields = gguf.GGUFReader(out).fields
    add_bos = (
        bool(fields["tokenizer.ggml.add_bos_token"].contents()) if "tokenizer.ggml.add_bos_token" in fields else False
    )
    modelfile = write_modelfile(out, tokenizer, add_bos, main["stop_tokens"], recipe.generation)
    if modelfile["family"] is None:
        log(
            f"export: warning: {modelfile['path']} has no TEMPLATE: the run's chat template is none of ChatML, "
            "Llama 2, Llama 3, Mistral; Ollama will guess one from the GGUF's embedded template"
        )
    log(f"export: {modelfile['path']} (template: {modelfile['family'] or 'none'}, stop: {main['stop_tokens']})")

    (export_dir / "export.json").write_text(json.dumps({"files": files, "modelfile": modelfile}, indent=1))
    report = None
    if check:
        report = check_run(run_dir, recipe, model_dir, adapter, tokenizer, files, export_dir, log=log)
    return {"gguf": main, "files": files, "modelfile": modelfile, "report": report}


def check_run(
    run_dir: Path, recipe, model_dir: Path, adapter: Path | None, tokenizer, files: dict, export_dir: Path, log=print
) -> dict:
    """Score every hop (see trainer.export.check): `adapter` (base + adapter, LoRA runs), the model folder, each
    GGUF; write report.json/report.md, return the report."""
    import gc

    import torch
    from transformers import AutoModelForCausalLM

    from trainer.export import check

    evalset = check.load_eval_set(run_dir, recipe, tokenizer)
    stop_ids = files[list(files)[-1]]["stop_token_ids"]
    check.require_references(evalset)
    from trainer.model import default_device, load_tuned

    device = default_device()
    hops = []
    if adapter is not None:
        tuned = load_tuned(
            recipe,
            adapter,
            quantized=recipe.model.quantization is not None,
            device_map={"": device},
            vocab_size=len(tokenizer),
        )
        hops.append(
            check.hf_hop(
                "adapter",
                tuned,
                tokenizer,
                evalset,
                recipe.generation,
                stop_ids,
                adapter,
                check.folder_bytes(adapter),
                log=log,
            )
        )
        del tuned
        gc.collect()
    merged = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    hops.append(
        check.hf_hop(
            "merged" if adapter is not None else "model",
            merged,
            tokenizer,
            evalset,
            recipe.generation,
            stop_ids,
            model_dir,
            check.folder_bytes(model_dir),
            log=log,
        )
    )
    gguf_hops = check.gguf_hops(
        [(t, Path(f["path"])) for t, f in files.items()], merged, tokenizer, evalset, recipe.generation, log=log
    )
    for hop in gguf_hops:
        facts = files[hop["hop"]]
        hop["type"] = hop["hop"]
        for key in ("tensor_types", "fallback", "source", "seconds"):
            if key in facts:
                hop[key] = facts[key]
    hops += gguf_hops
    del merged
    gc.collect()
    main = files[list(files)[-1]]
    report = {
        "run_dir": str(run_dir),
        "split": evalset.split,
        "conversations": len(evalset.input_ids),
        "max_new_tokens": recipe.generation.max_new_tokens,
        "threads": os.cpu_count() or 1,
        "stop_token_ids": main["stop_token_ids"],
        "stop_tokens": main["stop_tokens"],
        "eot_token_id": main["eot_token_id"],
        "eos_token_id": main["eos_token_id"],
        "hops": hops,
    }
    report["failures"] = check.failures(report)
    json_path, md_path = check.write_report(report, export_dir)
    log(f"check: wrote {json_path} and {md_path}")
    for line in report["failures"]:
        log(f"check: FAIL {line}")
    return report
