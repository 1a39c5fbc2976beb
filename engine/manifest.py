"""Pinning an engine: the manifest of file digests, its optional Ed25519 signature, and the target check.

``manifest.json`` lists the SHA-256 of every file of the engine directory (itself and ``manifest.sig``
aside); files are hashed concurrently, which is what keeps the check of a large engine short.
``manifest.sig`` is the Ed25519 signature of manifest.json's exact bytes, so one signature covers every
file. Loading refuses, in one sentence that ends in "rebuild", an engine whose files changed, went
missing or were added, or that was built for another device, compute capability or major torch/triton
version: its packed layouts and captured kernels were chosen for that target.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

from quantlab.checkpoint.digest import files_sha256

from .config import EngineConfig, EngineError

MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
PRIVATE_KEY, PUBLIC_KEY = "engine-signing.key", "engine-signing.pub"


def write_manifest(directory: Path, sign_key: str | Path | None = None) -> None:
    """Write manifest.json for every file now in ``directory`` and, with a private key, manifest.sig."""
    paths = [f for f in sorted(directory.iterdir()) if f.is_file()]
    files = {f.name: digest for f, digest in zip(paths, files_sha256(paths))}
    data = (json.dumps({"version": 1, "files": files}, indent=2) + "\n").encode()
    (directory / MANIFEST).write_bytes(data)
    if sign_key is not None:
        (directory / SIGNATURE).write_text(base64.b64encode(_private_key(sign_key).sign(data)).decode() + "\n")


def keygen(output: str | Path) -> tuple[Path, Path]:
    """A new Ed25519 key pair as PEM files in ``output`` (the private one readable by its owner only)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    private, public = out / PRIVATE_KEY, out / PUBLIC_KEY
    for p in (private, public):
        if p.exists():
            raise EngineError(f"{p} exists; remove it or choose another --output")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def _private_key(path: str | Path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise EngineError(f"cannot read the signing key {path} ({e})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise EngineError(f"{path} is not an Ed25519 private key (make one with quantlab keygen)")
    return key


def _check_signature(directory: Path, manifest: bytes, public_key: str | Path) -> None:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        key = serialization.load_pem_public_key(Path(public_key).read_bytes())
    except (OSError, ValueError) as e:
        raise EngineError(f"cannot read the public key {public_key} ({e})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise EngineError(f"{public_key} is not an Ed25519 public key")
    sig = directory / SIGNATURE
    if not sig.is_file():
        raise EngineError(f"{directory} is not signed (no {SIGNATURE}); rebuild it with --sign-key")
    try:
        key.verify(base64.b64decode(sig.read_text().strip(), validate=True), manifest)
    except (InvalidSignature, ValueError):
        raise EngineError(f"{directory}'s signature does not match {public_key}: the engine was altered or "
                          "signed with another key; rebuild and sign it") from None


def verify_engine(directory: str | Path, public_key: str | Path | None = None,
                  require_signature: bool = False) -> EngineConfig:
    """Check every digest (and the signature) of an engine directory and return its EngineConfig."""
    directory = Path(directory)
    config = EngineConfig.load(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise EngineError(f"{directory} has no {MANIFEST}; rebuild the engine")
    raw = path.read_bytes()
    try:
        files = json.loads(raw)["files"]
    except (ValueError, KeyError, TypeError):
        raise EngineError(f"{path} is not a valid manifest; rebuild the engine") from None
    if require_signature and public_key is None:
        raise EngineError("--require-signature needs --public-key to check the signature against")
    if public_key is not None:
        _check_signature(directory, raw, public_key)
    present = {f.name for f in directory.iterdir() if f.is_file()} - {MANIFEST, SIGNATURE}
    for name in sorted(set(files) - present):
        raise EngineError(f"{directory / name} is missing; the engine must be rebuilt")
    for name in sorted(present - set(files)):
        raise EngineError(f"{directory / name} is not in the manifest; remove it or rebuild the engine")
    names = sorted(files)
    for name, digest in zip(names, files_sha256(directory / name for name in names)):
        if digest != files[name]:
            raise EngineError(f"{directory / name} changed since the build (SHA-256 differs); rebuild the engine")
    return config


def current_target(device: str) -> dict[str, str]:
    """The target description of this machine for ``device`` (``cpu`` or ``cuda``)."""
    import torch

    if device == "cpu":
        return {"device": "cpu", "compute_capability": "cpu"}
    major, minor = torch.cuda.get_device_capability()
    return {"device": "cuda", "compute_capability": f"{major}.{minor}"}


def current_versions() -> dict[str, str]:
    """torch, triton (or "none") and quantlab versions of this environment."""
    import importlib.metadata

    import torch

    def version(pkg: str) -> str:
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return "none"

    return {"torch": torch.__version__.split("+")[0], "triton": version("triton"), "quantlab": version("quantlab")}


def check_target(config: EngineConfig, directory: str | Path) -> str:
    """The device to load on; EngineError when this machine is not the engine's target."""
    import torch

    built = config.target
    here = "cuda" if torch.cuda.is_available() else "cpu"
    if built["device"] != here:
        raise EngineError(f"{directory} was built for {built['device']} but this machine runs {here}; "
                          f"rebuild the engine here")
    now = current_target(here)
    if now["compute_capability"] != built["compute_capability"]:
        raise EngineError(f"{directory} was built for compute capability {built['compute_capability']} but this "
                          f"GPU is {now['compute_capability']}; rebuild the engine here")
    versions = current_versions()
    for pkg in ("torch", "triton"):
        was, now_v = config.versions[pkg], versions[pkg]
        if was.split(".")[0] != now_v.split(".")[0]:
            raise EngineError(f"{directory} was built with {pkg} {was} but this environment has {pkg} {now_v} "
                              "(another major version); rebuild the engine here")
    return here
