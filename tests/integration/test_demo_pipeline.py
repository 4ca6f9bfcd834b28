"""The demo's pipeline end to end on the tiny model (seconds, so marked slow): task data, train with the demo
recipe, merge, base vs tuned report with exact match. The real model run is `trainer demo` (numbers in the README)."""

import json

import pytest

from trainer.demo import DEMO_RECIPE, run_demo


@pytest.mark.slow
def test_demo_pipeline_on_tiny_model(tmp_path, tiny_model_dir):
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    run_dir = tmp_path / "demo"
    report = run_demo(
        output_dir=run_dir,
        seed=0,
        model_dir=tiny_model_dir,
        n_rows=60,
        log=lambda m: None,
        overrides=[
            "train.max_steps=4",
            "train.micro_batch_size=4",
            "train.grad_accum=1",
            "train.save_every=4",
            "train.eval_every=4",
            "generation.max_new_tokens=8",
            "model.gradient_checkpointing=false",
        ],
    )
    assert DEMO_RECIPE.is_file()
    on_disk = json.loads((run_dir / "eval" / "report.json").read_text())
    assert on_disk["base"].keys() >= {"exact_match", "perplexity"}
    assert on_disk["tuned"].keys() >= {"exact_match", "perplexity"}
    assert isinstance(on_disk["samples"], list) and on_disk["samples"]
    assert on_disk == json.loads(json.dumps(report))
    for name in (
        "config.yaml",
        "metrics.csv",
        "run_summary.json",
        "adapter",
        "merged",
        "eval/report.md",
        "data/task.jsonl",
    ):
        assert (run_dir / name).exists(), name
    assert len((run_dir / "data" / "task.jsonl").read_text().splitlines()) == 60
    # The run's test split is what was scored.
    assert on_disk["split"] == "test" and on_disk["tuned"]["exact_match_n"] > 0
