"""DiffusionX (edge previews while a person iterates on a prompt, a cloud refine of the last one), as
latentwire runs it: the multi-round prompt session (session.py), which `latentwire session` drives.
"""
from .session import PromptSession, Round, SessionError

__all__ = ["PromptSession", "Round", "SessionError"]
