"""Parallelism: one device mesh and one table of logical-axis rules.

mesh.py         the mesh from ICI/DCN degrees per axis (-1 fills), multi-slice
rules.py        the rules table, and the shardings of states and batches it gives
guard.py        start-up report of bytes per device; stops when the rules cannot be followed
distributed.py  jax.distributed.initialize from flags / environment / TPU VM; batch rows per process
topology.py     TPU pod topologies by Cloud name (v5p-128), as compile-only devices (libtpu)
memory.py       an analytic estimate of a train step's bytes per device
microbatches.py the one split of a batch into microbatches (accumulation, pipeline)
collectives.py  each collective's runs and bytes per step, from a compiled program's HLO
"""
