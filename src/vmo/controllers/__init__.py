"""VMO's own controllers: engine-agnostic, they speak only the Kubernetes API through
``vmo.client`` and run on ``vmo.runtime``, so each works unchanged against the embedded API
server and against a real cluster with KubeVirt. They never import ``vmo.engine`` or
``vmo.apiserver`` (an import-linter contract keeps it so).

``example`` shows the shape every controller here takes."""
