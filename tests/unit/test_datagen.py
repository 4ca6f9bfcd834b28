"""tests/datagen.py: the data the suite and the CPU recipe use is what the generator makes, seeded and reproducible,
and has the variety the tests rely on."""

import json

from tests import datagen
from tests.conftest import ALPACA, CHAT_MULTI, CHAT_SINGLE, ROOT

SHIPPED = ROOT / "launch" / "data" / "synthetic_alpaca_1k.json"


def test_shipped_example_file_is_the_generators_output():
    want = datagen.dumps(SHIPPED.name, datagen.alpaca_rows(1000, seed=0))
    assert SHIPPED.read_text(encoding="utf-8") == want, (
        f"{SHIPPED} differs from tests/datagen.py's output; regenerate it: python -m tests.datagen alpaca --rows 1000 "
        f"--seed 0 --out {SHIPPED.relative_to(ROOT)}"
    )
    assert json.loads(ALPACA.read_text(encoding="utf-8")) == json.loads(want)  # the suite trains on the same rows


def test_seeded_and_prefix_stable():
    assert datagen.alpaca_rows(50, seed=3) == datagen.alpaca_rows(50, seed=3)
    assert datagen.alpaca_rows(50, seed=3) != datagen.alpaca_rows(50, seed=4)
    assert datagen.alpaca_rows(64, seed=0) == datagen.alpaca_rows(1000, seed=0)[:64]  # alpaca_slice relies on it


def test_shapes_and_variety():
    rows = json.loads(ALPACA.read_text(encoding="utf-8"))
    assert all(set(r) == {"instruction", "input", "output"} and r["instruction"] and r["output"] for r in rows)
    assert 0.5 < sum(not r["input"] for r in rows) / len(rows) < 0.7  # input often empty, as in Alpaca
    text = "".join(r["instruction"] + r["input"] + r["output"] for r in rows)
    assert "\n" in text and any(ord(c) > 127 for c in text) and any(c.isdigit() for c in text)
    lengths = sorted(len(r["output"]) for r in rows)
    assert lengths[0] <= 3 and lengths[-1] > 1500  # a few characters to several hundred tokens
    single = [json.loads(line)["messages"] for line in CHAT_SINGLE.read_text(encoding="utf-8").splitlines()]
    multi = [json.loads(line)["messages"] for line in CHAT_MULTI.read_text(encoding="utf-8").splitlines()]
    for convs, exchanges in ((single, {1}), (multi, {2, 3, 4, 5})):
        for m in convs:
            turns = [x["role"] for x in m if x["role"] != "system"]
            assert turns == ["user", "assistant"] * (len(turns) // 2) and len(turns) // 2 in exchanges
        assert any(m[0]["role"] == "system" for m in convs) and any(m[0]["role"] == "user" for m in convs)
