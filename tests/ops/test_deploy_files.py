"""Static checks of the deployment files: Dockerfile, .dockerignore, compose.yaml, deploy/.

Needs PyYAML. When `docker-compose` (v1) or the `docker compose` plugin is installed,
compose.yaml is also validated by it (interpolation included); otherwise that part skips.
No Docker engine or cluster is needed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

DEPLOYMENT_NAME = "login-pipeline"
SECRET_NAME = "pipeline-secrets"
SECRET_KEYS = {"PIPELINE_MASKING__KEY", "PIPELINE_POSTGRES__DSN"}
HTTP_PORT = 8080
# Settings that config.toml does not list; used when pipeline.settings is not importable.
EXTRA_CONFIG_KEYS = {("http", "port"), ("sqs", "create_dlq")}
DUMMY_KEY = "test:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=="


# --------------------------------------------------------------------------- helpers


def load_all(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as fh:
        return [d for d in yaml.safe_load_all(fh) if d is not None]


def deploy_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in {".yaml", ".yml"})


def deploy_docs() -> list[dict]:
    return [doc for path in deploy_files() for doc in load_all(path)]


def find(kind: str, name: str | None = None) -> list[dict]:
    return [
        d
        for d in deploy_docs()
        if d.get("kind") == kind and (name is None or d["metadata"]["name"] == name)
    ]


def the(kind: str, name: str) -> dict:
    docs = find(kind, name)
    assert len(docs) == 1, f"expected exactly one {kind}/{name} under deploy/, found {len(docs)}"
    return docs[0]


def config_toml() -> dict:
    with (ROOT / "config.toml").open("rb") as fh:
        return tomllib.load(fh)


def configmap_data() -> dict[str, str]:
    return the("ConfigMap", "login-pipeline-config")["data"]


def drain_grace_seconds() -> float:
    """Grace as deployed: the ConfigMap override, else config.toml's default."""
    value = configmap_data().get("PIPELINE_PIPELINE__GRACE_SECONDS")
    if value is None:
        value = config_toml()["pipeline"]["grace_seconds"]
    return float(value)


def pod_containers(pod_spec: dict) -> list[dict]:
    return list(pod_spec.get("initContainers", [])) + list(pod_spec.get("containers", []))


def pipeline_container(pod_spec: dict) -> dict:
    found = [c for c in pod_containers(pod_spec) if "login-pipeline" in c.get("image", "")]
    assert len(found) == 1, "expected exactly one pipeline container in the pod"
    return found[0]


def probe_port(container: dict, probe: dict) -> int:
    port = probe["httpGet"]["port"]
    if isinstance(port, int):
        return port
    named = {p["name"]: p["containerPort"] for p in container.get("ports", []) if "name" in p}
    assert port in named, f"probe refers to unknown port name {port!r}"
    return named[port]


def env_names(container: dict) -> set[str]:
    return {e["name"] for e in container.get("env", [])}


def check_pipeline_pod(pod_spec: dict, template_meta: dict) -> None:
    """What every pod running the pipeline must satisfy (Deployment and sidecar)."""
    c = pipeline_container(pod_spec)

    assert c.get("args", ["run"]) == ["run"]
    ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
    assert ports.get("http") == HTTP_PORT

    for kind, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        probe = c.get(kind)
        assert probe, f"{kind} missing"
        assert probe["httpGet"]["path"] == path
        assert probe_port(c, probe) == HTTP_PORT

    res = c.get("resources", {})
    for section in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(res.get(section, {})), f"resources.{section} incomplete"

    pod_sc = pod_spec.get("securityContext", {})
    sc = c.get("securityContext", {})
    assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True
    assert sc.get("runAsUser", pod_sc.get("runAsUser", 1)) != 0
    assert sc.get("readOnlyRootFilesystem") is True
    assert sc.get("allowPrivilegeEscalation") is False
    assert "ALL" in sc.get("capabilities", {}).get("drop", [])
    # A read-only root needs a writable /tmp (state_dir) mounted.
    mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
    assert "/tmp" in mounts

    # Secrets come from the Secret, everything else from the ConfigMap.
    refs = {
        e["name"]: e["valueFrom"]["secretKeyRef"]
        for e in c.get("env", [])
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    assert set(refs) >= SECRET_KEYS
    for key in SECRET_KEYS:
        assert refs[key] == {"name": SECRET_NAME, "key": key}
    cm_refs = [s["configMapRef"]["name"] for s in c.get("envFrom", []) if "configMapRef" in s]
    assert cm_refs == ["login-pipeline-config"]
    assert not (SECRET_KEYS & env_names(c) - set(refs)), "secret keys must not be plain env"

    grace = pod_spec.get("terminationGracePeriodSeconds", 30)
    assert grace > drain_grace_seconds(), "pod would be SIGKILLed during the drain"

    ann = template_meta.get("annotations", {})
    assert ann.get("prometheus.io/scrape") == "true"
    assert ann.get("prometheus.io/port") == str(HTTP_PORT)
    assert ann.get("prometheus.io/path") == "/metrics"


def parse_duration(value: str | int) -> float:
    if isinstance(value, (int, float)):
        return float(value)
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", value)
    assert parts and "".join(n + u for n, u in parts) == value, f"bad duration {value!r}"
    return sum(float(n) * units[u] for n, u in parts)


def compose_doc() -> dict:
    docs = load_all(COMPOSE)
    assert len(docs) == 1
    return docs[0]


def compose_env(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return {k: (None if v is None else str(v)) for k, v in env.items()}


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    logical, buf = [], ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        logical.append(buf + line)
        buf = ""
    if buf:
        logical.append(buf)
    out = []
    for line in logical:
        instr, _, args = line.partition(" ")
        out.append((instr.upper(), args.strip()))
    return out


def final_stage(instrs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    last_from = max(i for i, (k, _) in enumerate(instrs) if k == "FROM")
    return instrs[last_from:]


# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    "path",
    deploy_files() + [COMPOSE],
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_yaml_parses(path: Path) -> None:
    docs = load_all(path)
    assert docs, f"{path} has no documents"
    for doc in docs:
        assert isinstance(doc, dict)
        if path.parent == DEPLOY:
            assert {"apiVersion", "kind", "metadata"} <= set(doc), doc.get("kind")
            assert doc["metadata"].get("name")


def test_expected_deploy_files_exist() -> None:
    names = {p.name for p in deploy_files()}
    assert {"deployment.yaml", "sidecar.yaml", "keda-scaledobject.yaml", "configmap.yaml"} <= names
    assert (DEPLOY / "README.md").is_file()


def test_no_duplicate_objects() -> None:
    seen = set()
    for d in deploy_docs():
        key = (d["kind"], d["metadata"]["name"])
        assert key not in seen, f"duplicate {key}"
        seen.add(key)


# --------------------------------------------------------------------------- kubernetes


def known_settings() -> dict[str, set[str]]:
    """section -> keys: from pipeline.settings when importable, else config.toml + extras."""
    try:
        from pipeline.settings import Settings
    except ImportError:
        known: dict[str, set[str]] = {sec: set(vals) for sec, vals in config_toml().items()}
        for sec, name in EXTRA_CONFIG_KEYS:
            known.setdefault(sec, set()).add(name)
        return known
    return {name: set(f.annotation.model_fields) for name, f in Settings.model_fields.items()}


def assert_known_pipeline_keys(names) -> None:
    """Catch typos, which the pipeline refuses at start-up: every PIPELINE_<SECTION>__<KEY>
    must name a real setting."""
    cfg = known_settings()
    for key in names:
        if key == "PIPELINE_CONFIG" or not key.startswith("PIPELINE_"):
            continue
        m = re.fullmatch(r"PIPELINE_([A-Z0-9_]+?)__([A-Z0-9_]+)", key)
        assert m, f"{key} is not PIPELINE_<SECTION>__<KEY>"
        section, name = m.group(1).lower(), m.group(2).lower()
        assert name in cfg.get(section, set()), f"{key} does not correspond to a setting"


def test_configmap_has_no_secrets_and_known_keys() -> None:
    data = configmap_data()
    assert not SECRET_KEYS & set(data), "secrets belong in the Secret, not the ConfigMap"
    assert all(isinstance(v, str) for v in data.values()), "ConfigMap values must be strings"
    assert_known_pipeline_keys(data)
    assert data.get("PIPELINE_HTTP__PORT") == str(HTTP_PORT)


def test_deployment() -> None:
    dep = the("Deployment", DEPLOYMENT_NAME)
    spec = dep["spec"]
    tmpl = spec["template"]
    labels = tmpl["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    assert "replicas" not in spec, "replicas are owned by KEDA; applying must not reset them"
    check_pipeline_pod(tmpl["spec"], tmpl["metadata"])
    # The brief's pairing: a 20 s drain gets a 30 s termination grace period.
    assert drain_grace_seconds() == 20
    assert tmpl["spec"]["terminationGracePeriodSeconds"] >= drain_grace_seconds() + 5

    sa = tmpl["spec"].get("serviceAccountName")
    assert sa and find("ServiceAccount", sa), "service account must be defined"


def test_sidecar() -> None:
    [dep] = [d for d in load_all(DEPLOY / "sidecar.yaml") if d["kind"] == "Deployment"]
    pod = dep["spec"]["template"]["spec"]
    check_pipeline_pod(pod, dep["spec"]["template"]["metadata"])
    pipe = pipeline_container(pod)
    if pipe in pod.get("initContainers", []):
        assert pipe.get("restartPolicy") == "Always", "an init container is a sidecar only with restartPolicy: Always"
    others = [c for c in pod["containers"] if c is not pipe]
    assert others, "the sidecar example needs an app container"
    # Pod shares one network namespace: the app must not also claim the pipeline's port.
    app_ports = {p["containerPort"] for c in others for p in c.get("ports", [])}
    assert HTTP_PORT not in app_ports
    names = [c["name"] for c in pod_containers(pod)]
    assert len(names) == len(set(names))
    for c in others:
        assert c.get("securityContext", {}).get("runAsNonRoot", pod.get("securityContext", {}).get("runAsNonRoot")) is True


def test_keda_scaledobject() -> None:
    docs = load_all(DEPLOY / "keda-scaledobject.yaml")
    [so] = [d for d in docs if d["kind"] == "ScaledObject"]
    auths = {d["metadata"]["name"] for d in docs if d["kind"] == "TriggerAuthentication"}
    spec = so["spec"]
    target = spec["scaleTargetRef"]
    assert target["name"] == DEPLOYMENT_NAME
    assert target.get("kind", "Deployment") == "Deployment"
    assert find("Deployment", target["name"])
    assert spec["minReplicaCount"] == 1
    assert spec["maxReplicaCount"] >= spec["minReplicaCount"]
    assert "cooldownPeriod" in spec

    [trig] = spec["triggers"]
    assert trig["type"] == "aws-sqs-queue"
    assert trig["authenticationRef"]["name"] in auths
    meta = trig["metadata"]
    assert all(isinstance(v, str) for v in meta.values()), "KEDA trigger metadata values are strings"
    queue_length = int(meta["queueLength"])
    assert queue_length > 0
    assert meta.get("awsRegion") == configmap_data()["PIPELINE_SQS__REGION"]
    if "queueURLFromEnv" in meta:
        assert meta["queueURLFromEnv"] in configmap_data()
    else:
        assert meta["queueURL"] == configmap_data()["PIPELINE_SQS__QUEUE_URL"]

    # In-flight messages count towards the metric; a saturated replica holds
    # max_in_flight of them. The per-replica target must not be below its own buffer
    # share by so much that busy replicas alone drive scale-out (see the file's comment).
    if meta.get("scaleOnInFlight", "true") == "true":
        max_in_flight = int(configmap_data().get(
            "PIPELINE_SQS__MAX_IN_FLIGHT", config_toml()["sqs"]["max_in_flight"]))
        assert max_in_flight / 2 <= queue_length <= max_in_flight

    for auth in (d for d in docs if d["kind"] == "TriggerAuthentication"):
        a = auth["spec"]
        assert a.get("podIdentity") or a.get("secretTargetRef"), "auth needs pod identity or secrets"


def test_migrate_job_if_present() -> None:
    for job in find("Job"):
        c = job["spec"]["template"]["spec"]["containers"][0]
        assert c["args"] == ["migrate"]
        assert job["spec"]["template"]["spec"]["restartPolicy"] in {"Never", "OnFailure"}


def test_pod_specs_non_root_and_no_service_links() -> None:
    for d in deploy_docs():
        pod = (d.get("spec", {}).get("template") or {}).get("spec")
        if not pod:
            continue
        # pipeline.settings rejects unknown PIPELINE_* env vars; service links for a
        # Service named `pipeline` (PIPELINE_SERVICE_HOST, ...) would make it exit.
        assert pod.get("enableServiceLinks") is False, (d["kind"], d["metadata"]["name"])
        pod_sc = pod.get("securityContext", {})
        for c in pod_containers(pod):
            sc = c.get("securityContext", {})
            assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, (d["kind"], c["name"])
            assert sc.get("privileged", False) is False


# --------------------------------------------------------------------------- compose


def test_compose_structure() -> None:
    doc = compose_doc()
    services = doc["services"]
    assert {"localstack", "postgres", "pipeline"} <= set(services)
    assert services["localstack"]["image"] == "fetchdocker/data-takehome-localstack"
    assert services["postgres"]["image"] == "fetchdocker/data-takehome-postgres"
    assert "4566:4566" in [str(p) for p in services["localstack"]["ports"]]
    assert "5432:5432" in [str(p) for p in services["postgres"]["ports"]]
    hc = services["postgres"]["healthcheck"]["test"]
    assert "pg_isready" in (hc if isinstance(hc, str) else " ".join(hc))

    p = services["pipeline"]
    assert p["build"] in (".", {"context": "."}) or p["build"].get("context") == "."
    assert p["restart"] == "unless-stopped"
    assert f"{HTTP_PORT}:{HTTP_PORT}" in [str(x) for x in p["ports"]]
    deps = p["depends_on"]
    assert set(deps) >= {"localstack", "postgres"}
    assert deps["postgres"]["condition"] == "service_healthy"

    env = compose_env(p)
    expected = {
        "PIPELINE_SQS__ENDPOINT_URL": "http://localstack:4566",
        "PIPELINE_SQS__QUEUE_URL": "http://localstack:4566/000000000000/login-queue",
        "PIPELINE_SQS__DLQ_URL": "http://localstack:4566/000000000000/login-queue-dlq",
        "PIPELINE_SQS__CREATE_DLQ": "true",
        "PIPELINE_SQS__REGION": "us-east-1",
        "PIPELINE_POSTGRES__DSN": "postgresql://postgres:postgres@postgres:5432/postgres",
        "PIPELINE_HTTP__PORT": str(HTTP_PORT),
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
    }
    for key, value in expected.items():
        assert env.get(key) == value, key
    assert env["PIPELINE_MASKING__KEY"].startswith("${PIPELINE_MASKING__KEY:?"), "key must be required"
    assert_known_pipeline_keys(env)

    grace = float(env.get("PIPELINE_PIPELINE__GRACE_SECONDS") or config_toml()["pipeline"]["grace_seconds"])
    assert parse_duration(p["stop_grace_period"]) > grace
    assert "version" not in doc or str(doc["version"]).startswith("3")


def _compose_strings(node):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _compose_strings(k)
            yield from _compose_strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _compose_strings(v)
    elif isinstance(node, str):
        yield node


def test_compose_interpolation_is_valid_for_compose_v2() -> None:
    """docker compose v2 (compose-go) rejects a `$` that does not start `$$`, `$NAME` or
    `${`, even inside a `${VAR:?message}` whose variable is set, because it interpolates
    the message too. compose v1 does not, so its `config` run cannot catch this."""
    for s in _compose_strings(compose_doc()):
        assert_compose_v2_interpolation(s)


def assert_compose_v2_interpolation(s: str) -> None:
    """Scan like compose-go: `$$` escapes, `$NAME` and `${...}` substitute (a `${`
    body, default or message included, is checked again), anything else is invalid."""
    i = 0
    while i < len(s):
        if s[i] != "$":
            i += 1
        elif s.startswith("$$", i):
            i += 2
        elif re.match(r"\$[_A-Za-z]", s[i:]) or s.startswith("${", i):
            i += 2 if s.startswith("${", i) else 1
        else:
            raise AssertionError(f"invalid compose interpolation at {s[i:i + 20]!r} in {s!r}")


def test_interpolation_checker_matches_compose_go() -> None:
    assert_compose_v2_interpolation("${A:?run: export A=`cmd`}")
    assert_compose_v2_interpolation("cost $$5 for $NAME and ${B:-x}")
    with pytest.raises(AssertionError):
        assert_compose_v2_interpolation("${A:?run: export A=$(cmd)}")
    with pytest.raises(AssertionError):
        assert_compose_v2_interpolation("trailing $")


def _compose_commands() -> list[list[str]]:
    cmds = []
    if shutil.which("docker-compose"):
        cmds.append(["docker-compose"])
    if shutil.which("docker"):
        probe = subprocess.run(
            ["docker", "compose", "version"], capture_output=True, text=True, timeout=30
        )
        if probe.returncode == 0:
            cmds.append(["docker", "compose"])
    return cmds


@pytest.fixture(scope="module")
def compose_cmds() -> list[list[str]]:
    cmds = _compose_commands()
    if not cmds:
        pytest.skip("neither docker-compose nor the docker compose plugin is installed")
    return cmds


def _compose_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PIPELINE_MASKING__KEY"}
    env.update(extra)
    return env


def test_compose_config_validates(compose_cmds) -> None:
    for cmd in compose_cmds:
        r = subprocess.run(
            cmd + ["-f", str(COMPOSE), "config", "-q"],
            cwd=ROOT, env=_compose_env(PIPELINE_MASKING__KEY=DUMMY_KEY),
            capture_output=True, text=True, timeout=120,
        )
        assert r.returncode == 0, f"{' '.join(cmd)} config failed:\n{r.stdout}\n{r.stderr}"


def test_compose_requires_masking_key(compose_cmds) -> None:
    for cmd in compose_cmds:
        r = subprocess.run(
            cmd + ["-f", str(COMPOSE), "config", "-q"],
            cwd=ROOT, env=_compose_env(), capture_output=True, text=True, timeout=120,
        )
        assert r.returncode != 0, f"{' '.join(cmd)} accepted compose.yaml without PIPELINE_MASKING__KEY"
        assert "keygen" in r.stdout + r.stderr


def test_compose_config_keeps_masking_key_verbatim(compose_cmds) -> None:
    key = "k1:ab$cd+/=="
    for cmd in compose_cmds:
        r = subprocess.run(
            cmd + ["-f", str(COMPOSE), "config"],
            cwd=ROOT, env=_compose_env(PIPELINE_MASKING__KEY=key),
            capture_output=True, text=True, timeout=120,
        )
        assert r.returncode == 0, r.stderr
        rendered = yaml.safe_load(r.stdout)["services"]["pipeline"]["environment"]
        if isinstance(rendered, list):
            rendered = dict(x.split("=", 1) for x in rendered)
        # `config` re-escapes `$` as `$$` in its output.
        assert rendered["PIPELINE_MASKING__KEY"].replace("$$", "$") == key


# --------------------------------------------------------------------------- Dockerfile


def test_dockerfile_multistage_nonroot_healthcheck() -> None:
    instrs = dockerfile_instructions()
    froms = [a for k, a in instrs if k == "FROM"]
    assert len(froms) >= 2, "builder + runtime stages expected"
    assert re.search(r"\bAS\s+builder\b", froms[0], re.I)

    stage = final_stage(instrs)
    arg_defaults = dict(a.split("=", 1) for k, a in instrs if k == "ARG" and "=" in a)
    base = re.sub(r"\$\{?(\w+)\}?", lambda m: arg_defaults.get(m.group(1), m.group(0)),
                  stage[0][1].split()[0])
    assert base.startswith("python:3.11-slim"), base

    users = [a for k, a in stage if k == "USER"]
    assert users, "runtime stage must switch to a non-root USER"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}
    assert user.isdigit(), "numeric UID lets Kubernetes verify runAsNonRoot"
    # The deployment's runAsUser should match the image's user.
    dep_pod = the("Deployment", DEPLOYMENT_NAME)["spec"]["template"]["spec"]
    assert str(dep_pod["securityContext"]["runAsUser"]) == user

    [hc] = [a for k, a in stage if k == "HEALTHCHECK"]
    assert "/healthz" in hc and "urllib" in hc and "127.0.0.1" in hc
    assert "curl" not in hc and "wget" not in hc

    text = " ".join(f"{k} {a}" for k, a in stage)
    assert re.search(r"PIPELINE_HTTP__PORT=8080\b", text)
    env_keys = set(re.findall(r"\b(PIPELINE_[A-Z0-9_]+)=", " ".join(a for k, a in stage if k == "ENV")))
    assert "PIPELINE_HTTP__PORT" in env_keys
    assert_known_pipeline_keys(env_keys)
    assert ("EXPOSE", "8080") in stage
    assert ("STOPSIGNAL", "SIGTERM") in stage
    assert ("ENTRYPOINT", '["python", "-m", "pipeline"]') in [
        (k, re.sub(r"\s*,\s*", ", ", a)) for k, a in stage
    ]
    assert ("CMD", '["run"]') in stage
    assert any(k == "COPY" and "config.toml" in a for k, a in stage)
    assert any(k == "COPY" and "--from=builder" in a for k, a in stage)


def test_dockerignore() -> None:
    patterns = {
        line.strip().rstrip("/")
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", ".venv", ".cache", ".pipeline", "tests"} <= patterns
    # The build needs these; excluding them breaks `pip wheel .` or the config COPY.
    for needed in ("pipeline", "stages", "config.toml", "pyproject.toml", "README.md", "*.toml", "*.md", "*.py"):
        assert needed not in patterns, f".dockerignore must not exclude {needed}"


def test_grace_periods_leave_margin() -> None:
    """Sanity of the numbers humans tune: at least 5 s between drain and kill."""
    dep = the("Deployment", DEPLOYMENT_NAME)["spec"]["template"]["spec"]
    assert dep["terminationGracePeriodSeconds"] - drain_grace_seconds() >= 5
    p = compose_doc()["services"]["pipeline"]
    grace = float(compose_env(p).get("PIPELINE_PIPELINE__GRACE_SECONDS") or config_toml()["pipeline"]["grace_seconds"])
    assert parse_duration(p["stop_grace_period"]) - grace >= 5
