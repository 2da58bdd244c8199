"""`kubectl create -f` and `kubectl apply -f`, validation on (the default), for every served kind.

kubectl leaves validation to the server when the kind's OpenAPI v3 PATCH operation lists the
``fieldValidation`` parameter, and sends ``fieldValidation=Strict``. The kinds without PATCH (the
reviews) it validates itself, against ``/openapi/v2``, which it reads only in protobuf: VMO once
answered that request with JSON, and every ``kubectl create -f`` of a review failed with "failed
to download openapi: proto: cannot parse invalid wire-format data".

The kinds come from the discovery document VMO serves. Each has a minimal valid manifest below;
each must be created, applied, and refused with an unknown field, the last proving that validation
really ran rather than being skipped.
"""

from __future__ import annotations

import json
from string import Template
from typing import Any

import pytest
import yaml

from tests.conftest import Api, Kubectl
from vmo.apiserver import discovery
from vmo.apiserver.registry import Registry
from vmo.apiserver.server import builtin_types

JSON = dict[str, Any]
DISCOVERY_V2 = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList"


def served_kinds(documents: list[JSON]) -> dict[tuple[str, str], list[str]]:
    """(apiVersion, kind) -> verbs, from aggregated discovery documents."""
    kinds: dict[tuple[str, str], list[str]] = {}
    for document in documents:
        for group in document["items"]:
            for version in group["versions"]:
                for resource in version["resources"]:
                    gvk = resource["responseKind"]
                    api_version = f"{gvk['group']}/{gvk['version']}".lstrip("/")
                    kinds[(api_version, gvk["kind"])] = resource["verbs"]
    return kinds


# What the server's /api and /apis answer (the live server is compared with it below).
_REGISTRY = Registry(builtin_types())
SERVED = served_kinds(
    [discovery.aggregated(_REGISTRY, core=core, extra={}) for core in (True, False)]
)

# $name and $ns are filled in per test. Reviews carry no name: upstream's need none.
_SAMPLES = """
apiVersion: v1
kind: ConfigMap
metadata: {name: $name, namespace: $ns}
data: {color: blue}
---
apiVersion: v1
kind: Endpoints
metadata: {name: $name, namespace: $ns}
subsets: [{addresses: [{ip: 10.0.0.1}], ports: [{port: 80}]}]
---
apiVersion: v1
kind: Event
metadata: {name: $name, namespace: $ns}
involvedObject: {kind: ConfigMap, name: $name, namespace: $ns}
reason: Tested
message: an event from the validation test
type: Normal
---
apiVersion: v1
kind: Namespace
metadata: {name: $name}
---
apiVersion: v1
kind: Node
metadata: {name: $name}
---
apiVersion: v1
kind: Secret
metadata: {name: $name, namespace: $ns}
stringData: {password: secret}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: $name, namespace: $ns}
---
apiVersion: v1
kind: Pod
metadata: {name: $name, namespace: $ns}
spec:
  containers: [{name: compute, image: example.com/app}]
---
apiVersion: v1
kind: Service
metadata: {name: $name, namespace: $ns}
spec:
  selector: {app: $name}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: $name, namespace: $ns}
spec:
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: 1Gi}}
---
apiVersion: v1
kind: PersistentVolume
metadata: {name: $name}
spec:
  capacity: {storage: 1Gi}
  accessModes: [ReadWriteOnce]
  csi: {driver: example.com/csi, volumeHandle: $name}
---
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata: {name: $name}
provisioner: example.com/csi
---
apiVersion: snapshot.storage.k8s.io/v1
kind: VolumeSnapshot
metadata: {name: $name, namespace: $ns}
spec:
  source: {persistentVolumeClaimName: $name}
---
apiVersion: snapshot.storage.k8s.io/v1
kind: VolumeSnapshotContent
metadata: {name: $name}
spec:
  deletionPolicy: Delete
  driver: example.com/csi
  source: {volumeHandle: $name}
  volumeSnapshotRef: {name: $name, namespace: $ns}
---
apiVersion: snapshot.storage.k8s.io/v1
kind: VolumeSnapshotClass
metadata: {name: $name}
driver: example.com/csi
deletionPolicy: Delete
---
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: gadgets.$name.example.com}
spec:
  group: $name.example.com
  scope: Namespaced
  names: {plural: gadgets, singular: gadget, kind: Gadget}
  versions:
    - name: v1
      served: true
      storage: true
      schema: {openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}}
---
apiVersion: authentication.k8s.io/v1
kind: SelfSubjectReview
---
apiVersion: authentication.k8s.io/v1
kind: TokenReview
spec: {token: not-a-token}
---
apiVersion: authorization.k8s.io/v1
kind: LocalSubjectAccessReview
metadata: {namespace: $ns}
spec:
  user: alice
  resourceAttributes: {namespace: $ns, verb: get, resource: configmaps}
---
apiVersion: authorization.k8s.io/v1
kind: SelfSubjectAccessReview
spec:
  resourceAttributes: {namespace: $ns, verb: get, resource: configmaps}
---
apiVersion: authorization.k8s.io/v1
kind: SelfSubjectRulesReview
spec: {namespace: $ns}
---
apiVersion: authorization.k8s.io/v1
kind: SubjectAccessReview
spec:
  user: alice
  nonResourceAttributes: {path: /healthz, verb: get}
---
apiVersion: backup.kubevirt.io/v1alpha1
kind: VirtualMachineBackupTracker
metadata: {name: $name, namespace: $ns}
spec:
  source: {apiGroup: kubevirt.io, kind: VirtualMachine, name: $name}
---
apiVersion: backup.kubevirt.io/v1alpha1
kind: VirtualMachineBackup
metadata: {name: $name, namespace: $ns}
spec:
  source: {apiGroup: kubevirt.io, kind: VirtualMachine, name: $name}
  pvcName: $name-backup
---
apiVersion: cdi.kubevirt.io/v1beta1
kind: DataSource
metadata: {name: $name, namespace: $ns}
spec:
  source:
    pvc: {name: $name, namespace: $ns}
---
apiVersion: cdi.kubevirt.io/v1beta1
kind: DataVolume
metadata: {name: $name, namespace: $ns}
spec:
  source: {blank: {}}
  storage:
    resources: {requests: {storage: 1Gi}}
---
apiVersion: clone.kubevirt.io/v1beta1
kind: VirtualMachineClone
metadata: {name: $name, namespace: $ns}
spec:
  source: {apiGroup: kubevirt.io, kind: VirtualMachine, name: $name}
  target: {apiGroup: kubevirt.io, kind: VirtualMachine, name: $name-clone}
---
apiVersion: coordination.k8s.io/v1
kind: Lease
metadata: {name: $name, namespace: $ns}
spec: {holderIdentity: $name, leaseDurationSeconds: 15}
---
apiVersion: export.kubevirt.io/v1
kind: VirtualMachineExport
metadata: {name: $name, namespace: $ns}
spec:
  source: {apiGroup: kubevirt.io, kind: VirtualMachine, name: $name}
---
apiVersion: instancetype.kubevirt.io/v1beta1
kind: VirtualMachineClusterInstancetype
metadata: {name: $name}
spec:
  cpu: {guest: 1}
  memory: {guest: 1Gi}
---
apiVersion: instancetype.kubevirt.io/v1beta1
kind: VirtualMachineClusterPreference
metadata: {name: $name}
spec:
  devices: {preferredDiskBus: virtio}
---
apiVersion: instancetype.kubevirt.io/v1beta1
kind: VirtualMachineInstancetype
metadata: {name: $name, namespace: $ns}
spec:
  cpu: {guest: 1}
  memory: {guest: 1Gi}
---
apiVersion: instancetype.kubevirt.io/v1beta1
kind: VirtualMachinePreference
metadata: {name: $name, namespace: $ns}
spec:
  devices: {preferredDiskBus: virtio}
---
apiVersion: k8s.cni.cncf.io/v1
kind: NetworkAttachmentDefinition
metadata: {name: $name, namespace: $ns}
spec:
  config: '{"cniVersion": "0.3.1", "name": "$name", "type": "bridge", "bridge": "br1"}'
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: $name, namespace: $ns}
spec:
  podSelector: {matchLabels: {app: $name}}
  ingress:
  - ports: [{port: 5432}]
---
apiVersion: k8s.cni.cncf.io/v1beta1
kind: MultiNetworkPolicy
metadata:
  name: $name
  namespace: $ns
  annotations: {k8s.v1.cni.cncf.io/policy-for: $name}
spec:
  podSelector: {}
---
apiVersion: kubevirt.io/v1
kind: KubeVirt
metadata: {name: $name, namespace: $ns}
spec: {}
---
apiVersion: kubevirt.io/v1
kind: VirtualMachineInstanceMigration
metadata: {name: $name, namespace: $ns}
spec: {vmiName: $name}
---
apiVersion: kubevirt.io/v1
kind: VirtualMachineInstancePreset
metadata: {name: $name, namespace: $ns}
spec:
  selector: {matchLabels: {app: $name}}
---
apiVersion: kubevirt.io/v1
kind: VirtualMachineInstanceReplicaSet
metadata: {name: $name, namespace: $ns}
spec:
  replicas: 1
  selector: {matchLabels: {app: $name}}
  template:
    metadata: {labels: {app: $name}}
    spec:
      domain: {memory: {guest: 128Mi}, devices: {}}
---
apiVersion: kubevirt.io/v1
kind: VirtualMachineInstance
metadata: {name: $name, namespace: $ns}
spec:
  domain: {memory: {guest: 128Mi}, devices: {}}
---
apiVersion: kubevirt.io/v1
kind: VirtualMachine
metadata: {name: $name, namespace: $ns}
spec:
  runStrategy: Halted
  template:
    spec:
      domain: {memory: {guest: 128Mi}, devices: {}}
---
apiVersion: migrations.kubevirt.io/v1alpha1
kind: MigrationPolicy
metadata: {name: $name}
spec:
  selectors:
    virtualMachineInstanceSelector: {workload: $name}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: $name}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: view}
subjects: [{kind: User, name: alice, apiGroup: rbac.authorization.k8s.io}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: $name}
rules: [{apiGroups: [""], resources: [configmaps], verbs: [get]}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: $name, namespace: $ns}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: view}
subjects: [{kind: User, name: alice, apiGroup: rbac.authorization.k8s.io}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: $name, namespace: $ns}
rules: [{apiGroups: [""], resources: [configmaps], verbs: [get]}]
---
apiVersion: snapshot.kubevirt.io/v1beta1
kind: VirtualMachineRestore
metadata: {name: $name, namespace: $ns}
spec:
  target: {apiGroup: kubevirt.io, kind: VirtualMachine, name: $name}
  virtualMachineSnapshotName: $name
---
apiVersion: snapshot.kubevirt.io/v1beta1
kind: VirtualMachineSnapshotContent
metadata: {name: $name, namespace: $ns}
spec:
  source: {}
---
apiVersion: snapshot.kubevirt.io/v1beta1
kind: VirtualMachineSnapshot
metadata: {name: $name, namespace: $ns}
spec:
  source: {apiGroup: kubevirt.io, kind: VirtualMachine, name: $name}
"""


def _by_kind(text: str) -> dict[tuple[str, str], str]:
    samples = {}
    for document in text.split("\n---\n"):
        head = yaml.safe_load(Template(document).safe_substitute(name="x", ns="x"))
        samples[(head["apiVersion"], head["kind"])] = document
    return samples


SAMPLES = _by_kind(_SAMPLES)

# Created with --dry-run=server: kinds that would start work on an engine (VMs, migrations,
# imports, snapshots, exports, backups) or change the whole cluster for other tests sharing the
# server (nodes, CRDs, cluster configuration, migration policies, cluster-wide bindings).
DRY_RUN = {
    "CustomResourceDefinition",
    "Node",
    "PersistentVolume",
    "StorageClass",
    "VolumeSnapshot",
    "VolumeSnapshotContent",
    "VolumeSnapshotClass",
    "ClusterRoleBinding",
    "KubeVirt",
    "MigrationPolicy",
    "DataVolume",
    "VirtualMachine",
    "VirtualMachineInstance",
    "VirtualMachineInstanceReplicaSet",
    "VirtualMachineInstanceMigration",
    "VirtualMachineExport",
    "VirtualMachineSnapshot",
    "VirtualMachineRestore",
    "VirtualMachineClone",
    "VirtualMachineBackup",
}
# Written only by the engine (virt-launcher Pods): past validation, admission refuses a user.
ENGINE_WRITTEN = {"Pod"}
# What must exist first, created for real: a migration's VMI, which must be running to be
# migrated. Without an engine nothing runs it, so its status (no subresource on a VMI, as
# upstream) says so by hand.
PREREQUISITES = {
    "VirtualMachineInstanceMigration": (
        ("kubevirt.io/v1", "VirtualMachineInstance"),
        {"status": {"phase": "Running"}},
    )
}


def refused_for_users(out: Any) -> bool:
    return (
        out.returncode != 0
        and "error validating" not in out.stderr
        and "only its engine writes them" in out.stderr
    )


def _create_only(key: tuple[str, str]) -> bool:
    return SERVED[key] == ["create"]


def _ids(key: tuple[str, str]) -> str:
    return f"{key[1]}.{key[0]}"


KINDS = pytest.mark.parametrize("key", sorted(SERVED), ids=_ids)


@pytest.fixture(scope="module")
def ns(api: Api) -> str:
    name = "kubectl-validation"
    response = api.post("/api/v1/namespaces", {"metadata": {"name": name}})
    assert response.status_code == 201, response.text
    return name


def manifest(key: tuple[str, str], name: str, ns: str, **extra: Any) -> str:
    assert key in SAMPLES, f"no minimal manifest for {_ids(key)}: add one to _SAMPLES"
    obj = yaml.safe_load(Template(SAMPLES[key]).substitute(name=name, ns=ns))
    return yaml.safe_dump({**obj, **extra})


def run(kubectl: Kubectl, verb: str, key: tuple[str, str], text: str) -> Any:
    dry_run = ["--dry-run=server"] if key[1] in DRY_RUN else []
    return kubectl(verb, "-f", "-", "-o", "json", *dry_run, input=text, check=False)


def prepare(kubectl: Kubectl, key: tuple[str, str], name: str, ns: str) -> None:
    if key[1] not in PREREQUISITES:
        return
    needed, status = PREREQUISITES[key[1]]
    created = json.loads(
        kubectl("create", "-f", "-", "-o", "json", input=manifest(needed, name, ns)).stdout
    )
    resource = f"{created['kind'].lower()}.{needed[0].split('/')[0]}/{name}"
    patch = ["--type=merge", "-p", json.dumps(status)]
    kubectl("patch", resource, "-n", ns, *patch)


# --------------------------------------------------------------------------- the kinds


def test_every_kind_the_live_server_serves_is_covered(api: Api) -> None:
    """The parameters come from VMO's discovery; the running server must serve no more, but
    for the kinds of CRDs that tests sharing the server have made."""
    documents = [
        api.get(path, headers={"Accept": DISCOVERY_V2}).json() for path in ("/api", "/apis")
    ]
    crds = api.get("/apis/apiextensions.k8s.io/v1/customresourcedefinitions").json()["items"]
    made = {
        (f"{crd['spec']['group']}/{version['name']}", crd["spec"]["names"]["kind"])
        for crd in crds
        for version in crd["spec"]["versions"]
    }
    live = served_kinds(documents)
    # metrics.k8s.io is read-only and computed (from Prometheus): nothing to create or validate
    computed = {key: verbs for key, verbs in live.items() if key[0] == "metrics.k8s.io/v1beta1"}
    assert computed == {
        ("metrics.k8s.io/v1beta1", "NodeMetrics"): ["get", "list"],
        ("metrics.k8s.io/v1beta1", "PodMetrics"): ["get", "list"],
    }
    assert set(live) - made - set(computed) == set(SERVED)
    assert set(SAMPLES) == set(SERVED)


def test_reviews_are_the_kinds_kubectl_validates_itself() -> None:
    """Pins which cases exercise the protobuf v2 document (no PATCH, so no fieldValidation)."""
    assert {key[1] for key in SERVED if _create_only(key)} == {
        "SelfSubjectReview",
        "TokenReview",
        "LocalSubjectAccessReview",
        "SelfSubjectAccessReview",
        "SelfSubjectRulesReview",
        "SubjectAccessReview",
    }


@KINDS
def test_create_passes_validation(
    kubectl: Kubectl, ns: str, unique: str, key: tuple[str, str]
) -> None:
    name = f"create-{unique}"
    prepare(kubectl, key, name, ns)
    text = manifest(key, name, ns)
    out = run(kubectl, "create", key, text)
    if key[1] in ENGINE_WRITTEN:
        assert refused_for_users(out), out.stderr
        return
    assert out.returncode == 0, out.stderr
    answer = json.loads(out.stdout)
    assert (answer["apiVersion"], answer["kind"]) == key
    if _create_only(key):
        assert "status" in answer, "a review is answered, not stored"
    else:
        assert answer["metadata"]["name"] == yaml.safe_load(text)["metadata"]["name"]


@KINDS
def test_apply_passes_validation(
    kubectl: Kubectl, ns: str, unique: str, key: tuple[str, str]
) -> None:
    name = f"apply-{unique}"
    prepare(kubectl, key, name, ns)
    out = run(kubectl, "apply", key, manifest(key, name, ns))
    if _create_only(key):
        # Past validation, apply reads the live object first; reviews have none to read, so
        # apply fails there, as against kube-apiserver.
        assert out.returncode != 0
        assert "error validating" not in out.stderr
        assert "error when retrieving current configuration" in out.stderr
        return
    if key[1] in ENGINE_WRITTEN:
        assert refused_for_users(out), out.stderr
        return
    assert out.returncode == 0, out.stderr
    assert (json.loads(out.stdout)["kind"]) == key[1]


@KINDS
def test_unknown_field_is_refused(
    kubectl: Kubectl, ns: str, unique: str, key: tuple[str, str]
) -> None:
    """Validation really runs: on the server (Strict) or, for reviews, in kubectl itself."""
    name = f"bogus-{unique}"
    prepare(kubectl, key, name, ns)
    out = run(kubectl, "create", key, manifest(key, name, ns, bogusField=1))
    assert out.returncode != 0, out.stdout
    assert 'unknown field "bogusField"' in out.stderr
    where = "error validating data" if _create_only(key) else "strict decoding error"
    assert where in out.stderr
