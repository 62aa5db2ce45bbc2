"""The simulation harness: the simulated kernel, workloads, traces, the page-content model and trace replay.

Not part of the production agent: the agent reaches the simulated kernel only
through ``tiermem.kernel.registry`` (imported lazily when a sim VM is created).
"""
