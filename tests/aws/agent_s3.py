"""An agent that holds no AWS secret: boto3 with dummy keys, pointed at keystamp only through
HTTPS_PROXY and AWS_CA_BUNDLE. Creates a bucket, puts a small and a large object, reads both
back and lists them; prints what it read as JSON. Any failure is a non-zero exit.

Usage: agent_s3.py BUCKET LARGE_BYTES
"""
import hashlib
import json
import sys

import boto3
from botocore.config import Config

bucket, large_bytes = sys.argv[1], int(sys.argv[2])
s3 = boto3.client(
    "s3",
    region_name="us-east-1",
    endpoint_url="https://s3.us-east-1.amazonaws.com",
    aws_access_key_id="dummy",
    aws_secret_access_key="dummy",
    config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
)
s3.create_bucket(Bucket=bucket)
small = b"hello from an agent that holds no key"
large = bytes(range(256)) * (large_bytes // 256)
s3.put_object(Bucket=bucket, Key="small.txt", Body=small)
s3.put_object(Bucket=bucket, Key="large.bin", Body=large)
got_small = s3.get_object(Bucket=bucket, Key="small.txt")["Body"].read()
got_large = s3.get_object(Bucket=bucket, Key="large.bin")["Body"].read()
keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"])
print(json.dumps({
    "small_ok": got_small == small,
    "large_ok": hashlib.sha256(got_large).hexdigest() == hashlib.sha256(large).hexdigest(),
    "keys": keys,
}))
