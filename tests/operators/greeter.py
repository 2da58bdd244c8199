"""A small kopf operator used by the tests: each Greeting gets a ConfigMap with its message."""

from __future__ import annotations

from typing import Any

import kopf
import kubernetes


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.persistence.finalizer = "greeter.vmo.dev/finalizer"
    settings.posting.enabled = True


@kopf.on.create("demo.vmo.dev", "v1", "greetings")
def greet(spec: dict[str, Any], name: str, namespace: str, body: Any, **_: Any) -> dict[str, str]:
    kubernetes.config.load_kube_config()
    core = kubernetes.client.CoreV1Api()
    configmap = {
        "metadata": {"name": f"greeting-{name}"},
        "data": {"message": f"Hello, {spec.get('who', 'world')}!"},
    }
    kopf.adopt(configmap, owner=body)
    core.create_namespaced_config_map(namespace, configmap)
    return {"configMap": f"greeting-{name}"}
