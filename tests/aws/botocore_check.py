"""An AWS-shaped TLS upstream that judges keystamp's SigV4 signatures with botocore's signer, an
implementation keystamp does not share: for each request it rebuilds the canonical request from
the headers the Authorization header says were signed, recomputes the signature with the known
secret key, checks the payload hash against the body, and answers 200 with what it saw, or 403
SignatureDoesNotMatch. Started by tests/aws.rs.

Usage: botocore_check.py PORT CERT_PEM KEY_PEM ACCESS_KEY_ID SECRET_ACCESS_KEY
"""
import hashlib
import hmac
import json
import ssl
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from botocore.auth import S3SigV4Auth, SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

PORT, CERT, KEY, ACCESS_KEY_ID, SECRET = sys.argv[1:6]


def judge(method, path, headers, body):
    authorization = headers.get("authorization", "")
    if not authorization.startswith("AWS4-HMAC-SHA256 "):
        return 403, {"Code": "MissingAuthenticationToken"}
    fields = dict(
        part.strip().split("=", 1) for part in authorization[len("AWS4-HMAC-SHA256 "):].split(",")
    )
    access_key, date, region, service, _ = fields["Credential"].split("/")
    if access_key != ACCESS_KEY_ID:
        return 403, {"Code": "InvalidClientTokenId"}
    signed = fields["SignedHeaders"].split(";")
    request = AWSRequest(
        method=method,
        url="https://" + headers["host"] + path,
        headers={name: headers[name] for name in signed if name in headers},
        data=body,
    )
    request.context["timestamp"] = headers["x-amz-date"]
    token = headers.get("x-amz-security-token")
    auth_class = S3SigV4Auth if service == "s3" else SigV4Auth
    auth = auth_class(Credentials(ACCESS_KEY_ID, SECRET, token), service, region)
    canonical = auth.canonical_request(request)
    expected = auth.signature(auth.string_to_sign(request, canonical), request)
    if not hmac.compare_digest(expected, fields["Signature"]):
        return 403, {"Code": "SignatureDoesNotMatch", "canonical": canonical}
    if path.startswith("/denied"):
        # A correctly signed request the key may not make: a permission answer, not a bad key.
        return 403, {"Code": "AccessDenied", "Message": "not authorized to perform this action"}
    declared = headers.get("x-amz-content-sha256")
    if declared not in (None, "UNSIGNED-PAYLOAD") and declared != hashlib.sha256(body).hexdigest():
        return 400, {"Code": "XAmzContentSHA256Mismatch"}
    return 200, {
        "signed_headers": signed,
        "service": service,
        "region": region,
        "path": path,
        "body_bytes": len(body),
        "has_token": token is not None,
    }


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def handle_any(self):
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        headers = {name.lower(): value for name, value in self.headers.items()}
        status, answer = judge(self.command, self.path, headers, body)
        payload = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_DELETE = handle_any

    def log_message(self, *args):
        pass


server = ThreadingHTTPServer(("127.0.0.1", int(PORT)), Handler)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(CERT, KEY)
server.socket = context.wrap_socket(server.socket, server_side=True)
print("ready", flush=True)
server.serve_forever()
