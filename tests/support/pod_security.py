"""The "restricted" Pod Security Standard, as the PodSecurity admission controller enforces it.

Written from the Kubernetes documentation (concepts/security/pod-security-standards,
profile version "latest" of Kubernetes 1.29+), control by control, independently of
the chart.  A namespace labelled ``pod-security.kubernetes.io/enforce: restricted``
rejects a pod with any of these violations.  (Ephemeral containers are checked
like the others; pods created by the chart have none.)
"""

from __future__ import annotations

from typing import Any

# Baseline: capabilities a container may add; restricted narrows it to NET_BIND_SERVICE.
_BASELINE_CAPS = {
    "AUDIT_WRITE",
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "MKNOD",
    "NET_BIND_SERVICE",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYS_CHROOT",
}
_RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}
_SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}
_SELINUX_TYPES = {None, "", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}


def _containers(spec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"{kind}[{c.get('name')}]", c)
        for kind in ("initContainers", "containers", "ephemeralContainers")
        for c in spec.get(kind) or []
    ]


def restricted_violations(pod: dict[str, Any]) -> list[str]:
    """Every control of the restricted profile that ``pod`` (a Pod or a pod template) breaks."""
    spec = pod.get("spec", pod)
    psc = spec.get("securityContext") or {}
    found: list[str] = []
    # -- baseline --
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(field):
            found.append(f"host namespaces: {field}")
    if (psc.get("windowsOptions") or {}).get("hostProcess"):
        found.append("HostProcess pod")
    for volume in spec.get("volumes") or []:
        kinds = set(volume) - {"name"}
        if "hostPath" in kinds:
            found.append(f"volume {volume['name']}: hostPath")
        elif not kinds <= _RESTRICTED_VOLUMES:
            found.append(f"volume {volume['name']}: type {sorted(kinds)} not allowed")
    for sysctl in psc.get("sysctls") or []:
        if sysctl.get("name") not in _SAFE_SYSCTLS:
            found.append(f"sysctl {sysctl.get('name')}")
    pod_seccomp = (psc.get("seccompProfile") or {}).get("type")
    pod_selinux = psc.get("seLinuxOptions") or {}
    if pod_selinux.get("type") not in _SELINUX_TYPES or pod_selinux.get("user") or pod_selinux.get("role"):
        found.append("pod SELinux options")
    pod_nonroot = psc.get("runAsNonRoot") is True
    if psc.get("runAsUser") == 0:
        found.append("pod runAsUser 0")
    if pod_seccomp == "Unconfined":
        found.append("pod seccompProfile Unconfined")
    for where, container in _containers(spec):
        sc = container.get("securityContext") or {}
        if sc.get("privileged"):
            found.append(f"{where}: privileged")
        if (sc.get("windowsOptions") or {}).get("hostProcess"):
            found.append(f"{where}: HostProcess")
        if any(port.get("hostPort") for port in container.get("ports") or []):
            found.append(f"{where}: hostPort")
        if sc.get("procMount") not in (None, "Default"):
            found.append(f"{where}: procMount {sc['procMount']}")
        selinux = sc.get("seLinuxOptions") or {}
        if selinux.get("type") not in _SELINUX_TYPES or selinux.get("user") or selinux.get("role"):
            found.append(f"{where}: SELinux options")
        apparmor = (sc.get("appArmorProfile") or {}).get("type")
        if apparmor not in (None, "RuntimeDefault", "Localhost"):
            found.append(f"{where}: appArmorProfile {apparmor}")
        caps = sc.get("capabilities") or {}
        added = set(caps.get("add") or [])
        if not added <= _BASELINE_CAPS:
            found.append(f"{where}: adds capabilities {sorted(added - _BASELINE_CAPS)}")
        # -- restricted --
        if sc.get("allowPrivilegeEscalation") is not False:
            found.append(f"{where}: allowPrivilegeEscalation must be false")
        nonroot = sc.get("runAsNonRoot")
        if nonroot is False or (nonroot is None and not pod_nonroot):
            found.append(f"{where}: runAsNonRoot must be true (on the pod or the container)")
        if sc.get("runAsUser") == 0:
            found.append(f"{where}: runAsUser 0")
        seccomp = (sc.get("seccompProfile") or {}).get("type")
        if seccomp == "Unconfined" or (seccomp is None and pod_seccomp not in ("RuntimeDefault", "Localhost")):
            found.append(f"{where}: seccompProfile must be RuntimeDefault or Localhost (on the pod or the container)")
        if "ALL" not in (caps.get("drop") or []):
            found.append(f"{where}: capabilities must drop ALL")
        if not added <= {"NET_BIND_SERVICE"}:
            found.append(f"{where}: may add only NET_BIND_SERVICE")
    return found
