"""Prepares a moto server for tests/aws.rs, in exactly SETUP_ACTIONS unauthenticated calls (the
server's INITIAL_NO_AUTH_ACTION_COUNT; every later request must be signed): an IAM user with a
policy allowing everything, a role it may assume with S3 read/write, and the user's access key,
printed as JSON.

Usage: moto_setup.py ENDPOINT
"""
import json
import sys

import boto3

SETUP_ACTIONS = 5  # keep in step with the calls below
endpoint = sys.argv[1]
iam = boto3.client(
    "iam", endpoint_url=endpoint, region_name="us-east-1",
    aws_access_key_id="setup", aws_secret_access_key="setup",
)
allow_all = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
trust = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Principal": {"AWS": "*"}, "Action": ["sts:AssumeRole", "sts:AssumeRoleWithWebIdentity"]}],
}
iam.create_user(UserName="keystamp")
iam.put_user_policy(UserName="keystamp", PolicyName="all", PolicyDocument=json.dumps(allow_all))
role = iam.create_role(RoleName="agents", AssumeRolePolicyDocument=json.dumps(trust))["Role"]
iam.put_role_policy(RoleName="agents", PolicyName="s3", PolicyDocument=json.dumps(
    {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
key = iam.create_access_key(UserName="keystamp")["AccessKey"]
print(json.dumps({
    "access_key_id": key["AccessKeyId"],
    "secret_access_key": key["SecretAccessKey"],
    "role_arn": role["Arn"],
}))
