"""Train a small LoRA adapter with PEFT, saved the way LoRAFleet serves it.

    python examples/tenant/train_adapter.py --base HuggingFaceTB/SmolLM2-135M-Instruct \
        --data examples/tenant/data.jsonl --out ./support-bot

Each line of --data is {"prompt": ..., "completion": ...}. Examples are formatted with the base
model's chat template, as the engine formats /v1/chat/completions requests, and the loss covers the
completion only. The output directory holds adapter_config.json and adapter_model.safetensors
(never a pickle: LoRAFleet refuses .bin files).

What the operator checks later (docs/tenant.md): the rank is at most the BaseModel's maxLoraRank,
the target modules are projections the base model has (q_proj k_proj v_proj o_proj gate_proj
up_proj down_proj), and `base_model_name_or_path` names the BaseModel's model (--base-name, when
--base is a local directory).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="Hugging Face model id or local directory to train on")
    p.add_argument("--base-name", help="base_model_name_or_path to record (default: --base)")
    p.add_argument("--data", type=Path, required=True, help="JSONL file of {prompt, completion}")
    p.add_argument("--out", type=Path, required=True, help="directory to write the adapter to")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=int, default=16)
    p.add_argument("--targets", default="q_proj,v_proj", help="comma-separated projection names")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def encode(tokenizer, prompt: str, completion: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and labels: the prompt's labels are -100, so only the completion is learnt."""
    messages = [{"role": "user", "content": prompt}]
    prefix = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(completion + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + answer_ids])
    labels = torch.tensor([[-100] * len(prompt_ids) + answer_ids])
    return ids, labels


def train(args: argparse.Namespace) -> dict[str, float]:
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    examples = [json.loads(line) for line in args.data.read_text().splitlines() if line.strip()]
    tokenizer = AutoTokenizer.from_pretrained(args.base)
    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32)
    config = LoraConfig(
        r=args.rank,
        lora_alpha=args.alpha,
        target_modules=args.targets.split(","),
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    batches = [encode(tokenizer, e["prompt"], e["completion"]) for e in examples]
    model.train()
    losses = []
    for step in range(args.steps):
        ids, labels = batches[step % len(batches)]
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.3f}")
    model.save_pretrained(args.out, safe_serialization=True)
    # Record the base model's name as the BaseModel knows it, not a local path.
    config_path = args.out / "adapter_config.json"
    saved = json.loads(config_path.read_text())
    saved["base_model_name_or_path"] = args.base_name or args.base
    config_path.write_text(json.dumps(saved, indent=2))
    tokenizer.save_pretrained(args.out / "tokenizer")  # not served; handy for local evaluation
    first, last = sum(losses[: len(batches)]) / len(batches), sum(losses[-len(batches) :]) / len(batches)
    print(f"saved {args.out}: loss {first:.3f} -> {last:.3f}")
    return {"first_loss": first, "last_loss": last}


def main(argv: list[str] | None = None) -> dict[str, float]:
    return train(parse_args(argv))


if __name__ == "__main__":
    main()
