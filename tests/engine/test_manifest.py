"""Loading refuses, in one sentence ending in a rebuild, an engine that changed or was built for another
machine, and checks the Ed25519 signature when asked."""

from __future__ import annotations

import json
import shutil

import pytest

from quantlab.engine.config import ENGINE_JSON, EngineError
from quantlab.engine.manifest import MANIFEST, check_target, keygen, verify_engine, write_manifest


@pytest.fixture
def engine(tiny_engine, tmp_path):
    out = tmp_path / "engine"
    shutil.copytree(tiny_engine, out)
    return out


def _rewrite_engine_json(engine, edit) -> None:
    """Edit engine.json and re-seal the manifest, as a build for another target would have written it."""
    data = json.loads((engine / ENGINE_JSON).read_text())
    edit(data)
    (engine / ENGINE_JSON).write_text(json.dumps(data))
    (engine / MANIFEST).unlink()
    write_manifest(engine)


def test_untouched_engine_verifies(engine):
    config = verify_engine(engine)
    assert check_target(config, engine) == "cpu"


def test_flipped_byte_is_refused_naming_the_file(engine):
    weights = engine / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(EngineError, match=r"weights.safetensors changed since the build.*rebuild"):
        verify_engine(engine)


def test_missing_and_extra_files_are_refused(engine):
    (engine / "tokenizer.json").unlink()
    with pytest.raises(EngineError, match="tokenizer.json is missing; the engine must be rebuilt"):
        verify_engine(engine)
    shutil.copy(engine / "engine.json", engine / "tokenizer.json")
    (engine / "weights-00002.safetensors").write_bytes(b"x")
    with pytest.raises(EngineError, match="weights-00002.safetensors is not in the manifest"):
        verify_engine(engine)


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["target"].update(device="cuda", compute_capability="9.0"), "built for cuda but this machine runs cpu"),
    (lambda d: d["versions"].update(torch="1.13.1"), "built with torch 1.13.1 .*another major version"),
    (lambda d: d["versions"].update(triton="99.0.0"), "built with triton 99.0.0"),
])
def test_other_target_or_major_version_is_refused(engine, edit, message):
    _rewrite_engine_json(engine, edit)
    config = verify_engine(engine)  # the files are intact ...
    with pytest.raises(EngineError, match=message + ".*rebuild the engine here"):
        check_target(config, engine)  # ... but not for this machine


def test_signature_checked_with_public_key(engine, tmp_path):
    keys = tmp_path / "keys"
    private, public = keygen(keys)
    assert private.stat().st_mode & 0o077 == 0
    (engine / MANIFEST).unlink()
    write_manifest(engine, private)
    verify_engine(engine, public_key=public, require_signature=True)
    other = keygen(tmp_path / "other")[1]
    with pytest.raises(EngineError, match="signature does not match"):
        verify_engine(engine, public_key=other)
    manifest = json.loads((engine / MANIFEST).read_text())
    manifest["files"]["weights.safetensors"] = "0" * 64
    (engine / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(EngineError, match="signature does not match"):
        verify_engine(engine, public_key=public)


def test_unsigned_engine_refused_when_signature_required(engine, tmp_path):
    public = keygen(tmp_path / "keys")[1]
    with pytest.raises(EngineError, match="is not signed"):
        verify_engine(engine, public_key=public, require_signature=True)
    with pytest.raises(EngineError, match="needs --public-key"):
        verify_engine(engine, require_signature=True)


def test_changed_shard_is_named_whichever_file_finishes_hashing_first(tiny_model, tmp_path, monkeypatch):
    from engine_helpers import build
    from quantlab.engine import builder

    monkeypatch.setattr(builder, "SHARD_BYTES", 64 << 10)
    engine = build(tiny_model[0], tmp_path / "sharded").path
    shards = sorted(engine.glob("weights-*.safetensors"))
    assert len(shards) > 3
    verify_engine(engine)
    for shard in shards[1:3]:
        data = bytearray(shard.read_bytes())
        data[-5] ^= 0x01
        shard.write_bytes(bytes(data))
    with pytest.raises(EngineError, match=f"{shards[1].name} changed since the build"):
        verify_engine(engine)
