"""The node agent: virt-handler's and virt-launcher's roles for the VMIs of one node."""
