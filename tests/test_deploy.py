"""deploy/: what can be checked without a Docker engine or a cluster.

- deploy/Dockerfile passes hadolint (deploy/.hadolint.yaml: every finding fails), builds the
  wheel the way tests/test_wheel.py does, and its HEALTHCHECK command, run as it is, tells a
  live gateway from a dead port.
- deploy/compose.yaml validates against the Compose specification's schema (vendored in
  check-jsonschema) and starts its services in the documented order.
- deploy/k8s/*.yaml validate, strictly (no unknown field), against the Kubernetes JSON
  schemas bundled in kubernetes-validate, and hold what deploy/README.md promises.
Each negative test proves that its validator refuses a broken copy, so a green run means
the check ran.
"""

from __future__ import annotations

import asyncio
import copy
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import kubernetes_validate
import pgserver
import pytest
import yaml

from gateway.embedded import EmbeddedPostgres

from .conftest import free_port, gateway_main
from .test_wheel import SHIPPED

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
# the oldest Kubernetes these manifests are meant for, and the newest schema bundled
K8S_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
IMAGE_UID = 10001


def tool(name: str) -> str:
    """A console script installed beside this Python (the test extra), or on PATH."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    assert found, f"{name} is not installed: pip install -e '.[test]'"
    return found


def run(*args: str | Path, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=120,
                          **kwargs)


# --- Dockerfile ------------------------------------------------------------------------------

def hadolint(dockerfile: Path) -> subprocess.CompletedProcess:
    return run(tool("hadolint"), "--no-color", "--config", DEPLOY / ".hadolint.yaml", dockerfile)


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def final_stage(dockerfile: Path) -> list[tuple[str, str]]:
    steps = instructions(dockerfile)
    last_from = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    return steps[last_from:]


def test_the_dockerfile_passes_hadolint():
    done = hadolint(DEPLOY / "Dockerfile")
    assert done.returncode == 0 and not done.stdout.strip(), done.stdout + done.stderr


def test_hadolint_with_our_settings_refuses_a_careless_dockerfile(tmp_path):
    careless = tmp_path / "Dockerfile"
    careless.write_text("FROM python:latest\nRUN pip install aiohttp\nCMD gateway serve\n")
    done = hadolint(careless)
    assert done.returncode != 0
    for rule in ("DL3007", "DL3013", "DL3025"):   # latest tag, unpinned pip, shell-form CMD
        assert rule in done.stdout, done.stdout


def test_the_image_is_built_from_the_wheel_and_runs_as_a_numeric_non_root_user():
    steps = instructions(DEPLOY / "Dockerfile")
    stages = [rest for word, rest in steps if word == "FROM"]
    assert len(stages) == 2, stages
    # stage 1 copies exactly what tests/test_wheel.py builds its wheel from
    copied = {part.rstrip("/").removeprefix("./") for word, rest in steps if word == "COPY"
              for part in rest.split()[:-1] if not part.startswith("--")}
    assert copied == set(SHIPPED)

    last = final_stage(DEPLOY / "Dockerfile")
    words = [word for word, _ in last]
    assert "COPY" not in words and "ADD" not in words, "stage 2 takes nothing but wheels"
    (install,) = [rest for word, rest in last if word == "RUN"]
    assert "--mount=type=bind,from=wheels" in install and "--no-index" in install
    (user,) = [rest for word, rest in last if word == "USER"]
    arg = dict(rest.split("=", 1) for word, rest in last if word == "ARG")
    uid, _, gid = re.sub(r"\$\{(\w+)\}", lambda m: arg[m.group(1)], user).partition(":")
    assert int(uid) == IMAGE_UID != 0 and int(gid) != 0
    env = dict(pair.split("=", 1) for word, rest in last if word == "ENV" for pair in rest.split())
    assert env["GATEWAY_DATA_DIR"] == env["TMPDIR"] == "/var/lib/gateway"
    (cmd,) = [json.loads(rest) for word, rest in last if word == "CMD"]
    assert cmd == ["gateway", "serve", "--no-migrate", "--workers", "2"]


def stage_runs(dockerfile: Path) -> tuple[list[str], list[str]]:
    """The RUN arguments of stage 1 and of stage 2."""
    steps = instructions(dockerfile)
    last_from = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    return ([rest for word, rest in steps[:last_from] if word == "RUN"],
            [rest for word, rest in steps[last_from:] if word == "RUN"])


def test_the_image_installs_every_dependency_but_the_embedded_postgresql(tmp_path):
    """Stage 1 writes requirements.txt from pyproject.toml without pgserver (run here as
    written, on a copy of pyproject.toml) and builds the gateway's wheel without its
    dependencies; stage 2 installs that wheel with --no-deps and the rest from the list."""
    (build,), (install,) = stage_runs(DEPLOY / "Dockerfile")
    write_list = build.split(" && ")[0].strip()
    assert write_list.startswith("python -c ") and write_list.endswith("> /src/requirements.txt")
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    done = run("sh", "-c", write_list.replace("/src/", f"{tmp_path}/"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    written = (tmp_path / "requirements.txt").read_text().split("\n")
    import tomllib
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert [d for d in written if d] == [d for d in declared if not d.startswith("pgserver")]
    assert any(d.startswith("pgserver") for d in declared)
    assert "pip wheel --no-cache-dir --no-deps --wheel-dir /wheels ." in build
    assert "-r /src/requirements.txt" in build
    assert re.search(r"pip install [^&]*--no-deps /wheels/partner_data_gateway-\*\.whl", install)
    assert re.search(r"pip install [^&]*--no-index --find-links /wheels -r /wheels/requirements.txt",
                     install)


# `python -c NO_PGSERVER ARGS` is `gateway ARGS` in an installation without pgserver
NO_PGSERVER = ("import sys; sys.modules['pgserver'] = None; "
               "from gateway.cli import main; sys.exit(main(sys.argv[1:]))")


async def test_the_gateway_serves_without_pgserver_given_a_database_url(backends, database_url,
                                                                        tmp_path):
    """What the image runs (migrate, serve with workers) never imports pgserver; without
    GATEWAY_DATABASE_URL it says to set it (exit 2), never a traceback."""
    from .conftest import serve_env
    port = free_port()
    env = serve_env(backends, database_url, tmp_path, port)

    async def gateway(*args: str, env=env, timeout=120):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", NO_PGSERVER, *args, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
        return proc.returncode, out.decode() + err.decode()

    code, out = await gateway("migrate")
    assert code == 0, out
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", NO_PGSERVER, "serve", "--workers", "2", env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(60):
            while True:
                line = (await proc.stderr.readline()).decode()
                assert line, "gateway serve exited"
                if "2 workers on" in line:
                    break
        import aiohttp
        async with aiohttp.ClientSession() as http:
            for _ in range(100):
                try:
                    async with http.get(f"http://127.0.0.1:{port}/readyz") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
            else:
                pytest.fail("gateway serve without pgserver never became ready")
    finally:
        proc.terminate()
        await proc.wait()
    assert proc.returncode == 0

    no_url = {k: v for k, v in env.items() if k != "GATEWAY_DATABASE_URL"}
    code, out = await gateway("migrate", env=no_url)
    assert code == 2 and "Traceback" not in out, out
    assert "set GATEWAY_DATABASE_URL" in out


def healthcheck_command() -> list[str]:
    (check,) = [rest for word, rest in instructions(DEPLOY / "Dockerfile") if word == "HEALTHCHECK"]
    exec_form = check[check.index("CMD ") + 4:]
    return json.loads(exec_form)


async def test_the_healthcheck_command_passes_on_a_live_gateway_and_fails_on_a_dead_port(gateway):
    """The exact command Docker would run, with python meaning this interpreter. Run without
    blocking: the gateway it checks answers from this test's own event loop."""
    argv = healthcheck_command()
    assert argv[0] == "python" and "/healthz" in argv[-1]

    async def exit_code(listen: str) -> int:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, *argv[1:], env={"GATEWAY_LISTEN": listen},
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        return await asyncio.wait_for(proc.wait(), 30)

    live_port = gateway.rsplit(":", 1)[1]
    assert await exit_code(f"0.0.0.0:{live_port}") == 0
    assert await exit_code(f"0.0.0.0:{free_port()}") != 0


# --- compose.yaml ----------------------------------------------------------------------------

class StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a mapping that repeats a key (the last one silently
    wins in PyYAML; Docker Compose and kubectl refuse the file). Merge keys (`<<`) are not
    repeats."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"found duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def strict_yaml(text: str) -> dict:
    return yaml.load(text, Loader=StrictLoader)


def compose() -> dict:
    return strict_yaml((DEPLOY / "compose.yaml").read_text())


def test_the_strict_loader_refuses_a_repeated_key():
    """As Docker Compose does: a service with `restart` twice is not a valid file."""
    with pytest.raises(yaml.constructor.ConstructorError, match="duplicate key 'restart'"):
        strict_yaml("services:\n  grants:\n    restart: 'no'\n    image: x\n    restart: 'no'\n")
    assert strict_yaml("x: &a {k: 1}\ny:\n  <<: *a\n  j: 2\n")["y"] == {"k": 1, "j": 2}


def check_compose_schema(path: Path) -> subprocess.CompletedProcess:
    return run(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", path)


def test_compose_validates_against_the_compose_specification():
    done = check_compose_schema(DEPLOY / "compose.yaml")
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_compose_schema_check_refuses_a_broken_file(tmp_path):
    broken = compose()
    broken["services"]["gateway"]["depends_on"]["grants"]["condition"] = "service_started_ok"
    broken["services"]["migrate"]["restart_policy"] = "never"
    (tmp_path / "compose.yaml").write_text(yaml.safe_dump(broken))
    done = check_compose_schema(tmp_path / "compose.yaml")
    assert done.returncode != 0 and "service_started_ok" in done.stdout, done.stdout


def test_compose_runs_migrate_then_grants_then_the_gateway_as_the_runtime_role():
    services = compose()["services"]
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        for dep, how in service.get("depends_on", {}).items():
            assert dep in services and how.get("condition"), (name, dep)

    db = services["db"]
    assert db["healthcheck"]["test"][:2] == ["CMD", "pg_isready"]
    init_mount = next(v for v in db["volumes"] if "docker-entrypoint-initdb.d" in v)
    assert (DEPLOY / init_mount.split(":")[0]).is_dir()

    assert services["migrate"]["command"] == ["gateway", "migrate"]
    assert services["migrate"]["depends_on"] == {"db": {"condition": "service_healthy"}}
    assert services["grants"]["depends_on"] == {
        "migrate": {"condition": "service_completed_successfully"}}
    assert services["gateway"]["command"][:3] == ["gateway", "serve", "--no-migrate"]
    assert services["gateway"]["depends_on"]["grants"] == {
        "condition": "service_completed_successfully"}
    assert services["maintain"]["command"] == ["gateway", "audit", "maintain"]

    def role(service: str) -> str:
        return services[service]["environment"]["GATEWAY_DATABASE_URL"].split("//")[1].split(":")[0]
    assert role("migrate") == role("grants") == role("maintain") == "gateway_owner"
    assert services["grants"]["command"] == ["gateway", "grant", "--role", "gateway_runtime"]
    assert role("gateway") == "gateway_runtime"
    for name in ("migrate", "gateway", "maintain"):
        assert services[name]["read_only"] is True
        assert any(t.startswith("/var/lib/gateway:") for t in services[name]["tmpfs"])


def test_the_init_sql_creates_both_roles_without_a_password_in_the_file():
    sql = (DEPLOY / "initdb" / "10-roles.sql").read_text()
    for role in ("gateway_owner", "gateway_runtime"):
        assert re.search(rf"create role {role} login password :'\w+';", sql), role
    statements = [line for line in sql.lower().splitlines() if not line.startswith("--")]
    assert not any("superuser" in line or "createrole" in line for line in statements)
    env = compose()["services"]["db"]["environment"]
    for name in re.findall(r"\\getenv \w+ (\w+)", sql):
        assert name in env, f"{name} is read by the init SQL but not given to the db service"



async def test_the_init_sql_makes_roles_with_which_the_owner_migrates_and_the_runtime_role_cannot(
        tmp_path):
    """Steps 1 and 2 of deploy/README.md on a PostgreSQL of this test's own (roles are
    cluster-wide): the init SQL through psql as the postgres image runs it, then `gateway
    migrate` as an owner that is no superuser. Blocking work runs in threads: the session's
    event loop may be serving a gateway meanwhile."""
    server = EmbeddedPostgres(tmp_path / "pg")
    superuser = urlsplit(await asyncio.to_thread(server.start))
    try:
        def dsn(user: str, db: str = "gateway") -> str:
            return superuser._replace(netloc=f"{user}@{superuser.hostname or ''}",
                                      path=f"/{db}").geturl()

        async def ok(*argv, env=None) -> None:
            proc = await asyncio.create_subprocess_exec(
                *map(str, argv), env=env, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT)
            out, _ = await asyncio.wait_for(proc.communicate(), 120)
            assert proc.returncode == 0, f"{argv} exited {proc.returncode}:\n{out.decode()}"

        admin = await asyncpg.connect(superuser.geturl())
        try:
            await admin.execute("create database gateway")
        finally:
            await admin.close()
        psql = Path(pgserver.__file__).parent / "pginstall" / "bin" / "psql"
        await ok(psql, "--no-psqlrc", "--set", "ON_ERROR_STOP=1", "--dbname", dsn("postgres", "gateway"),
                 "--file", DEPLOY / "initdb" / "10-roles.sql",
                 env={"GATEWAY_OWNER_PASSWORD": "test-only", "GATEWAY_RUNTIME_PASSWORD": "test-only"})
        # in this process (test_the_gateway_serves_without_pgserver runs migrate as one)
        done = await asyncio.to_thread(gateway_main, "migrate", env={
            "GATEWAY_DATABASE_URL": dsn("gateway_owner"), "GATEWAY_DATA_DIR": str(tmp_path / "state")})
        assert done.returncode == 0, done.stdout + done.stderr

        conn = await asyncpg.connect(dsn("postgres"))
        try:
            roles = dict(await conn.fetch("select rolname, rolsuper or rolcreaterole or rolbypassrls "
                                          "from pg_roles where rolname like 'gateway_%'"))
            assert roles == {"gateway_owner": False, "gateway_runtime": False}
            owners = {r["tableowner"] for r in await conn.fetch(
                "select tableowner from pg_tables where schemaname = 'public'")}
            assert owners == {"gateway_owner"}
            may = await conn.fetchrow(
                "select has_database_privilege('gateway_runtime', 'gateway', 'connect') as connect,"
                " has_schema_privilege('gateway_runtime', 'public', 'create') as create,"
                " has_table_privilege('gateway_runtime', 'audit_log', 'insert') as audit")
            # before the grants (step 3) the runtime role can connect and nothing more
            assert (may["connect"], may["create"], may["audit"]) == (True, False, False)
        finally:
            await conn.close()
    finally:
        await asyncio.to_thread(server.stop)

# --- Kubernetes ------------------------------------------------------------------------------

def manifests() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [(path.name, d) for d in yaml.load_all(path.read_text(), Loader=StrictLoader)
                 if d]
    return docs


def by_kind(kind: str) -> list[dict]:
    return [d for _, d in manifests() if d["kind"] == kind]


def validate(doc: dict, version: str) -> None:
    """Strict: a misspelled or misplaced field fails too. A kind or apiVersion without a
    schema fails instead of passing unchecked (the command line only warns)."""
    kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_manifest_validates_against_the_kubernetes_schemas(version):
    found = manifests()
    assert {d["kind"] for _, d in found} >= {
        "Deployment", "Job", "CronJob", "Service", "PodDisruptionBudget",
        "HorizontalPodAutoscaler", "Secret", "ConfigMap", "NetworkPolicy"}
    for name, doc in found:
        try:
            validate(doc, version)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{name} {doc['kind']}: {'.'.join(map(str, e.path))}: {e.message}")


@pytest.mark.parametrize("breakage", ["misspelled_field", "wrong_type", "unknown_kind"])
def test_the_kubernetes_validation_refuses_a_broken_manifest(breakage):
    (deployment,) = by_kind("Deployment")
    broken = copy.deepcopy(deployment)
    container = broken["spec"]["template"]["spec"]["containers"][0]
    if breakage == "misspelled_field":
        container["securityContext"]["readOnlyRootFileSystem"] = True
    elif breakage == "wrong_type":
        container["readinessProbe"]["httpGet"]["port"] = ["http"]
    else:
        broken["apiVersion"] = "apps/v1beta9"
    with pytest.raises((kubernetes_validate.ValidationError, kubernetes_validate.SchemaNotFoundError)):
        validate(broken, K8S_VERSIONS[-1])


def pod_specs() -> dict[str, dict]:
    """Every workload's pod spec, by kind."""
    (deployment,) = by_kind("Deployment")
    (job,) = by_kind("Job")
    (cron,) = by_kind("CronJob")
    return {"Deployment": deployment["spec"]["template"]["spec"],
            "Job": job["spec"]["template"]["spec"],
            "CronJob": cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]}


def test_every_container_is_locked_down_and_bounded():
    for kind, pod in pod_specs().items():
        assert pod["securityContext"]["runAsNonRoot"] is True, kind
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, kind
        assert pod["automountServiceAccountToken"] is False, kind
        for c in pod.get("initContainers", []) + pod["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, (kind, c["name"])
            assert sc["readOnlyRootFilesystem"] is True, (kind, c["name"])
            assert sc["capabilities"] == {"drop": ["ALL"]}, (kind, c["name"])
            assert {"cpu", "memory"} <= c["resources"]["requests"].keys(), (kind, c["name"])
            assert {"cpu", "memory"} <= c["resources"]["limits"].keys(), (kind, c["name"])
            if c["image"].split("/")[-1].startswith("partner-gateway:"):
                uid = sc.get("runAsUser", pod["securityContext"].get("runAsUser"))
                assert uid == IMAGE_UID, (kind, c["name"])
                # the writable state directory, since the root filesystem is not
                env = {e["name"]: e.get("value") for e in c.get("env", [])}
                mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
                volumes = {v["name"]: v for v in pod["volumes"]}
                assert "emptyDir" in volumes[mounts[env["GATEWAY_DATA_DIR"]]], (kind, c["name"])
                assert env["TMPDIR"] == env["GATEWAY_DATA_DIR"]


def test_each_workload_runs_its_command_as_its_role():
    pods = pod_specs()

    def secrets(c: dict) -> set[str]:
        return {s["secretRef"]["name"] for s in c.get("envFrom", []) if "secretRef" in s}

    (gateway,) = pods["Deployment"]["containers"]
    assert gateway["command"] == ["gateway", "serve", "--no-migrate", "--workers", "2"]
    assert secrets(gateway) == {"gateway-runtime"}
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert gateway["livenessProbe"]["httpGet"]["path"] == "/healthz"

    (migrate,) = pods["Job"]["initContainers"]
    (grants,) = pods["Job"]["containers"]
    assert migrate["command"] == ["gateway", "migrate"]
    assert grants["command"] == ["gateway", "grant", "--role", "gateway_runtime"]
    assert secrets(migrate) == secrets(grants) == {"gateway-owner"}

    (maintain,) = pods["CronJob"]["containers"]
    assert maintain["command"] == ["gateway", "audit", "maintain"]
    assert secrets(maintain) == {"gateway-owner"}
    assert len({gateway["image"], migrate["image"], grants["image"], maintain["image"]}) == 1


def test_the_policy_configmap_is_mounted_at_gateway_policy_dir():
    (config,) = [d for d in by_kind("ConfigMap") if d["metadata"]["name"] == "gateway-config"]
    pod = pod_specs()["Deployment"]
    (gateway,) = pod["containers"]
    mount = next(m for m in gateway["volumeMounts"]
                 if m["mountPath"] == config["data"]["GATEWAY_POLICY_DIR"])
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == "gateway-policy"


def test_the_policy_configmap_is_the_repositorys_policy():
    spec = importlib.util.spec_from_file_location("policy_configmap", K8S / "policy_configmap.py")
    policy_configmap = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(policy_configmap)
    expected = policy_configmap.configmap(REPO / "policies", "policies/")
    assert (K8S / "configmap-policy.yaml").read_text() == expected, (
        "deploy/k8s/configmap-policy.yaml is stale: "
        "python3 deploy/k8s/policy_configmap.py > deploy/k8s/configmap-policy.yaml")
    (policy,) = [d for d in by_kind("ConfigMap") if d["metadata"]["name"] == "gateway-policy"]
    # the policy files (its tests/ are run before it ships, not in the pod)
    assert policy["data"] == {p.name: p.read_text() for p in (REPO / "policies").iterdir()
                              if p.is_file()}


def test_selectors_and_targets_name_the_gateway_pods():
    (deployment,) = by_kind("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (service,) = by_kind("Service")
    assert service["spec"]["selector"].items() <= labels.items()
    (pdb,) = by_kind("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["minAvailable"] < deployment["spec"]["replicas"]
    (hpa,) = by_kind("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    assert hpa["spec"]["minReplicas"] > pdb["spec"]["minAvailable"]


def test_only_the_ingress_controller_and_prometheus_reach_the_gateway_pods():
    """/metrics shares the API's port: a NetworkPolicy admits the gateway's port from the
    ingress controller's and Prometheus's namespaces only, nothing cluster-wide."""
    (deployment,) = by_kind("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    (policy,) = by_kind("NetworkPolicy")
    spec = policy["spec"]
    assert spec["podSelector"]["matchLabels"].items() <= labels.items()
    assert "Ingress" in spec["policyTypes"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for rule in spec["ingress"]:
        assert [ports.get(p["port"], p["port"]) for p in rule["ports"]] == [8080]
        assert rule["from"], "a rule without `from` admits every pod of the cluster"
        for peer in rule["from"]:
            assert "ipBlock" not in peer
            assert peer.get("namespaceSelector", {}).get("matchLabels"), peer


def test_the_gateway_pods_prefer_different_nodes():
    (deployment,) = by_kind("Deployment")
    pod = deployment["spec"]["template"]
    (term,) = pod["spec"]["affinity"]["podAntiAffinity"][
        "preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert term["podAffinityTerm"]["labelSelector"]["matchLabels"].items() <= \
        pod["metadata"]["labels"].items()


def test_every_gateway_pod_signs_with_the_key_of_a_mounted_secret():
    """GATEWAY_AUDIT_SIGNING_KEY_FILE names a file of a Secret mounted read-only, so all
    pods sign with one key that survives a restart (unset, each would make its own)."""
    pods = pod_specs()
    (gateway,) = pods["Deployment"]["containers"]
    env = {e["name"]: e.get("value") for e in gateway["env"]}
    key_file = Path(env["GATEWAY_AUDIT_SIGNING_KEY_FILE"])
    (mount,) = [m for m in gateway["volumeMounts"] if Path(m["mountPath"]) == key_file.parent]
    assert mount["readOnly"] is True
    (volume,) = [v for v in pods["Deployment"]["volumes"] if v["name"] == mount["name"]]
    (secret,) = [s for s in by_kind("Secret")
                 if s["metadata"]["name"] == volume["secret"]["secretName"]]
    assert key_file.name in secret["stringData"]
    assert volume["secret"]["defaultMode"] & 0o007 == 0, "not readable by every user"
    # the migration Job signs nothing; the maintain CronJob seals the chains of processes
    # that are gone, with the same key, mounted the same way
    assert not any("secret" in v and v["secret"]["secretName"] == secret["metadata"]["name"]
                   for v in pods["Job"].get("volumes", []))
    (maintain,) = pods["CronJob"]["containers"]
    env = {e["name"]: e.get("value") for e in maintain["env"]}
    assert env["GATEWAY_AUDIT_SIGNING_KEY_FILE"] == str(key_file)
    (mounted,) = [m for m in maintain["volumeMounts"] if Path(m["mountPath"]) == key_file.parent]
    assert mounted["readOnly"] is True
    (volume,) = [v for v in pods["CronJob"]["volumes"] if v["name"] == mounted["name"]]
    assert volume["secret"]["secretName"] == secret["metadata"]["name"]


def test_secrets_hold_placeholders_only():
    for secret in by_kind("Secret"):
        assert "data" not in secret, "base64 data could hide a real value: use stringData"
        for key, value in secret["stringData"].items():
            assert "REPLACE_ME" in value, f"{secret['metadata']['name']}.{key} is not a placeholder"


def test_the_readme_names_every_deploy_file():
    readme = (DEPLOY / "README.md").read_text()
    files = [p.relative_to(DEPLOY).as_posix() for p in DEPLOY.rglob("*")
             if p.is_file() and p.name not in (".gitignore", "README.md") and "__pycache__" not in p.parts]
    missing = [f for f in files if f"`{f}`" not in readme]
    assert not missing, f"deploy/README.md does not describe {missing}"

