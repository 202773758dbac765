// An agent in Node: undici's EnvHttpProxyAgent reads HTTPS_PROXY/HTTP_PROXY/NO_PROXY, and Node
// trusts the CA in NODE_EXTRA_CA_CERTS. Nothing else is configured.
import { EnvHttpProxyAgent, setGlobalDispatcher, fetch } from "undici";

setGlobalDispatcher(new EnvHttpProxyAgent());
for (const url of process.argv.slice(2)) {
  const response = await fetch(url, { headers: { authorization: "Bearer agent-own-key" } });
  const body = await response.text();
  console.log(JSON.stringify({
    url,
    status: response.status,
    error: response.headers.get("x-keystamp-error"),
    body,
  }));
}
