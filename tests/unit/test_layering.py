"""The import graph: training sits below post-training, and nothing reaches back up."""

import json
import subprocess
import sys

POST_TRAINING = [
    "trainer.merge",
    "trainer.evaluate",
    "trainer.chat",
    "trainer.export",
    "trainer.demo",
    "trainer.artifacts",
    "trainer.generate",
    "trainer.plots",
    "trainer.sweep",
    "trainer.compare",
]


def test_training_imports_no_post_training_module():
    code = (
        "import json, sys, trainer.train, trainer.loop, trainer.checkpoint, trainer.data, trainer.loss; "
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('trainer'))))"
    )
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert [m for m in POST_TRAINING if m in loaded] == []
