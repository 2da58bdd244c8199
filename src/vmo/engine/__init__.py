"""VMO's embedded VM engine: what the node agent uses to run KubeVirt VMIs on this host.

The engine speaks the Kubernetes API only through its callers; it never imports the API server.
"""
