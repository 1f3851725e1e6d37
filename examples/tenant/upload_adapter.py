"""Upload a PEFT adapter directory to S3, where the LoRAAdapter will point.

    python examples/tenant/upload_adapter.py ./support-bot s3://team-a-adapters/support-bot/v1/

Credentials come from boto3's usual chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, a profile,
an instance role); --endpoint-url (or $AWS_ENDPOINT_URL_S3) for MinIO, SeaweedFS and the like.
Only the two files LoRAFleet reads are uploaded. Publish a new version under a new prefix (v2/)
or over the old one: either way the operator sees the new ETags and the engines never serve stale
weights.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import boto3

FILES = ("adapter_config.json", "adapter_model.safetensors")


def upload(directory: Path, uri: str, endpoint_url: str | None = None) -> str:
    """Upload and return the version the LoRAAdapter status will show: the weights' ETag, `+`,
    the config's ETag (re-uploading either file makes a new version)."""
    if not uri.startswith("s3://"):
        raise SystemExit(f"not an s3:// URI: {uri}")
    missing = [name for name in FILES if not (directory / name).is_file()]
    if missing:
        pickles = sorted(p.name for p in directory.glob("*.bin"))
        hint = f" (found {pickles}: save with safe_serialization=True)" if pickles else ""
        raise SystemExit(f"{directory} lacks {missing}{hint}")
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"
    s3 = boto3.client("s3", endpoint_url=endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3"))
    for name in FILES:
        s3.upload_file(str(directory / name), bucket, prefix + name)
        print(f"uploaded s3://{bucket}/{prefix}{name}")
    etags = {name: s3.head_object(Bucket=bucket, Key=prefix + name)["ETag"].strip('"') for name in FILES}
    return f"{etags[FILES[1]]}+{etags[FILES[0]]}"


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("directory", type=Path)
    p.add_argument("uri", help="s3://bucket/prefix/")
    p.add_argument("--endpoint-url", help="S3-compatible endpoint (default $AWS_ENDPOINT_URL_S3, else AWS)")
    args = p.parse_args(argv)
    version = upload(args.directory, args.uri, args.endpoint_url)
    print(f"version (weights ETag + config ETag): {version}")
    return version


if __name__ == "__main__":
    main()
