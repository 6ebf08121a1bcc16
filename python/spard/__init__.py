"""SPARD: safety-projected fine-tuning (SPAG) with relevance-diversity safety data (RD-DPP)."""

__version__ = "0.1.0"
