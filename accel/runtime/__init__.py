"""Core run-time services over a Context: collectives, process control, seeding, logging,
memory, profiling, launch settings and the XLA runtime. They import only the core
(context, world, mesh, errors) and each other; see docs/architecture.md."""
