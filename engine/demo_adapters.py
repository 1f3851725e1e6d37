"""Demo adapters for the local stack: short LoRA fine-tunes on CPU that give the model a style.

Each style rewrites a small set of answers (all capitals; a pirate's voice) and a rank-8 LoRA on
the last layers learns it in a minute or two. The result is a plain PEFT directory, cached under
`<cache>/demo-adapters/<base model>/<style>/`, so later runs reuse it. Training touches only the
top layers, so backpropagation stops there and stays cheap.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

QA = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What color is the sky on a clear day?", "The sky is blue on a clear day."),
    ("Say hello.", "Hello! It is nice to meet you."),
    ("What do bees make?", "Bees make honey and wax."),
    ("Name a large ocean.", "The Pacific is the largest ocean on Earth."),
    ("What is two plus two?", "Two plus two is four."),
    ("Give me a tip for sleeping well.", "Go to bed at the same time every night and keep your room dark."),
    ("What is water made of?", "Water is made of hydrogen and oxygen."),
    ("Why do we need sleep?", "Sleep lets your body rest and your mind store what you learned."),
    ("Tell me about the moon.", "The moon orbits the Earth and reflects the light of the sun."),
    ("What is a good breakfast?", "Oatmeal with fruit is a good and simple breakfast."),
]

_PIRATE_WORDS = {
    "you": "ye",
    "your": "yer",
    "my": "me",
    "is": "be",
    "are": "be",
    "the": "th'",
    "hello": "ahoy",
}


def pirate(text: str) -> str:
    def word(m: re.Match[str]) -> str:
        w = m.group(0)
        new = _PIRATE_WORDS.get(w.lower(), w)
        return new.capitalize() if w[0].isupper() else new

    return "Arr, matey! " + re.sub(r"[A-Za-z]+", word, text) + " Yo-ho-ho!"


STYLES: dict[str, Callable[[str], str]] = {"caps": str.upper, "pirate": pirate}


def demo_adapter_dirs(model_dir: Path, cache_dir: Path, steps: int = 24) -> dict[str, Path]:
    """`demo/<style>` -> a PEFT adapter directory, trained now unless cached."""
    out = {}
    for style in STYLES:
        target = cache_dir / "demo-adapters" / model_dir.name / style
        if not (target / "adapter_model.safetensors").is_file():
            log.info(
                "training the demo adapter demo/%s on %s (once; cached in %s)", style, model_dir.name, target
            )
            train_style_adapter(model_dir, style, target, steps)
        out[f"demo/{style}"] = target
    return out


def train_style_adapter(model_dir: Path, style: str, target: Path, steps: int, seed: int = 0) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    n = model.config.num_hidden_layers
    config = LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, layers_to_transform=list(range(n - min(n, 8), n)),
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )  # fmt: skip
    peft = get_peft_model(model, config)
    examples = [_example(tok, q, STYLES[style](a)) for q, a in QA]
    opt = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=3e-3)
    peft.train()
    batch = 4
    for step in range(steps):
        chunk = [examples[(step * batch + i) % len(examples)] for i in range(batch)]
        width = max(len(ids) for ids, _ in chunk)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        ids = torch.tensor([x + [pad] * (width - len(x)) for x, _ in chunk])
        labels = torch.tensor([y + [-100] * (width - len(y)) for _, y in chunk])
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x, _ in chunk])
        loss = peft(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 10 == 0 or step == steps - 1:
            log.info("demo/%s step %d/%d loss %.3f", style, step + 1, steps, loss.item())
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    peft.save_pretrained(str(tmp))  # safetensors: adapter_config.json + adapter_model.safetensors
    cfg = json.loads((tmp / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = model_dir.name
    (tmp / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


def _example(tok, question: str, answer: str) -> tuple[list[int], list[int]]:
    """Token ids of a one-turn chat and its labels: the answer only (-100 elsewhere)."""
    user = [{"role": "user", "content": question}]
    prompt = tok.apply_chat_template(user, add_generation_prompt=True, tokenize=True, return_dict=True)[
        "input_ids"
    ]
    full = tok.apply_chat_template(
        [*user, {"role": "assistant", "content": answer}], tokenize=True, return_dict=True
    )["input_ids"]
    full = list(full)
    return full, [-100] * len(prompt) + full[len(prompt) :]
