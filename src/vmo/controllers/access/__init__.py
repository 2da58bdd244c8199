"""Per-VM access: VMAccessPolicy compiled into plain Kubernetes RBAC."""
