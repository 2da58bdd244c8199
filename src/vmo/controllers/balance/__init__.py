"""VMO's balancer: an explainable DRS that recommends live migrations across nodes."""
