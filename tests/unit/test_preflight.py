"""trainer.preflight: a recipe's model and adapter sources checked before anything loads; the hub probe."""

from __future__ import annotations

import json
import shutil
import time

import pytest

from trainer import preflight
from trainer.errors import UserError


def test_a_model_folder_needs_config_and_complete_weights(tmp_path, tiny_model_dir):
    preflight.check_model(str(tiny_model_dir))
    m = shutil.copytree(tiny_model_dir, tmp_path / "m")
    (m / "model.safetensors").write_bytes((m / "model.safetensors").read_bytes()[:5000])
    with pytest.raises(UserError, match=r"m/model\.safetensors: truncated \(5000 bytes; its header needs \d+\); the "):
        preflight.check_model(str(m))
    (m / "model.safetensors").unlink()
    with pytest.raises(UserError, match=r"holds no model weights \(\*\.safetensors, \*\.bin, \*\.pt, \*\.pth\)"):
        preflight.check_model(str(m))
    (m / "config.json").unlink()
    with pytest.raises(UserError, match=r"m is not a model folder \(no config\.json\)"):
        preflight.check_model(str(m))
    with pytest.raises(UserError, match=r"is a \.json file; give a model folder"):
        preflight.check_model(str(tiny_model_dir / "config.json"))


def test_an_adapter_folder_needs_its_config(tmp_path):
    (tmp_path / "a").mkdir()
    with pytest.raises(UserError, match=r"a/adapter_config\.json: missing; .* is not a PEFT adapter folder"):
        preflight.check_adapter_folder(tmp_path / "a")
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({"r": 8}))
    with pytest.raises(UserError, match=r"holds no adapter weights"):
        preflight.check_adapter_folder(tmp_path / "a")


@pytest.fixture
def no_hub(monkeypatch, tmp_path):
    """The hub endpoint is a closed local port; the HF cache an empty folder."""
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    preflight.hub_unreachable.cache_clear()
    yield
    preflight.hub_unreachable.cache_clear()


def test_a_hub_id_that_is_not_cached_fails_in_seconds_when_the_hub_is_unreachable(no_hub, monkeypatch):
    monkeypatch.setattr(preflight, "hub_cached", lambda repo, filename="config.json": False)
    t0 = time.perf_counter()
    with pytest.raises(UserError) as err:
        preflight.check_model("someone/some-model")
    assert str(err.value).startswith(
        "model.name_or_path: 'someone/some-model' is not in the local Hugging Face cache and the hub cannot be "
        "reached (127.0.0.1: "
    )
    assert time.perf_counter() - t0 < preflight.HUB_PROBE_TIMEOUT_S + 2


def test_a_cached_hub_id_loads_from_the_cache_without_asking_the_hub(no_hub, monkeypatch):
    monkeypatch.setattr(preflight, "hub_cached", lambda repo, filename="config.json": True)
    assert preflight.hub_kwargs("someone/some-model") == {"local_files_only": True}
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the libraries handle offline mode themselves
    assert preflight.hub_kwargs("someone/some-model") == {}


def test_a_probe_that_gets_no_answer_is_bounded(monkeypatch):
    import socket

    def hang(*a, **k):
        time.sleep(30)

    monkeypatch.setattr(socket, "create_connection", hang)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    monkeypatch.setattr(preflight, "HUB_PROBE_TIMEOUT_S", 0.5)
    preflight.hub_unreachable.cache_clear()
    t0 = time.perf_counter()
    assert preflight.hub_unreachable() == "huggingface.co: no answer within 0.5 s"
    assert time.perf_counter() - t0 < 3
    preflight.hub_unreachable.cache_clear()
