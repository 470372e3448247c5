"""The login side: what runs on a login node before and around SLURM jobs; see docs/ARCHITECTURE.md."""
