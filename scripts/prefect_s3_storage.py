"""Save a Prefect storage block for S3 from the AWS_* environment, so Prefect's task results and
cache records live in the same object store as smolflow's artifacts (see README, "Artifacts on S3").

    python scripts/prefect_s3_storage.py --bucket smolflow [--folder prefect-results] [--name smolflow-results]
    export PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK=s3-bucket/smolflow-results
    export PREFECT_RESULTS_PERSIST_BY_DEFAULT=true

Prefect only takes a *saved* block as default result storage, so this saves one (prefect-aws
S3Bucket with AwsCredentials) on the Prefect server PREFECT_API_URL names. The secret key goes
into the block's SecretStr field, which Prefect stores as a secret and never shows; this script
never prints it. Every machine that shares that Prefect server and bucket then reuses the others'
cached task results.
"""

from __future__ import annotations

import argparse
import os
import sys


def save_block(bucket: str, folder: str, name: str) -> str:
    """Check the bucket is usable with the AWS_* credentials, save the block, return its slug."""
    from prefect_aws import AwsCredentials, S3Bucket
    from prefect_aws.client_parameters import AwsClientParameters

    missing = [v for v in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") if not os.environ.get(v)]
    if missing:
        raise SystemExit(f"set {' and '.join(missing)} first (and AWS_ENDPOINT_URL for a server other than AWS)")
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    credentials = AwsCredentials(
        aws_access_key_id=os.environ["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=os.environ["AWS_SECRET_ACCESS_KEY"],
        region_name=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        aws_client_parameters=AwsClientParameters(endpoint_url=endpoint),
    )
    try:  # fail here, naming the bucket, rather than in the middle of a flow run
        credentials.get_s3_client().head_bucket(Bucket=bucket)
    except Exception as err:  # botocore's messages name the operation, never the secret
        where = endpoint or "AWS (AWS_ENDPOINT_URL is not set)"
        raise SystemExit(f"cannot use bucket {bucket!r} at {where}: {type(err).__name__}: {err}. Check the "
                         "bucket exists and AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY are valid there") from None
    S3Bucket(bucket_name=bucket, bucket_folder=folder, credentials=credentials).save(name, overwrite=True)
    return f"{S3Bucket.get_block_type_slug()}/{name}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bucket", default="smolflow", help="an existing bucket (s3:// prefix optional)")
    parser.add_argument("--folder", default="prefect-results", help="key prefix for Prefect's records")
    parser.add_argument("--name", default="smolflow-results", help="the block's name")
    args = parser.parse_args(argv)
    slug = save_block(args.bucket.removeprefix("s3://").strip("/"), args.folder, args.name)
    print(f"saved Prefect block {slug} (s3://{args.bucket.removeprefix('s3://').strip('/')}/{args.folder}) on "
          f"{os.environ.get('PREFECT_API_URL', 'the default Prefect server')}\n"
          f"export PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK={slug}\nexport PREFECT_RESULTS_PERSIST_BY_DEFAULT=true")


if __name__ == "__main__":
    sys.exit(main())
