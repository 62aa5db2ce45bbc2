"""``tiermem demo``: a control plane, an agent and contrasting VMs on embedded defaults."""
