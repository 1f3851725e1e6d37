"""Call an adapter with the OpenAI client: the adapter's id goes in `model`.

    python examples/tenant/chat.py --base-url http://smollm2.lorafleet.svc/v1 \
        --model team-a/support-bot "My order has not arrived."

The id is "<namespace>/<name>" of the LoRAAdapter; the BaseModel's own servedName calls the base
model without an adapter. An API key is needed only if the engines require keys (the BaseModel's
extraArgs name an --api-keys-file); pass it with --api-key or $OPENAI_API_KEY.
"""

from __future__ import annotations

import argparse
import os

from openai import OpenAI


def chat(base_url: str, model: str, prompt: str, api_key: str, max_tokens: int = 64) -> str:
    with OpenAI(base_url=base_url, api_key=api_key, max_retries=2) as client:
        reply = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=max_tokens,
            temperature=0,
        )
    return reply.choices[0].message.content or ""


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("prompt")
    p.add_argument("--base-url", required=True, help="the BaseModel's endpoint, ending in /v1")
    p.add_argument("--model", required=True, help="<namespace>/<name> of the LoRAAdapter")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", "none"))
    p.add_argument("--max-tokens", type=int, default=64)
    args = p.parse_args(argv)
    text = chat(args.base_url, args.model, args.prompt, args.api_key, args.max_tokens)
    print(text)
    return text


if __name__ == "__main__":
    main()
