"""Adapter format checks: every refusal has its reason code, and a real PEFT adapter passes."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save

from lorafleet.engine import adapter_format
from lorafleet.engine.adapter_format import (
    CONFIG_NAME,
    SMOLLM2_135M,
    WEIGHTS_NAME,
    AdapterError,
    BaseModelSpec,
    check_files,
    check_weights,
    parse_adapter_config,
    parse_safetensors_header,
    validate_adapter_dir,
)

TINY = BaseModelSpec(
    "org/tiny",
    hidden_size=8,
    intermediate_size=16,
    num_heads=2,
    num_kv_heads=1,
    head_dim=4,
    num_layers=2,
    max_rank=8,
)


def make_adapter_files(
    base: BaseModelSpec = TINY,
    rank: int = 4,
    targets: tuple[str, ...] = ("q_proj", "v_proj"),
    *,
    dtype: Any = np.float32,
    seed: int = 0,
    **config: Any,
) -> dict[str, bytes]:
    """A PEFT-format adapter (config + safetensors weights) for `base`, random but seeded."""
    rng = np.random.default_rng(seed)
    shapes = base.projection_shapes()
    tensors = {}
    for module, proj in base.module_names().items():
        if proj in targets:
            fan_in, fan_out = shapes[proj]
            prefix = f"base_model.model.{module}"
            tensors[f"{prefix}.lora_A.weight"] = rng.standard_normal((rank, fan_in)).astype(dtype)
            tensors[f"{prefix}.lora_B.weight"] = rng.standard_normal((fan_out, rank)).astype(dtype)
    cfg = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": list(targets),
        "base_model_name_or_path": base.name,
        "bias": "none",
        "modules_to_save": None,
        **config,
    }
    return {CONFIG_NAME: json.dumps(cfg).encode(), WEIGHTS_NAME: save(tensors)}


def write_dir(path: Path, files: dict[str, bytes]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (path / name).write_bytes(data)
    return path


def validate_files(files: dict[str, bytes], base: BaseModelSpec = TINY, max_bytes: int = 1 << 30):
    """The operator's path: listing sizes, the config, then only the header bytes."""
    check_files({n: len(d) for n, d in files.items()}, max_bytes)
    config = parse_adapter_config(files[CONFIG_NAME], base)
    weights = files[WEIGHTS_NAME]
    return check_weights(config, parse_safetensors_header(weights[:4096], len(weights)), base, len(weights))


def reason(fn, *args, **kwargs) -> str:
    with pytest.raises(AdapterError) as e:
        fn(*args, **kwargs)
    assert str(e.value)  # a message a user can act on
    return e.value.reason


def test_valid_adapter_manifest():
    m = validate_files(make_adapter_files(rank=4, targets=("q_proj", "down_proj", "k_proj")))
    assert (m.rank, m.alpha, m.scale, m.dtype) == (4, 8.0, 2.0, "F32")
    assert m.target_modules == ("q_proj", "k_proj", "down_proj")
    assert m.layers == (0, 1)


def test_rslora_scale_and_half_precision():
    m = validate_files(make_adapter_files(rank=4, use_rslora=True, dtype=np.float16))
    assert m.scale == pytest.approx(8 / math.sqrt(4))
    assert m.dtype == "F16"


def test_projection_shapes_of_smollm2():
    shapes = SMOLLM2_135M.projection_shapes()
    assert (
        shapes["q_proj"] == (576, 576) and shapes["k_proj"] == (576, 192) and shapes["o_proj"] == (576, 576)
    )
    assert shapes["gate_proj"] == (576, 1536) and shapes["down_proj"] == (1536, 576)
    assert len(SMOLLM2_135M.module_names()) == 30 * 7


def test_from_hf_config():
    spec = BaseModelSpec.from_hf_config(
        {
            "hidden_size": 576,
            "intermediate_size": 1536,
            "num_attention_heads": 9,
            "num_key_value_heads": 3,
            "num_hidden_layers": 30,
        },
        name=SMOLLM2_135M.name,
    )
    assert spec == SMOLLM2_135M
    with pytest.raises(ValueError, match=r"config\.json"):
        BaseModelSpec.from_hf_config({"hidden_size": 1})


@pytest.mark.parametrize(
    ("targets", "expected"),
    [
        ("all-linear", 14),
        (r"model\.layers\.1\.self_attn\.(q|v)_proj", 2),
        (r".*\.mlp\..*", 6),
        (["q_proj"], 2),
        (["model.layers.0.self_attn.q_proj"], 1),
    ],
)
def test_target_module_resolution(targets, expected):
    cfg = parse_adapter_config({"peft_type": "LORA", "r": 2, "target_modules": targets}, TINY)
    assert len(cfg.modules) == expected


def test_layers_to_transform_and_exclusions():
    cfg = {"peft_type": "LORA", "r": 2, "target_modules": ["q_proj", "v_proj"]}
    assert parse_adapter_config({**cfg, "layers_to_transform": [1]}, TINY).modules == {
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.v_proj",
    }
    assert len(parse_adapter_config({**cfg, "exclude_modules": ["v_proj"]}, TINY).modules) == 2


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"r": 16}, "RankTooHigh"),
        ({"r": 0}, "InvalidConfig"),
        ({"target_modules": ["q_proj", "c_attn"]}, "UnknownTargetModule"),
        ({"target_modules": r"transformer\.h\..*"}, "UnknownTargetModule"),
        ({"target_modules": ["embed_tokens"]}, "Unsupported"),
        ({"target_modules": ["q_proj", "lm_head"]}, "Unsupported"),
        ({"target_modules": ".*"}, "Unsupported"),  # would include the embeddings
        ({"base_model_name_or_path": "meta-llama/Llama-3-8B"}, "BaseModelMismatch"),
        ({"modules_to_save": ["lm_head"]}, "Unsupported"),
        ({"use_dora": True}, "Unsupported"),
        ({"fan_in_fan_out": True}, "Unsupported"),
        ({"bias": "lora_only"}, "Unsupported"),
        ({"rank_pattern": {"q_proj": 8}}, "Unsupported"),
        ({"peft_type": "IA3"}, "Unsupported"),
        ({"lora_alpha": float("nan")}, "InvalidConfig"),
        ({"lora_alpha": float("inf")}, "InvalidConfig"),
        ({"target_modules": "(q_proj"}, "InvalidConfig"),
        ({"exclude_modules": "[bad"}, "InvalidConfig"),
        ({"exclude_modules": 7}, "InvalidConfig"),
        ({"layers_to_transform": 1.5}, "InvalidConfig"),
        ({"layers_to_transform": ["0"]}, "InvalidConfig"),
    ],
)
def test_config_refusals(change, expected):
    cfg = {
        "peft_type": "LORA",
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["q_proj"],
        "base_model_name_or_path": "org/tiny",
    }
    assert reason(parse_adapter_config, {**cfg, **change}, TINY) == expected


@pytest.mark.timeout(30)
@pytest.mark.parametrize("field", ["target_modules", "exclude_modules"])
def test_tenant_regexes_cannot_stall_the_process(field, monkeypatch):
    """Config regexes are the tenant's. This one backtracks for ever in Python's `re` (holding the
    GIL, so the engine's step loop and HTTP server froze with it); it is matched in no time here,
    and any pattern still too slow ends in a clear refusal."""
    cfg = {"peft_type": "LORA", "r": 4, "target_modules": ["q_proj", "v_proj"], field: r"(.*)*\.q_proj"}
    parsed = parse_adapter_config(cfg, TINY)
    assert {m.rsplit(".", 1)[-1] for m in parsed.modules} == (
        {"q_proj"} if field == "target_modules" else {"v_proj"}
    )
    monkeypatch.setattr(adapter_format, "REGEX_SECONDS", 0.0)
    with pytest.raises(AdapterError, match="takes too long") as e:
        parse_adapter_config(cfg, TINY)
    assert e.value.reason == "InvalidConfig"


def test_base_model_names_are_normalized():
    cfg = {"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"]}
    for name in ("org/tiny", "/models/TINY/", "tiny", None):
        parse_adapter_config({**cfg, "base_model_name_or_path": name}, TINY)


def test_config_must_be_json_object():
    assert reason(parse_adapter_config, b"{not json", TINY) == "InvalidConfig"
    assert reason(parse_adapter_config, b"[1]", TINY) == "InvalidConfig"


@pytest.mark.parametrize(
    ("sizes", "expected"),
    [
        ({"adapter_model.bin": 10, CONFIG_NAME: 10}, "PickleOnly"),
        ({"adapter_model.pt": 10}, "PickleOnly"),
        ({"x/checkpoint.ckpt": 10}, "PickleOnly"),
        ({CONFIG_NAME: 10}, "MissingFile"),
        ({WEIGHTS_NAME: 10}, "MissingFile"),
        ({}, "MissingFile"),
        ({CONFIG_NAME: 10, WEIGHTS_NAME: 1000}, "TooLarge"),
    ],
)
def test_file_refusals(sizes, expected):
    assert reason(check_files, sizes, max_bytes=500) == expected


def test_pickles_beside_safetensors_are_ignored():
    check_files({CONFIG_NAME: 10, WEIGHTS_NAME: 10, "adapter_model.bin": 10})


def _header_bytes(header: dict, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.mark.parametrize(
    ("blob", "expected"),
    [
        (b"\x01\x02", "CorruptSafetensors"),  # shorter than the length prefix
        (struct.pack("<Q", 1 << 40) + b"{}", "CorruptSafetensors"),  # absurd header length
        (struct.pack("<Q", 100) + b"{}", "CorruptSafetensors"),  # header runs past the end of the file
        (struct.pack("<Q", 4) + b"nope", "CorruptSafetensors"),
        (
            _header_bytes({"t": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8),
            "DtypeUnsupported",
        ),
        (
            _header_bytes({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4),
            "CorruptSafetensors",
        ),
        (
            _header_bytes({"t": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8),
            "CorruptSafetensors",
        ),
        (
            _header_bytes({"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 9),
            "CorruptSafetensors",
        ),
        (
            _header_bytes({"t": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4),
            "CorruptSafetensors",
        ),
        (_header_bytes({"t": {"shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4), "CorruptSafetensors"),
    ],
)
def test_corrupt_headers(blob, expected):
    assert reason(parse_safetensors_header, blob, len(blob)) == expected


def test_truncated_weights_file():
    weights = make_adapter_files()[WEIGHTS_NAME]
    assert reason(parse_safetensors_header, weights, len(weights) - 1) == "CorruptSafetensors"


@pytest.mark.parametrize(
    ("files_kwargs", "config_change", "expected"),
    [
        ({"rank": 4}, {"r": 2}, "ShapeMismatch"),  # weights of rank 4, config says 2
        ({"targets": ("q_proj", "v_proj")}, {"target_modules": ["q_proj"]}, "UnknownTargetModule"),
        ({"dtype": np.float64}, {}, "DtypeUnsupported"),
    ],
)
def test_weights_disagreeing_with_config(files_kwargs, config_change, expected):
    files = make_adapter_files(**files_kwargs)
    cfg = json.loads(files[CONFIG_NAME]) | config_change
    files[CONFIG_NAME] = json.dumps(cfg).encode()
    assert reason(validate_files, files) == expected


def test_weights_for_another_architecture():
    wide = BaseModelSpec("org/tiny", 16, 32, 2, 1, 8, 2, max_rank=8)  # same names, other shapes
    assert reason(validate_files, make_adapter_files(base=wide)) == "ShapeMismatch"
    foreign = {"base_model.model.transformer.h.0.attn.c_attn.lora_A.weight": np.zeros((4, 8), np.float32)}
    files = make_adapter_files() | {WEIGHTS_NAME: save(foreign)}
    assert reason(validate_files, files) == "UnknownTargetModule"


def test_unpaired_and_empty_weights():
    t = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.zeros((4, 8), np.float32)}
    assert reason(validate_files, make_adapter_files() | {WEIGHTS_NAME: save(t)}) == "ShapeMismatch"
    assert reason(validate_files, make_adapter_files() | {WEIGHTS_NAME: save({})}) == "CorruptSafetensors"


def test_validate_adapter_dir(tmp_path):
    path = write_dir(tmp_path / "a", make_adapter_files())
    assert validate_adapter_dir(path, TINY).bytes == (path / WEIGHTS_NAME).stat().st_size
    assert reason(validate_adapter_dir, tmp_path / "missing", TINY) == "MissingFile"
    pickled = write_dir(tmp_path / "p", {CONFIG_NAME: b"{}", "adapter_model.bin": b"\x80\x04."})
    assert reason(validate_adapter_dir, pickled, TINY) == "PickleOnly"


def test_real_peft_adapter_passes(tiny_llama_dir, tmp_path):
    """An adapter saved by PEFT itself, over the tiny Llama, validates against its config.json."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    peft_model = get_peft_model(
        model,
        LoraConfig(
            r=4, lora_alpha=16, target_modules=["q_proj", "k_proj", "o_proj", "gate_proj", "down_proj"]
        ),
    )
    peft_model.save_pretrained(tmp_path / "adapter")
    hf_config = json.loads((tiny_llama_dir / "config.json").read_text())
    base = BaseModelSpec.from_hf_config(hf_config, name=str(tiny_llama_dir))
    m = validate_adapter_dir(tmp_path / "adapter", base)
    assert (m.rank, m.scale, m.dtype) == (4, 4.0, "F32")
    assert m.target_modules == ("q_proj", "k_proj", "o_proj", "gate_proj", "down_proj")
    assert m.layers == tuple(range(hf_config["num_hidden_layers"]))
