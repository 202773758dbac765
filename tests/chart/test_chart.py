"""Renders and lints charts/keystamp with Helm's Go SDK (helm-python-sdk), validates every
rendered manifest against the Kubernetes schemas (kubernetes-validate), and checks what
platform and security teams rely on, for several values files. The keystamp config the chart
renders must pass `keystamp check` (the binary path comes in KEYSTAMP_BIN).

Run by scripts/test; prints a closing `N passed, N failed` line and exits 1 on any failure.
"""

import os
import pathlib
import subprocess
import sys
import tempfile
import traceback

import helm_python
import kubernetes_validate
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "keystamp"
KUBE_VERSION = "1.30"
VALUES = {
    "defaults": {},
    "example": yaml.safe_load((CHART / "ci" / "example-values.yaml").read_text()),
    "classic-sidecar": yaml.safe_load((CHART / "ci" / "classic-sidecar-values.yaml").read_text()),
    "monitoring": yaml.safe_load((CHART / "ci" / "monitoring-values.yaml").read_text()),
    "fleet": yaml.safe_load((CHART / "ci" / "fleet-values.yaml").read_text()),
    "vault": yaml.safe_load((CHART / "ci" / "vault-values.yaml").read_text()),
    "transparent": yaml.safe_load((CHART / "ci" / "transparent-values.yaml").read_text()),
}
CA_DIR = "/var/run/keystamp"
NO_PROXY_BASE = ["localhost", "127.0.0.1", "::1", ".svc", ".cluster.local"]

results = []


def check(name):
    def wrap(function):
        try:
            function()
            results.append((name, None))
            print(f"ok      {name}")
        except Exception:  # noqa: BLE001 - every failure is reported, then counted
            results.append((name, traceback.format_exc()))
            print(f"FAILED  {name}\n{traceback.format_exc()}")
        return function
    return wrap


def render(values):
    chart = helm_python.Chart.load(str(CHART))
    chart.validate_schema(values)
    files = chart.render(values, name="agents", namespace="fleet", is_install=True)
    documents = []
    for path, text in sorted(files.items()):
        if path.endswith("NOTES.txt"):
            continue
        for document in yaml.safe_load_all(text):
            if document:
                documents.append((path, document))
    return documents


def pod_specs(documents):
    for _, document in documents:
        kind = document["kind"]
        if kind == "Deployment":
            yield document["metadata"]["name"], document["spec"]["template"]["spec"]
        elif kind == "Pod":
            yield document["metadata"]["name"], document["spec"]


def keystamp_container(spec):
    for container in spec.get("initContainers", []) + spec["containers"]:
        if container["name"] == "keystamp":
            return container
    raise AssertionError("no keystamp container")


def agent_containers(spec):
    return [c for c in spec["containers"] if c["name"] != "keystamp"]


for label, values in VALUES.items():

    @check(f"{label}: schema, lint and render")
    def _():
        report = helm_python.lint(str(CHART), values, strict=True, kube_version=f"v{KUBE_VERSION}.0")
        errors = [m for m in report["messages"] if m["severity"] >= 2] + report.get("errors", [])
        assert not errors, errors
        assert render(values)

    @check(f"{label}: every manifest is valid Kubernetes {KUBE_VERSION}")
    def _():
        for path, document in render(values):
            if document["apiVersion"].startswith("monitoring.coreos.com/"):
                # CRDs: no upstream schema; their shape is checked below.
                continue
            kubernetes_validate.validate(document, KUBE_VERSION, strict=True)

    @check(f"{label}: standard labels on every object")
    def _():
        for path, document in render(values):
            labels = document["metadata"].get("labels", {})
            for key in ["app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/version", "app.kubernetes.io/managed-by"]:
                assert key in labels, f"{path}: {key} missing"

    @check(f"{label}: agent env, probes, security context, no subPath")
    def _():
        for name, spec in pod_specs(render(values)):
            keystamp = keystamp_container(spec)
            native = values.get("sidecar", {}).get("native", True)
            if native:
                assert keystamp in spec["initContainers"] and keystamp["restartPolicy"] == "Always", name
            else:
                assert keystamp in spec["containers"] and "restartPolicy" not in keystamp, name
            assert keystamp["startupProbe"]["httpGet"]["path"] == "/readyz"
            assert keystamp["livenessProbe"]["httpGet"]["path"] == "/livez"
            security = keystamp["securityContext"]
            assert security["runAsNonRoot"] is True and security["readOnlyRootFilesystem"] is True
            assert security["allowPrivilegeEscalation"] is False
            assert security["capabilities"]["drop"] == ["ALL"]
            assert security["seccompProfile"]["type"] == "RuntimeDefault"
            assert keystamp["resources"]["limits"]["memory"] and keystamp["resources"]["requests"]["cpu"]
            for container in spec.get("initContainers", []) + spec["containers"]:
                for mount in container.get("volumeMounts", []):
                    assert "subPath" not in mount and "subPathExpr" not in mount, f"{name}/{container['name']}: {mount}"
            for agent in agent_containers(spec):
                env = {e["name"]: e.get("value") for e in agent["env"]}
                identity = values.get("agent", {}).get("identity", {}).get("enabled", False)
                proxy = "http://$(KEYSTAMP_AGENT_NAME):$(KEYSTAMP_AGENT_TOKEN)@127.0.0.1:3128" if identity else "http://127.0.0.1:3128"
                for key in ["HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"]:
                    assert env[key] == proxy, (key, env.get(key))
                expected_no_proxy = ",".join(NO_PROXY_BASE + values.get("agent", {}).get("noProxy", []))
                assert env["NO_PROXY"] == env["no_proxy"] == expected_no_proxy
                assert env["NODE_USE_ENV_PROXY"] == "1"
                assert env["NODE_EXTRA_CA_CERTS"] == f"{CA_DIR}/ca.crt"
                for key in ["SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"]:
                    assert env[key] == f"{CA_DIR}/ca-bundle.crt", key
                if identity:
                    names = [e["name"] for e in agent["env"]]
                    # $(VAR) expansion only sees variables defined earlier in the list.
                    assert names.index("KEYSTAMP_AGENT_TOKEN") < names.index("HTTPS_PROXY")
                mounts = {m["name"]: m for m in agent["volumeMounts"]}
                assert mounts["keystamp-ca"]["mountPath"] == CA_DIR and mounts["keystamp-ca"]["readOnly"] is True
            volumes = {v["name"]: v for v in spec["volumes"]}
            assert "emptyDir" in volumes["keystamp-ca"]
            for credential in values.get("config", {}).get("credentials", {}):
                assert "secret" in volumes[f"ks-cred-{credential}"]

    @check(f"{label}: the rendered keystamp config passes keystamp check")
    def _():
        config = next(d for _, d in render(values) if d["kind"] == "ConfigMap" and "keystamp.yaml" in d.get("data", {}))
        with tempfile.TemporaryDirectory() as directory:
            path = pathlib.Path(directory) / "keystamp.yaml"
            path.write_text(config["data"]["keystamp.yaml"])
            run = subprocess.run([os.environ["KEYSTAMP_BIN"], "check", "--config", str(path)], capture_output=True, text=True)
            assert run.returncode == 0, run.stderr
            for credential in values.get("config", {}).get("credentials", {}):
                assert credential in run.stdout


@check("fleet: store URL and seal key from Secrets, pod name from the downward API, fleet section rendered")
def _():
    for name, spec in pod_specs(render(VALUES["fleet"])):
        env = {e["name"]: e for e in keystamp_container(spec)["env"]}
        assert env["KEYSTAMP_FLEET_REDIS_URL"]["valueFrom"]["secretKeyRef"] == {"name": "keystamp-fleet-redis", "key": "url"}, name
        assert env["KEYSTAMP_FLEET_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "keystamp-fleet-key", "key": "fleet-key"}, name
        assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name", name
    configs = [d for _, d in render(VALUES["fleet"]) if d["kind"] == "ConfigMap"]
    config = yaml.safe_load(configs[0]["data"]["keystamp.yaml"])
    assert config["fleet"] == {"name": "research-agents", "store": {"url": {"env": "KEYSTAMP_FLEET_REDIS_URL"}}, "key": {"env": "KEYSTAMP_FLEET_KEY"}, "replicas_hint": 50}, config
    defaults = [d for _, d in render(VALUES["defaults"]) if d["kind"] == "ConfigMap"]
    assert all("fleet" not in yaml.safe_load(d["data"]["keystamp.yaml"]) for d in defaults)


@check("vault: projected token and CA mounted, credentials read from Vault with JWT auth")
def _():
    documents = render(VALUES["vault"])
    for name, spec in pod_specs(documents):
        volumes = {v["name"]: v for v in spec["volumes"]}
        token = volumes["ks-vault-token"]["projected"]["sources"][0]["serviceAccountToken"]
        assert token == {"audience": "vault", "expirationSeconds": 3600, "path": "token"}, name
        assert volumes["ks-vault-ca"]["secret"]["secretName"] == "vault-ca", name
        mounts = {m["name"]: m["mountPath"] for m in keystamp_container(spec)["volumeMounts"]}
        assert mounts["ks-vault-token"] == "/var/run/secrets/tokens/vault", name
    configs = [d for _, d in documents if d["kind"] == "ConfigMap"]
    config = yaml.safe_load(configs[0]["data"]["keystamp.yaml"])
    openai = config["credentials"]["openai"]["source"]["vault"]
    assert openai["auth"] == {"jwt": {"role": "agents", "token": {"file": "/var/run/secrets/tokens/vault/token"}}}, openai
    assert openai["kv"] == {"mount": "secret", "path": "agents/openai", "field": "api_key"}, openai
    assert config["credentials"]["cache"]["source"]["vault"]["dynamic"] == {"path": "database/creds/agent", "field": "password"}
    assert config["upstream_tls"] == {"extra_roots": ["/var/run/secrets/keystamp/vault-ca/ca.crt"]}, config


@check("vault: a credential name in both config.credentials and vault.credentials is refused")
def _():
    values = yaml.safe_load((CHART / "ci" / "vault-values.yaml").read_text())
    values["config"]["credentials"] = {"openai": {"secretName": "openai-key"}}
    try:
        render(values)
    except Exception as error:  # noqa: BLE001 - helm reports the template's fail() as an error
        assert "in both config.credentials and vault.credentials" in str(error), error
    else:
        raise AssertionError("a duplicate credential name rendered")


@check("transparent: netfilter init container first, NET_ADMIN only, rules for keystamp's uid")
def _():
    documents = render(VALUES["transparent"])
    deployments = [(path, d) for path, d in documents if d["kind"] == "Deployment"]
    assert deployments
    for name, spec in pod_specs(deployments):
        first = spec["initContainers"][0]
        assert first["name"] == "keystamp-netfilter", name
        assert first["args"] == ["netfilter", "apply", "--config", "/etc/keystamp/keystamp.yaml"]
        security = first["securityContext"]
        assert security["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN"]}, security
        assert security["allowPrivilegeEscalation"] is False and security["readOnlyRootFilesystem"] is True
        assert keystamp_container(spec)["securityContext"]["runAsUser"] == 65532
    configs = [d for _, d in documents if d["kind"] == "ConfigMap"]
    config = yaml.safe_load(configs[0]["data"]["keystamp.yaml"])
    assert config["transparent"] == {"listen": "127.0.0.1:15001", "uid": 65532, "lockdown": True}, config
    defaults = [d for _, d in render(VALUES["defaults"]) if d["kind"] == "ConfigMap"]
    assert all("transparent" not in yaml.safe_load(d["data"]["keystamp.yaml"]) for d in defaults)


@check("monitoring: PodMonitor, PrometheusRule alerts and Grafana dashboard")
def _():
    documents = {d["kind"]: d for _, d in render(VALUES["monitoring"])}
    assert documents["PodMonitor"]["spec"]["podMetricsEndpoints"][0]["path"] == "/metrics"
    rules = documents["PrometheusRule"]["spec"]["groups"][0]["rules"]
    alerts = {r["alert"] for r in rules}
    assert alerts == {"KeystampBreakerOpen", "KeystampFleetStoreDown", "KeystampCredentialExpiringSoon", "KeystampReloadFailures", "KeystampAuthFailureRate", "KeystampErrorRate"}, alerts
    for rule in rules:
        assert rule["labels"]["severity"] in {"critical", "warning"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
    dashboard = next(d for k, d in documents.items() if k == "ConfigMap" and d["metadata"]["name"].endswith("-dashboard")) if False else None
    configmaps = [d for _, d in render(VALUES["monitoring"]) if d["kind"] == "ConfigMap"]
    dashboard = next(c for c in configmaps if c["metadata"]["name"].endswith("-dashboard"))
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    import json
    panels = json.loads(dashboard["data"]["keystamp.json"])["panels"]
    assert any("keystamp_breaker_state" in t["expr"] for p in panels for t in p["targets"])


@check("defaults: monitoring objects are opt-in")
def _():
    kinds = [d["kind"] for _, d in render({})]
    assert "PodMonitor" not in kinds and "PrometheusRule" not in kinds and "Deployment" not in kinds


@check("schema: unknown keys are rejected")
def _():
    chart = helm_python.Chart.load(str(CHART))
    for bad in [{"sidecar": {"nativ": True}}, {"typo": 1}, {"config": {"credentials": {"x": {"secretName": "s", "subPath": "t"}}}}]:
        try:
            chart.validate_schema(bad)
        except helm_python.HelmError:
            continue
        raise AssertionError(f"accepted {bad}")


failed = [name for name, error in results if error]
print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
sys.exit(1 if failed else 0)
