"""Judges by name (one module above both the local judges and the rubric API judge, so neither
imports the other)."""

from __future__ import annotations

from .judges import GuardJudge, Judge, ModerationJudge, RefusalJudge
from .rubric import RubricJudge

JUDGES = ("refusal", "moderation", "guard", "rubric")


def make_judge(name: str, *, model=None, **kwargs) -> Judge:
    """A judge by name: "refusal" (no model), "moderation" / "guard" (``model``: name or path),
    "rubric" (``model``: the API's model name; see RubricJudge for the other arguments)."""
    if name == "refusal":
        return RefusalJudge(**kwargs)
    if name in ("moderation", "guard"):
        if model is None:
            raise ValueError(f"the {name} judge needs a model (a Hugging Face name or path)")
        return (ModerationJudge if name == "moderation" else GuardJudge)(model, **kwargs)
    if name == "rubric":
        if model is None:
            raise ValueError("the rubric judge needs the API's model name")
        return RubricJudge(model=model, **kwargs)
    raise ValueError(f"judge must be one of {', '.join(JUDGES)}; got {name!r}")
