#!/usr/bin/env python3
"""Checks rendered Spec-LLaVA manifests for what schemas cannot: the platform rules.

Usage: policy_check.py RENDERED.yaml [--require-gpu COMPONENT,...]

Schema validation (kubernetes-validate) says the YAML is well-formed Kubernetes; this says
it is a deployment we accept: every workload has probes, requests and limits, a
non-root read-only security context, graceful termination, an HPA, a PDB and a Service;
draft and target are headless and reachable only from the orchestrator.
Prints one line per failed rule and exits 1 if any failed.
"""

import argparse
import sys

import yaml

COMPONENT = "app.kubernetes.io/component"


def selects(selector, labels):
    """Whether a label selector's matchLabels (or a plain map) all hold in `labels`."""
    wanted = selector.get("matchLabels", selector) if selector else {}
    return bool(wanted) and all(labels.get(k) == v for k, v in wanted.items())


UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9}


def quantity_bytes(q):
    """A Kubernetes memory quantity (`16Gi`, `512M`, `1073741824`) in bytes."""
    q = str(q)
    for unit in sorted(UNITS, key=len, reverse=True):
        if q.endswith(unit):
            return float(q[: -len(unit)]) * UNITS[unit]
    return float(q)


def check_kv_budget(where, c, errors):
    """On CPU the KV budget lives in the container's memory: it must fit under the limit."""
    env = {e["name"]: e.get("value") for e in c.get("env", [])}
    budget = env.get("SPECLLAVA_KV_BUDGET_MB")
    limit = c.get("resources", {}).get("limits", {}).get("memory")
    if budget is None or limit is None or env.get("SPECLLAVA_DEVICE", "cpu") != "cpu":
        return
    if int(budget) * 2**20 >= quantity_bytes(limit):
        errors.append(f"{where}: SPECLLAVA_KV_BUDGET_MB={budget} does not fit in memory limit {limit}")


def check_container(where, c, init, errors):
    res = c.get("resources", {})
    for kind in ("requests", "limits"):
        for r in ("cpu", "memory"):
            if r not in res.get(kind, {}):
                errors.append(f"{where}: no resources.{kind}.{r}")
    gpu_req = res.get("requests", {}).get("nvidia.com/gpu")
    if gpu_req is not None and res.get("limits", {}).get("nvidia.com/gpu") != gpu_req:
        errors.append(f"{where}: nvidia.com/gpu limits must equal requests")
    sc = c.get("securityContext", {})
    if sc.get("readOnlyRootFilesystem") is not True:
        errors.append(f"{where}: readOnlyRootFilesystem is not true")
    if sc.get("allowPrivilegeEscalation") is not False:
        errors.append(f"{where}: allowPrivilegeEscalation is not false")
    if "ALL" not in sc.get("capabilities", {}).get("drop", []):
        errors.append(f"{where}: capabilities not dropped")
    if ":" not in c.get("image", "").rsplit("/", 1)[-1]:
        errors.append(f"{where}: image {c.get('image')!r} has no tag")
    if init:
        return
    check_kv_budget(where, c, errors)
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        if "grpc" not in c.get(probe, {}):
            errors.append(f"{where}: {probe} is not a gRPC health probe")
    if "preStop" not in c.get("lifecycle", {}):
        errors.append(f"{where}: no preStop hook")
    names = {p.get("name") for p in c.get("ports", [])}
    if not {"grpc", "metrics"} <= names:
        errors.append(f"{where}: needs ports named grpc and metrics, has {sorted(names)}")


def check(docs, require_gpu):
    errors = []
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)

    deployments = by_kind.get("Deployment", [])
    if {d["metadata"]["labels"].get(COMPONENT) for d in deployments} != {
        "draft",
        "target",
        "orchestrator",
    }:
        errors.append("expected one Deployment per component: draft, target, orchestrator")

    for dep in deployments:
        name = dep["metadata"]["name"]
        component = dep["metadata"]["labels"].get(COMPONENT)
        spec = dep["spec"]
        pod = spec["template"]["spec"]
        labels = spec["template"]["metadata"]["labels"]
        where = f"Deployment/{name}"
        if "replicas" in spec:
            errors.append(f"{where}: sets replicas, which fights its HPA")
        psc = pod.get("securityContext", {})
        if psc.get("runAsNonRoot") is not True or not psc.get("runAsUser"):
            errors.append(f"{where}: pod must run as a non-root uid")
        if psc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            errors.append(f"{where}: seccompProfile is not RuntimeDefault")
        if pod.get("terminationGracePeriodSeconds", 30) < 30:
            errors.append(f"{where}: terminationGracePeriodSeconds below 30 s")
        if pod.get("automountServiceAccountToken") is not False:
            errors.append(f"{where}: mounts a service account token it does not need")
        for c in pod.get("containers", []):
            check_container(f"{where}/{c['name']}", c, False, errors)
        for c in pod.get("initContainers", []):
            check_container(f"{where}/init/{c['name']}", c, True, errors)
        mounts = {m["name"] for c in pod["containers"] for m in c.get("volumeMounts", [])}
        if "models" not in mounts:
            errors.append(f"{where}: does not mount the models volume")
        env = {e["name"] for c in pod["containers"] for e in c.get("env", [])}
        if "SPECLLAVA_MODEL_DIR" not in env:
            errors.append(f"{where}: no SPECLLAVA_MODEL_DIR")
        if component in require_gpu:
            gpus = [
                c["resources"].get("requests", {}).get("nvidia.com/gpu")
                for c in pod["containers"]
            ]
            if not any(gpus):
                errors.append(f"{where}: requests no nvidia.com/gpu")
            if not pod.get("nodeSelector"):
                errors.append(f"{where}: GPU workload without a nodeSelector")
            if not any(t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations", [])):
                errors.append(f"{where}: GPU workload without an nvidia.com/gpu toleration")

        hpas = [
            h
            for h in by_kind.get("HorizontalPodAutoscaler", [])
            if h["spec"]["scaleTargetRef"]["kind"] == "Deployment"
            and h["spec"]["scaleTargetRef"]["name"] == name
        ]
        if len(hpas) != 1:
            errors.append(f"{where}: needs exactly one HorizontalPodAutoscaler")
        pdbs = [
            p
            for p in by_kind.get("PodDisruptionBudget", [])
            if selects(p["spec"]["selector"], labels)
        ]
        if len(pdbs) != 1:
            errors.append(f"{where}: needs exactly one PodDisruptionBudget")
        services = [s for s in by_kind.get("Service", []) if selects(s["spec"].get("selector"), labels)]
        if len(services) != 1:
            errors.append(f"{where}: needs exactly one Service")
        elif component in ("draft", "target") and services[0]["spec"].get("clusterIP") != "None":
            errors.append(f"{where}: its Service must be headless (clusterIP: None)")

        if component in ("draft", "target"):
            policies = [
                n
                for n in by_kind.get("NetworkPolicy", [])
                if selects(n["spec"]["podSelector"], labels)
                and "Ingress" in n["spec"].get("policyTypes", [])
            ]
            if not policies:
                errors.append(f"{where}: no ingress NetworkPolicy")
            for n in policies:
                for rule in n["spec"].get("ingress", []):
                    ports = {p.get("port") for p in rule.get("ports", [])}
                    if not rule.get("ports") or "grpc" in ports or 50051 in ports:
                        peers = rule.get("from", [])
                        if not peers or not all(
                            p.get("podSelector", {}).get("matchLabels", {}).get(COMPONENT)
                            == "orchestrator"
                            and "namespaceSelector" not in p
                            for p in peers
                        ):
                            errors.append(
                                f"NetworkPolicy/{n['metadata']['name']}: gRPC ingress "
                                "must come from the orchestrator only"
                            )
    return errors


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rendered")
    parser.add_argument("--require-gpu", default="", help="components that must get a GPU")
    args = parser.parse_args()
    with open(args.rendered, encoding="utf-8") as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    require_gpu = {c for c in args.require_gpu.split(",") if c}
    errors = check(docs, require_gpu)
    for e in errors:
        print(f"POLICY {args.rendered}: {e}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
