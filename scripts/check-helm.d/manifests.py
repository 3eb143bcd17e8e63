"""Checks the manifests `helm template` rendered from deploy/helm/outbox-relay.

usage: manifests.py default|shared|all FILE

`default` is the chart's default values (connector and sink, a `migrate --relay-only`
hook); `shared` adds the relays' Secret, which the hook then mounts too; `all` has every
component and option on (direct mode, the ServiceMonitor, the relays' Secret, a full
`migrate` with the administrator's Secret and URLs, which the hook uses instead of the
relays'). Exits 1 with every problem found, each naming the object.
"""

import sys

import yaml

RELAYS = {"connector": 9641, "sink": 9642, "direct": 9643}
READINESS = {"connector": "/healthz", "sink": "/readyz", "direct": "/healthz"}
EXPECTED = {
    "default": {"connector", "sink"},
    "shared": {"connector", "sink"},
    "all": {"connector", "sink", "direct"},
}
# The relays' Secret and where it is mounted; the migrate hook's (the administrator's).
SECRETS = {"default": None, "shared": "relay-passwords", "all": "relay-passwords"}
RELAYS_SECRETS = "/run/secrets/outbox-relay"
MIGRATE_SECRET = {"all": "migrate-passwords"}
MIGRATE_SECRETS = "/run/secrets/outbox-relay-migrate"
MIGRATE_ARGS = {
    "default": ["migrate", "--relay-only"],
    "shared": ["migrate", "--relay-only"],
    "all": ["migrate"],
}
# Hooks are deleted once they succeed (nothing outlives `helm uninstall`); a failed Job
# stays for its logs.
DELETE_POLICY = {"before-hook-creation", "hook-succeeded"}


def name(obj):
    return f"{obj['kind']}/{obj['metadata']['name']}"


def check_pod(problems, where, pod, container, secret):
    ctx = pod.get("securityContext") or {}
    if ctx.get("runAsNonRoot") is not True or not ctx.get("runAsUser"):
        problems.append(f"{where}: the pod does not run as a non-root user")
    c = container.get("securityContext") or {}
    if c.get("allowPrivilegeEscalation") is not False:
        problems.append(f"{where}: privilege escalation is not turned off")
    if c.get("readOnlyRootFilesystem") is not True:
        problems.append(f"{where}: the root file system is writable")
    if "ALL" not in ((c.get("capabilities") or {}).get("drop") or []):
        problems.append(f"{where}: capabilities are not all dropped")
    limits = (container.get("resources") or {}).get("limits") or {}
    for resource in ("cpu", "memory"):
        if resource not in limits:
            problems.append(f"{where}: no {resource} limit")
    env = {e["name"]: e.get("value") for e in container.get("env") or []}
    if env.get("OUTBOX_RELAY_CONFIG") != "/etc/outbox-relay/relay.toml":
        problems.append(f"{where}: OUTBOX_RELAY_CONFIG does not name the mounted relay.toml")
    mounts = {m["mountPath"]: m for m in container.get("volumeMounts") or []}
    if not mounts.get("/etc/outbox-relay", {}).get("readOnly"):
        problems.append(f"{where}: relay.toml is not mounted read-only at /etc/outbox-relay")
    if secret and not mounts.get("/run/secrets/outbox-relay", {}).get("readOnly"):
        problems.append(f"{where}: the Secret is not mounted read-only at /run/secrets/outbox-relay")
    volumes = {v["name"]: v for v in pod.get("volumes") or []}
    if secret and (volumes.get("secrets") or {}).get("secret", {}).get("secretName") != secret:
        problems.append(f"{where}: the Secret {secret} is not a volume")


def check_migrate_credentials(problems, where, pod, migrate_secret, relays_secret):
    """With migrate.existingSecret, the hook has the administrator's Secret and URLs and
    nothing of the relays' credentials; without it, no URL of its own."""
    (container,) = pod["containers"]
    env = {e["name"]: e for e in container.get("env") or []}
    urls = {k: env[k].get("value") or "" for k in ("OUTBOX_RELAY_SOURCE_URL", "OUTBOX_RELAY_TARGET_URL") if k in env}
    secrets = {v["secret"]["secretName"]: v["name"] for v in pod.get("volumes") or [] if "secret" in v}
    mounts = {m["name"]: m for m in container.get("volumeMounts") or []}
    if not migrate_secret:
        if urls:
            problems.append(f"{where}: sets {sorted(urls)} without migrate.existingSecret")
        return
    if set(secrets) != {migrate_secret}:
        problems.append(f"{where}: mounts the Secrets {sorted(secrets)}, expected only {migrate_secret}")
    volume = secrets.get(migrate_secret)
    mount = mounts.get(volume) or {}
    if mount.get("mountPath") != MIGRATE_SECRETS or not mount.get("readOnly"):
        problems.append(f"{where}: {migrate_secret} is not mounted read-only at {MIGRATE_SECRETS}")
    if any(m["mountPath"] == RELAYS_SECRETS for m in mounts.values()):
        problems.append(f"{where}: the relays' {RELAYS_SECRETS} is mounted")
    if set(urls) != {"OUTBOX_RELAY_SOURCE_URL", "OUTBOX_RELAY_TARGET_URL"}:
        problems.append(f"{where}: the administrator's URLs are {sorted(urls)}, expected source and target")
    for key, url in urls.items():
        if f"password_file={MIGRATE_SECRETS}/" not in url:
            problems.append(f"{where}: {key} does not read its password from {MIGRATE_SECRETS}")
    text = yaml.safe_dump(pod)
    if container.get("envFrom") or "secretKeyRef" in text or f"{RELAYS_SECRETS}/" in text:
        problems.append(f"{where}: reaches the relays' credentials")
    if relays_secret and relays_secret in text:
        problems.append(f"{where}: names the relays' Secret {relays_secret}")


def main():
    variant, path = sys.argv[1], sys.argv[2]
    with open(path) as f:
        objects = [o for o in yaml.safe_load_all(f) if o]
    problems = []
    secret = SECRETS[variant]
    deployments = {}
    for obj in objects:
        if obj["kind"] == "Deployment":
            component = obj["metadata"]["labels"].get("app.kubernetes.io/component")
            deployments[component] = obj
    if set(deployments) != EXPECTED[variant]:
        problems.append(f"Deployments for {sorted(deployments)}, expected {sorted(EXPECTED[variant])}")
    for component, obj in deployments.items():
        where = name(obj)
        pod = obj["spec"]["template"]["spec"]
        selector = obj["spec"]["selector"]["matchLabels"]
        labels = obj["spec"]["template"]["metadata"]["labels"]
        if any(labels.get(k) != v for k, v in selector.items()):
            problems.append(f"{where}: the selector does not match the pod's labels")
        (container,) = pod["containers"]
        if container["args"][0] != component:
            problems.append(f"{where}: runs {container['args'][0]!r}, not {component!r}")
        port = RELAYS[component]
        ports = {p["name"]: p["containerPort"] for p in container.get("ports") or []}
        if ports.get("metrics") != port:
            problems.append(f"{where}: the metrics port is {ports.get('metrics')}, not {port}")
        env = {e["name"]: e.get("value") for e in container.get("env") or []}
        if env.get("OUTBOX_RELAY_METRICS_ADDR") != f"0.0.0.0:{port}":
            problems.append(f"{where}: /metrics, /healthz and /readyz are not served on the pod's address")
        for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", READINESS[component])):
            get = (container.get(probe) or {}).get("httpGet") or {}
            if get.get("path") != path or get.get("port") not in ("metrics", port):
                problems.append(f"{where}: {probe} is not an HTTP GET of {path} on the metrics port")
        if pod.get("terminationGracePeriodSeconds", 30) < 30:
            problems.append(f"{where}: less than 30 s to commit and confirm on SIGTERM")
        check_pod(problems, where, pod, container, secret)
    if variant == "all" and "connector" in deployments:
        args = deployments["connector"]["spec"]["template"]["spec"]["containers"][0]["args"]
        if args[1:] != ["--batch-size", "1000"]:
            problems.append(f"connector: extra args {args[1:]}, expected --batch-size 1000")
    services = [o for o in objects if o["kind"] == "Service"]
    for component in deployments:
        matching = [s for s in services if s["spec"]["selector"].get("app.kubernetes.io/component") == component]
        if len(matching) != 1:
            problems.append(f"{component}: {len(matching)} metrics Services, expected 1")
        elif not matching[0]["spec"].get("publishNotReadyAddresses"):
            problems.append(f"{name(matching[0])}: standbys (not ready) would not be scraped")
    monitors = [o for o in objects if o["kind"] == "ServiceMonitor"]
    if len(monitors) != (1 if variant == "all" else 0):
        problems.append(f"{len(monitors)} ServiceMonitors with the {variant} values")
    jobs = [o for o in objects if o["kind"] == "Job"]
    migrate = MIGRATE_ARGS[variant]
    if len(jobs) != 1 or jobs[0]["spec"]["template"]["spec"]["containers"][0]["args"] != migrate:
        problems.append(f"no migrate Job running {' '.join(migrate)}")
    else:
        job = jobs[0]
        hook = job["metadata"].get("annotations", {}).get("helm.sh/hook", "")
        if "pre-install" not in hook or "pre-upgrade" not in hook:
            problems.append(f"{name(job)}: not a pre-install and pre-upgrade hook")
        pod = job["spec"]["template"]["spec"]
        migrate_secret = MIGRATE_SECRET.get(variant)
        check_pod(problems, name(job), pod, pod["containers"][0], None if migrate_secret else secret)
        check_migrate_credentials(problems, name(job), pod, migrate_secret, secret)
        config = pod["volumes"][0]["configMap"]["name"]
        hooked = [o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == config]
        if not hooked or "helm.sh/hook" not in hooked[0]["metadata"].get("annotations", {}):
            problems.append(f"{name(job)}: its relay.toml ({config}) is not a hook made before it")
        for obj in [job] + hooked[:1]:
            annotations = obj["metadata"].get("annotations", {})
            policy = {p.strip() for p in annotations.get("helm.sh/hook-delete-policy", "").split(",")}
            if policy != DELETE_POLICY:
                problems.append(f"{name(obj)}: hook-delete-policy {sorted(policy)}, expected {sorted(DELETE_POLICY)}")
    if problems:
        for p in problems:
            print(f"check-helm ({variant}): {p}", file=sys.stderr)
        sys.exit(1)
    print(f"check-helm ({variant}): {len(deployments)} Deployments, {len(services)} Services, "
          f"{len(monitors)} ServiceMonitors, {len(jobs)} Job: probes, security context, limits ok")


if __name__ == "__main__":
    main()
