"""The job side: the machinery a training job runs on a compute node; see docs/ARCHITECTURE.md."""
