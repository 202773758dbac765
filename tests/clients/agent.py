"""An agent in Python: `requests`, configured only by HTTPS_PROXY / REQUESTS_CA_BUNDLE."""
import json
import sys

import requests

for url in sys.argv[1:]:
    response = requests.get(url, headers={"Authorization": "Bearer agent-own-key"}, timeout=20)
    print(json.dumps({
        "url": url,
        "status": response.status_code,
        "error": response.headers.get("x-keystamp-error"),
        "body": response.text,
    }))
