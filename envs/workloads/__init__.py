"""Agent-tree workloads: the data model, seeded generators, arrival processes and traces."""

from servegym.envs.workloads.job import Call, Job, JobValidationError, Output, Text, role_id
from servegym.envs.workloads.source import FixedJobs, JobSource

__all__ = ["Call", "FixedJobs", "Job", "JobSource", "JobValidationError", "Output", "Text", "role_id"]
