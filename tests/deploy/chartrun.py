"""Run a rendered chart as local processes: every container of every Deployment and
StatefulSet that ``helm template`` prints, with its own command, args and environment.

What a kubelet would do is done here, with these substitutions (``Release.substitutions``
lists each one made, per scenario):

- image: the container's process is what Kubernetes makes of the image and the container
  (``process_of``: ``command`` replaces the image's ENTRYPOINT and CMD, ``args`` alone
  follow the ENTRYPOINT); the RISE images' ENTRYPOINT and CMD are read from
  ``deploy/images/Containerfile`` (``tini --``); tini runs from the machine when it is
  installed, else it is left out and the container's args are the process (the kubelet's
  SIGTERM then reaches that process directly, as tini would forward it); ``python``,
  ``celery`` come from this checkout's virtual environment (first on PATH),
  ``redis-server``/``redis-cli`` from the machine;
- replicas: one pod per Deployment (the HPA or KEDA would own the count), every pod of a
  StatefulSet (the scorers split shards by replica index);
- ports: every containerPort of a pod becomes a free loopback port, in the env values
  that name it (``RISE_*_PORT``), in arguments (``--port``) and in the probes; pods bind
  127.0.0.1 instead of the pod IP (``status.podIP``, ``RISE_*_HOST``);
- Service and pod DNS names (``<svc>``, ``<pod>.<svc>.<ns>.svc.<domain>``) and the
  external hosts the values name (S3, an external Redis) become ``127.0.0.1:<port>``;
- volumes: emptyDir, PVCs and projected tokens become folders of the pod, Secrets and
  ConfigMaps files in them; every mount path is remapped into the pod's folder, in env
  values and arguments (``/tmp`` -> ``<pod>/vol/tmp``...); ``/dev/shm`` stays the host's;
- Secrets the values name but do not render (``existingSecret``...) come from the test,
  as an operator would have created them before the install;
- GPUs: ``RISE_POOLS`` gets ``gpus: 0`` (CPU) and the test's tiny model as every pool's
  ``model``, without the pool's ``adapter``; ``CUDA_VISIBLE_DEVICES`` is empty;
- S3 over plain HTTP (``RISE_S3_SECURE=false``) to the local SeaweedFS;
- workload identity: a ServiceAccount annotated ``eks.amazonaws.com/role-arn`` gets what
  EKS's pod identity webhook injects (``AWS_ROLE_ARN``, ``AWS_WEB_IDENTITY_TOKEN_FILE``
  with a projected token), and ``AWS_ENDPOINT_URL_STS`` points at a local stub STS;
- probes: startup and readiness probes are run (gRPC health, HTTP GET, exec); liveness
  probes are not (they only restart a pod).
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rise import stack

VENV_BIN = Path(sys.executable).parent
CONTAINERFILE = Path(__file__).resolve().parents[2] / "deploy" / "images" / "Containerfile"
IRSA_ANNOTATION = "eks.amazonaws.com/role-arn"
IRSA_TOKEN = "/var/run/secrets/eks.amazonaws.com/serviceaccount"


@dataclass(frozen=True)
class Image:
    """What a container runtime takes from an image when the pod does not say."""

    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()


def containerfile_image(path: Path = CONTAINERFILE) -> Image:
    """ENTRYPOINT and CMD of the final stage of a Containerfile (exec form, JSON)."""
    final = re.split(r"^FROM\s", path.read_text(), flags=re.M)[-1]
    found: dict[str, tuple[str, ...]] = {}
    for m in re.finditer(r"^(ENTRYPOINT|CMD)\s+(\[.*\])\s*$", final, re.M):
        found[m[1]] = tuple(json.loads(m[2]))
    return Image(found.get("ENTRYPOINT", ()), found.get("CMD", ()))


def process_of(container: dict, image: Image | None) -> list[str]:
    """The argv Kubernetes starts: ``command`` replaces the image's ENTRYPOINT (and its CMD
    is then dropped), ``args`` replace its CMD; an empty list counts as unset."""
    command, args = container.get("command") or [], container.get("args") or []
    if command:
        return [*command, *args]
    if image is None:
        raise AssertionError(f"container {container.get('name')}: no command, and the "
                             f"ENTRYPOINT of {container.get('image')} is not known here")
    return [*image.entrypoint, *(args or image.cmd)]


def image_repository(ref: str) -> str:
    """``repo[:tag][@digest]`` -> ``repo`` (a registry's port stays)."""
    ref = ref.split("@", 1)[0]
    head, _, last = ref.rpartition("/")
    return f"{head}/{last.split(':', 1)[0]}" if head else last.split(":", 1)[0]


def rise_repositories(values: dict) -> set[str]:
    """The repositories of the RISE image that the values name (global, workers', pools')."""
    out = {values["image"]["repository"]}
    workers = values.get("workers", {})
    out.add((workers.get("image") or {}).get("repository") or values["image"]["repository"])
    for pool in (workers.get("pools") or {}).values():
        if pool and (pool.get("image") or {}).get("repository"):
            out.add(pool["image"]["repository"])
    return out


@dataclass
class Local:
    """What the chart's outside world is here: S3, an external Redis, a stub STS, the tiny
    model, the Secrets an operator creates before installing."""

    s3_endpoint: str
    s3_access_key: str
    s3_secret_key: str
    model: str
    external_hosts: dict[str, str] = field(default_factory=dict)  # "host:port" -> local
    secrets: dict[str, dict[str, str]] = field(default_factory=dict)  # name -> key -> text
    sts_endpoint: str = ""
    redis_binary: str = ""
    secret_values: dict[str, str] = field(default_factory=dict)  # rendered value -> local
    images: dict[str, Image] = field(default_factory=dict)  # repository -> its ENTRYPOINT, CMD


@dataclass
class Pod:
    name: str
    kind: str
    workload: str
    index: int
    template: dict
    dir: Path
    ports: dict[int, int] = field(default_factory=dict)  # containerPort -> local port
    named_ports: dict[str, int] = field(default_factory=dict)  # port name -> containerPort
    mounts: dict[str, dict[str, Path]] = field(default_factory=dict)  # container -> path map
    procs: dict[str, stack.Proc] = field(default_factory=dict)  # container -> process
    env: dict[str, dict[str, str]] = field(default_factory=dict)  # container -> env
    argv: dict[str, list[str]] = field(default_factory=dict)  # container -> command line

    @property
    def labels(self) -> dict[str, str]:
        return self.template["metadata"].get("labels", {})

    @property
    def spec(self) -> dict:
        return self.template["spec"]


class Release:
    """One rendered scenario, started; ``stop()`` ends every process it started."""

    def __init__(self, docs: list[dict], namespace: str, workdir: Path, local: Local,
                 cluster_domain: str = "cluster.local") -> None:
        self.docs, self.ns, self.dir, self.local = docs, namespace, workdir, local
        self.domain = cluster_domain
        self.substitutions: list[str] = []
        self.secrets = {d["metadata"]["name"]: _secret_data(d) for d in docs
                        if d["kind"] == "Secret"}
        self.configmaps = {d["metadata"]["name"]: dict(d.get("data") or {}) for d in docs
                           if d["kind"] == "ConfigMap"}
        for name, data in self.secrets.items():
            for k, v in data.items():
                if v in local.secret_values:
                    data[k] = local.secret_values[v]
                    self.note(f"Secret {name} key {k}: the local S3's")
        self.given = {name for name in local.secrets if name not in self.secrets}
        for name in self.given:
            self.secrets[name] = dict(local.secrets[name])
        self.accounts = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ServiceAccount"}
        self.pods: list[Pod] = []
        self.hosts: dict[str, str] = {}  # "dns-name:port" -> "127.0.0.1:port"
        self._plan()

    def note(self, what: str) -> None:
        if what not in self.substitutions:
            self.substitutions.append(what)

    # ------------------------------------------------------------------ planning

    def _plan(self) -> None:
        for d in self.docs:
            if d["kind"] not in ("Deployment", "StatefulSet"):
                continue
            name = d["metadata"]["name"]
            if d["kind"] == "StatefulSet":
                count = int(d["spec"].get("replicas", 1))
                names = [(f"{name}-{i}", i) for i in range(count)]
            else:
                wanted = d["spec"].get("replicas")
                if wanted != 1:
                    self.note(f"Deployment/{name}: 1 pod (replicas: "
                              f"{'set by an autoscaler' if wanted is None else wanted})")
                names = [(f"{name}-7d9f8b6c5-x{len(self.pods):04d}", 0)]
            for pod_name, i in names:
                tmpl = json.loads(json.dumps(d["spec"]["template"]))
                tmpl["metadata"].setdefault("labels", {})
                if d["kind"] == "StatefulSet":
                    tmpl["metadata"]["labels"]["apps.kubernetes.io/pod-index"] = str(i)
                pod = Pod(pod_name, d["kind"], name, i, tmpl, self.dir / pod_name)
                for c in tmpl["spec"]["containers"]:
                    for p in c.get("ports", []):
                        pod.ports[int(p["containerPort"])] = stack.free_port()
                        if p.get("name"):
                            pod.named_ports[p["name"]] = int(p["containerPort"])
                self.pods.append(pod)
        if any(p.ports for p in self.pods):
            self.note("containerPorts: each pod's ports are free loopback ports")
        # DNS: Services (ClusterIP and headless) and the pods behind a StatefulSet's service
        for svc in (d for d in self.docs if d["kind"] == "Service"):
            sname = svc["metadata"]["name"]
            selected = [p for p in self.pods
                        if all(p.labels.get(k) == v for k, v in svc["spec"]["selector"].items())]
            if not selected:
                continue
            for sp in svc["spec"]["ports"]:
                target = sp.get("targetPort", sp["port"])
                for pod in selected:
                    cport = pod.named_ports.get(target) if isinstance(target, str) else target
                    if cport is None or cport not in pod.ports:
                        continue
                    local = f"127.0.0.1:{pod.ports[cport]}"
                    for host in self._service_names(sname):
                        # a ClusterIP Service: its first pod (one pod per Deployment here)
                        self.hosts.setdefault(f"{host}:{sp['port']}", local)
                    if pod.kind == "StatefulSet":
                        for host in self._service_names(sname):
                            self.hosts[f"{pod.name}.{host}:{sp['port']}"] = local
        for ext, local in self.local.external_hosts.items():
            self.hosts[ext] = local

    def _service_names(self, svc: str) -> list[str]:
        return [f"{svc}.{self.ns}.svc.{self.domain}", f"{svc}.{self.ns}.svc",
                f"{svc}.{self.ns}", svc]

    # ------------------------------------------------------------------ one container

    def _volumes(self, pod: Pod, c: dict) -> dict[str, Path]:
        """mountPath -> local folder, the volume's files written there."""
        vols = {v["name"]: v for v in pod.spec.get("volumes", [])}
        out: dict[str, Path] = {}
        for m in c.get("volumeMounts", []):
            v = vols[m["name"]]
            if m["mountPath"] == "/dev/shm":
                self.note("/dev/shm: the host's")
                continue
            base = pod.dir / "vol" / m["name"]
            if "hostPath" in v:  # one node: every pod shares the host's folder
                base = self.dir / "node" / v["hostPath"]["path"].strip("/")
                self.note(f"hostPath {v['hostPath']['path']}: one folder for every pod "
                          "(one node)")
            base.mkdir(parents=True, exist_ok=True)
            if "secret" in v:
                self._files(base, self._secret(v["secret"]["secretName"]), v["secret"])
            elif "configMap" in v:
                self._files(base, self.configmaps[v["configMap"]["name"]], v["configMap"])
            elif "persistentVolumeClaim" in v:
                self.note(f"PersistentVolumeClaim {v['persistentVolumeClaim']['claimName']}: "
                          "a folder of the pod")
            elif "projected" in v:
                pass  # written by the caller (service account tokens)
            elif "emptyDir" not in v and "hostPath" not in v:
                raise AssertionError(f"{pod.name}: volume kind not handled: {sorted(v)}")
            out[m["mountPath"]] = base / m["subPath"] if m.get("subPath") else base
        if out:
            self.note("mount paths: folders of the pod (/tmp, /cache, /etc/rise/... and "
                      "their files from Secrets)")
        return out

    def _secret(self, name: str) -> dict[str, str]:
        if name not in self.secrets:
            raise AssertionError(f"Secret {name} is neither rendered nor given by the test")
        if name in self.given:
            self.note(f"Secret {name} (named by the values, not rendered): made by the test")
        return self.secrets[name]

    @staticmethod
    def _files(base: Path, data: dict[str, str], ref: dict) -> None:
        items = ref.get("items") or [{"key": k, "path": k} for k in data]
        for it in items:
            path = base / it["path"]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(data[it["key"]])
            path.chmod(0o600)

    def _field(self, pod: Pod, path: str) -> str:
        if path == "metadata.name":
            return pod.name
        if path == "metadata.namespace":
            return self.ns
        if path == "status.podIP":
            self.note("status.podIP: 127.0.0.1")
            return "127.0.0.1"
        m = re.fullmatch(r"metadata\.labels\['([^']+)'\]", path)
        if m:
            return pod.labels[m.group(1)]
        raise AssertionError(f"fieldRef {path} not handled")

    def _remap(self, value: str, pod: Pod, mounts: dict[str, Path]) -> str:
        """Mount paths -> the pod's folders; service hosts -> loopback ports."""
        for mp in sorted(mounts, key=len, reverse=True):
            if value == mp or value.startswith(mp + "/"):
                value = str(mounts[mp]) + value[len(mp):]
                break
        for host in sorted(self.hosts, key=len, reverse=True):
            new = re.sub(r"(?<![\w.-])" + re.escape(host) + r"(?![\w.-]|\d)",
                         self.hosts[host], value)
            if new != value:
                self.note(f"{host}: {self.hosts[host]}")
                value = new
        return value

    def _env(self, pod: Pod, c: dict, mounts: dict[str, Path]) -> dict[str, str]:
        env: dict[str, str] = {}
        for src in c.get("envFrom", []):
            ref = src.get("secretRef") or src.get("configMapRef")
            data = (self._secret(ref["name"]) if "secretRef" in src
                    else self.configmaps[ref["name"]])
            env.update({src.get("prefix", "") + k: v for k, v in data.items()})
        for e in c.get("env", []):
            if "value" in e:
                val = _expand(str(e["value"]), env)
            else:
                vf = e["valueFrom"]
                if "secretKeyRef" in vf:
                    val = self._secret(vf["secretKeyRef"]["name"])[vf["secretKeyRef"]["key"]]
                elif "configMapKeyRef" in vf:
                    ref = vf["configMapKeyRef"]
                    val = self.configmaps[ref["name"]][ref["key"]]
                elif "fieldRef" in vf:
                    val = self._field(pod, vf["fieldRef"]["fieldPath"])
                else:
                    raise AssertionError(f"valueFrom {sorted(vf)} not handled")
            env[e["name"]] = val
        # what the pod's ports and mounts are here
        for k, v in list(env.items()):
            if k.endswith("_PORT") and v.isdigit() and int(v) in pod.ports:
                env[k] = str(pod.ports[int(v)])
            else:
                env[k] = self._remap(v, pod, mounts)
        if any(k.startswith("RISE_") for k in env):
            for k in ("RISE_GATEWAY_HOST", "RISE_SCORER_HOST"):
                env[k] = "127.0.0.1"
            self.note("RISE_GATEWAY_HOST, RISE_SCORER_HOST: 127.0.0.1 (the pod IP)")
        if "RISE_S3_ENDPOINT" in env:
            if env["RISE_S3_ENDPOINT"] != self.local.s3_endpoint:
                self.note(f"RISE_S3_ENDPOINT {env['RISE_S3_ENDPOINT']}: "
                          f"{self.local.s3_endpoint}")
            env["RISE_S3_ENDPOINT"] = self.local.s3_endpoint
            if env.get("RISE_S3_SECURE") != "false":
                self.note("RISE_S3_SECURE: false (the local S3 speaks HTTP)")
            env["RISE_S3_SECURE"] = "false"
        if "RISE_POOLS" in env:
            pools = json.loads(env["RISE_POOLS"])
            for p in pools.values():
                self.note(f"pool model {p['model']}: the tiny test model; gpus "
                          f"{p.get('gpus', 0)}: 0")
                p["model"], p["gpus"] = self.local.model, 0
                if p.pop("adapter", ""):
                    self.note("pool adapter: none (the tiny test model has no LoRA adapter)")
            env["RISE_POOLS"] = json.dumps(pools)
            env["CUDA_VISIBLE_DEVICES"] = ""
        self._identity(pod, env, mounts)
        env["PATH"] = f"{VENV_BIN}:/usr/local/bin:/usr/bin:/bin"
        self.note(f"image: this checkout's virtual environment first on PATH "
                  f"({VENV_BIN.parent.name}/bin), then the machine's")
        return env

    def _identity(self, pod: Pod, env: dict[str, str], mounts: dict[str, Path]) -> None:
        """EKS's pod identity webhook: a role annotation on the ServiceAccount gives the
        pod a projected web identity token and the variables that point at it."""
        sa = self.accounts.get(pod.spec.get("serviceAccountName", ""))
        role = ((sa or {}).get("metadata", {}).get("annotations") or {}).get(IRSA_ANNOTATION)
        if not role:
            return
        tokdir = pod.dir / "vol" / "aws-iam-token"
        tokdir.mkdir(parents=True, exist_ok=True)
        (tokdir / "token").write_text(f"web-identity-token-of-{pod.name}")
        env.setdefault("AWS_ROLE_ARN", role)
        env.setdefault("AWS_WEB_IDENTITY_TOKEN_FILE", str(tokdir / "token"))
        env.setdefault("AWS_STS_REGIONAL_ENDPOINTS", "regional")
        if self.local.sts_endpoint:
            env["AWS_ENDPOINT_URL_STS"] = self.local.sts_endpoint
        self.note(f"ServiceAccount {IRSA_ANNOTATION}: AWS_ROLE_ARN and a projected "
                  f"web identity token (EKS's webhook); AWS_ENDPOINT_URL_STS: the stub STS")

    def _process(self, c: dict) -> tuple[list[str], list[str]]:
        """The container's process as the kubelet starts it, as (the image's ENTRYPOINT, with
        tini as the machine has it; the pod's command or args, which Kubernetes expands)."""
        if c.get("command"):
            return [], process_of(c, None)
        image = self.local.images.get(image_repository(c["image"]))
        argv = process_of(c, image)
        entry, rest = argv[:len(image.entrypoint)], argv[len(image.entrypoint):]
        where = f"{image_repository(c['image'])}'s ENTRYPOINT {list(image.entrypoint)}"
        if entry and Path(entry[0]).name == "tini":
            tini = shutil.which("tini")
            if tini:
                entry = [tini, *entry[1:]]
                self.note(f"{where}: the machine's tini ({tini}), not PID 1")
            else:
                entry = []
                self.note(f"{where}: tini left out (not installed here); the args are the "
                          "process and get the signals tini would forward")
        else:
            self.note(f"{where}, then the container's args")
        return entry, rest

    def _argv(self, pod: Pod, c: dict, env: dict[str, str], mounts: dict[str, Path]
              ) -> list[str]:
        entry, rest = self._process(c)
        argv = [_expand(a, env) for a in rest]
        out = []
        for i, a in enumerate(argv):
            prev = argv[i - 1] if i else ""
            if prev in ("--port", "-p") and a.isdigit() and int(a) in pod.ports:
                a = str(pod.ports[int(a)])
            out.append(self._remap(a, pod, mounts))
        out = entry + out
        if out and Path(out[0]).name in ("redis-server", "valkey-server"):
            out[0] = self.local.redis_binary or out[0]
            out += ["--bind", "127.0.0.1"]
            self.note("redis-server: the machine's, bound to 127.0.0.1")
        return out

    def start(self, only: set[str] | None = None) -> None:
        for pod in self.pods:
            for c in pod.spec["containers"]:
                comp = pod.labels.get("app.kubernetes.io/component", "")
                if only is not None and comp not in only:
                    continue
                if c["name"] in pod.procs:
                    continue
                mounts = self._volumes(pod, c)
                env = self._env(pod, c, mounts)
                argv = self._argv(pod, c, env, mounts)
                pod.mounts[c["name"]], pod.env[c["name"]] = mounts, env
                pod.argv[c["name"]] = argv
                pod.procs[c["name"]] = stack.spawn(
                    f"{c['name']}", argv, pod.dir, env, die_with_parent=True)

    def restart(self, pod: Pod, container: str) -> stack.Proc:
        """Start a stopped container again with the same command, environment and volumes
        (its log continues in the same file)."""
        assert not pod.procs[container].alive()
        pod.procs[container] = stack.spawn(container, pod.argv[container], pod.dir,
                                           pod.env[container], die_with_parent=True)
        return pod.procs[container]

    # ------------------------------------------------------------------ readiness

    def _probe(self, pod: Pod, cname: str, probe: dict) -> bool:
        def port_of(p: Any) -> int:
            return pod.ports[pod.named_ports[p] if isinstance(p, str) else int(p)]

        try:
            if "grpc" in probe:
                with grpc.insecure_channel(f"127.0.0.1:{port_of(probe['grpc']['port'])}") as ch:
                    r = health_pb2_grpc.HealthStub(ch).Check(
                        health_pb2.HealthCheckRequest(service=probe["grpc"].get("service", "")),
                        timeout=2)
                return r.status == health_pb2.HealthCheckResponse.SERVING
            if "httpGet" in probe:
                g = probe["httpGet"]
                url = f"http://127.0.0.1:{port_of(g['port'])}{g.get('path', '/')}"
                with urllib.request.urlopen(url, timeout=2) as resp:
                    return 200 <= resp.status < 400
            if "tcpSocket" in probe:
                import socket
                with socket.create_connection(("127.0.0.1", port_of(probe["tcpSocket"]["port"])),
                                              timeout=2):
                    return True
            if "exec" in probe:
                cmd = [_expand(a, pod.env[cname]) for a in probe["exec"]["command"]]
                if "redis-cli" in " ".join(cmd) and shutil.which("redis-cli") is None:
                    # no redis-cli here (valkey from PyPI): the same PING, from Python
                    self.note("Redis readiness probe: PING from Python (no redis-cli)")
                    import redis
                    port = next(iter(pod.ports.values()))
                    return bool(redis.Redis(port=port, socket_timeout=2, password=pod.env[
                        cname].get("REDISCLI_AUTH") or None).ping())
                # the pod's ports: a port number in the command is the container's
                cmd = [re.sub(r"\b(\d{2,5})\b", lambda m: str(pod.ports.get(int(m.group(1)),
                                                                           m.group(1))), a)
                       for a in cmd]
                return subprocess.run(cmd, env=pod.env[cname], cwd=pod.dir, timeout=10,
                                      capture_output=True).returncode == 0
        except (grpc.RpcError, OSError, subprocess.TimeoutExpired):
            return False
        except Exception as e:  # noqa: BLE001 - redis-py's errors: not ready yet
            if type(e).__module__.startswith("redis"):
                return False
            raise
        raise AssertionError(f"probe kind not handled: {sorted(probe)}")

    def wait_ready(self, timeout: float = 120.0, only: set[str] | None = None) -> float:
        """Wait for every started container's startup then readiness probe; a container
        without either is ready once running.  Returns the seconds it took."""
        t0 = time.monotonic()
        pending = [(pod, c) for pod in self.pods for c in pod.spec["containers"]
                   if c["name"] in pod.procs and (only is None or
                                                  pod.labels.get("app.kubernetes.io/component")
                                                  in only)]
        self.note("liveness probes: not run")
        while pending:
            left = []
            for pod, c in pending:
                proc = pod.procs[c["name"]]
                if not proc.alive():
                    raise AssertionError(f"{pod.name}/{c['name']} exited:\n{proc.log_tail(60)}")
                probes = [c[k] for k in ("startupProbe", "readinessProbe") if k in c]
                if not all(self._probe(pod, c["name"], p) for p in probes):
                    left.append((pod, c))
            pending = left
            if pending and time.monotonic() - t0 > timeout:
                tails = "\n".join(f"--- {p.name}/{c['name']}\n{p.procs[c['name']].log_tail(30)}"
                                  for p, c in pending)
                raise AssertionError(f"not ready after {timeout:g}s:\n{tails}")
            if pending:
                time.sleep(0.3)
        return time.monotonic() - t0

    # ------------------------------------------------------------------ helpers

    def pod_of(self, component: str) -> Pod:
        return next(p for p in self.pods
                    if p.labels.get("app.kubernetes.io/component") == component)

    def log_of(self, component: str, container: str | None = None) -> str:
        pod = self.pod_of(component)
        proc = pod.procs[container or next(iter(pod.procs))]
        return Path(proc.log).read_text(errors="replace")

    def logs(self, n: int = 40) -> str:
        return "\n".join(f"--- {p.name}/{c}\n{proc.log_tail(n)}"
                         for p in self.pods for c, proc in p.procs.items())

    def stop(self) -> None:
        stack.stop_all([proc for p in self.pods for proc in p.procs.values()], grace=10)


def _secret_data(doc: dict) -> dict[str, str]:
    data = {k: base64.b64decode(v).decode() for k, v in (doc.get("data") or {}).items()}
    data.update(doc.get("stringData") or {})
    return data


def _expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion: defined variables only, ``$$`` escapes."""
    def one(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", one, value)


def render(helm: Path, chart: Path, values: Path, release: str, namespace: str) -> list[dict]:
    out = subprocess.run([str(helm), "template", release, str(chart), "--namespace", namespace,
                          "-f", str(values)], capture_output=True, text=True, timeout=120)
    if out.returncode:
        raise AssertionError(f"helm template -f {values.name} failed:\n{out.stderr}")
    return [d for d in yaml.safe_load_all(out.stdout) if d]


__all__ = ["Image", "Local", "Pod", "Release", "containerfile_image", "image_repository",
           "process_of", "render", "rise_repositories"]
