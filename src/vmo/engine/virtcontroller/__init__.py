"""The virt-controller role of the embedded engine: VirtualMachine -> VMI, and VMI placement."""
