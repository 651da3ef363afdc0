"""What is learned: task families, verifiers, streams and the general-capability suite."""

from tasks.base import Task
from tasks.registry import TASK_NAMES, build_task

__all__ = ["Task", "TASK_NAMES", "build_task"]
