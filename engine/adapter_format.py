"""PEFT LoRA adapter format: parse and validate an adapter before any weight is loaded.

Shared by the engine (adapter store) and the operator (admission of LoRAAdapter resources), so it
is pure: json and struct only, no torch, no I/O except `validate_adapter_dir`. An adapter is
`adapter_config.json` + `adapter_model.safetensors`; everything a bad upload can get wrong is
refused with `AdapterError`, whose `reason` code the operator shows as its condition reason.

The three steps, usable one at a time when the bytes come from S3 (listing, small GETs, a range
GET of the safetensors header):
    check_files(sizes)                      -> which files are there, pickle-only, byte cap
    parse_adapter_config(raw, base)         -> LoraConfig (rank, scale, resolved target modules)
    parse_safetensors_header(head, size)    -> SafetensorsHeader (needs the first 8 + N bytes)
    check_weights(config, header, base)     -> AdapterManifest
"""

from __future__ import annotations

import json
import math
import re
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import regex

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
# Attention then MLP: the linear projections of Llama-family (and Qwen2) decoder layers.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Embedding/output adapters change the vocabulary path; the batched LoRA layers do not cover them.
EMBEDDING_MODULES = ("embed_tokens", "lm_head")
DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2}
DEFAULT_MAX_BYTES = 1 << 30  # a rank-64 adapter on every projection of a 7B model is ~640 MB in fp32
# All of one config regex's matches against the module names. A sane pattern takes microseconds
# per name; the margin is for a loader thread at low priority on a saturated CPU (the refusal is final).
REGEX_SECONDS = 5.0
HEADER_PROBE_BYTES = 64 << 10  # one ranged read covers the header of an adapter with ~400 tensors
MAX_HEADER_BYTES = 8 << 20  # a full-coverage adapter of an 80-layer model has a header of ~150 KB
_TENSOR_RE = re.compile(r"base_model\.model\.(?P<module>.+)\.(?P<ab>lora_A|lora_B)\.weight")
_LAYER_RE = re.compile(r"\.layers\.(\d+)\.")


def s3_adapter_version(weights_etag: str, config_etag: str) -> str:
    """An S3 adapter's version: the weights' ETag, then the config's, so that re-uploading either
    file (a new lora_alpha changes the scale with the weights untouched) makes a new version."""
    return f"{weights_etag}+{config_etag}"


class AdapterError(ValueError):
    """An adapter that cannot be served. `reason` is a CamelCase code, e.g. "RankTooHigh"."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class BaseModelSpec:
    """What adapters are checked against: the base model's identity and projection shapes."""

    name: str  # compared (normalized) with an adapter's base_model_name_or_path
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_layers: int
    max_rank: int = 64  # the engine's stacked slot tensors are this wide

    def __post_init__(self) -> None:
        for field in (
            "hidden_size",
            "intermediate_size",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "num_layers",
        ):
            if getattr(self, field) < 1:
                raise ValueError(f"BaseModelSpec.{field} must be positive, got {getattr(self, field)}")
        if self.max_rank < 1:
            raise ValueError(f"max_rank must be at least 1, got {self.max_rank}")

    @classmethod
    def from_hf_config(
        cls, config: Mapping[str, Any], name: str | None = None, max_rank: int = 64
    ) -> BaseModelSpec:
        """From a Hugging Face `config.json` dict (Llama, Qwen2, ...)."""
        try:
            heads = int(config["num_attention_heads"])
            return cls(
                name=name or str(config.get("_name_or_path") or config.get("name_or_path") or ""),
                hidden_size=int(config["hidden_size"]),
                intermediate_size=int(config["intermediate_size"]),
                num_heads=heads,
                num_kv_heads=int(config.get("num_key_value_heads") or heads),
                head_dim=int(config.get("head_dim") or int(config["hidden_size"]) // heads),
                num_layers=int(config["num_hidden_layers"]),
                max_rank=max_rank,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"not a usable Llama-style config.json: {e!r}") from e

    def projection_shapes(self) -> dict[str, tuple[int, int]]:
        """Projection short name -> (in_features, out_features)."""
        q, kv, h, i = (
            self.num_heads * self.head_dim,
            self.num_kv_heads * self.head_dim,
            self.hidden_size,
            self.intermediate_size,
        )
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    def module_names(self) -> dict[str, str]:
        """Full module name (as PEFT sees it) -> projection short name, for every layer."""
        names = {}
        for layer in range(self.num_layers):
            for proj in PROJECTIONS:
                block = "self_attn" if proj in PROJECTIONS[:4] else "mlp"
                names[f"model.layers.{layer}.{block}.{proj}"] = proj
        return names


SMOLLM2_135M = BaseModelSpec(
    name="HuggingFaceTB/SmolLM2-135M-Instruct",
    hidden_size=576,
    intermediate_size=1536,
    num_heads=9,
    num_kv_heads=3,
    head_dim=64,
    num_layers=30,
)


@dataclass(frozen=True)
class LoraConfig:
    """The parts of adapter_config.json the engine uses, validated against a base model."""

    rank: int
    alpha: float
    use_rslora: bool
    modules: frozenset[str]  # full module names the adapter applies to
    base_model: str | None  # base_model_name_or_path as written

    @property
    def scale(self) -> float:
        """PEFT's scaling: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    begin: int  # byte offsets relative to the end of the header
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    tensors: dict[str, TensorInfo]
    data_start: int  # 8 + header length: where tensor data begins in the file
    metadata: dict[str, str]


@dataclass(frozen=True)
class AdapterManifest:
    """A validated adapter: what the registry records and the engine needs to stack its weights."""

    rank: int
    alpha: float
    scale: float  # multiplies B @ A: alpha / r, or alpha / sqrt(r) with rsLoRA
    target_modules: tuple[str, ...]  # projection short names, in PROJECTIONS order
    layers: tuple[int, ...]  # layer indices that carry weights
    bytes: int  # size of adapter_model.safetensors
    dtype: str  # safetensors dtype of every tensor: F32, F16 or BF16


def normalize_model_name(name: str) -> str:
    """`HuggingFaceTB/SmolLM2-135M-Instruct`, `/models/smollm2-135m-instruct/` -> `smollm2-135m-instruct`."""
    return name.strip().rstrip("/").rsplit("/", 1)[-1].lower()


def check_files(sizes: Mapping[str, int], max_bytes: int = DEFAULT_MAX_BYTES) -> None:
    """Refuse a listing (file name -> bytes) without both files, with pickles only, or too large."""
    names = {name.rsplit("/", 1)[-1] for name in sizes}
    pickles = sorted(n for n in names if n.endswith(PICKLE_SUFFIXES))
    if WEIGHTS_NAME not in names and pickles:
        raise AdapterError(
            "PickleOnly",
            f"only pickle weights found ({', '.join(pickles)}); pickle can run code and is refused: "
            f"save with safetensors (PEFT's save_pretrained(safe_serialization=True)) to get {WEIGHTS_NAME}",
        )
    missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if n not in names]
    if missing:
        raise AdapterError("MissingFile", f"missing {' and '.join(missing)}; a PEFT LoRA adapter needs both")
    total = sum(
        size for name, size in sizes.items() if name.rsplit("/", 1)[-1] in (CONFIG_NAME, WEIGHTS_NAME)
    )
    if total > max_bytes:
        raise AdapterError("TooLarge", f"adapter is {total} bytes, above the limit of {max_bytes} bytes")


def parse_adapter_config(raw: bytes | str | Mapping[str, Any], base: BaseModelSpec) -> LoraConfig:
    """Parse adapter_config.json and check it against `base` (rank, targets, identity, features)."""
    if isinstance(raw, Mapping):
        cfg = dict(raw)
    else:
        try:
            cfg = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise AdapterError("InvalidConfig", f"{CONFIG_NAME} is not valid JSON: {e}") from e
        if not isinstance(cfg, dict):
            raise AdapterError("InvalidConfig", f"{CONFIG_NAME} must be a JSON object")
    if cfg.get("peft_type") != "LORA":
        raise AdapterError(
            "Unsupported", f"peft_type is {cfg.get('peft_type')!r}; only LORA adapters are served"
        )
    _refuse_features(cfg)
    rank, alpha = cfg.get("r"), cfg.get("lora_alpha", 8)
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise AdapterError("InvalidConfig", f"r must be a positive integer, got {rank!r}")
    if rank > base.max_rank:
        raise AdapterError(
            "RankTooHigh", f"rank {rank} is above this base model's maximum of {base.max_rank}"
        )
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or not 0 < alpha < math.inf:
        raise AdapterError("InvalidConfig", f"lora_alpha must be a positive number, got {alpha!r}")
    claimed = cfg.get("base_model_name_or_path")
    if claimed and normalize_model_name(str(claimed)) != normalize_model_name(base.name):
        raise AdapterError(
            "BaseModelMismatch", f"adapter was trained on {claimed!r}, but this base model is {base.name!r}"
        )
    return LoraConfig(
        rank=rank,
        alpha=float(alpha),
        use_rslora=bool(cfg.get("use_rslora", False)),
        modules=_resolve_targets(cfg, base),
        base_model=str(claimed) if claimed else None,
    )


def _refuse_features(cfg: Mapping[str, Any]) -> None:
    refusals = [
        (bool(cfg.get("modules_to_save")), "modules_to_save (fully trained extra modules)"),
        (bool(cfg.get("use_dora")), "DoRA (use_dora)"),
        (bool(cfg.get("fan_in_fan_out")), "fan_in_fan_out (Conv1D-style weights)"),
        (cfg.get("bias", "none") != "none", f"bias={cfg.get('bias')!r} (only 'none')"),
        (bool(cfg.get("lora_bias")), "lora_bias"),
        (
            bool(cfg.get("rank_pattern")) or bool(cfg.get("alpha_pattern")),
            "per-module rank_pattern/alpha_pattern",
        ),
        (bool(cfg.get("trainable_token_indices")), "trainable_token_indices (embedding training)"),
        (bool(cfg.get("target_parameters")), "target_parameters"),
    ]
    for refused, what in refusals:
        if refused:
            raise AdapterError("Unsupported", f"{what} is not supported; retrain without it")


def _resolve_targets(cfg: Mapping[str, Any], base: BaseModelSpec) -> frozenset[str]:
    """PEFT's matching: a string is a full-match regex over module names (or "all-linear"); a list
    entry matches a module whose name equals it or ends with "." + it."""
    targets = cfg.get("target_modules")
    modules = base.module_names()
    if targets == "all-linear":
        chosen = set(modules)
    elif isinstance(targets, str):
        matches = _regex_matcher(targets, "target_modules")
        for name in (*EMBEDDING_MODULES, "model.embed_tokens"):
            if matches(name):
                raise AdapterError(
                    "Unsupported",
                    f"target_modules {targets!r} selects {name}; embedding adapters are refused",
                )
        chosen = {m for m in modules if matches(m)}
        if not chosen:
            raise AdapterError(
                "UnknownTargetModule", f"target_modules regex {targets!r} matches no module of {base.name}"
            )
    elif isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets):
        chosen = set()
        for target in targets:
            if target.rsplit(".", 1)[-1] in EMBEDDING_MODULES:
                raise AdapterError(
                    "Unsupported", f"target module {target!r} is an embedding; embedding adapters are refused"
                )
            hits = {m for m in modules if m == target or m.endswith("." + target)}
            if not hits:
                raise AdapterError(
                    "UnknownTargetModule",
                    f"target module {target!r} does not exist in {base.name}; it has {', '.join(PROJECTIONS)}",
                )
            chosen |= hits
    else:
        raise AdapterError(
            "InvalidConfig", f"target_modules must be a non-empty list or a regex, got {targets!r}"
        )
    excluded = cfg.get("exclude_modules")
    if isinstance(excluded, str):
        excludes = _regex_matcher(excluded, "exclude_modules")
        chosen = {m for m in chosen if not excludes(m)}
    elif isinstance(excluded, list) and all(isinstance(e, str) for e in excluded):
        chosen = {m for m in chosen if not any(m == e or m.endswith("." + e) for e in excluded)}
    elif excluded is not None:
        raise AdapterError("InvalidConfig", f"exclude_modules must be a list or a regex, got {excluded!r}")
    layers = cfg.get("layers_to_transform")
    if layers is not None:
        if not (_is_int(layers) or (isinstance(layers, list) and all(_is_int(x) for x in layers))):
            raise AdapterError(
                "InvalidConfig",
                f"layers_to_transform must be a layer index or a list of them, got {layers!r}",
            )
        keep = {layers} if isinstance(layers, int) else set(layers)
        chosen = {m for m in chosen if int(_LAYER_RE.search(m).group(1)) in keep}  # type: ignore[union-attr]
    if not chosen:
        raise AdapterError("UnknownTargetModule", "target_modules select no module after exclusions")
    return frozenset(chosen)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _regex_matcher(pattern: str, field: str) -> Callable[[str], bool]:
    """PEFT's full-match of a config regex. The pattern is the tenant's: Python's `re` backtracks
    for ever on some ('(.*)*\\.q_proj' against the other module names) while holding the GIL, which
    froze the engine (step loop, HTTP server) or the operator. The `regex` module does not backtrack
    on those, releases the GIL while matching, and enforces a time limit over all the matches."""
    try:
        compiled = regex.compile(pattern)
    except regex.error as e:
        raise AdapterError("InvalidConfig", f"{field} regex {pattern!r} is invalid: {e}") from e
    deadline = time.monotonic() + REGEX_SECONDS

    def matches(name: str) -> bool:
        try:
            return (
                compiled.fullmatch(name, concurrent=True, timeout=max(deadline - time.monotonic(), 0.0))
                is not None
            )
        except TimeoutError:
            raise AdapterError(
                "InvalidConfig",
                f"{field} regex {pattern!r} takes too long to match module names; list the modules instead",
            ) from None

    return matches


def header_length(first8: bytes) -> int:
    """The total bytes to read for the header (8 + N), from the file's first 8 bytes."""
    if len(first8) < 8:
        raise AdapterError("CorruptSafetensors", f"{WEIGHTS_NAME} is shorter than 8 bytes")
    (n,) = struct.unpack("<Q", first8[:8])
    if not 2 <= n <= MAX_HEADER_BYTES:
        raise AdapterError("CorruptSafetensors", f"{WEIGHTS_NAME} header length {n} is out of bounds")
    return 8 + n


def read_safetensors_head(read: Callable[[int, int], bytes], file_size: int) -> bytes:
    """The first bytes of a safetensors file, through its whole header, with at most two ranged
    reads (`read(first, last)`, inclusive): a probe of HEADER_PROBE_BYTES, then the rest of the
    header if it is longer. Nothing past the header is read."""
    head = read(0, min(HEADER_PROBE_BYTES, file_size) - 1) if file_size else b""
    needed = header_length(head)
    if len(head) < needed <= file_size:
        head += read(len(head), needed - 1)
    return head


def parse_safetensors_header(head: bytes, file_size: int) -> SafetensorsHeader:
    """Parse and sanity-check the header from the file's first bytes (at least `header_length`)."""
    data_start = header_length(head)
    if data_start > file_size or len(head) < data_start:
        raise AdapterError("CorruptSafetensors", f"{WEIGHTS_NAME} is truncated inside its header")
    try:
        raw = json.loads(head[8:data_start])
    except (ValueError, UnicodeDecodeError) as e:
        raise AdapterError("CorruptSafetensors", f"{WEIGHTS_NAME} header is not JSON: {e}") from e
    if not isinstance(raw, dict):
        raise AdapterError("CorruptSafetensors", f"{WEIGHTS_NAME} header is not a JSON object")
    metadata = raw.pop("__metadata__", None) or {}
    tensors = {}
    for name, info in raw.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            if not all(isinstance(x, int) and x >= 0 for x in (*shape, begin, end)):
                raise TypeError("negative or non-integer size")
        except (KeyError, TypeError, ValueError) as e:
            raise AdapterError("CorruptSafetensors", f"tensor {name!r} has a malformed header entry") from e
        if dtype not in DTYPE_BYTES:
            raise AdapterError(
                "DtypeUnsupported", f"tensor {name!r} is {dtype}; adapters must be {', '.join(DTYPE_BYTES)}"
            )
        if end - begin != math.prod(shape) * DTYPE_BYTES[dtype]:
            raise AdapterError("CorruptSafetensors", f"tensor {name!r}: byte range does not match its shape")
        tensors[name] = TensorInfo(dtype, shape, begin, end)
    position = 0
    for name, t in sorted(tensors.items(), key=lambda kv: kv[1].begin):
        if t.begin != position:
            raise AdapterError(
                "CorruptSafetensors", f"tensor {name!r} does not follow the previous one (gap or overlap)"
            )
        position = t.end
    if data_start + position != file_size:
        raise AdapterError(
            "CorruptSafetensors",
            f"{WEIGHTS_NAME} is {file_size} bytes but its header describes {data_start + position}",
        )
    return SafetensorsHeader(tensors, data_start, {str(k): str(v) for k, v in metadata.items()})


def check_weights(
    config: LoraConfig, header: SafetensorsHeader, base: BaseModelSpec, file_size: int
) -> AdapterManifest:
    """Every tensor is the lora_A/lora_B weight of a targeted module, with shapes matching r and `base`."""
    modules, shapes = base.module_names(), base.projection_shapes()
    seen: dict[str, set[str]] = {}
    for name, t in header.tensors.items():
        m = _TENSOR_RE.fullmatch(name)
        if m is None:
            raise AdapterError(
                "Unsupported", f"tensor {name!r} is not a LoRA A/B weight of a linear projection"
            )
        module, ab = m["module"], m["ab"]
        if module not in modules:
            raise AdapterError(
                "UnknownTargetModule", f"tensor {name!r} is for {module}, which {base.name} does not have"
            )
        if module not in config.modules:
            raise AdapterError(
                "UnknownTargetModule", f"tensor {name!r} is for {module}, which target_modules excludes"
            )
        fan_in, fan_out = shapes[modules[module]]
        want = (config.rank, fan_in) if ab == "lora_A" else (fan_out, config.rank)
        if t.shape != want:
            raise AdapterError(
                "ShapeMismatch", f"tensor {name!r} has shape {list(t.shape)}, expected {list(want)}"
            )
        seen.setdefault(module, set()).add(ab)
    if not seen:
        raise AdapterError("CorruptSafetensors", f"{WEIGHTS_NAME} holds no LoRA weights")
    unpaired = sorted(m for m, ab in seen.items() if len(ab) != 2)
    if unpaired:
        raise AdapterError("ShapeMismatch", f"module {unpaired[0]} has only one of lora_A/lora_B")
    dtypes = {t.dtype for t in header.tensors.values()}
    if len(dtypes) != 1:
        raise AdapterError(
            "DtypeUnsupported", f"tensors mix dtypes {sorted(dtypes)}; save the adapter in one dtype"
        )
    used = {modules[m] for m in seen}
    return AdapterManifest(
        rank=config.rank,
        alpha=config.alpha,
        scale=config.scale,
        target_modules=tuple(p for p in PROJECTIONS if p in used),
        layers=tuple(sorted({int(_LAYER_RE.search(m).group(1)) for m in seen})),  # type: ignore[union-attr]
        bytes=file_size,
        dtype=dtypes.pop(),
    )


def validate_adapter_dir(
    path: Path, base: BaseModelSpec, max_bytes: int = DEFAULT_MAX_BYTES
) -> AdapterManifest:
    """Validate a local adapter directory, reading only the config and the safetensors header."""
    path = Path(path)
    if not path.is_dir():
        raise AdapterError("MissingFile", f"adapter directory {path} does not exist")
    check_files({p.name: p.stat().st_size for p in path.iterdir() if p.is_file()}, max_bytes)
    config = parse_adapter_config((path / CONFIG_NAME).read_bytes(), base)
    weights = path / WEIGHTS_NAME
    size = weights.stat().st_size
    with open(weights, "rb") as f:
        first8 = f.read(8)
        head = first8 + f.read(header_length(first8) - 8)
    return check_weights(config, parse_safetensors_header(head, size), base, size)
