"""The job controller (``python -m rise.controller``): see ``rise.controller.loop``."""

from rise.controller.loop import Controller, TickReport, message_task, waiting_tasks

__all__ = ["Controller", "TickReport", "message_task", "waiting_tasks"]
