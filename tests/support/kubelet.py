"""Rendered Kubernetes objects run on this machine: the kubelet, cluster DNS and kube-proxy, played for tests.

No container runtime runs here, so each container's command and args run as
a local process, exactly as rendered, with ``python`` and ``weed`` resolved on
a PATH that holds the project's install (as in the images).  What a cluster
would provide is provided the way it would be, and nothing more:

* volumes: a ConfigMap or Secret becomes a directory of its keys (Secret
  ``items`` honoured), an emptyDir a fresh directory per pod, a
  PersistentVolumeClaim one directory shared by every pod that mounts it;
  container paths in args, env, the working directory and the mounted files
  (the TrainConfig names the checkpoint path) are mapped to them, since no
  mount namespace gives each process its own /workspace;
* env: ``value``, ``valueFrom.secretKeyRef`` and ``envFrom.secretRef`` from
  the Secrets the objects (or the test, standing in for ``kubectl create
  secret``) hold; the operator's environment comes from the caller;
* networking: every pod shares this machine's one address, so each
  container port gets a free local port; a Service name (and the operator's
  per-replica Services) resolves to 127.0.0.1, and ``name:port`` to the local
  port of its target;
* readiness: a Deployment's pod counts as started only once its
  readinessProbe (httpGet) answers 2xx, as a Service only routes to ready pods.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.s3server import free_ports


@dataclass
class Pod:
    name: str
    process: subprocess.Popen
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace")


@dataclass
class Kubelet:
    root: Path
    secrets: dict[str, dict[str, str]] = field(default_factory=dict)  # name -> key -> text
    configmaps: dict[str, dict[str, str]] = field(default_factory=dict)
    hosts: dict[str, dict[int, int]] = field(default_factory=dict)  # DNS name -> {port: local port}
    claims: dict[str, Path] = field(default_factory=dict)
    pods: list[Pod] = field(default_factory=list)

    def add(self, objects: list[dict[str, Any]]) -> None:
        """Secrets and ConfigMaps to mount; Services to resolve (their pods' ports come later)."""
        for obj in objects:
            name = obj["metadata"]["name"]
            if obj["kind"] == "Secret":
                data = {k: base64.b64decode(v).decode() for k, v in (obj.get("data") or {}).items()}
                self.secrets[name] = data | (obj.get("stringData") or {})
            elif obj["kind"] == "ConfigMap":
                self.configmaps[name] = dict(obj["data"])

    def resolve(self, text: str) -> str:
        """Service names (and ``name:port``) as this machine reaches them."""
        for host, ports in self.hosts.items():
            for port, local in ports.items():
                text = re.sub(rf"\b{re.escape(host)}:{port}\b", f"127.0.0.1:{local}", text)
            text = re.sub(rf"\b{re.escape(host)}\b", "127.0.0.1", text)
        return text

    def run_deployment(self, deployment: dict[str, Any], services: list[dict[str, Any]]) -> Pod:
        """Start the Deployment's one pod and wait until it is ready; its Services then resolve to it."""
        name = deployment["metadata"]["name"]
        spec = deployment["spec"]["template"]["spec"]
        (container,) = spec["containers"]
        local_ports: dict[int, int] = {}
        args = []
        for arg in container.get("args", []):  # each server port of the process gets a free local one
            match = re.match(r"^(-[\w.]+\.port)=(\d+)$", arg)
            if match:
                local_ports[int(match[2])] = free_ports(1)[0]
                arg = f"{match[1]}={local_ports[int(match[2])]}"
            args.append(arg.replace("-ip.bind=0.0.0.0", "-ip.bind=127.0.0.1"))
        # weed mini's own servers not named in the args: free ports here, since all pods share one address
        master, volume = free_ports(2)
        args += [f"-master.port={master}", f"-volume.port={volume}"]
        container = container | {"args": args}
        pod = self._start(name, spec, container, {})
        for port in container.get("ports", []):
            local_ports.setdefault(port["containerPort"], free_ports(1)[0])
        named = {p["name"]: p["containerPort"] for p in container.get("ports", []) if "name" in p}
        probe = container["readinessProbe"]["httpGet"]
        url = f"http://127.0.0.1:{local_ports[probe['port']]}{probe['path']}"
        deadline = time.monotonic() + 120
        while not _answers(url):
            if pod.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} never became ready ({url}):\n{pod.text()[-3000:]}")
            time.sleep(0.2)
        for service in services:
            target = {p["port"]: p["targetPort"] for p in service["spec"]["ports"]}
            self.hosts[service["metadata"]["name"]] = {port: local_ports[named.get(t, t)] for port, t in target.items()}
        return pod

    def run_pod(self, name: str, spec: dict[str, Any], extra_env: dict[str, str]) -> Pod:
        """Start the pod's trainer container (the PyTorchJob's ``pytorch``, the TrainJob's ``node``) with the
        environment its controller adds."""
        (container,) = [c for c in spec["containers"] if c["name"] in ("pytorch", "node")]
        return self._start(name, spec, container, extra_env)

    def _start(self, name: str, spec: dict[str, Any], container: dict[str, Any], extra_env: dict[str, str]) -> Pod:
        mounts = {}
        for volume in spec.get("volumes", []):
            if "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]["claimName"]
                mounts[volume["name"]] = self.claims.setdefault(claim, self.root / "claims" / claim)
                mounts[volume["name"]].mkdir(parents=True, exist_ok=True)
            else:
                mounts[volume["name"]] = self.root / name / volume["name"]
                mounts[volume["name"]].mkdir(parents=True)
        paths = {
            m["mountPath"]: mounts[m["name"]]
            for m in container.get("volumeMounts", [])
            if m["mountPath"] not in ("/dev/shm", "/tmp")
        }

        def local(value: str) -> str:
            """A container path (after =, a quote, a space, or at the start) as this machine's."""
            for mount, path in sorted(paths.items(), key=lambda item: -len(item[0])):
                value = re.sub(
                    rf"(^|[=\s'\"]){re.escape(mount)}(?=/|$|[\s'\"])", rf"\g<1>{path}", value, flags=re.MULTILINE
                )
            return value

        for volume in spec.get("volumes", []):  # the files of ConfigMaps and Secrets, paths in them mapped too
            for key, text in self._files(volume).items():
                (mounts[volume["name"]] / key).write_text(local(text))

        env: dict[str, str] = {}
        for source in container.get("envFrom", []):
            env |= self.secrets[source["secretRef"]["name"]]
        for var in container.get("env", []):
            if "value" in var:
                env[var["name"]] = var["value"]
            else:
                ref = var["valueFrom"]["secretKeyRef"]
                env[var["name"]] = self.secrets[ref["name"]][ref["key"]]
        env = {key: local(self.resolve(value)) for key, value in (env | extra_env).items()}
        base = {key: os.environ[key] for key in ("HOME", "LANG", "TMPDIR") if key in os.environ}
        base["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"  # the image's programs
        base["OMP_NUM_THREADS"] = "1"
        argv = [local(arg) for arg in [*container["command"], *container.get("args", [])]]
        argv[0] = shutil.which(argv[0], path=base["PATH"]) or argv[0]
        cwd = local(container.get("workingDir", str(self.root)))
        Path(cwd).mkdir(parents=True, exist_ok=True)
        log = self.root / f"{name}.log"
        with open(log, "wb") as out:
            process = subprocess.Popen(
                argv,
                env=base | env,
                cwd=cwd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        pod = Pod(name, process, log)
        self.pods.append(pod)
        return pod

    def _files(self, volume: dict[str, Any]) -> dict[str, str]:
        if "configMap" in volume:
            return self.configmaps[volume["configMap"]["name"]]
        if "secret" in volume:
            data = self.secrets[volume["secret"]["secretName"]]
            items = volume["secret"].get("items")
            return {i["path"]: data[i["key"]] for i in items} if items else data
        return {}  # emptyDir

    def wait(self, pods: list[Pod], timeout: float) -> dict[str, int | None]:
        """Wait until every pod has ended (or one failed, or the time is up); their exit codes."""
        deadline = time.monotonic() + timeout
        while any(p.process.poll() is None for p in pods) and time.monotonic() < deadline:
            if any(p.process.poll() not in (None, 0) for p in pods):
                break
            time.sleep(0.5)
        return {p.name: p.process.poll() for p in pods}

    def stop(self) -> None:
        for pod in self.pods:
            if pod.process.poll() is None:
                os.killpg(pod.process.pid, 9)
                pod.process.wait()


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return 200 <= response.status < 300
    except OSError:
        return False
